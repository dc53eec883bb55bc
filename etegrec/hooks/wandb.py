"""The tracking subscriber: the bus, through every Accelerate tracker (W&B, TensorBoard, ...).

On each signal a row (:mod:`etegrec.hooks.wandb_rows`) goes to every tracker (a ``codebook_usage``
row with the next row of its epoch); W&B runs in a process of its own (:mod:`.wandb_process`), so
its ~0.7 ms of CPU a row is not taken from training. Three traps:

* Steps. W&B rows are logged *without* ``step=``: W&B's own step then only increases, while every
  row carries ``epoch``, declared the x-axis of every chart. With the epoch as ``step=``, W&B would
  silently drop a row whose step goes back (the test evaluation of the best epoch, after the last).
* Media. Histograms go to W&B only. Every other tracker gets the row's scalars with ``step=epoch``:
  those backends take scalars only and need an explicit step. (tensorboardX writes a key's
  characters outside ``[-/\\w.]`` as ``_``: ``eval/ndcg@10`` is ``eval/ndcg_10`` there.)
* Config. W&B stores the run config nested; the other trackers get it flattened (``flat_config``):
  TensorBoard's ``add_hparams`` takes flat primitive values only, a nested config breaks it.
"""
from __future__ import annotations

import functools
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .base import Subscriber
from .wandb_child import usage_histogram
from .wandb_mode import MODES, check_mode, resolve_mode
from .wandb_process import log_artifact_file, log_row, wandb_in_its_own_process
from .wandb_rows import (KeyMap, Row, best_metrics_row, codebook_usage_row, codes_assigned_row, flat_config,
                         merge_pending, probed_row)

__all__ = ["MODES", "KeyMap", "WandbSubscriber", "codes_assigned_row", "flat_config", "resolve_mode",
           "usage_histogram"]

log = logging.getLogger(__name__)


def on_main_process(method: Callable) -> Callable:
    """``method`` on the accelerator's main process only; elsewhere a call does nothing."""
    @functools.wraps(method)
    def on_main(self, *args: Any, **kwargs: Any) -> Any:
        return method(self, *args, **kwargs) if self.accelerator.is_main_process else None
    return on_main


class WandbSubscriber(Subscriber):
    """Logs the bus through ``accelerator``'s trackers, on the main process only.

    Construction only stores its arguments. Only payloads of this ``stage`` are logged, so an
    earlier stage run in the same process never lands in this run. The first error a tracker raises
    while logging is warned about once and stops the logging; training goes on.

    Args:
        accelerator: an ``accelerate.Accelerator`` with at least one tracker in ``log_with`` (and a
            ``project_dir`` for trackers that write files, such as TensorBoard).
        project: the W&B project (a stage declares its own), also TensorBoard's folder.
        run_name, config: the W&B run's name; the fully resolved config, stored as the run config.
        run_dir: the run directory; W&B writes under ``run_dir/"wandb"``.
        stage: the name of the stage whose payloads are logged.
        mode: W&B's mode, already resolved (:func:`~etegrec.hooks.wandb_mode.resolve_mode`).
        key_map: how the stage's losses and splits are keyed (its declaration's).
        finish_timeout: seconds ``finish`` may wait for W&B to flush (W&B's ``finish_timeout``).
        resume: continue the W&B run whose id this run directory holds (``wandb/run-id``).
        init_timeout: seconds W&B may take to start online before the run falls back to offline.

    Raises:
        ValueError: no tracker in ``log_with``, an invalid mode.
    """

    main_process_only = True

    def __init__(self, *, accelerator: Any, project: str, run_name: str, config: Mapping[str, Any],
                 run_dir: str | os.PathLike, stage: str, key_map: KeyMap, mode: str = "offline",
                 finish_timeout: float = 60.0, resume: bool = False, init_timeout: float = 15.0) -> None:
        super().__init__()
        if not accelerator.log_with:
            raise ValueError(
                f"WandbSubscriber needs an Accelerator with a tracker, got log_with={list(accelerator.log_with)!r}; "
                f"build it with Accelerator(log_with='wandb') or another tracker (log_with='tensorboard', ...).")
        self.accelerator, self.project, self.run_name, self.config = accelerator, project, run_name, dict(config)
        self.run_dir, self.stage, self.mode = Path(run_dir), stage, check_mode(mode)
        self.key_map = key_map
        self.finish_timeout, self.resume, self.init_timeout = finish_timeout, resume, init_timeout
        self.run = None  # the W&B run (in W&B's process: a RemoteRun), once started, when W&B is a tracker
        self.trackers: list = []  # the Accelerate trackers this subscriber started; finish() ends them
        self._started = self._logging = False
        self._pending: list[Row] = []  # codebook rows waiting for the next row of their epoch

    @property
    def run_id_file(self) -> Path:
        """Where the W&B run id is kept, so that a resumed run continues the same W&B run."""
        return self.run_dir / "wandb" / "run-id"

    @on_main_process
    def start(self) -> None:
        """Start the trackers, once; if one cannot start, that is warned about and the run goes on untracked."""
        if self._started:  # init_trackers starts every tracker again on each call
            return
        self._started = True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.resume and self.run_id_file.exists() and self.run_id_file.read_text(encoding="utf-8").strip()
        wandb_kwargs = {"name": self.run_name, "dir": str(self.run_dir), "mode": self.mode, "resume": "allow",
                        "id": resumed or uuid.uuid4().hex[:12],
                        "settings": {"finish_timeout": self.finish_timeout, "init_timeout": self.init_timeout}}
        first = len(self.accelerator.trackers)
        try:
            with wandb_in_its_own_process():  # no config here: each tracker gets it below in the shape it stores
                self.accelerator.init_trackers(self.project, init_kwargs={"wandb": wandb_kwargs})
            self.trackers = self.accelerator.trackers[first:]
            for tracker in self.trackers:
                tracker.store_init_configuration(self.config if tracker.name == "wandb" else flat_config(self.config))
                if tracker.name == "wandb":  # its mode is offline now if it could not go online
                    self.run, self.mode = tracker.tracker, getattr(tracker, "init_kwargs", {}).get("mode", self.mode)
                    self.run.define_metric("epoch")
                    self.run.define_metric("*", step_metric="epoch")
                    self.run_id_file.parent.mkdir(parents=True, exist_ok=True)
                    self.run_id_file.write_text(f"{self.run.id}\n", encoding="utf-8")
        except Exception as exc:
            log.warning("the trackers could not start (%s: %s); the run goes on without them", type(exc).__name__, exc)
            return
        self._logging = True

    def handlers(self) -> list:
        """The ``on_<signal>`` handlers on the main process; none elsewhere (see :meth:`start`)."""
        return super().handlers() if self.accelerator.is_main_process else []

    def finish(self, status: str = "completed") -> None:
        """Disconnect, then finish W&B (failed, exit code 1, unless ``status == "completed"``) and every
        other tracker, so that TensorBoard's events are on disk without ``accelerator.end_training()``
        (a no-op after this). Bounded by ``finish_timeout``; safe to call twice; never raises."""
        self.disconnect()
        if self._pending:
            self._log((self._pending[-1][0], {}, {}))
        trackers, self.trackers, self.run, self._logging = self.trackers, [], None, False
        for tracker in trackers:
            try:  # W&B's run itself takes an exit code; the trackers' finish() does not
                if tracker.name == "wandb":
                    tracker.tracker.finish(exit_code=0 if status == "completed" else 1)
                else:
                    tracker.finish()
            except Exception as exc:
                log.warning("tracker %s did not finish cleanly (%s: %s)", tracker.name, type(exc).__name__, exc)

    # on_<signal>: the payload's row (etegrec.hooks.wandb_rows), logged to every tracker
    def on_epoch_end(self, sender, *, stage, epoch, **payload):
        if stage == self.stage:
            self._log((epoch, self.key_map.epoch_end(**payload), {}))

    def on_evaluated(self, sender, *, stage, epoch, **payload):
        if stage == self.stage:
            self._log((epoch, self.key_map.evaluated(**payload), {}))

    def on_probed(self, sender, *, stage, epoch, **payload):
        if stage == self.stage:
            self._log((epoch, probed_row(**payload), {}))

    def on_codes_assigned(self, sender, *, epoch, **payload):
        self._log((epoch, codes_assigned_row(**payload), {}))

    def on_codebook_usage(self, sender, *, stage, epoch, **payload):
        if stage == self.stage:
            self._pending.append((int(epoch), *codebook_usage_row(**payload)))

    def on_run_finished(self, sender, *, stage, status="completed", best_metrics=None, **extra):
        if stage != self.stage:
            return
        if self.run is not None and best_metrics:
            self._guarded(self.run.summary.update, best_metrics_row(best_metrics))
        codes = self.run_dir / "item_codes.tsv"  # the tokenizer's product, as an artifact
        if self.run is not None and status == "completed" and codes.exists():
            self._guarded(log_artifact_file, self.run, codes, f"item-codes-{self.run.id}", "item-codes")
        self.finish(status)

    def _log(self, row: Row) -> None:
        rows, self._pending = merge_pending(self._pending, row), []
        for epoch, scalars, histograms in rows:
            for tracker in self.trackers:
                if tracker.name == "wandb":  # no step=: see the module docstring
                    self._guarded(log_row, tracker.tracker, {"epoch": int(epoch), **scalars}, histograms)
                else:  # scalars only, and the epoch is their step: no "epoch" chart of its own
                    self._guarded(tracker.log, scalars, step=int(epoch))

    def _guarded(self, fn: Callable, *args: Any, **kwargs: Any) -> None:
        """``fn(*args, **kwargs)`` while logging is on; the first error turns it off, with one warning."""
        if not self._logging:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            self._logging = False
            log.warning("tracking failed (%s: %s); logging to the trackers is off for the rest of this run, "
                        "training goes on", type(exc).__name__, exc)
