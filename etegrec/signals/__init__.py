"""The event bus: every signal that etegrec's trainers and ``get_code`` emit.

This module only declares signals (plus the small dispatch rules below) and imports nothing else
of the package. Senders pass keyword-only payloads; receivers take ``(sender, **payload)`` and
should accept ``**extra`` so that a new keyword never breaks them::

    from etegrec import signals

    def on_epoch(sender, *, stage, epoch, losses, **extra):
        print(stage, epoch, losses)

    signals.epoch_end.connect(on_epoch)          # held weakly: keep a reference to on_epoch

Dispatch rules, which differ from plain blinker on purpose:

* Receivers are called in the order they were connected (blinker's default is a set), so the
  package can put producers before sinks and the event log before W&B.
* A receiver that raises does not stop the others or the run: the error is logged once per
  (receiver, signal) with its traceback. Under :func:`strict` (or ``ETEGREC_STRICT_SIGNALS=1``,
  which the test suite sets) it is re-raised instead.
* Sending with nobody connected costs one attribute check; senders guard payloads that cost
  anything with ``if signal.receivers:``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, MutableSet
from dataclasses import dataclass
from typing import Any

from blinker import Namespace, NamedSignal

__all__ = [
    "ALL_SIGNALS",
    "BusSignal",
    "Emission",
    "checkpoint_saved",
    "codebook_usage",
    "codes_assigned",
    "epoch_end",
    "evaluated",
    "is_strict",
    "probed",
    "recording",
    "run_finished",
    "run_started",
    "step_end",
    "strict",
]

log = logging.getLogger(__name__)

STRICT_ENV = "ETEGREC_STRICT_SIGNALS"
_strict_depth = 0
_reported: set[tuple[str, str]] = set()
_report_lock = threading.Lock()


class _OrderedIdSet(MutableSet):
    """An insertion-ordered set; blinker documents ``set_class`` as the hook for ordered dispatch."""

    def __init__(self, items=()):
        self._items = dict.fromkeys(items)

    def __contains__(self, item):
        return item in self._items

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def add(self, item):
        self._items[item] = None

    def discard(self, item):
        self._items.pop(item, None)

    def copy(self):
        return _OrderedIdSet(self._items)


def is_strict() -> bool:
    """True when receiver errors are re-raised instead of logged."""
    return _strict_depth > 0 or os.environ.get(STRICT_ENV, "") not in ("", "0")


@contextlib.contextmanager
def strict() -> Iterator[None]:
    """Re-raise receiver errors inside this block (the tests run this way)."""
    global _strict_depth
    _strict_depth += 1
    try:
        yield
    finally:
        _strict_depth -= 1


def _receiver_name(receiver: Any) -> str:
    owner = getattr(receiver, "__self__", None)
    name = getattr(receiver, "__qualname__", None) or type(receiver).__qualname__
    if owner is not None and not getattr(receiver, "__qualname__", "").startswith(type(owner).__qualname__):
        name = f"{type(owner).__qualname__}.{name}"
    return f"{getattr(receiver, '__module__', '?')}.{name}"


class BusSignal(NamedSignal):
    """A blinker signal that dispatches in connection order and isolates failing receivers."""

    set_class = _OrderedIdSet

    def send(self, sender: Any = None, /, **payload: Any) -> list[tuple[Any, Any]]:
        if not self.receivers or self.is_muted:
            return []
        results = []
        for receiver in self.receivers_for(sender):
            try:
                results.append((receiver, receiver(sender, **payload)))
            except Exception:
                if is_strict():
                    raise
                key = (_receiver_name(receiver), self.name)
                with _report_lock:
                    first = key not in _reported
                    _reported.add(key)
                if first:
                    log.exception(
                        "subscriber %s raised on signal %r; training goes on "
                        "(further errors of this subscriber on this signal are not repeated)",
                        key[0], self.name,
                    )
        return results


class _BusNamespace(Namespace):
    def signal(self, name: str, doc: str | None = None) -> BusSignal:
        if name not in self:
            self[name] = BusSignal(name, doc)
        return self[name]


_bus = _BusNamespace()

run_started = _bus.signal("run_started", doc="""\
Fired once when a trainer starts, before its first epoch (also on resume).

Payload: stage (str: "embed", "rqvae", "joint"), config (dict, the fully resolved config),
run_dir (str), rank (int), world_size (int), resumed (bool), start_epoch (int), phases (list[str],
the phase of every epoch the stage plans, in order; early stopping may end it sooner).""")

epoch_end = _bus.signal("epoch_end", doc="""\
Fired after every training epoch of every trainer.

Payload: stage (str), phase (str: "embed", "rqvae", "id", "rec", "finetune"), epoch (int),
losses (dict[str, float], epoch means averaged over ranks), lr (dict[str, float], learning rate
per optimiser), seconds (float), samples_per_second (float, summed over ranks); joint training
adds weights (dict[str, float], the loss weights in force, alignment losses 0 during warm-up).""")

step_end = _bus.signal("step_end", doc="""\
Fired every ``log_every`` optimiser steps (optional live curves).

Payload: stage (str), phase (str), epoch (int), step (int, global), losses (dict[str, float],
this rank's values of that step), lr (dict[str, float]).""")

codes_assigned = _bus.signal("codes_assigned", doc="""\
Fired by ``etegrec.forge.get_code`` each time the item codes are (re)computed.

Payload: stage (str, the sender's: "joint"), epoch (int, the first epoch that uses these codes: 0
at the start of joint training, e + 1 after tokenizer epoch e), codes (np.ndarray [n_items, L+1],
row i = item i+1), use_forge (bool), policy (str), max_conflict (int, largest suffix + 1),
max_conflict_before (int, the same without FORGE), collision_rate (float, (n_items - distinct
L-code tuples) / n_items after FORGE), changed (int, items whose code differs from the previous
call; n_items on the first call), seconds (float).""")

evaluated = _bus.signal("evaluated", doc="""\
Fired after every evaluation.

Payload: stage (str), split (str: "valid" or "test"), epoch (int), metrics (dict[str, float],
e.g. "ndcg@10", "recall@5"; reduced over ranks).""")

probed = _bus.signal("probed", doc="""\
Fired by the joint trainer after every validation: learning probes on a fixed subsample of the
validation users, which say why the recommender is or is not learning.
Payload: stage (str), split (str, "valid"), epoch (int), users (int, the subsample's size),
probes (dict[str, float]): item_nll (mean teacher-forced NLL of the target item, the sum of its
code cross-entropies, nats), popularity_nll (the same for training popularity), code_ce_{p} and
code_floor_{p} (cross-entropy of code position p, and its no-history floor: the training targets'
frequency of that code given the earlier ones), shuffle_overlap (share of the top-k kept when each
history is shuffled; 1.0 = order-blind), drop_last_overlap (share kept when the most recent item is
dropped; 1.0 = the last item is not used), repeat_share (share of top-k slots that are history
items), data_repeat_rate (share of the subsample's targets that are in their history),
codes_changed (share of items whose code changed at the last refresh).""")

codebook_usage = _bus.signal("codebook_usage", doc="""\
Fired by the codebook forward hooks once per layer at the end of an epoch.

Payload: stage (str), epoch (int), layer (int, 0-based), counts (np.ndarray [K], summed over
ranks), utilization (float, used codes / K), perplexity (float, exp of the usage entropy),
gini (float), dead_codes (int).""")

checkpoint_saved = _bus.signal("checkpoint_saved", doc="""\
Fired after a checkpoint has been written (atomically) by the main rank.

Payload: stage (str), epoch (int), path (str), is_best (bool).""")

run_finished = _bus.signal("run_finished", doc="""\
Fired once when a trainer ends, whatever the reason.

Payload: stage (str), status (str: "completed", "interrupted", "failed"), best_metrics
(dict[str, float]), best_checkpoint (str or None), seconds (float).""")

ALL_SIGNALS: tuple[BusSignal, ...] = (
    run_started, epoch_end, step_end, codes_assigned, evaluated, probed, codebook_usage,
    checkpoint_saved, run_finished,
)


@dataclass(frozen=True)
class Emission:
    """One recorded emission: which signal, who sent it, with what payload."""

    signal: str
    sender: Any
    payload: dict[str, Any]


@contextlib.contextmanager
def recording(*signals: BusSignal) -> Iterator[list[Emission]]:
    """Record every emission of ``signals`` (all of them by default) inside the block.

    >>> with recording(epoch_end) as events:
    ...     epoch_end.send(None, stage="x", epoch=0)
    >>> events[0].payload["epoch"]
    0
    """
    emitted: list[Emission] = []
    with contextlib.ExitStack() as stack:
        for sig in signals or ALL_SIGNALS:
            def receiver(sender, _name=sig.name, **payload):
                emitted.append(Emission(_name, sender, payload))
            stack.enter_context(sig.connected_to(receiver))
        yield emitted
