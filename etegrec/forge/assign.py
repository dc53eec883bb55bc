"""FORGE: rebalance RQ codes so that items sharing a prefix spread over the last codebook.

``assign_codes`` is a pure function of an ``[n_items, L]`` integer array (row i = item i+1); it
runs no model and does no I/O. It is vectorised with numpy: items are grouped by sorting one
integer key per row, and the Adler-32 offsets are computed from per-value digit sums instead of
calling ``zlib`` once per prefix. Only the ``nearest_free`` policy loops, over colliding items.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .checks import _check_distances, _check_previous, _check_rq_codes, _readonly

__all__ = ["POLICIES", "CodeAssignment", "CodeOverflowError", "assign_codes", "prefix_offsets"]

POLICIES = ("round_robin", "nearest_free")

_ADLER_MOD = 65521
_KEY_LIMIT = 1 << 62  # row keys stay below this so that key * code_num + code never overflows


class CodeOverflowError(ValueError):
    """More items share one full code than the suffix token (``code_num`` values) can separate."""


@dataclass(frozen=True, eq=False)
class CodeAssignment:
    """The item codes FORGE produced and how crowded they are.

    ``codes`` is ``[n_items, L+1]`` int64 (read-only): the possibly rewritten RQ codes followed by
    the suffix token; row i is item i+1. ``max_conflict`` is the largest suffix + 1 (0 without
    items) and ``max_conflict_before`` the same on the raw RQ codes, i.e. without FORGE.
    ``collision_rate`` is ``(n_items - number of distinct L-code tuples) / n_items`` on the codes
    after FORGE (the tokenizer's definition; 0.0 without items) and ``collision_rate_before`` the
    same on the raw RQ codes. ``n_prefix_groups`` counts the distinct prefixes (all RQ codes but the
    last; one empty prefix when L = 1), ``largest_prefix_group`` is the size of the largest, and
    ``changed`` counts items whose full code differs from ``previous`` (all items without it).
    """

    codes: np.ndarray  # (n_items, L + 1) int64
    max_conflict: int
    max_conflict_before: int
    collision_rate: float
    collision_rate_before: float
    n_prefix_groups: int
    largest_prefix_group: int
    changed: int


@dataclass(frozen=True)
class _Groups:
    """Items grouped by equal keys, listed in (key, item id) order; groups numbered in key order."""

    order: np.ndarray  # (n,) item ids sorted by (key, id)
    group: np.ndarray  # (n,) group of each item of `order`
    starts: np.ndarray  # (n_groups,) where each group starts in `order`
    sizes: np.ndarray  # (n_groups,)

    @property
    def first(self) -> np.ndarray:
        """The lowest item id of each group."""
        return self.order[self.starts]

    def rank_sorted(self) -> np.ndarray:
        """For each item of `order`: how many items with a lower id share its group."""
        return np.arange(self.order.size) - self.starts[self.group]

    def to_items(self, values: np.ndarray) -> np.ndarray:
        """Reorder per-`order` values into item order."""
        out = np.empty_like(values)
        out[self.order] = values
        return out


def assign_codes(
    rq_codes: Any,
    code_num: int,
    *,
    use_forge: bool = True,
    policy: str = "round_robin",
    distances: Any = None,
    previous: Any = None,
) -> CodeAssignment:
    """Give every item its final code: the (possibly rebalanced) RQ codes plus a suffix token.

    Args:
        rq_codes: ``[n_items, L]`` integer array of RQ codes in ``[0, code_num)``; row i = item i+1.
        code_num: codebook size; also the number of values the suffix token can take.
        use_forge: rebalance the last RQ code within each prefix group (SPEC §2, FORGE); when
            False the suffix is computed on the raw RQ codes and ``policy`` is not applied.
        policy: ``"round_robin"``: the k-th item of a prefix group (ascending id, k from 0) gets
            last code ``(adler32(str(prefix).encode()) + k) mod code_num``. ``"nearest_free"``: an
            item keeps its code unless an item with a lower id holds the same L codes; such an item
            moves to the free last code of its prefix group nearest to it by ``distances``
            (movers in ascending id, ties to the lower code) or, with none free, stays.
        distances: ``[n_items, code_num]`` distances of each item to the last codebook's entries;
            required by ``"nearest_free"``, ignored otherwise.
        previous: optional ``[n_items, L+1]`` codes of an earlier call, to count ``changed``.

    Raises:
        ValueError: on malformed input.
        CodeOverflowError: when more than ``code_num`` items end up sharing all L codes.
    """
    codes_in = _check_rq_codes(rq_codes, code_num)
    code_num = operator.index(code_num)
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is not a FORGE policy; use one of {POLICIES!r}.")
    n_items, length = codes_in.shape
    nearest = use_forge and policy == "nearest_free"
    dist = _check_distances(distances, n_items, code_num) if nearest else None
    prev = _check_previous(previous, n_items, length)
    if n_items == 0:
        empty = _readonly(np.zeros((0, length + 1), np.int64))
        return CodeAssignment(empty, 0, 0, 0.0, 0.0, 0, 0, 0)

    prefix_keys = _row_keys(codes_in[:, :-1], code_num)
    full_keys = prefix_keys * code_num + codes_in[:, -1]
    prefixes = _group(prefix_keys)
    if not use_forge:
        raw = _group(full_keys)
        last, suffix = codes_in[:, -1], raw.to_items(raw.rank_sorted())
        before = after = _spread(raw.sizes)
    elif policy == "round_robin":
        group_prefixes = np.take(codes_in, prefixes.first, axis=0)[:, :-1]  # (n_groups, L-1)
        last, suffix, after = _round_robin(group_prefixes, prefixes, code_num)
        before = _spread(_group_sizes(full_keys))
    else:
        raw = _group(full_keys)
        last = _nearest_free_last(codes_in[:, -1], prefixes, raw, dist, code_num)
        final = _group(prefix_keys * code_num + last)
        suffix = final.to_items(final.rank_sorted())
        before, after = _spread(raw.sizes), _spread(final.sizes)

    codes = np.empty((n_items, length + 1), np.int64)
    codes[:, :-2] = codes_in[:, :-1]
    codes[:, -2] = last
    codes[:, -1] = suffix
    n_distinct, max_conflict = after
    if max_conflict > code_num:
        raise _overflow_error(codes[:, :-1], code_num, use_forge)
    return CodeAssignment(
        codes=_readonly(codes),
        max_conflict=max_conflict,
        max_conflict_before=before[1],
        collision_rate=(n_items - n_distinct) / n_items,
        collision_rate_before=(n_items - before[0]) / n_items,
        n_prefix_groups=int(prefixes.sizes.size),
        largest_prefix_group=int(prefixes.sizes.max()),
        changed=n_items if prev is None else int(np.count_nonzero((codes != prev).any(axis=1))),
    )


def prefix_offsets(prefixes: np.ndarray, code_num: int) -> np.ndarray:
    """FORGE offsets ``zlib.adler32(str(tuple(prefix)).encode()) % code_num``, one per row.

    Vectorised: Adler-32 of bytes ``b_0 .. b_{m-1}`` is ``(B << 16) | A`` with
    ``A = 1 + sum(b_i)`` and ``B = m + sum((m - i) * b_i)`` (both mod 65521), so the text
    ``"(c0, c1)"`` only needs, per piece (``"("``, the digits of ``c0``, ``", "``, ...), its byte
    sum, its length-weighted byte sum and its length. Rows must be non-negative integers.
    """
    prefixes = np.asarray(prefixes, np.int64)  # (n_rows, width)
    n_rows, width = prefixes.shape
    values, inverse = np.unique(prefixes, return_inverse=True)
    digits = np.array([_piece(str(int(v)).encode()) for v in values], np.int64).reshape(-1, 3)
    per_value = digits[inverse.reshape(prefixes.shape)]  # (n_rows, width, 3)
    pieces: list[Any] = [_piece(b"(")]
    for j in range(width):
        pieces += [_piece(b", ")] if j else []
        pieces.append(per_value[:, j].T)
    pieces.append(_piece(b",)" if width == 1 else b")"))

    ends, end = [], 0
    for _, _, size in pieces:
        end = end + size
        ends.append(end)
    total = np.broadcast_to(end, (n_rows,))
    a = 1 + sum(byte_sum for byte_sum, _, _ in pieces)
    b = total + sum((total - e) * byte_sum + weighted for (byte_sum, weighted, _), e in zip(pieces, ends))
    adler = ((b % _ADLER_MOD) << 16) | (a % _ADLER_MOD)
    return np.broadcast_to(adler % code_num, (n_rows,)).astype(np.int64)


def _piece(text: bytes) -> tuple[int, int, int]:
    """(byte sum, length-weighted byte sum, length) of one piece of an Adler-32 input."""
    size = len(text)
    return sum(text), sum((size - i) * byte for i, byte in enumerate(text)), size


def _round_robin(
    group_prefixes: np.ndarray, prefixes: _Groups, code_num: int,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """SPEC FORGE steps 2-4: last codes and suffixes (item order), and their ``_spread``.

    The k-th item of a prefix group gets ``(offset + k) mod code_num``, so two items of a group
    share all L codes exactly when their k agree mod code_num: the suffix is ``k // code_num``,
    and no second grouping of the rewritten codes is needed.
    """
    offsets = prefix_offsets(group_prefixes, code_num)
    k = prefixes.rank_sorted()
    last = (offsets[prefixes.group] + k) % code_num
    # A prefix group of s items holds min(s, code_num) distinct codes; the most shared one
    # (its k = 0 code) ceil(s / code_num) times.
    spread = int(np.minimum(prefixes.sizes, code_num).sum()), int(-(-prefixes.sizes.max() // code_num))
    return prefixes.to_items(last), prefixes.to_items(k // code_num), spread


def _nearest_free_last(
    last: np.ndarray, prefixes: _Groups, raw: _Groups, distances: np.ndarray, code_num: int,
) -> np.ndarray:
    """Move each duplicate (not the lowest id of its full-code group) to its nearest free code."""
    raw_rank = raw.to_items(raw.rank_sorted())
    of_prefix = prefixes.to_items(prefixes.group)
    movers = np.flatnonzero(raw_rank > 0)  # ascending item id
    if movers.size == 0:
        return last
    # Only prefix groups with movers need a row of the used-code table.
    busy, mover_row = np.unique(of_prefix[movers], return_inverse=True)
    row_of_group = np.full(prefixes.sizes.size, -1)
    row_of_group[busy] = np.arange(busy.size)
    keepers = np.flatnonzero((raw_rank == 0) & (row_of_group[of_prefix] >= 0))
    used = np.zeros((busy.size, code_num), bool)
    used[row_of_group[of_prefix[keepers]], last[keepers]] = True
    # Each move takes one free code, so only the first `free` movers of a group can move.
    free = code_num - used.sum(axis=1)
    movers_by_row = _group(mover_row)
    can_move = movers_by_row.to_items(movers_by_row.rank_sorted()) < free[mover_row]

    last = last.copy()
    for item, row in zip(movers[can_move].tolist(), mover_row[can_move].tolist()):
        open_codes = np.flatnonzero(~used[row])
        code = int(open_codes[np.argmin(distances[item, open_codes])])
        used[row, code] = True
        last[item] = code
    return last


def _row_keys(rows: np.ndarray, code_num: int) -> np.ndarray:
    """One non-negative int64 key per row, equal exactly for equal rows (mixed radix code_num)."""
    n_rows, width = rows.shape
    if code_num ** (width + 1) < _KEY_LIMIT:
        keys = np.zeros(n_rows, np.int64)
        for j in range(width):
            keys = keys * code_num + rows[:, j]
        return keys
    # Too wide for one int64: number the distinct rows instead (ids < n_rows keep the bound).
    return np.unique(rows, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _group(keys: np.ndarray) -> _Groups:
    """Group items (positions in ``keys``) by key."""
    n = keys.size
    index_bits = max(int(n - 1).bit_length(), 1)
    if int(keys.max()) < (1 << (63 - index_bits)):
        # Sorting (key, id) packed in one int64 is a stable sort and numpy's fastest one.
        packed = np.sort((keys << index_bits) | np.arange(n))
        order, sorted_keys = packed & ((1 << index_bits) - 1), packed >> index_bits
    else:
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
    is_start = np.empty(n, bool)
    is_start[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    return _Groups(order, np.cumsum(is_start) - 1, starts, np.diff(starts, append=n))


def _group_sizes(keys: np.ndarray) -> np.ndarray:
    """Sizes of the groups of equal keys (cheaper than ``_group`` when nothing else is needed)."""
    sorted_keys = np.sort(keys)
    is_start = np.empty(keys.size, bool)
    is_start[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=is_start[1:])
    return np.diff(np.flatnonzero(is_start), append=keys.size)


def _spread(sizes: np.ndarray) -> tuple[int, int]:
    """(number of distinct full codes, items sharing the most shared one) from group sizes."""
    return int(sizes.size), int(sizes.max())


def _overflow_error(full: np.ndarray, code_num: int, use_forge: bool) -> CodeOverflowError:
    """The error naming the most shared L codes (the earliest such group on ties); slow path."""
    rows, first, counts = np.unique(full, axis=0, return_index=True, return_counts=True)
    largest = int(counts.max())
    shared = rows[np.flatnonzero(counts == largest)[np.argmin(first[counts == largest])]]
    remedy = ("give the last codebook more entries, try policy='nearest_free', or check the tokenizer "
              "for codebook collapse" if use_forge else "turn FORGE on (use_forge=True), give the "
              "codebooks more entries, or check the tokenizer for codebook collapse")
    return CodeOverflowError(
        f"{largest} items share the codes {tuple(int(c) for c in shared)!r}, so max_conflict {largest} "
        f"exceeds code_num={code_num} and the suffix token cannot separate them; {remedy}."
    )
