"""Learning probes of a generative recommender: pure functions of arrays (no model, no I/O).

They answer *why* NDCG is where it is. With ``ranked`` the top-k item ids per user (-1 = no item),
``history`` the left-padded histories (0 = padding) and ``item_codes`` the ``[n_items, L]`` codes
(row i = item i + 1):

* :func:`code_floors`: per code position, the cross-entropy a model without any history reaches:
  the training targets' frequency of each code given the earlier codes (add-one smoothed items).
  Summed over positions it is the popularity model's item NLL.
* :func:`topk_overlap`: share of one ranking's top-k kept in another (order sensitivity with a
  shuffled history, recency reliance with the last item dropped; 1.0 = no effect).
* :func:`repeat_share`: share of top-k slots that are items of the history.
"""
from __future__ import annotations

import numpy as np

__all__ = ["code_floors", "drop_last", "popularity_nll", "repeat_share", "shuffle_histories", "topk_overlap"]


def _smoothed(target_counts: np.ndarray) -> np.ndarray:
    return np.asarray(target_counts, dtype=np.float64) + 1.0  # every item stays possible


def popularity_nll(target_counts: np.ndarray, targets: np.ndarray) -> float:
    """Mean ``-log p(target)`` with ``p`` the add-one smoothed training popularity.

    Args:
        target_counts: (n_items,) how often item i + 1 is a training target.
        targets: (n,) 1-based item ids.
    """
    counts = _smoothed(target_counts)
    return float(np.mean(-np.log(counts[np.asarray(targets) - 1] / counts.sum())))


def code_floors(item_codes: np.ndarray, target_counts: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(L,) mean over ``targets`` of ``-log p(c_p | c_<p)`` under smoothed training popularity.

    ``p(c_p | c_<p)`` is the smoothed count of items with prefix ``c_<=p`` over that of ``c_<p``;
    the positions sum to :func:`popularity_nll` (the chain rule), so the floors say at which
    position a model falls short of knowing nothing about the history.
    """
    codes = np.asarray(item_codes)
    counts = _smoothed(target_counts)
    targets = np.asarray(targets) - 1  # (n,) rows of codes
    floors, previous = [], np.full(len(targets), counts.sum())
    radix = int(codes.max(initial=0)) + 1
    key = np.zeros(len(codes), np.int64)
    for p in range(codes.shape[1]):
        # mass of every item sharing the target's first p + 1 codes: items grouped by that prefix
        # (memory grows with the items, where comparing every target to every item grew with their
        # product). One integer per prefix, numbered afresh whenever the next digit would overflow.
        if int(key.max(initial=0)) >= np.iinfo(np.int64).max // radix:
            key = np.unique(key, return_inverse=True)[1].reshape(-1).astype(np.int64)
        key = key * radix + codes[:, p]
        _, group = np.unique(key, return_inverse=True)
        group = group.reshape(-1)
        mass = np.bincount(group, weights=counts)[group[targets]]  # counts are whole numbers: exact sums
        floors.append(float(np.mean(-np.log(mass / previous))))
        previous = mass
    return np.array(floors)


def topk_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of row i of ``a`` (n, k) that also appears in row i of ``b``; -1 entries never match."""
    a, b = np.asarray(a), np.asarray(b)
    k = a.shape[1]
    same = (a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)
    return float(same.any(axis=2).sum(axis=1).mean() / k)


def repeat_share(ranked: np.ndarray, history: np.ndarray) -> float:
    """Share of all top-k slots (n, k) holding an item of the row's ``history`` (n, H)."""
    ranked, history = np.asarray(ranked), np.asarray(history)
    hit = (ranked[:, :, None] == history[:, None, :]) & (ranked[:, :, None] > 0)
    return float(hit.any(axis=2).mean())


def shuffle_histories(history: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each row's real items (non-zero) in a random order, padding left where it was."""
    out = np.array(history, copy=True)
    for row in out:
        real = row > 0
        row[real] = rng.permutation(row[real])
    return out


def drop_last(history: np.ndarray) -> np.ndarray:
    """Histories without their most recent item (right-most), left-padded again; a row keeps at
    least one item."""
    out = np.array(history, copy=True)
    keep = (out > 0).sum(axis=1) > 1
    out[keep, 1:] = out[keep, :-1]
    out[keep, 0] = 0
    return out
