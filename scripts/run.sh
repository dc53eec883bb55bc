#!/usr/bin/env bash
# Set up, then run the main job: the whole ETEGRec pipeline on ml-100k (extra arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m etegrec.training.joint "$@"
