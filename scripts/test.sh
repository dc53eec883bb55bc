#!/usr/bin/env bash
# Set up, then run the test suite (strict signal dispatch: a failing subscriber fails the test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export ETEGREC_STRICT_SIGNALS=1 WANDB_MODE=offline WANDB_SILENT=true
exec .venv/bin/python -m pytest -q "$@"
