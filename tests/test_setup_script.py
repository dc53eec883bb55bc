"""scripts/setup.sh installs the torch build the user chose: TORCH_INDEX_URL names the index of torch alone."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_torch_index_url_takes_torch_alone_from_that_index(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    for name in ("setup.cfg", "pyproject.toml"):
        (tmp_path / name).write_text("")
    python = tmp_path / ".venv" / "bin" / "python"  # stands in for the environment's python: it notes its arguments
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path / "calls.log"}\n')
    python.chmod(0o755)
    cpu = "https://download.pytorch.org/whl/cpu"
    subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh")], check=True, timeout=60,
                   env={**os.environ, "TORCH_INDEX_URL": cpu})
    installs = [line for line in (tmp_path / "calls.log").read_text().splitlines() if " install " in line]
    assert installs[1] == f"-m pip install --quiet --index-url {cpu} torch==2.13.0"
    assert installs[2] == '-m pip install --quiet -e .[dev]'  # the package and its dependencies: pip's own indexes
