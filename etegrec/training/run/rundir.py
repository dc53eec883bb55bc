"""A run directory: its paths, atomic writes, checkpoints, metrics and item codes.

Layout (SPEC §5): ``config.yaml``, ``events.jsonl``, ``wandb/``, ``tensorboard/`` (with
``--log-with tensorboard``), ``checkpoints/``, ``metrics.json`` and ``item_codes.tsv``. Only the
main rank writes into it.
"""
from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from etegrec.config import Config, ConfigError
from etegrec.hooks.eventlog import set_aside

from .atomic import atomic_write_bytes, atomic_write_text, umask
from .checkpoint import read_checkpoint, write_checkpoint
from .item_codes import format_item_codes
from .resume import absolute_data_path, rng_state

__all__ = ["RunDir", "atomic_write_bytes", "atomic_write_text", "check_writable", "default_run_dir", "hold_run_dir",
           "release_run_dir", "wait_while_held"]

log = logging.getLogger(__name__)


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
    """Hold ``path/.lock`` (an exclusive ``flock``) until :func:`release_run_dir` or the end of this process.

    Idempotent within a process. The lock goes with the process, however it ends (a SIGKILL too).

    Raises:
        ConfigError: another live process holds it, named by its pid.
    """
    import fcntl

    path = Path(path).resolve()
    if path in _HELD:
        return
    lock = path / ".lock"
    try:  # never through a link: a .lock linked to another file would have that file truncated and written
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666 & ~umask())
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{str(lock)!r} is a symbolic link (to {os.readlink(lock)!r}); a run never writes "
                              "through one: remove the link or choose another --output-dir") from None
        raise ConfigError(f"{str(lock)!r} cannot be opened as the run directory's lock ({exc.strerror}); remove it "
                          "or choose another --output-dir") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        raise ConfigError(f"{str(lock)!r} is not a plain file of its own (a hard link or a special file); a run "
                          "never writes into one: remove it or choose another --output-dir")
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
    _remove_stale_temps(path)


def release_run_dir(path: str | Path) -> None:
    """Let go of ``path/.lock`` if this process holds it: a run that needs the directory's product (a cached
    stage this process has finished) stops waiting now, not when this whole command ends."""
    fd = _HELD.pop(Path(path).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock; the file stays for the next holder


def wait_while_held(path: str | Path, on_wait: Callable[[str], None]) -> None:
    """Block while another live process holds ``path/.lock``.

    ``on_wait(pid)`` is called once, before waiting, with the holder's pid. Nothing is waited for when
    there is no lock file, when it is not a plain file, or when this process holds it itself.
    """
    import fcntl

    path = Path(path).resolve()
    lock = path / ".lock"
    if path in _HELD or lock.is_symlink() or not lock.is_file():
        return
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return  # whoever opens it to write will say what is wrong with it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait(os.read(fd, 32).decode(errors="replace").strip() or "?")
            fcntl.flock(fd, fcntl.LOCK_SH)  # until the holder ends, however it ends
    finally:
        os.close(fd)  # releases the shared lock too


def _remove_stale_temps(path: Path) -> None:
    """Remove what atomic writes killed midway left behind (``.last.pt.*.tmp``, ...): every writer into a
    run directory holds its lock, so once this process holds it their writers are dead."""
    for folder in (path, path / "checkpoints"):
        for tmp in folder.glob(".*.*.tmp"):
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)


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

    def open(self, config: Config, *, fresh: bool = True) -> None:
        """Create and hold the directory (two live runs never share one), then write ``config.yaml``.

        ``fresh`` (not a resume): the records of an earlier run that stopped before its first checkpoint
        (there is nothing to resume) are moved aside first, so the new run neither appends to its event
        log nor overwrites its config unseen; a warning line says so.
        """
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            hold_run_dir(self.path)  # before anything is written
            if fresh:
                self._move_aside_records()
            atomic_write_text(self.path / "config.yaml", yaml.safe_dump(absolute_data_path(config.to_dict()), sort_keys=False))

    def close(self) -> None:
        """Let go of the directory once the run has written its last file."""
        if self.is_main:
            release_run_dir(self.path)

    def _move_aside_records(self) -> None:
        events, config = self.path / "events.jsonl", self.path / "config.yaml"
        if not events.exists() or self.last_checkpoint.exists():  # no run here, or one to resume (refused before)
            return
        moved = [set_aside(events).name]
        if config.exists():
            config.replace(config.with_name("config.superseded.yaml"))
            moved.append("config.superseded.yaml")
        log.warning("%s held the records of a run that stopped before its first checkpoint (nothing to resume); "
                    "moved them aside to %s", self.path, " and ".join(moved))

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """A resumable checkpoint of this stage (for ``--resume``), in today's layout.

        Raises:
            CheckpointError: unreadable, unsafe, or not a resumable checkpoint of this stage.
        """
        return read_checkpoint(path, stage=self.stage, resumable=True, what="--resume")

    def load_best(self) -> dict[str, Any]:
        """``checkpoints/best.pt`` of this stage (CheckpointError when it cannot be used)."""
        return read_checkpoint(self.checkpoint_dir / "best.pt", stage=self.stage)

    def save_checkpoint(self, state: dict[str, Any], name: str) -> Path | None:
        """Write ``checkpoints/<name>.pt`` with the stage's name and the random generators' states."""
        if not self.is_main:
            return None
        return write_checkpoint(self.checkpoint_dir / f"{name}.pt", {"stage": self.stage, "rng": rng_state(), **state})

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
