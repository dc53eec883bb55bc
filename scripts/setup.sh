#!/usr/bin/env bash
# Create .venv (if missing) and install PyTorch 2.13.0, then etegrec with its dev extra.
# torch goes first so that the package's `torch>=2.3` is already satisfied and pip pulls no other build.
# Which build of torch 2.13.0 is the one pip picks: a wheel pip is configured to find first (a local
# one), else PyPI's, which on Linux x86-64 is the CUDA build with its NVIDIA packages (several GB).
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes torch (only) from that index instead:
# the CPU build. The script ends by saying which build it installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.etegrec-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  touch "$stamp"
  .venv/bin/python -c 'import torch; cuda = torch.version.cuda
print(f"installed torch {torch.__version__}: " + (f"the CUDA {cuda} build" if cuda else "the CPU-only build"))'
fi
