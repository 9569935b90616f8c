#!/usr/bin/env bash
# Run an attnlens command in the project's virtual environment (created on first use), e.g.
#   bash scripts/run.sh walkthrough
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec attnlens "$@"
