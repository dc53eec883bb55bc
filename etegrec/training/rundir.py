"""A run directory: its paths, atomic writes, checkpoints, metrics and item codes.

Layout (SPEC §5): ``config.yaml``, ``events.jsonl``, ``wandb/``, ``tensorboard/`` (with
``--log-with tensorboard``), ``checkpoints/``, ``metrics.json`` and ``item_codes.tsv``. Only the
main rank writes into it.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from etegrec.config import Config, ConfigError

from .item_codes import format_item_codes
from .resume import rng_state

__all__ = ["RunDir", "atomic_write_bytes", "atomic_write_text", "check_writable", "default_run_dir", "hold_run_dir"]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename: never a torn file.

    The file gets the mode the umask gives a new file (0644 under umask 022), as ``open()`` would.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode a plain open() gives
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def default_run_dir(stage: str, config: Config, *, create: bool = True) -> Path:
    """A new run directory ``runs/<stage>-<dataset>-<time>``, created exclusively: when another run
    took that name (started in the same second), ``-2``, ``-3``, ... is appended. ``create=False``
    only names it (the other ranks of a launch, which write nothing)."""
    base = Path("runs") / f"{stage}-{config.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not create:
        return base
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


_HELD: dict[Path, int] = {}  # run directories this process holds: their lock files' descriptors


def hold_run_dir(path: str | Path) -> None:
    """Hold ``path/.lock`` (an exclusive ``flock``) for as long as this process lives.

    Idempotent within a process. The lock goes with the process, however it ends (a SIGKILL too).

    Raises:
        ConfigError: another live process holds it, named by its pid.
    """
    import fcntl

    path = Path(path).resolve()
    if path in _HELD:
        return
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"run directory {str(path)!r} is in use by another live run (pid {holder}); wait for it "
                          "to end or choose another --output-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[path] = fd


def check_writable(path: str | Path, what: str) -> Path:
    """Create the directory ``path`` (and its parents) and check a file can be written in it.

    Raises:
        ConfigError: it cannot be created or written (a file in the way, no permission, read-only),
            naming ``what`` (the option or variable that chose it) and the path.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{what} {str(path)!r} cannot be used as a directory to write into ({reason}"
                          f"{': ' + repr(exc.filename) if exc.filename and str(exc.filename) != str(path) else ''}); "
                          f"choose another {what}") from None
    return path


class RunDir:
    """The files of one stage's run; every write is atomic and happens on the main rank only."""

    def __init__(self, path: str | Path, *, stage: str, is_main: bool) -> None:
        self.path, self.stage, self.is_main = Path(path), stage, is_main

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.pt"

    def open(self, config: Config) -> None:
        """Create and hold the directory (two live runs never share one), then write ``config.yaml``."""
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            hold_run_dir(self.path)  # before anything is written
            atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """A checkpoint of this stage (for ``--resume``).

        Raises:
            ConfigError: unreadable, or not a resumable checkpoint of this stage.
        """
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ConfigError(f"--resume: {str(path)!r} could not be read ({exc})") from None
        if state.get("stage") != self.stage or "position" not in state:
            raise ConfigError(f"--resume: {str(path)!r} is not a resumable {self.stage} checkpoint")
        return state

    def save_checkpoint(self, state: dict[str, Any], name: str) -> Path | None:
        """Write ``checkpoints/<name>.pt`` with the stage's name and the random generators' states."""
        if not self.is_main:
            return None
        path = self.checkpoint_dir / f"{name}.pt"
        buffer = io.BytesIO()
        torch.save({"stage": self.stage, "rng": rng_state(), **state}, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def write_item_codes(self, codes: np.ndarray, item_ids: Sequence[str]) -> Path | None:
        """``item_codes.tsv`` (:mod:`.item_codes`): one row per item, its raw id (as the data spells
        it), its RQ codes ``c0 ..`` and its suffix token; ``codes`` is ``[n_items, L + 1]`` (row i = item i + 1)."""
        if not self.is_main:
            return None
        path = self.path / "item_codes.tsv"
        atomic_write_text(path, format_item_codes(codes, item_ids))
        return path

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """``metrics.json`` (stage, valid, test, ...)."""
        if self.is_main:
            atomic_write_text(self.path / "metrics.json", json.dumps({"stage": self.stage, **metrics}, indent=2))
