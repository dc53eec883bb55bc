"""What every stage needs around its training loop: the run directory, the Accelerator, the
subscribers and atomic writes.

Layout of a run directory (SPEC §5): ``config.yaml``, ``events.jsonl``, ``wandb/``,
``tensorboard/`` (with ``--log-with tensorboard``), ``checkpoints/`` and ``metrics.json``. Only the
main rank writes into it.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from etegrec import signals
from etegrec.config import Config, ConfigError
from etegrec.hooks import ConsoleSubscriber, EventLog, Subscriber, resolve_subscriber
from etegrec.hooks.eventlog import read_events
from etegrec.hooks.wandb import resolve_mode

__all__ = ["Run", "atomic_write_bytes", "atomic_write_text", "check_resume_config", "check_world", "check_trackers", "check_writable",
           "default_run_dir", "hold_run_dir", "launch_rank", "prepare_process", "resume_checkpoint", "rng_state", "set_rng_state"]

# where launchers put the number of processes they started (torchrun; Open MPI, Intel MPI/MPICH, MVAPICH)
WORLD_SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")

# where launchers put this process's rank (torchrun, Accelerate; Open MPI, Intel MPI/MPICH, MVAPICH)
RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")

# config sections a resumed run may change: how it runs, not what it trains
RESUMABLE_CHANGES = ("run.name", "run.num_threads", "run.log_every")
# keys a resumed run may raise (never lower): they only lengthen training, so a finished run goes on
LENGTHENING_KEYS = ("joint.epochs", "joint.finetune_epochs")

log = logging.getLogger(__name__)


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


def prepare_process(config: Config) -> None:
    """Seed every generator and set torch's thread count from ``run.num_threads`` (0 = torch's default)."""
    from accelerate.utils import set_seed

    set_seed(config.run.seed)
    if config.run.num_threads:
        torch.set_num_threads(config.run.num_threads)


def rng_state() -> dict[str, Any]:
    """Every random generator's state (Python, NumPy's global, torch CPU and CUDA), for a checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back the generators saved by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts (ignoring :data:`RESUMABLE_CHANGES`).

    A key the saved config lacks (a run from before the key existed) counts as unchanged when the
    current value is the key's default: that is what the old run trained with.
    """
    defaults = Config().to_dict()
    changed = []
    for section in sorted(set(saved) | set(current)):
        old, new = saved.get(section) or {}, current.get(section) or {}
        for name in sorted(set(old) | set(new)):
            key = f"{section}.{name}"
            if name not in old and new.get(name) == (defaults.get(section) or {}).get(name):
                continue
            if key in RESUMABLE_CHANGES or old.get(name) == new.get(name):
                continue
            if key in LENGTHENING_KEYS and isinstance(old.get(name), int) and new.get(name) > old[name]:
                continue  # see lengthened_keys
            changed.append(f"{key} ({old.get(name)!r} -> {new.get(name)!r})")
    return changed


def lengthened_keys(run_dir: str | Path, config: Config) -> list[str]:
    """The :data:`LENGTHENING_KEYS` that ``config`` raises above the run's ``config.yaml``."""
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.exists():
        return []
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    current = config.to_dict()
    out = []
    for key in LENGTHENING_KEYS:
        section, name = key.split(".")
        old, new = (saved.get(section) or {}).get(name), current[section][name]
        if isinstance(old, int) and new > old:
            out.append(key)
    return out


def resume_checkpoint(run_dir: str | Path) -> Path:
    """``run_dir/checkpoints/last.pt``, the checkpoint ``--resume`` continues from.

    Raises:
        ConfigError: it does not exist.
    """
    path = Path(run_dir) / "checkpoints" / "last.pt"
    if not path.exists():
        raise ConfigError(f"--resume: {str(path)!r} does not exist, so there is nothing to resume; "
                          "start without --resume")
    return path


def check_resume_config(run_dir: str | Path, config: Config) -> None:
    """Refuse to resume the run in ``run_dir`` with a config that changes what it trains.

    Raises:
        ConfigError: the keys that differ from the run's ``config.yaml``, with both values.
    """
    saved_path = Path(run_dir) / "config.yaml"
    if saved_path.exists():
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
        changes = _config_changes(saved, config.to_dict())
        if changes:
            raise ConfigError(f"--resume: the config differs from the run's {str(saved_path)!r} in "
                              f"{', '.join(changes)}; resume with the same config or start a new run")


def check_world(accelerator) -> None:
    """Stop a launch whose processes did not form one world, instead of training the same thing twice.

    A launcher sets ``WORLD_SIZE`` (``torchrun``, ``accelerate launch --multi_gpu``) or its MPI twin
    (``mpirun``, behind ``accelerate launch`` with a MULTI_CPU config); an accelerator that then
    sees a world of one means every process would train alone (e.g. ``Accelerator()`` without
    ``cpu=True`` on a machine without a GPU).

    Raises:
        ConfigError: ``WORLD_SIZE`` above one but a world of one process.
    """
    asked = max(int(os.environ.get(var) or 1) for var in WORLD_SIZE_VARS)
    if asked > 1 and accelerator.num_processes == 1:
        raise ConfigError(
            f"this launch asked for {asked} processes but the accelerator got a world of 1, so every process "
            "would train alone; launch with torchrun or accelerate launch with a MULTI_CPU/MULTI_GPU config")


def launch_rank() -> int:
    """This process's rank as the launcher set it (0 for a plain ``python`` start), before any
    process group exists."""
    return next((int(os.environ[var]) for var in RANK_VARS if os.environ.get(var)), 0)


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


def check_trackers(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple, once each, after checking each is an Accelerate tracker that is installed.

    Raises:
        ValueError: a name Accelerate does not know, or a tracker whose package is missing.
    """
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [t for t in LoggerType.list() if t != "all"]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise ValueError(f"unknown tracker {name!r} in log_with; use some of {', '.join(known)} (or none).")
        if name not in available:
            extra = " (pip install 'etegrec[tensorboard]')" if name == "tensorboard" else ""
            raise ValueError(f"tracker {name!r} in log_with is not installed; install its package{extra} "
                             f"or log with another one.")
    return tuple(dict.fromkeys(names))


class Run:
    """A stage's run: accelerator, run directory, subscribers, checkpoints and final metrics.

    Use as a context manager around the stage's ``fit``: it writes ``config.yaml``, starts and
    connects the subscribers (event log and console on the main rank, the tracking subscriber on
    the main rank when at least one tracker is on, user subscribers on every rank unless they say
    ``main_process_only``) and finishes them, failed or not.

    Trackers: ``log_with`` names Accelerate trackers (``("wandb",)`` by default; ``"tensorboard"``
    writes under ``run_dir/"tensorboard"``). W&B is dropped from them when its mode is disabled or
    no ``wandb_project`` is given; ``wandb_project`` (or else the stage's name) is also the folder
    the other trackers log into. A given ``accelerator`` is used as it is: the subscriber then
    drives the trackers it was built with (the cached embed and tokenizer runs share the joint
    run's accelerator, and with no ``wandb_project`` and the default ``log_with`` they track nothing).

    Resuming (``resume=True``): ``resume_state`` holds ``checkpoints/last.pt`` for the trainer to
    continue from; the event log is cut back to that checkpoint (records of work after it, which is
    done again, move to ``events.superseded.jsonl``); the W&B run with the same id continues. A
    run directory that already holds a checkpoint is refused without ``resume``, so a typo in
    ``--output-dir`` never overwrites a run.

    Ctrl-C: the first one sets :attr:`stop_requested` (trainers write a checkpoint after the step in
    progress and stop with :class:`KeyboardInterrupt`); a second one stops at once.

    Raises:
        ValueError: ``log_with`` names an unknown or uninstalled tracker (see :func:`check_trackers`).
        ConfigError: ``resume`` without a checkpoint to resume, or with a config that changed what
            is trained; a run directory that holds a checkpoint, without ``resume``.
    """

    def __init__(self, config: Config, *, stage: str, output_dir: str | Path | None = None,
                 wandb_mode: str | None = None, wandb_project: str | None = None,
                 wandb_run_name: str | None = None, log_with: Sequence[str] = ("wandb",),
                 subscribers: list[str] | tuple[str, ...] = (),
                 extra_subscribers: list[Subscriber] | tuple[Subscriber, ...] = (),
                 console: bool = True, accelerator=None, resume: bool = False) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.config = config
        self.stage = stage
        # a new default directory is made by the launch's first process only (the others write nothing)
        self.run_dir = Path(output_dir) if output_dir else default_run_dir(stage, config, create=launch_rank() == 0)
        self.wandb_mode = resolve_mode(wandb_mode) if wandb_project else "disabled"
        self.log_with = [name for name in check_trackers(log_with)
                         if name != "wandb" or self.wandb_mode != "disabled"]
        self._owns_accelerator = accelerator is None
        # cpu=True without a GPU: otherwise torchrun's CPU processes each see a world of one
        try:
            self.accelerator = accelerator or Accelerator(
                cpu=not torch.cuda.is_available(), log_with=self.log_with or None,
                project_config=ProjectConfiguration(project_dir=str(self.run_dir),
                                                    logging_dir=str(self.run_dir / "tensorboard")))
        except ValueError as exc:  # a half-set launch environment (WORLD_SIZE without MASTER_ADDR, ...)
            raise ConfigError(f"the processes of this launch could not be set up: {exc}; start it with torchrun "
                              "or accelerate launch, or with plain python for one process") from None
        check_world(self.accelerator)
        self.is_main = self.accelerator.is_main_process
        self.resume_state = self._load_resume_state() if resume else None
        # a finished or stopped run resumed with more epochs (joint.epochs, joint.finetune_epochs)
        self.lengthened = lengthened_keys(self.run_dir, config) if resume else []
        if not resume and self.last_checkpoint.exists():
            raise ConfigError(f"run directory {str(self.run_dir)!r} already holds a run ({self.last_checkpoint.name} "
                              "in checkpoints/); pass --resume to continue it or choose another --output-dir")
        self.stop_requested = False
        self._previous_sigint = None
        self.subscribers: list[Subscriber] = []
        if self.is_main:
            self.subscribers.append(EventLog(self.run_dir / "events.jsonl", rank=self.accelerator.process_index))
            if console:
                self.subscribers.append(ConsoleSubscriber())
            if self.log_with:
                from etegrec.hooks.wandb import WandbSubscriber  # drives every tracker, W&B or not
                self.subscribers.append(WandbSubscriber(
                    accelerator=self.accelerator, project=wandb_project or stage, stage=stage,
                    run_name=wandb_run_name or config.run.name or self.run_dir.name, config=config.to_dict(),
                    run_dir=self.run_dir, mode=self.wandb_mode, resume=resume))
        user = [resolve_subscriber(spec) for spec in subscribers] + list(extra_subscribers)
        self.subscribers += [s for s in user if self.is_main or not s.main_process_only]
        self.status = "completed"
        self._start = time.perf_counter()

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.pt"

    @property
    def resumed(self) -> bool:
        return self.resume_state is not None

    def _load_resume_state(self) -> dict[str, Any]:
        resume_checkpoint(self.run_dir)
        check_resume_config(self.run_dir, self.config)
        try:
            state = torch.load(self.last_checkpoint, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ConfigError(f"--resume: {str(self.last_checkpoint)!r} could not be read ({exc})") from None
        if state.get("stage") != self.stage or "position" not in state:
            raise ConfigError(f"--resume: {str(self.last_checkpoint)!r} is not a resumable {self.stage} checkpoint")
        return state

    def _cut_event_log(self) -> None:
        """Drop the records written after the checkpoint being resumed (their work is done again).

        They are appended to ``events.superseded.jsonl``, not lost; ``run_started`` and
        ``run_finished`` records stay, so the log still shows every attempt.
        """
        path = self.run_dir / "events.jsonl"
        if not path.exists():
            return
        events = read_events(path)
        cut = next((i for i in range(len(events) - 1, -1, -1)
                    if events[i].get("signal") == "checkpoint_saved" and events[i].get("is_best") is False
                    and Path(events[i].get("path", "")).name == self.last_checkpoint.name
                    and events[i].get("epoch") == self.resume_state["epoch"]), None)
        if cut is None:
            log.warning("%s has no checkpoint_saved record of epoch %s; the event log is kept as it is",
                        path, self.resume_state["epoch"])
            return
        kept = events[:cut + 1] + [e for e in events[cut + 1:] if e.get("signal") in ("run_started", "run_finished")]
        dropped = [e for e in events[cut + 1:] if e.get("signal") not in ("run_started", "run_finished")]
        if dropped:
            with open(self.run_dir / "events.superseded.jsonl", "a", encoding="utf-8") as f:
                f.writelines(json.dumps(e, separators=(",", ":")) + "\n" for e in dropped)
        atomic_write_text(path, "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in kept))

    def _on_sigint(self, signum, frame) -> None:
        if self.stop_requested:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True
        if self.is_main:
            print("\n[etegrec] Ctrl-C: stopping after this step and writing a checkpoint "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def step_stop(self) -> Callable[[], bool] | None:
        """What ``train_epoch`` asks after every step: Ctrl-C stops mid-epoch on one process only.

        With several processes the ranks must stop at the same step, which would cost a collective
        per step; they stop together at the end of the epoch instead (:meth:`should_stop`).
        """
        return (lambda: self.stop_requested) if self.accelerator.num_processes == 1 else None

    def should_stop(self) -> bool:
        """Whether Ctrl-C was pressed on any process; a collective: call it on every rank at the same point."""
        stop = self.stop_requested
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(stop)], device=self.accelerator.device)
            stop = bool(self.accelerator.reduce(flag, reduction="sum").item())
        return stop

    def check_stop(self) -> None:
        """Between epochs: stop with :class:`KeyboardInterrupt` when Ctrl-C was pressed (the checkpoint is written)."""
        if self.should_stop():
            raise KeyboardInterrupt

    def __enter__(self) -> Run:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            hold_run_dir(self.run_dir)  # before anything is written: two live runs never share a directory
            if self.resumed:
                self._cut_event_log()
            atomic_write_text(self.run_dir / "config.yaml",
                              yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        for sub in self.subscribers:
            sub.start()
            sub.connect()
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.status = "interrupted"
        elif exc_type is not None:
            self.status = "failed"
        if exc_type is not None:  # the trainer could not say it; say it for it
            best = self.checkpoint_dir / "best.pt"
            signals.run_finished.send(self, stage=self.stage, status=self.status, best_metrics={},
                                      best_checkpoint=str(best) if best.exists() else None,
                                      seconds=time.perf_counter() - self._start)
        for sub in self.subscribers:
            sub.disconnect()
            try:
                sub.finish(self.status)
            except Exception:  # a subscriber's cleanup must not hide the run's own outcome
                log.exception("subscriber %s failed to finish", type(sub).__name__)
        if self._owns_accelerator:  # trackers are finished already (with their exit codes); this ends the rest
            self.accelerator.end_training()

    def announce_start(self, sender: Any, *, start_epoch: int = 0) -> None:
        """Emit ``run_started`` for ``sender`` (the trainer) with this run's config and processes."""
        signals.run_started.send(sender, stage=self.stage, config=self.config.to_dict(), run_dir=str(self.run_dir),
                                 rank=self.accelerator.process_index, world_size=self.accelerator.num_processes,
                                 resumed=self.resumed, start_epoch=start_epoch)

    def save_checkpoint(self, sender: Any, state: dict[str, Any], name: str, *, epoch: int,
                        is_best: bool = False) -> Path | None:
        """Write ``checkpoints/<name>.pt`` atomically on the main rank and emit ``checkpoint_saved``.

        The state is stored with the stage's name and the random generators' states (``rng``), so
        ``last.pt`` is all a resumed run needs.
        """
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return None
        path = self.checkpoint_dir / f"{name}.pt"
        buffer = io.BytesIO()
        torch.save({"stage": self.stage, "rng": rng_state(), **state}, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        signals.checkpoint_saved.send(sender, stage=self.stage, epoch=epoch, path=str(path), is_best=is_best)
        return path

    def write_item_codes(self, codes: np.ndarray, item_ids: Sequence[str]) -> Path | None:
        """Write ``item_codes.tsv`` atomically on the main rank: one row per item, its raw id (as the
        data spells it), its RQ codes ``c0 ..`` and its suffix token; ``codes`` is ``[n_items, L + 1]``
        (row i = item i + 1)."""
        if not self.is_main:
            return None
        codes = np.asarray(codes)
        if codes.shape[0] != len(item_ids):
            raise AssertionError(f"{codes.shape[0]} code rows for {len(item_ids)} items")
        header = "\t".join(["item_id", *(f"c{i}" for i in range(codes.shape[1] - 1)), "suffix"])
        rows = ("\t".join([item, *map(str, row)]) for item, row in zip(item_ids, codes.tolist()))
        path = self.run_dir / "item_codes.tsv"
        atomic_write_text(path, header + "\n" + "\n".join(rows) + "\n")
        return path

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """Write ``metrics.json`` (stage, valid, test, ...) atomically on the main rank."""
        if self.is_main:
            atomic_write_text(self.run_dir / "metrics.json", json.dumps({"stage": self.stage, **metrics}, indent=2))
