"""What every stage needs around its training loop: the Accelerator, the run directory, the
subscribers and Ctrl-C.

A :class:`Run` receives its :class:`~etegrec.training.run.options.RunOptions` already resolved and
sends no signal itself: the trainer owns its events (see :func:`~etegrec.training.run.fit.fit_stage`).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from etegrec.config import Config, ConfigError
from etegrec.hooks import ConsoleSubscriber, EventLog, Subscriber

from .options import RunOptions
from .rundir import RunDir, default_run_dir
from ..stage import Stage

__all__ = ["Run", "check_world", "launch_rank", "prepare_process"]

# where launchers put the number of processes they started (torchrun; Open MPI, Intel MPI/MPICH, MVAPICH)
WORLD_SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")

# where launchers put this process's rank (torchrun, Accelerate; Open MPI, Intel MPI/MPICH, MVAPICH)
RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")

log = logging.getLogger(__name__)


def prepare_process(config: Config) -> None:
    """Seed every generator, set torch's thread count from ``run.num_threads`` (0 = torch's default)
    and, with ``run.deterministic``, torch's deterministic kernels.

    Without them a run on more than one thread is not repeatable: the backward of indexing a table with
    repeated rows (the code embeddings, the encoder states gathered per target) adds into the gradient
    from several threads at once, in whatever order they arrive, and the last digits differ from the
    first recommender epoch on; by the end of an ml-100k run one seed's test N@10 moved by up to 0.004.
    """
    from accelerate.utils import set_seed

    set_seed(config.run.seed)
    if config.run.num_threads:
        torch.set_num_threads(config.run.num_threads)
    if config.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to repeat itself
    # warn, not fail, on a GPU op that has no deterministic kernel
    torch.use_deterministic_algorithms(config.run.deterministic, warn_only=True)


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


class Run:
    """A stage's run: accelerator, run directory, subscribers and Ctrl-C.

    Use as a context manager around :func:`~etegrec.training.run.fit.fit_stage`: it writes
    ``config.yaml``, starts and connects the subscribers (event log and console on the main rank,
    the tracking subscriber on the main rank when a tracker is on, the user's subscribers on every
    rank unless they say ``main_process_only``) and finishes them, failed or not.

    Trackers: ``options.log_with``, for a ``tracked`` stage (under its declared project, run name and
    key map); ``"tensorboard"`` writes under ``run_dir/"tensorboard"``. A given ``accelerator`` is used
    as it is (the cached runs of the stages a command needs share its run's). The console numbers the
    stage within ``pipeline``, the stages of the command being run (by default the stage's own chain).

    Resuming (``options.resume``): ``resume_state`` holds ``checkpoints/last.pt`` (refused when
    ``data_digest`` differs from the one it was trained on); the event log is
    cut back to that checkpoint (see :meth:`EventLog.cut_back`); the W&B run with the same id goes on.

    Ctrl-C: the first one sets :attr:`stop_requested` (the loop writes a checkpoint after the step in
    progress and stops with :class:`KeyboardInterrupt`); a second one stops at once, and the user's
    subscribers get no further call (neither signals nor ``finish``: one may be what hangs).
    """

    def __init__(self, config: Config, options: RunOptions = RunOptions(), *, stage: Stage, tracked: bool = True,
                 accelerator=None, data_digest: str | None = None, pipeline: Sequence[Stage] = ()) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.config, self.options, self.stage = config, options, stage.name
        # a new default directory is made by the launch's first process only (the others write nothing)
        self.run_dir = options.output_dir or default_run_dir(stage.name, config, create=launch_rank() == 0)
        self.log_with = list(options.log_with) if tracked else []
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
        self.files = RunDir(self.run_dir, stage=stage.name, is_main=self.is_main)
        self.resume_state = self.files.load_checkpoint(self.files.last_checkpoint) if options.resume else None
        self.data_digest = data_digest  # of the prepared data it trains on: kept in checkpoints, checked on resume
        trained_on = (self.resume_state or {}).get("data_digest")
        if data_digest and trained_on and trained_on != data_digest:
            raise ConfigError(f"--resume: the data {config.data.data_path or config.data.dataset!r} changed since the run "
                              f"in {str(self.run_dir)!r} started (digest {data_digest}, it trained on {trained_on}); "
                              "resume with the data it was made with or start a new run")
        self.lengthened = list(options.lengthened)
        self.stop_requested = False
        self._previous_sigint = None
        self.subscribers: list[Subscriber] = []
        if self.is_main:
            self.event_log = EventLog(self.run_dir / "events.jsonl", rank=self.accelerator.process_index)
            self.subscribers.append(self.event_log)
            if options.console:
                self.subscribers.append(ConsoleSubscriber(pipeline=[s.name for s in pipeline or stage.chain]))
            if self.log_with:
                from etegrec.hooks.wandb import WandbSubscriber  # drives every tracker, W&B or not
                self.subscribers.append(WandbSubscriber(
                    accelerator=self.accelerator, project=stage.project, stage=stage.name, key_map=stage.key_map,
                    run_name=stage.run_name(config) or self.run_dir.name, config=config.to_dict(),
                    run_dir=self.run_dir, mode=options.wandb_mode, resume=options.resume))
        self.subscribers += [s for s in options.subscribers if self.is_main or not s.main_process_only]
        self.status = "completed"

    @property
    def checkpoint_dir(self) -> Path:
        return self.files.checkpoint_dir

    @property
    def resumed(self) -> bool:
        return self.resume_state is not None

    def _on_sigint(self, signum, frame) -> None:
        if self.stop_requested:  # the second Ctrl-C: stop now, and call none of the user's subscribers again
            self._drop_user_subscribers()  # (a hanging one may be why the first Ctrl-C did not stop the run)
            raise KeyboardInterrupt
        self.stop_requested = True
        if self.is_main:
            print("\n[etegrec] Ctrl-C: stopping after this step and writing a checkpoint "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def _drop_user_subscribers(self) -> None:
        dropped = [s for s in self.subscribers if s in self.options.subscribers]
        for sub in dropped:
            sub.disconnect()
        self.subscribers = [s for s in self.subscribers if s not in dropped]  # nor their finish
        if self.is_main and dropped:
            print("\n[etegrec] Ctrl-C again: stopping now, without calling your subscribers again",
                  file=sys.stderr, flush=True)

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
        self.files.open(self.config, fresh=not self.resumed)
        if self.is_main and self.resumed:
            self.event_log.cut_back(self.files.last_checkpoint.name, self.resume_state["epoch"])
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
        if exc_type is not None:
            self.status = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
        for sub in self.subscribers:
            sub.disconnect()
            try:
                sub.finish(self.status)
            except Exception:  # a subscriber's cleanup must not hide the run's own outcome
                log.exception("subscriber %s failed to finish", type(sub).__name__)
        if self._owns_accelerator:  # trackers are finished already (with their exit codes); this ends the rest
            self.accelerator.end_training()
        self.files.close()  # a run waiting for this stage's product goes on now, not when this command ends

    def started_payload(self, start_epoch: int = 0) -> dict[str, Any]:
        """The ``run_started`` payload: this run's config and processes (the trainer's loop sends it)."""
        return dict(stage=self.stage, config=self.config.to_dict(), run_dir=str(self.run_dir),
                    rank=self.accelerator.process_index, world_size=self.accelerator.num_processes,
                    resumed=self.resumed, start_epoch=start_epoch)

    def save_checkpoint(self, state: dict[str, Any], name: str) -> Path | None:
        """``checkpoints/<name>.pt`` on the main rank, after every rank got here."""
        self.accelerator.wait_for_everyone()
        return self.files.save_checkpoint({**state, "data_digest": self.data_digest} if self.data_digest else state, name)

    def write_item_codes(self, codes, item_ids) -> Path | None:
        return self.files.write_item_codes(codes, item_ids)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        self.files.write_metrics(metrics)
