"""What the bus's payloads are called on the trackers (SPEC section 4): payload in, row out.

Pure functions, no tracker and no state: each takes a signal's payload as keywords (what it does not
use is ignored, so a handler can pass the whole payload) and returns a row of plain floats and ints,
keyed as W&B and TensorBoard show them. A stage's :class:`KeyMap` (in its declaration,
:class:`etegrec.training.stage.Stage`) says how its ``epoch_end`` losses and ``evaluated`` splits are keyed.

Loss names are the trainers' own, never renamed here: the rqvae stage's ``loss_total`` is
``train/loss_total``; the joint and embed stages' phase goes in front, so the ``rec`` phase's
``loss_total`` is ``train/rec_loss_total`` and the ``id`` phase's ``vq_loss`` is ``train/id_vq_loss``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "KeyMap",
    "Row",
    "best_metrics_row",
    "codebook_usage_row",
    "codes_assigned_row",
    "flat_config",
    "lr_key",
    "merge_pending",
    "phase_loss_key",
    "plain_loss_key",
    "probed_row",
]

# (epoch, scalars, histograms): histograms map a key to a codebook's usage counts
Row = tuple[int, dict[str, Any], dict[str, Any]]


def plain_loss_key(phase: str, name: str) -> str:
    """``train/<name>``: a stage of one phase (rqvae: ``loss_total`` -> ``train/loss_total``)."""
    return f"train/{name}"


def phase_loss_key(phase: str, name: str) -> str:
    """``train/<phase>_<name>``: a stage of several phases (joint: ``rec``, ``loss_total`` ->
    ``train/rec_loss_total``)."""
    return f"train/{phase}_{name}"


def lr_key(phase: str, name: str) -> str:
    """``lr/<optimiser>_lr``: optimiser ``rec`` (or ``rec_lr``) -> ``lr/rec_lr``; a bare ``lr`` is
    named after the phase."""
    name = phase if name == "lr" else name.removesuffix("_lr")
    return f"lr/{name}_lr"


@dataclass(frozen=True)
class KeyMap:
    """How one stage's ``epoch_end`` losses and ``evaluated`` metrics are keyed.

    ``codes_assigned`` (``monitor/...``), ``codebook_usage`` (``codebook/layer{i}/...``) and
    ``probed`` (``probe/...``) are keyed the same way in every stage.
    """

    loss_key: Callable[[str, str], str]  # (phase, loss name) -> key
    split_prefix: Mapping[str, str]  # evaluated split -> key prefix; other splits use their name

    def epoch_end(self, *, phase: str, losses: Mapping[str, float], lr: Mapping[str, float] | None = None,
                  seconds: float | None = None, samples_per_second: float | None = None,
                  **_: Any) -> dict[str, float]:
        """The row of an ``epoch_end`` payload: losses, learning rates and ``perf/`` timings."""
        row = {self.loss_key(phase, name): float(v) for name, v in losses.items()}
        row.update({lr_key(phase, name): float(v) for name, v in (lr or {}).items()})
        if seconds is not None:
            row[f"perf/{phase}_epoch_seconds"] = float(seconds)
        if samples_per_second is not None:
            row[f"perf/{phase}_samples_per_second"] = float(samples_per_second)
        return row

    def evaluated(self, *, split: str, metrics: Mapping[str, float], **_: Any) -> dict[str, float]:
        """The row of an ``evaluated`` payload: each metric under its split's prefix."""
        prefix = self.split_prefix.get(split, split)
        return {f"{prefix}/{name}": float(v) for name, v in metrics.items()}


def probed_row(*, probes: Mapping[str, float], **_: Any) -> dict[str, float]:
    """``probe/<name>`` keys of a ``probed`` payload."""
    return {f"probe/{name}": float(value) for name, value in probes.items()}


def codes_assigned_row(*, codes: Any, max_conflict: int, max_conflict_before: int, collision_rate: float,
                       changed: int, **_: Any) -> dict[str, float]:
    """``monitor/...`` keys of a ``codes_assigned`` payload; ``codes_changed`` is a share of items."""
    n_items = len(codes) if codes is not None else 0
    return {
        "monitor/max_conflict": int(max_conflict),
        "monitor/max_conflict_before_forge": int(max_conflict_before),
        "monitor/collision_rate": float(collision_rate),
        "monitor/codes_changed": float(changed) / n_items if n_items else 0.0,
    }


def codebook_usage_row(*, layer: int, counts: Any, utilization: float, perplexity: float, gini: float,
                       dead_codes: int, **_: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """``codebook/layer{i}/...`` keys of a ``codebook_usage`` payload: ``(scalars, histograms)``,
    the histograms being ``{"codebook/layer{i}/usage": counts}`` (for W&B only)."""
    prefix = f"codebook/layer{layer}"
    scalars = {
        f"{prefix}/utilization": float(utilization),
        f"{prefix}/perplexity": float(perplexity),
        f"{prefix}/gini": float(gini),
        f"{prefix}/dead_codes": int(dead_codes),
    }
    return scalars, {f"{prefix}/usage": counts}


def best_metrics_row(best_metrics: Mapping[str, float]) -> dict[str, float]:
    """``best/<name>`` keys of a ``run_finished`` payload's best metrics (the W&B run summary)."""
    return {f"best/{name}": float(value) for name, value in best_metrics.items()}


def merge_pending(pending: Sequence[Row], row: Row) -> list[Row]:
    """The rows to send when ``row`` comes while ``pending`` rows are held back.

    Held-back rows of ``row``'s epoch go with it (one tracker call, ``row``'s scalars winning a
    clash); those of another epoch, for which no row came, go first, each on its own, in order.
    """
    epoch, scalars, histograms = row
    merged_scalars: dict[str, Any] = {}
    merged_histograms = dict(histograms)
    for pending_epoch, pending_scalars, pending_histograms in pending:
        if pending_epoch == epoch:
            merged_scalars.update(pending_scalars)
            merged_histograms.update(pending_histograms)
    others = [p for p in pending if p[0] != epoch]
    return [*others, (epoch, {**merged_scalars, **scalars}, merged_histograms)]


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
