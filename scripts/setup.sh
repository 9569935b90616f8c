#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install attnlens into it.
# torch==2.13.0 is installed first: it is the CPU build, and an unpinned torch resolved first
# would pull several GB of CUDA packages. Re-runs are quick: nothing is reinstalled unless
# pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-test,hf,browser}
stamp=".venv/.attnlens-setup-${extras//,/-}"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
echo "setting up .venv (first run only: ~1 minute)" >&2
# pip's own errors stay visible and fail the script; only the harmless local-index warnings are dropped
# torch stays at the CPU build whatever a dependency asks for
constraints=$(mktemp); trap 'rm -f "$constraints"' EXIT; echo "torch==2.13.0" > "$constraints"
pipq() { python -m pip install -q --disable-pip-version-check -c "$constraints" "$@" 2> >(grep -v '^WARNING: Location' >&2); }
pipq --upgrade pip
pipq "torch==2.13.0"
pipq -e ".[$extras]"
python -c "import torch, attnlens" || { echo "torch==2.13.0 or attnlens failed to install" >&2; exit 1; }
echo "$want" > "$stamp"
