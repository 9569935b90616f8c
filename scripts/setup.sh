#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install attnlens into it.
# torch==2.13.0 is installed first: it is the CPU build, and an unpinned torch resolved first
# would pull several GB of CUDA packages. Re-runs are quick: nothing is reinstalled unless
# pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-test}
stamp=".venv/.attnlens-setup-$extras"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
echo "setting up .venv (first run only: ~1 minute)" >&2
python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' >&2 || true
python -m pip install -q --disable-pip-version-check -e ".[$extras]" 2>&1 | grep -v '^WARNING: Location' >&2 || true
python -c "import torch, attnlens" || { echo "torch==2.13.0 or attnlens failed to install" >&2; exit 1; }
echo "$want" > "$stamp"
