"""The checks of ``assign_codes``' inputs: one clear error naming the argument and its fix."""
from __future__ import annotations

import operator
from typing import Any

import numpy as np

_MAX_CODE_NUM = 1 << 31


def _check_rq_codes(rq_codes: Any, code_num: Any) -> np.ndarray:
    try:
        code_num = operator.index(code_num)
    except TypeError:
        raise TypeError(f"code_num={code_num!r} must be an int; pass the codebook size.") from None
    if not 1 <= code_num <= _MAX_CODE_NUM:
        raise ValueError(f"code_num={code_num!r} is not a codebook size; pass one in [1, 2**31].")
    codes = np.asarray(rq_codes)
    if codes.ndim != 2 or codes.shape[1] < 1:
        raise ValueError(f"rq_codes has shape {codes.shape!r}; pass an [n_items, L] array with L >= 1.")
    if codes.dtype == np.bool_ or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"rq_codes has dtype {codes.dtype!r}; pass integer codes (e.g. int64).")
    if codes.size and (codes.min() < 0 or codes.max() >= code_num):
        bad = codes.min() if codes.min() < 0 else codes.max()
        raise ValueError(f"rq_codes contains {int(bad)!r}, outside [0, {code_num}); pass codes below "
                         f"code_num or the right code_num.")
    return codes.astype(np.int64, copy=False)


def _check_distances(distances: Any, n_items: int, code_num: int) -> np.ndarray:
    if distances is None:
        raise ValueError("distances=None but policy='nearest_free' needs them; pass the "
                         "[n_items, code_num] distances to the last codebook or use 'round_robin'.")
    dist = np.asarray(distances)
    if dist.shape != (n_items, code_num):
        raise ValueError(f"distances has shape {dist.shape!r}; pass [n_items, code_num] = "
                         f"{(n_items, code_num)!r}.")
    if np.isnan(dist).any():
        raise ValueError("distances contains NaN; pass finite distances to the last codebook.")
    return dist


def _check_previous(previous: Any, n_items: int, length: int) -> np.ndarray | None:
    if previous is None:
        return None
    prev = np.asarray(previous)
    if prev.shape != (n_items, length + 1):
        raise ValueError(f"previous has shape {prev.shape!r}; pass the [n_items, L+1] = "
                         f"{(n_items, length + 1)!r} codes of an earlier call or None.")
    return prev


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array
