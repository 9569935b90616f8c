#!/usr/bin/env bash
# Run an attnlens command in the project's virtual environment (created on first use), e.g.
#   bash scripts/run.sh walkthrough
# Only the setup runs in the repository: attnlens runs in the caller's folder, so relative paths
# (--out, --png, --model) are the caller's.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/attnlens" "$@"
