"""Early stopping, with its own resume state (Lightning's ``EarlyStopping`` is the model)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Watch one validation metric; stop after ``patience`` evaluations without a strict improvement.

    ``mode="max"`` for a metric to raise (NDCG@10), ``"min"`` for one to lower (collision rate).
    The best score, its epoch and metrics and the count of evaluations since travel through
    :meth:`state_dict` / :meth:`load_state_dict`, so a resumed run stops where the first would have.
    """

    def __init__(self, monitor: str, *, mode: str = "max", patience: int) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"EarlyStopping mode={mode!r}; use 'max' or 'min'.")
        if patience < 1:
            raise ValueError(f"EarlyStopping patience={patience!r} must be at least 1.")
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.best_score = -math.inf if mode == "max" else math.inf
        self.best_epoch = -1
        self.best_metrics: dict[str, float] = {}
        self.wait_count = 0

    def update(self, metrics: Mapping[str, float], epoch: int) -> bool:
        """Count one evaluation; True when ``metrics[monitor]`` is the new best."""
        score = metrics[self.monitor]
        improved = score > self.best_score if self.mode == "max" else score < self.best_score
        if improved:
            self.best_score, self.best_epoch, self.best_metrics = score, epoch, dict(metrics)
            self.wait_count = 0
        else:
            self.wait_count += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.wait_count >= self.patience

    def reset_wait(self) -> None:
        """Start counting again (a new segment of training, or epochs added to a finished run)."""
        self.wait_count = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch,
                "best_metrics": dict(self.best_metrics), "wait_count": self.wait_count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.best_metrics, self.wait_count = dict(state["best_metrics"]), state["wait_count"]
