"""Filtering, chronological leave-one-out splitting and the prepared :class:`SequenceData`.

The protocol (docs/protocol.md): every interaction counts; iterative k-core on users and items; each
user's items sorted by timestamp with ties in file order (formats without timestamps: in file
order, which is their time order); the last item is the test target, the
second last the validation target, and every earlier position ``i >= 1`` is a training sample
whose history is ``items[:i]``. Items are numbered ``1..N`` in order of first appearance in the
file (0 is padding); histories are left-padded to ``max_his_len`` and keep the most recent items.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .readers import DataError, Interactions, PreparedSplits
from .windows import make_windows

__all__ = ["SequenceData", "first_users", "k_core", "pad_histories", "prepare_interactions", "prepare_splits"]

_SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class SequenceData:
    """A prepared dataset. Item ids run 1..n_items; 0 is padding.

    ``seq_items[seq_offsets[u]:seq_offsets[u+1]]`` is user u's chronological sequence (including
    the validation and test targets). ``<split>_history`` is ``[n, max_his_len]`` left-padded,
    ``<split>_target`` ``[n]`` and ``<split>_user`` ``[n]``.
    """

    name: str
    item_map: tuple[str, ...]  # raw token of item i at position i - 1
    seq_offsets: np.ndarray
    seq_items: np.ndarray
    # The ordering key of every seq_items entry: its timestamp where the source has them; where it
    # has none (prepared splits, s3rec, lcrec) its position in the file, never a made-up time.
    # Positions are distinct, so those users have no ties for shuffle_ties to reorder.
    seq_times: np.ndarray
    train_history: np.ndarray
    train_target: np.ndarray
    train_user: np.ndarray
    valid_history: np.ndarray
    valid_target: np.ndarray
    valid_user: np.ndarray
    test_history: np.ndarray
    test_target: np.ndarray
    test_user: np.ndarray

    @cached_property
    def digest(self) -> str:
        """A digest of the prepared content (sequences, timestamps, splits, item map): what a stage
        trained on this data was trained on. Equal data, equal digest, whatever the file's path or
        mtime; one changed timestamp changes it."""
        h = hashlib.sha256()
        for name in ("seq_offsets", "seq_items", "seq_times", "train_history", "train_target", "valid_history",
                     "valid_target", "test_history", "test_target"):
            array = np.ascontiguousarray(getattr(self, name))
            h.update(f"{name}:{array.dtype.str}:{array.shape}\n".encode())
            h.update(array.tobytes())
        h.update("\n".join(self.item_map).encode())
        return h.hexdigest()[:16]

    @property
    def n_items(self) -> int:
        return len(self.item_map)

    @property
    def n_users(self) -> int:
        return len(self.seq_offsets) - 1

    @property
    def max_his_len(self) -> int:
        return self.train_history.shape[1]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(history [n, max_his_len], target [n])`` of split ``train``, ``valid`` or ``test``."""
        if name not in _SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {_SPLITS}")
        return getattr(self, f"{name}_history"), getattr(self, f"{name}_target")

    def train_sequences(self, rng: np.random.Generator | None = None) -> list[np.ndarray]:
        """Each user's training sequence: the chronological items without the last two.

        With ``rng``, items that share a timestamp are put in a random order (the held-out last
        two items stay where they are): the file order inside such ties carries no information,
        and on ml-100k half of all consecutive pairs are ties.
        """
        items = self._items(rng)
        return [items[a:b - 2] for a, b in zip(self.seq_offsets[:-1], self.seq_offsets[1:])]

    def train_windows(self, length: int, stride: int | None = None, rng: np.random.Generator | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """The training sequences (ties shuffled with ``rng``, as in :meth:`train_sequences`) cut into
        windows of ``length`` items: ``(windows [n, length], counted [n])``, see :func:`make_windows`."""
        return make_windows(self.train_sequences(rng), length, stride)

    def train_samples(self, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(train_history, train_target)``, with ties shuffled as in :meth:`train_sequences` when
        ``rng`` is given. Sample ``i`` is the same position of the same user either way. Prepared
        splits (no users, no timestamps) always give the samples of their files."""
        if rng is None or (self.train_user < 0).any():  # prepared splits: samples as the files give them
            return self.train_history, self.train_target
        samples = _split_samples(self.seq_offsets, self._items(rng), self.max_his_len)
        return samples["train_history"], samples["train_target"]

    def _items(self, rng: np.random.Generator | None) -> np.ndarray:
        """Every user's items in order; with ``rng``, same-timestamp items before the held-out two shuffled."""
        items = self.seq_items
        if rng is not None:
            lengths = np.diff(self.seq_offsets)
            owner = np.repeat(np.arange(self.n_users), lengths)
            held_out = np.arange(len(items)) - self.seq_offsets[owner] >= lengths[owner] - 2
            noise = np.where(held_out, 0.0, rng.random(len(items)))
            items = items[np.lexsort((noise, held_out, self.seq_times, owner))]
        return items

    def stats(self) -> dict[str, float]:
        lengths = np.diff(self.seq_offsets)
        return {
            "users": self.n_users,
            "items": self.n_items,
            "interactions": int(lengths.sum()),
            "avg_length": round(float(lengths.mean()), 2) if len(lengths) else 0.0,
            "train_samples": len(self.train_target),
            "valid_samples": len(self.valid_target),
            "test_samples": len(self.test_target),
        }


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the rows that survive the iterative k-core filter on users and items.

    ``users`` and ``items`` are integer codes; one pass can create new users or items below k,
    so passes repeat until nothing changes.
    """
    keep = np.ones(len(users), dtype=bool)
    while True:
        user_count = np.bincount(users[keep], minlength=users.max(initial=-1) + 1)
        item_count = np.bincount(items[keep], minlength=items.max(initial=-1) + 1)
        new_keep = keep & (user_count[users] >= k) & (item_count[items] >= k)
        if new_keep.sum() == keep.sum():
            return new_keep
        keep = new_keep


def first_users(inter: Interactions, n: int) -> Interactions:
    """The interactions of the first ``n`` distinct users in file order (a slice for smoke runs)."""
    _, first = np.unique(inter.users, return_index=True)
    keep_users = inter.users[np.sort(first)[:n]]
    keep = np.isin(inter.users, keep_users)
    return Interactions(inter.users[keep], inter.items[keep],
                        None if inter.timestamps is None else inter.timestamps[keep])


def pad_histories(histories: list[np.ndarray] | list[list[int]], max_his_len: int) -> np.ndarray:
    """Left-pad (with 0) the last ``max_his_len`` items of each history into ``[n, max_his_len]``."""
    out = np.zeros((len(histories), max_his_len), dtype=np.int64)
    for row, hist in enumerate(histories):
        hist = hist[-max_his_len:]
        if len(hist):
            out[row, max_his_len - len(hist):] = hist
    return out


def _first_appearance_codes(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes numbered in order of first appearance, and the tokens in that order."""
    uniq, first, inverse = np.unique(tokens, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse], uniq[order]


def _split_samples(offsets: np.ndarray, seq: np.ndarray, max_his_len: int) -> dict[str, np.ndarray]:
    """Leave-one-out samples from the users' chronological sequences (CSR form)."""
    lengths = np.diff(offsets)
    owner = np.repeat(np.arange(len(lengths)), lengths)  # user of each sequence position
    rel = np.arange(len(seq)) - offsets[owner]  # position inside the user's sequence
    targets = {
        "train": np.flatnonzero((rel >= 1) & (rel <= lengths[owner] - 3)),
        "valid": offsets[1:] - 2,
        "test": offsets[1:] - 1,
    }
    window = np.arange(-max_his_len, 0)
    out = {}
    for split, idx in targets.items():
        gather = idx[:, None] + window[None, :]  # (n, max_his_len) positions before the target
        inside = gather >= offsets[owner[idx]][:, None]
        out[f"{split}_history"] = np.where(inside, seq[np.maximum(gather, 0)], 0).astype(np.int64)
        out[f"{split}_target"] = seq[idx].astype(np.int64)
        out[f"{split}_user"] = owner[idx].astype(np.int64)
    return out


def prepare_interactions(inter: Interactions, *, name: str, min_count: int = 5,
                         max_his_len: int = 20, source: str = "") -> SequenceData:
    """Filter, sort and split raw interactions into a :class:`SequenceData`.

    Raises:
        DataError: when nothing is left after filtering (the message gives the counts before).
    """
    if max_his_len < 1:
        raise DataError(f"max_his_len must be at least 1, got {max_his_len!r}")
    if min_count < 3:  # shorter users would take their valid/test targets from the previous user
        raise DataError(f"min_count must be at least 3 (each user needs a history item, a validation and "
                        f"a test target), got {min_count!r}; use --min-count 3 or more")
    user_codes, _ = _first_appearance_codes(inter.users)
    item_codes_raw, _ = _first_appearance_codes(inter.items)
    keep = k_core(user_codes, item_codes_raw, min_count) if len(user_codes) else np.zeros(0, bool)
    if not keep.any():
        raise DataError(
            f"{source or name}: no interactions left after the {min_count}-core filter "
            f"(before filtering: {len(np.unique(inter.users))} users, {len(np.unique(inter.items))} items, "
            f"{len(inter.users)} interactions); use a larger dataset or a smaller min_count")
    # no timestamps: the file's positions order the rows (file order is time order there)
    order_key = np.arange(len(keep), dtype=np.float64) if inter.timestamps is None else inter.timestamps
    users, items, times = inter.users[keep], inter.items[keep], order_key[keep]
    user_codes, _ = _first_appearance_codes(users)
    item_codes, item_tokens = _first_appearance_codes(items)
    # sort by (user, timestamp); lexsort is stable, so file order breaks timestamp ties
    order = np.lexsort((times, user_codes))
    seq = item_codes[order].astype(np.int64) + 1
    offsets = np.concatenate([[0], np.cumsum(np.bincount(user_codes, minlength=user_codes.max() + 1))])
    return SequenceData(name=name, item_map=tuple(str(t) for t in item_tokens),
                        seq_offsets=offsets.astype(np.int64), seq_items=seq, seq_times=times[order],
                        **_split_samples(offsets, seq, max_his_len))


def prepare_splits(splits: PreparedSplits, *, name: str, max_his_len: int = 20) -> SequenceData:
    """Renumber ETEGRec-style prepared splits to items 1..N and pad their histories.

    Item ids are renumbered in ascending order of the ids the files use. Users' sequences are
    rebuilt from the test lines (history + target), which hold one line per user.
    """
    ids = set((splits.item_map or {}).values())
    for split in _SPLITS:
        hists, targets = getattr(splits, split)
        ids.update(targets)
        ids.update(i for h in hists for i in h)
    ordered = sorted(ids)
    renumber = {old: new for new, old in enumerate(ordered, start=1)}
    token_of = {v: k for k, v in (splits.item_map or {}).items()}
    fields = {}
    for split in _SPLITS:
        hists, targets = getattr(splits, split)
        fields[f"{split}_history"] = pad_histories([[renumber[i] for i in h] for h in hists], max_his_len)
        fields[f"{split}_target"] = np.asarray([renumber[t] for t in targets], dtype=np.int64)
        # prepared files name no users: the k-th valid/test line is taken as user k
        fields[f"{split}_user"] = (np.arange(len(targets)) if split != "train"
                                   else np.full(len(targets), -1)).astype(np.int64)
    seqs = [[renumber[i] for i in h] + [renumber[t]] for h, t in zip(*splits.test)]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs], dtype=np.int64)]).astype(np.int64)
    seq_items = np.asarray([i for s in seqs for i in s], dtype=np.int64)
    return SequenceData(name=name, item_map=tuple(token_of.get(i, str(i)) for i in ordered),
                        seq_offsets=offsets, seq_items=seq_items,
                        seq_times=np.arange(len(seq_items), dtype=np.float64), **fields)
