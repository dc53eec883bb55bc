#!/usr/bin/env bash
# Set up, then run the test suite (strict signal dispatch: a failing subscriber fails the test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two workers (pytest-xdist), one test file each at a time, one thread each: the suite's stages are
# tiny and single-threaded, so two files side by side use both cores without oversubscribing them.
export ETEGREC_STRICT_SIGNALS=1 WANDB_MODE=offline WANDB_SILENT=true OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
