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
from dataclasses import dataclass

import numpy as np

__all__ = ["TransitionCounts", "cooccurrence", "markov_chain", "popularity", "transition_counts"]

Scorer = Callable[[np.ndarray], np.ndarray]


def popularity(sequences: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """(n_items + 1,) how often each item occurs in the training sequences (index 0 = padding, 0)."""
    counts = np.bincount(np.concatenate(sequences), minlength=n_items + 1).astype(np.float64)
    counts[0] = 0.0
    return counts


@dataclass(frozen=True)
class TransitionCounts:
    """Sparse ``(n_items + 1) x (n_items + 1)`` counts in CSR form: row ``a`` holds the items that
    followed ``a`` (``indices[indptr[a]:indptr[a + 1]]``, ascending) and their weights (``values``).

    A dense matrix would hold (n_items + 1)^2 float64: 80 GB at 1e5 items. The pairs that occur are
    at most ``window`` per training interaction, so the CSR form grows with the interactions.
    """

    n_items: int
    indptr: np.ndarray  # (n_items + 2,) int64
    indices: np.ndarray  # (nnz,) int64
    values: np.ndarray  # (nnz,) float64

    def add_rows_to(self, out: np.ndarray, rows: np.ndarray, weight: float = 1.0) -> np.ndarray:
        """``out[i] += weight * C[rows[i]]`` for every i (out (len(rows), n_items + 1)); returns ``out``."""
        rows = np.asarray(rows)
        starts, lengths = self.indptr[rows], np.diff(self.indptr)[rows]
        owner = np.repeat(np.arange(len(rows)), lengths)  # the out row of each stored entry
        at = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths) + np.repeat(starts, lengths)
        out[owner, self.indices[at]] += weight * self.values[at]  # a row's columns are distinct
        return out

    def toarray(self) -> np.ndarray:
        """The dense matrix (small catalogues, tests)."""
        return self.add_rows_to(np.zeros((self.n_items + 1, self.n_items + 1)), np.arange(self.n_items + 1))


def transition_counts(sequences: Sequence[np.ndarray], n_items: int, *, window: int = 1) -> TransitionCounts:
    """Counts ``C[a, b]`` of ``b`` following ``a`` at gap ``d <= window``, each weighted ``1 / d``
    (``window=1``: plain first-order transition counts), as a sparse :class:`TransitionCounts`.

    Each cell sums its weights in the order the sequences, then the gaps, then the positions come
    (what ``np.add.at`` over the sequences one by one did), so the sums are the same to the bit.
    """
    lengths = np.array([len(seq) for seq in sequences], dtype=np.int64)
    flat = np.concatenate([np.asarray(seq, dtype=np.int64) for seq in sequences]) if len(sequences) else \
        np.zeros(0, np.int64)
    starts = np.cumsum(lengths) - lengths
    owner = np.repeat(np.arange(len(lengths)), lengths)  # sequence of each flat position
    position = np.arange(len(flat)) - starts[owner]
    parts = []  # (order key, from, to, weight) of every pair
    for gap in range(1, window + 1):
        # a pair at this gap exists where the sequence is long enough (gap <= len - 1 and gap <= window)
        first = np.flatnonzero(position + gap < lengths[owner])
        # one int64 that sorts by (sequence, gap, position): the order np.add.at added them in
        rank = starts[owner[first]] * window + (gap - 1) * lengths[owner[first]] + position[first]
        parts.append((rank, flat[first], flat[first + gap], np.full(len(first), 1.0 / gap)))
    rank, src, dst, weight = (np.concatenate(column) for column in zip(*parts))
    order = np.argsort(rank, kind="stable")
    keys = src[order] * (n_items + 1) + dst[order]
    cells, inverse = np.unique(keys, return_inverse=True)
    values = np.bincount(inverse.reshape(-1), weights=weight[order], minlength=len(cells))
    rows = cells // (n_items + 1)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_items + 1))]).astype(np.int64)
    return TransitionCounts(n_items, indptr, cells % (n_items + 1), values)


def _with_tiebreak(scores: np.ndarray, pop: np.ndarray, scale: float = 1.0) -> np.ndarray:
    scores = scores + scale * pop / (pop.max() + 1.0)  # below `scale`: reorders equal scores only
    scores[:, 0] = -np.inf
    return scores


def markov_chain(sequences: Sequence[np.ndarray], n_items: int) -> Scorer:
    """Score every item by its count of following the history's last item, then by popularity."""
    counts, pop = transition_counts(sequences, n_items), popularity(sequences, n_items)

    def score(history: np.ndarray) -> np.ndarray:
        last = np.asarray(history)[:, -1]
        return _with_tiebreak(counts.add_rows_to(np.zeros((len(last), n_items + 1)), last), pop)

    return score


def cooccurrence(sequences: Sequence[np.ndarray], n_items: int, *, window: int = 10, decay: float = 0.7,
                 recent: int = 10) -> Scorer:
    """Score items by what followed the ``recent`` most recent history items, recency-weighted."""
    counts, pop = transition_counts(sequences, n_items, window=window), popularity(sequences, n_items)

    def score(history: np.ndarray) -> np.ndarray:
        history = np.asarray(history)
        out = np.zeros((len(history), n_items + 1))
        for age in range(min(recent, history.shape[1])):
            counts.add_rows_to(out, history[:, -1 - age], decay ** age)  # row 0 (padding) is empty
        return _with_tiebreak(out, pop, scale=1e-6)  # weighted sums differ by far more than 1e-6

    return score
