"""Shared test setup: strict signals, an isolated data cache per test, and a small dataset.

Set at import so that subprocesses started by the tests inherit them too.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

os.environ["ETEGREC_STRICT_SIGNALS"] = "1"  # a raising subscriber fails the test instead of being logged
os.environ.setdefault("WANDB_MODE", "offline")  # nothing ever tries the network
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def etegrec_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the data cache at a fresh folder, never the user's real ``~/.cache/etegrec``."""
    home = tmp_path / "etegrec-home"
    monkeypatch.setenv("ETEGREC_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def wandb_env():
    """W&B without credentials, network or a mode from the environment: the mode a test passes wins."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_DISABLE_GIT", "true")
        for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_DIR"):
            mp.delenv(var, raising=False)
        yield


def write_synthetic_inter(path: Path) -> Path:
    """Write the deterministic synthetic RecBole ``.inter`` file to ``path`` (see ``inter_file``)."""
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(30):
        for k in range(6 + u % 5):
            item = (5 * u + 7 * k) % 12  # 7 is coprime to 12: a user's items are distinct
            rating = 1 + (u + k) % 5
            timestamp = 1_600_000_000 + 3_600 * k + 17 * u  # chronological within each user
            lines.append(f"u{u}\ti{item}\t{rating}\t{timestamp}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def inter_file(tmp_path: Path) -> Path:
    """A small RecBole atomic ``.inter`` file with timestamps, in chronological order per user.

    30 users (``u0``..``u29``, user u has 6 + u % 5 interactions), 12 items (``i0``..``i11``, each
    used at least 16 times), 240 interactions: everything survives the 5-core filter, giving
    240 - 3 * 30 = 150 training samples and 30 validation and test samples.
    """
    return write_synthetic_inter(tmp_path / "synthetic.inter")


def write_structured_inter(path: Path, n_users: int = 40, n_items: int = 48) -> Path:
    """Users walk through items in small strides, so sequences carry a learnable next-item signal."""
    import numpy as np

    rng = np.random.default_rng(0)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(n_users):
        item, stride = int(rng.integers(n_items)), 1 + u % 3
        for k in range(8 + u % 6):
            lines.append(f"u{u}\ti{item}\t4\t{1_000_000 + 60 * k + u}")
            item = (item + stride) % n_items
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_command(root: Path, stage: str, *args: str) -> Path:
    """Run ``python -m etegrec.training.<stage> --config tiny`` in this process on the structured walk
    ``root/walk.inter`` (written the first time), with ``$ETEGREC_HOME`` at ``root/home``; the command
    must succeed. Returns the data file."""
    import importlib

    inter = root / "walk.inter"
    if not inter.exists():
        write_structured_inter(inter)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ETEGREC_HOME", str(root / "home"))
        main = importlib.import_module(f"etegrec.training.{stage}").main
        assert main(["--config", "tiny", "--data-path", str(inter), *args]) == 0
    return inter


def run_while_embed_stage_held(argv: list[str], cmd: list[str], log: Path,
                               env: dict[str, str] | None = None) -> tuple[int, Path]:
    """Run ``cmd`` (its output into ``log``) while another command holds the cached item-embedding stage's
    folder for the config of ``argv`` (``$ETEGREC_HOME`` from ``env``), as a command training it does.
    Once ``cmd`` says it waits, the other command builds the stage and goes on living, as a command would
    that trains its own model next: ``cmd`` must end with 0 before it does. Returns the other command's
    pid and the stage's folder."""
    import subprocess
    import sys
    import time

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from accelerate import Accelerator; "
        "from etegrec.training.embed import EMBED; "
        "from etegrec.training.run.cache import load_stage_data, stage_dir; "
        "from etegrec.training.run.cli import common_parser, parse_stage_args; "
        "from etegrec.training.run.pipeline import ensure; "
        "from etegrec.training.run.rundir import hold_run_dir; "
        f"config = parse_stage_args(common_parser('x', 'x'), {argv!r}).config; "
        "data = load_stage_data(config); folder = stage_dir(config, EMBED, data); folder.mkdir(parents=True); "
        "hold_run_dir(folder); print(folder, flush=True); sys.stdin.readline(); "
        "ensure(EMBED, config, data, Accelerator(cpu=True)); print('built', flush=True); sys.stdin.readline()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    waiting = None
    try:
        folder = Path(holder.stdout.readline().strip())
        with open(log, "w") as out:
            waiting = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
            for _ in range(600):  # the waiting line comes once the data is read
                if "waiting for it to end" in log.read_text() or waiting.poll() is not None:
                    break
                time.sleep(0.1)
            assert waiting.poll() is None, log.read_text()  # not refused: it waits
            holder.stdin.write("go\n")
            holder.stdin.flush()
            assert "built" in (line.strip() for line in holder.stdout)  # (after the stage's own lines)
            assert waiting.wait(timeout=300) == 0, log.read_text()[-4000:]  # while the other command lives
            holder.stdin.close()
            assert holder.wait(timeout=120) == 0
    finally:
        for process in (holder, waiting):
            if process is not None and process.poll() is None:
                process.kill()
    return holder.pid, folder


def make_accelerator(**kwargs) -> Accelerator:
    """An Accelerator on the device a Run picks (the GPU when there is one).

    Accelerate's state is process-wide: on a GPU machine, once a test's Run has put it on CUDA,
    ``Accelerator(cpu=True)`` raises. Tests that build their own Accelerator use this instead.
    """
    return Accelerator(cpu=not torch.cuda.is_available(), **kwargs)


class _WritesMarker:
    """Pickled as a call of ``exec``: loading the pickle unsafely writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def write_crafted_checkpoint(path: Path, marker: Path, stage: str = "joint") -> None:
    """A ``.pt`` file shaped like a resumable checkpoint of ``stage`` whose pickle, loaded unsafely
    (``weights_only=False``), runs code that writes ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"stage": stage, "position": {"epoch": 1, "segment": 0, "index": 1}, "payload": _WritesMarker(marker)},
               path)


def cached_tokenizer_stage(data_file: Path) -> Path:
    """A stage cache (under ``$ETEGREC_HOME``) for ``data_file`` with the tiny config, as the command line
    names it: embeddings that fit, and a finished tokenizer stage; returns the path its ``best.pt`` goes to."""
    import numpy as np

    from etegrec.config import load_config
    from etegrec.data import dataset_name_of
    from etegrec.training.run.cache import load_stage_data, stage_dir
    from etegrec.training.embed import EMBED
    from etegrec.training.rqvae import RQVAE

    config = load_config("tiny", [f"data.data_path={data_file}", f"data.dataset={dataset_name_of(data_file)}"])
    data = load_stage_data(config)
    embed = stage_dir(config, EMBED, data)
    embed.mkdir(parents=True)
    np.save(embed / "embeddings.npy", np.zeros((data.n_items + 1, config.embed.hidden), dtype=np.float32))
    folder = stage_dir(config, RQVAE, data)
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "metrics.json").write_text("{}")
    return folder / "checkpoints" / "best.pt"


def load_benchmark(name: str):
    """The module ``benchmarks/<name>.py`` (benchmarks are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
