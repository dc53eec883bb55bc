#!/usr/bin/env bash
# Create .venv (if missing) and install CPU PyTorch 2.13.0, then etegrec with its dev extra.
# torch goes first so that the package's `torch>=2.3` is already satisfied and pip pulls no other build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.etegrec-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet torch==2.13.0
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  touch "$stamp"
fi
