"""Count baselines: the simplest sequential recommenders, as pure functions of arrays.

Every published quality table shows the generative models against these (docs/protocol.md, "Reference points"):
a model that learns from sequences should beat counting them. Each builder returns a function
``score(history) -> (batch, n_items + 1)`` over left-padded histories (0 = padding; column 0 is
-inf), ready for ``etegrec.training.run.evaluation.evaluate_full_ranking`` (ties count against the
target). Counts come from the training sequences only.

* :func:`markov_chain`: first order: how often each item followed the history's last item.
* :func:`cooccurrence`: items that followed any recent history item within ``window`` positions,
  weighted by ``1 / gap`` and by ``decay ** age`` of the history item (age 0 = the most recent).

Equal scores are ordered by training popularity (a tie-break below any score difference).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["cooccurrence", "markov_chain", "popularity", "transition_counts"]

Scorer = Callable[[np.ndarray], np.ndarray]


def popularity(sequences: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """(n_items + 1,) how often each item occurs in the training sequences (index 0 = padding, 0)."""
    counts = np.bincount(np.concatenate(sequences), minlength=n_items + 1).astype(np.float64)
    counts[0] = 0.0
    return counts


def transition_counts(sequences: Sequence[np.ndarray], n_items: int, *, window: int = 1) -> np.ndarray:
    """(n_items + 1, n_items + 1) counts ``C[a, b]`` of ``b`` following ``a`` at gap ``d <= window``,
    each weighted ``1 / d`` (``window=1``: plain first-order transition counts)."""
    counts = np.zeros((n_items + 1, n_items + 1))
    for seq in sequences:
        seq = np.asarray(seq)
        for gap in range(1, min(window, len(seq) - 1) + 1):
            np.add.at(counts, (seq[:-gap], seq[gap:]), 1.0 / gap)
    return counts


def _with_tiebreak(scores: np.ndarray, pop: np.ndarray, scale: float = 1.0) -> np.ndarray:
    scores = scores + scale * pop / (pop.max() + 1.0)  # below `scale`: reorders equal scores only
    scores[:, 0] = -np.inf
    return scores


def markov_chain(sequences: Sequence[np.ndarray], n_items: int) -> Scorer:
    """Score every item by its count of following the history's last item, then by popularity."""
    counts, pop = transition_counts(sequences, n_items), popularity(sequences, n_items)

    def score(history: np.ndarray) -> np.ndarray:
        return _with_tiebreak(counts[np.asarray(history)[:, -1]], pop)

    return score


def cooccurrence(sequences: Sequence[np.ndarray], n_items: int, *, window: int = 10, decay: float = 0.7,
                 recent: int = 10) -> Scorer:
    """Score items by what followed the ``recent`` most recent history items, recency-weighted."""
    counts, pop = transition_counts(sequences, n_items, window=window), popularity(sequences, n_items)

    def score(history: np.ndarray) -> np.ndarray:
        history = np.asarray(history)
        out = np.zeros((len(history), n_items + 1))
        for age in range(min(recent, history.shape[1])):
            out += decay ** age * counts[history[:, -1 - age]]  # row 0 (padding) is all zero
        return _with_tiebreak(out, pop, scale=1e-6)  # weighted sums differ by far more than 1e-6

    return score
