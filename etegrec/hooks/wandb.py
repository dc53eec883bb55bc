"""The tracking subscriber: W&B and every other Accelerate tracker (main rank only).

It turns the bus's payloads into the keys of SPEC section 4, one small :class:`KeyMap` per stage,
and owns the tracking run: :meth:`WandbSubscriber.start` calls ``accelerator.init_trackers`` for
whatever the accelerator logs with (``wandb``, ``tensorboard``, ...) and declares ``epoch`` as the
x-axis of every W&B chart; :meth:`WandbSubscriber.finish` ends the W&B run with a bounded timeout,
marks it failed unless the status is ``"completed"``, and finishes the other trackers.

Two W&B traps it avoids:

* Steps. Rows are logged *without* ``step=``: W&B's own step then only increases, while every row
  carries ``epoch`` and ``define_metric("*", step_metric="epoch")`` puts it on the x-axis. Passing
  the epoch as ``step=`` would make W&B silently drop any row whose step goes backwards (a test
  evaluation of the best epoch after the last epoch, or validation logged after training rows).
* Media. Histograms go to the W&B run only; every other Accelerate tracker (TensorBoard, ...)
  gets the scalar part of the same row through its own ``log`` with ``step=epoch``, since those
  backends take scalars only and need an explicit step. (tensorboardX, TensorBoard's writer when
  the ``tensorboard`` package is absent, writes a key's characters outside ``[-/\\w.]`` as ``_``:
  ``eval/ndcg@10`` is ``eval/ndcg_10`` there.)

And one of the other trackers: the run config is stored per tracker, nested for W&B and flattened
to ``{"joint.lr_rec": 0.005, ...}`` for the others (TensorBoard's ``add_hparams`` takes flat
primitive values only; a nested config breaks it or is stored as unset).

W&B named in ``log_with`` runs in a process of its own (:mod:`etegrec.hooks.wandb_process`): its
client costs about 0.7 ms of CPU per row, which in the training process is taken from training.
The training thread pickles a W&B row straight into that process's socket when the socket has
room and nothing is queued ahead of it (~25 us; waking a thread cost more). Every other tracker
call (TensorBoard, a W&B tracker object the user built, a W&B row that would wait) runs in order
on one worker thread; :meth:`WandbSubscriber.finish` drains its queue before finishing. A codebook
row waits for its epoch's ``epoch_end`` and goes with it: one call per epoch; its usage counts
become a W&B histogram where the W&B run is.

Finishing the trackers here means nobody has to reach ``accelerator.end_training()`` for the
TensorBoard events to be on disk; the run that made the Accelerator calls it afterwards anyway,
which is harmless (finishing again is a no-op for both).
"""
from __future__ import annotations

import logging
import netrc
import os
import queue
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from .base import Subscriber
from .wandb_child import usage_histogram
from .wandb_process import RemoteRun, WandbProcessTracker

__all__ = [
    "JOINT_PROJECT",
    "KEY_MAPS",
    "KeyMap",
    "PRETRAIN_PROJECT",
    "WandbSubscriber",
    "flat_config",
    "resolve_mode",
    "usage_histogram",
]

log = logging.getLogger(__name__)

PRETRAIN_PROJECT = "ETEGRec-RQVAE-Pretrain"
JOINT_PROJECT = "ETEGRec-Joint"
MODES = ("online", "offline", "disabled")


# --- what each stage's payloads are called on W&B -------------------------------------------

def _plain_loss_key(phase: str, name: str) -> str:
    return f"train/{name}"  # rqvae: loss_total -> train/loss_total


def _phase_loss_key(phase: str, name: str) -> str:
    # joint: (rec, loss) -> train/rec_loss_total, (id, vq_loss) -> train/id_vq_loss
    return f"train/{phase}_{'loss_total' if name == 'loss' else name}"


def _lr_key(phase: str, name: str) -> str:
    # optimiser "rec" -> lr/rec_lr; a bare "lr" is named after the phase
    name = phase if name == "lr" else name.removesuffix("_lr")
    return f"lr/{name}_lr"


@dataclass(frozen=True)
class KeyMap:
    """How one stage's ``epoch_end`` losses and ``evaluated`` metrics are keyed on W&B.

    ``codes_assigned`` (``monitor/...``) and ``codebook_usage`` (``codebook/layer{i}/...``) are
    keyed the same way in every stage.
    """

    loss_key: Callable[[str, str], str]  # (phase, loss name) -> key
    split_prefix: Mapping[str, str]  # evaluated split -> key prefix; other splits use their name

    def epoch_end(self, *, phase: str, losses: Mapping[str, float], lr: Mapping[str, float] | None,
                  seconds: float | None, samples_per_second: float | None) -> dict[str, float]:
        row = {self.loss_key(phase, name): float(v) for name, v in losses.items()}
        row.update({_lr_key(phase, name): float(v) for name, v in (lr or {}).items()})
        if seconds is not None:
            row[f"perf/{phase}_epoch_seconds"] = float(seconds)
        if samples_per_second is not None:
            row[f"perf/{phase}_samples_per_second"] = float(samples_per_second)
        return row

    def evaluated(self, *, split: str, metrics: Mapping[str, float]) -> dict[str, float]:
        prefix = self.split_prefix.get(split, split)
        return {f"{prefix}/{name}": float(v) for name, v in metrics.items()}


KEY_MAPS: dict[str, KeyMap] = {
    "rqvae": KeyMap(loss_key=_plain_loss_key, split_prefix={"valid": "val", "test": "test"}),
    "joint": KeyMap(loss_key=_phase_loss_key, split_prefix={"valid": "eval", "test": "test"}),
    "embed": KeyMap(loss_key=_phase_loss_key, split_prefix={"valid": "val", "test": "test"}),
}


def codes_assigned_row(*, codes: Any, max_conflict: int, max_conflict_before: int,
                       collision_rate: float, changed: int) -> dict[str, float]:
    """``monitor/...`` keys of a ``codes_assigned`` payload; ``codes_changed`` is a share of items."""
    n_items = len(codes) if codes is not None else 0
    return {
        "monitor/max_conflict": int(max_conflict),
        "monitor/max_conflict_before_forge": int(max_conflict_before),
        "monitor/collision_rate": float(collision_rate),
        "monitor/codes_changed": float(changed) / n_items if n_items else 0.0,
    }


def resolve_mode(mode: str | None = None, *, environ: Mapping[str, str] = os.environ) -> str:
    """The W&B mode to run in.

    An explicit ``mode`` wins; then ``WANDB_MODE`` from the environment; then ``"online"`` when an
    API key is available (``WANDB_API_KEY`` or a netrc entry for the W&B host), else ``"offline"``
    so that a machine without credentials or network never tries to reach W&B.

    Raises:
        ValueError: ``mode`` is not one of online, offline, disabled.
    """
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"wandb mode {mode!r} is not one of {', '.join(MODES)}; pass one of them or None.")
        return mode
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    return "online" if _has_api_key(environ) else "offline"


def _has_api_key(environ: Mapping[str, str]) -> bool:
    return bool(environ.get("WANDB_API_KEY")) or _netrc_has_key(environ)


def _netrc_has_key(environ: Mapping[str, str]) -> bool:
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = environ.get("NETRC") or Path.home() / ".netrc"
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``config`` with nested keys joined by dots and lists turned into strings.

    What trackers that take flat primitive hyper-parameters (TensorBoard's ``add_hparams``) can
    store: ``{"joint": {"lr_rec": 0.005}, "tokenizer": {"hidden_dims": [64, 32]}}`` becomes
    ``{"joint.lr_rec": 0.005, "tokenizer.hidden_dims": "[64, 32]"}``; None stays None.
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_config(value, prefix=f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def _tracker_name(tracker: Any) -> str:
    # log_with holds LoggerType members (str() is the name; .name is "WANDB") or GeneralTracker instances
    from accelerate.tracking import GeneralTracker

    return tracker.name if isinstance(tracker, GeneralTracker) else str(tracker)


# --- the subscriber --------------------------------------------------------------------------

class WandbSubscriber(Subscriber):
    """Logs the bus through ``accelerator``'s trackers (W&B, TensorBoard, ...) on the main process only.

    Construction only stores its arguments (no W&B import, no distributed state). :meth:`start`
    initialises the trackers on the main process; :meth:`connect` attaches the handlers there (and
    does nothing elsewhere); ``run_finished`` (or :meth:`finish`) ends the run. Only payloads whose
    ``stage`` is this subscriber's stage are logged, so an earlier stage run in the same process
    never lands in this run. Scalars go to every tracker; histograms and the best metrics (the run
    summary) to W&B only. If a tracker raises while logging, the error is logged once as a warning
    and the subscriber stops logging; training goes on.

    Args:
        accelerator: an ``accelerate.Accelerator`` with at least one tracker in ``log_with`` (and a
            ``project_dir`` for trackers that write files, such as TensorBoard).
        project: the tracking project: W&B's project (:data:`PRETRAIN_PROJECT` or
            :data:`JOINT_PROJECT`), and the folder TensorBoard writes into under its logging dir.
        run_name: W&B run name.
        config: the fully resolved config, stored as the run config (flattened for trackers other
            than W&B, see :func:`flat_config`).
        run_dir: the run directory; W&B writes under ``run_dir/"wandb"``.
        stage: the stage whose payloads are logged ("rqvae", "joint", "embed"); picks the key map.
        mode: W&B's mode, "online", "offline", "disabled" or None (see :func:`resolve_mode`).
        key_map: overrides the stage's :data:`KEY_MAPS` entry.
        finish_timeout: seconds ``finish`` may wait for W&B to flush (W&B's ``finish_timeout``).
        resume: continue the W&B run whose id this run directory holds (``wandb/run-id``), so the
            charts of a resumed run go on in the same run.
        init_timeout: seconds W&B may take to start online before the run falls back to offline.

    Raises:
        ValueError: the accelerator has no tracker, the stage is unknown without a ``key_map``, or
            the mode is invalid.
    """

    main_process_only = True

    def __init__(self, *, accelerator: Any, project: str, run_name: str, config: Mapping[str, Any],
                 run_dir: str | os.PathLike, stage: str, mode: str | None = None,
                 key_map: KeyMap | None = None, finish_timeout: float = 60.0, resume: bool = False,
                 init_timeout: float = 15.0) -> None:
        super().__init__()
        if not accelerator.log_with:
            raise ValueError(
                f"WandbSubscriber needs an Accelerator with a tracker, got log_with={list(accelerator.log_with)!r}; "
                f"build it with Accelerator(log_with='wandb') or another tracker (log_with='tensorboard', ...)."
            )
        if key_map is None and stage not in KEY_MAPS:
            raise ValueError(f"no W&B key map for stage {stage!r}; use one of {sorted(KEY_MAPS)} or pass key_map.")
        self.accelerator = accelerator
        self.project = project
        self.run_name = run_name
        self.config = dict(config)
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.mode = resolve_mode(mode)
        self.key_map = key_map or KEY_MAPS[stage]
        self.finish_timeout = finish_timeout
        self.resume = resume
        self.init_timeout = init_timeout
        self.run_id: str | None = None  # the W&B run id, once started
        self.run = None  # the wandb Run, on the main process once started, when wandb is a tracker
        self.trackers: list = []  # the Accelerate trackers this subscriber started; finish() ends them
        self._started = False
        self._logging = False
        self._pending: list[tuple[int, dict, dict]] = []
        self._log_with: list | None = None  # accelerator.log_with as given, before W&B moved out of process
        self._queue: queue.SimpleQueue | None = None
        self._worker: threading.Thread | None = None
        self._queued = 0  # calls put on the queue (written by the training thread only)
        self._done = 0  # calls the worker has finished (written by the worker only)

    # lifecycle

    def start(self) -> None:
        """Initialise the trackers (and the W&B run) on the main process, once; do nothing elsewhere.

        W&B never stops the run: online mode without an API key, or a W&B that cannot start online
        within ``init_timeout`` seconds (no network, server down), falls back to offline with one
        warning; any other tracker failure here is logged as a warning and leaves the subscriber inert.
        """
        # init_trackers appends every tracker again on each call: called again only after a reset
        if self._started or not self.accelerator.is_main_process:
            return
        self._started = True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            uses_wandb = "wandb" in {_tracker_name(t) for t in self.accelerator.log_with}
            if uses_wandb and self.mode == "online" and not _has_api_key(os.environ):
                log.warning("W&B mode is online but no API key is configured (WANDB_API_KEY or `wandb login`); "
                            "logging offline under %s instead", self.run_dir / "wandb")
                self.mode = "offline"
            try:
                self._init_trackers(uses_wandb)
            except Exception as exc:
                if not (uses_wandb and self.mode == "online"):
                    raise
                log.warning("W&B could not start online (%s: %s); logging offline under %s instead",
                            type(exc).__name__, exc, self.run_dir / "wandb")
                self.accelerator.trackers = []  # init_trackers appends: drop what the failed call started
                self.mode = "offline"
                self._init_trackers(uses_wandb)
        except Exception as exc:
            log.warning("the trackers could not start (%s: %s); the run goes on without them",
                        type(exc).__name__, exc)
            return
        self._logging = True
        # tracker calls (~1-2 ms each with W&B) run on one worker thread, off the training loop
        self._queue = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._drain, name="etegrec-trackers", daemon=True)
        self._worker.start()

    @property
    def run_id_file(self) -> Path:
        """Where the W&B run id is kept, so that a resumed run continues the same W&B run."""
        return self.run_dir / "wandb" / "run-id"

    def _init_trackers(self, uses_wandb: bool) -> None:
        from accelerate.tracking import GeneralTracker

        init_kwargs = {}
        if uses_wandb:
            run_id = None
            if self.resume and self.run_id_file.exists():
                run_id = self.run_id_file.read_text(encoding="utf-8").strip() or None
            # a fresh id when not resuming, also for the offline retry: W&B holds the failed online id as in use
            self.run_id = run_id = run_id or uuid.uuid4().hex[:12]
            init_kwargs["wandb"] = {
                "name": self.run_name,
                "dir": str(self.run_dir),  # W&B appends "wandb/" itself
                "mode": self.mode,
                "id": run_id,
                "resume": "allow",
                "settings": {"finish_timeout": self.finish_timeout, "init_timeout": self.init_timeout},
            }
            self.run_id_file.parent.mkdir(parents=True, exist_ok=True)
            self.run_id_file.write_text(run_id + "\n", encoding="utf-8")
            # W&B by name runs in its own process (see etegrec.hooks.wandb_process); a W&B tracker
            # object the user built stays as it is. Rebuilt from the original list on a retry.
            if self._log_with is None:
                self._log_with = list(self.accelerator.log_with)
            self.accelerator.log_with = [
                WandbProcessTracker(self.project, **init_kwargs["wandb"])
                if _tracker_name(t) == "wandb" and not isinstance(t, GeneralTracker) else t
                for t in self._log_with]
        # no config here: each tracker gets it below in the shape it can store
        self.accelerator.init_trackers(project_name=self.project, init_kwargs=init_kwargs)
        self.trackers = list(self.accelerator.trackers)
        for tracker in self.trackers:
            tracker.store_init_configuration(self.config if tracker.name == "wandb" else flat_config(self.config))
        if uses_wandb:
            self.run = self.accelerator.get_tracker("wandb", unwrap=True)
            self.run.define_metric("epoch")
            self.run.define_metric("*", step_metric="epoch")

    def connect(self) -> WandbSubscriber:
        """Attach the handlers (held strongly) on the main process only."""
        if self.accelerator.is_main_process:
            super().connect()
        return self

    def finish(self, status: str = "completed") -> None:
        """Disconnect, then finish the W&B run (failed, exit code 1, unless ``status == "completed"``)
        and every other tracker.

        Bounded by ``finish_timeout``; safe to call twice; never raises.
        """
        self.disconnect()
        self._flush_pending()
        if self._worker is not None:  # let the worker send what is queued, then stop it
            self._queue.put(None)
            self._worker.join(timeout=self.finish_timeout)
            self._worker = None
        trackers, self.trackers, self.run, self._logging = self.trackers, [], None, False
        for tracker in trackers:
            try:
                if tracker.name == "wandb":
                    tracker.tracker.finish(exit_code=0 if status == "completed" else 1)
                else:
                    tracker.finish()
            except Exception as exc:
                log.warning("tracker %s did not finish cleanly (%s: %s)", tracker.name, type(exc).__name__, exc)

    # handlers

    def on_epoch_end(self, sender, *, stage, phase, epoch, losses, lr=None, seconds=None,
                     samples_per_second=None, **extra):
        if stage == self.stage:
            self._log(epoch, self.key_map.epoch_end(phase=phase, losses=losses, lr=lr, seconds=seconds,
                                                    samples_per_second=samples_per_second))

    def on_evaluated(self, sender, *, stage, split, epoch, metrics, **extra):
        if stage == self.stage:
            self._log(epoch, self.key_map.evaluated(split=split, metrics=metrics))

    def on_probed(self, sender, *, stage, epoch, probes, **extra):
        if stage == self.stage:
            self._log(epoch, {f"probe/{name}": float(value) for name, value in probes.items()})

    def on_codes_assigned(self, sender, *, epoch, codes, max_conflict, max_conflict_before,
                          collision_rate, changed, **extra):
        self._log(epoch, codes_assigned_row(codes=codes, max_conflict=max_conflict,
                                            max_conflict_before=max_conflict_before,
                                            collision_rate=collision_rate, changed=changed))

    def on_codebook_usage(self, sender, *, stage, epoch, layer, counts, utilization, perplexity, gini,
                          dead_codes, **extra):
        if stage != self.stage:
            return
        prefix = f"codebook/layer{layer}"
        # held back and sent with this epoch's epoch_end row: one W&B call per epoch, not one per layer
        self._pending.append((int(epoch), {
            f"{prefix}/utilization": float(utilization),
            f"{prefix}/perplexity": float(perplexity),
            f"{prefix}/gini": float(gini),
            f"{prefix}/dead_codes": int(dead_codes),
        }, {f"{prefix}/usage": counts}))  # made a histogram where W&B runs: see _log_wandb

    def on_run_finished(self, sender, *, stage, status="completed", best_metrics=None, **extra):
        if stage != self.stage:
            return
        if self._logging and best_metrics and self.run is not None:
            run, best = self.run, {f"best/{k}": float(v) for k, v in best_metrics.items()}
            self._submit(lambda: run.summary.update(best))
        codes = self.run_dir / "item_codes.tsv" if self.run_dir is not None else None
        if self._logging and self.run is not None and status == "completed" and codes is not None and codes.exists():
            self._submit(lambda: _log_codes(self.run, codes))  # the tokenizer's product, as an artifact
        self.finish(status)

    # logging

    def _log(self, epoch: int, scalars: dict[str, float], histograms: Mapping[str, np.ndarray] | None = None) -> None:
        if not self._logging:
            self._pending.clear()
            return
        histograms = dict(histograms or {})
        for pending_epoch, pending_scalars, pending_histograms in self._pending:
            if pending_epoch == epoch:
                scalars = {**pending_scalars, **scalars}
                histograms.update(pending_histograms)
            else:  # no epoch_end came for that epoch: send it on its own
                self._send(pending_epoch, pending_scalars, pending_histograms)
        self._pending.clear()
        self._send(epoch, scalars, histograms)

    def _flush_pending(self) -> None:
        if self._pending:
            epoch = self._pending[-1][0]
            self._log(epoch, {})

    def _send(self, epoch: int, scalars: dict[str, float], histograms: Mapping[str, np.ndarray]) -> None:
        row = {"epoch": int(epoch), **scalars}
        others = [t for t in self.trackers if t.name != "wandb"]
        if self.run is not None and len(others) < len(self.trackers):
            run = self.run
            # Sent from here when nothing is queued ahead of it and the socket has room: waking the
            # worker thread cost the training thread ~150 us per row (measured on RQ-VAE epochs),
            # more than the pickling. No step=: see the module docstring.
            sent = (isinstance(run, RemoteRun) and self._queued == self._done
                    and self._guarded(lambda: run.log_now(row, histograms)) is not False)
            if not sent:
                self._submit(lambda: _log_wandb(run, row, histograms))
        if others:  # scalars only, and the epoch is their step: no "epoch" chart of its own
            self._submit(lambda: [tracker.log(scalars, step=int(epoch)) for tracker in others])

    def _submit(self, fn: Callable[[], Any]) -> None:
        if self._worker is not None:
            self._queued += 1
            self._queue.put(fn)
        else:
            self._guarded(fn)

    def _drain(self) -> None:
        """The worker: run queued tracker calls in order until the ``None`` sentinel."""
        while (fn := self._queue.get()) is not None:
            if self._logging:
                self._guarded(fn)
            self._done += 1

    def _guarded(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, or None once it raised (warned about once; tracking is then off)."""
        try:
            return fn()
        except Exception as exc:
            self._logging = False
            log.warning("tracking failed (%s: %s); logging to the trackers is off for the rest of this run, "
                        "training goes on", type(exc).__name__, exc)


def _log_wandb(run: Any, row: dict[str, Any], usage: Mapping[str, np.ndarray]) -> None:
    """Log ``row`` plus one usage histogram per ``usage`` entry (key -> codebook counts) to ``run``."""
    if isinstance(run, RemoteRun):  # the histograms are made in W&B's process
        run.log(row, histograms=usage)
        return
    import wandb

    run.log({**row, **{k: wandb.Histogram(np_histogram=usage_histogram(c)) for k, c in usage.items()}})


def _log_codes(run: Any, path: Path) -> None:
    """The run's ``item_codes.tsv`` as the W&B artifact ``item-codes-<run id>`` (type ``item-codes``)."""
    from .wandb_child import log_file_artifact
    from .wandb_process import RemoteRun

    name = f"item-codes-{run.id}"
    if isinstance(run, RemoteRun):
        run.log_file_artifact(str(path), name, "item-codes")
    else:  # a W&B run in this process (a tracker the user built)
        log_file_artifact(run, str(path), name, "item-codes")
