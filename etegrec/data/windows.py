"""Training windows: the one place sequences are cut into fixed-length windows (the SASRec stage's,
and the joint stage's with ``joint.targets: all``)."""
from __future__ import annotations

import numpy as np

__all__ = ["make_windows"]


def make_windows(sequences: list[np.ndarray], length: int, stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cut sequences into left-padded windows of ``length`` items, from the end backwards.

    A window's last ``stride`` targets are new (``window_loss`` predicts ``w[1:]`` from ``w[:-1]``),
    so every item after a sequence's first is a target exactly once. The default stride
    ``length - 1`` makes consecutive windows overlap by one item; a smaller stride gives targets
    longer histories (closer to evaluation, where the history is full) at the cost of more windows.

    Returns ``(windows [n, length], counted [n])``: ``counted`` is how many trailing targets of
    each window are to be scored (all of them for a sequence's first window).
    """
    stride = length - 1 if stride is None else stride
    if not 1 <= stride <= length - 1:
        raise ValueError(f"window stride={stride!r} must lie between 1 and the window's targets ({length - 1}).")
    rows, counted = [], []
    for seq in sequences:
        end = len(seq)
        while end > 1:
            start = max(0, end - length)
            window = seq[start:end]
            rows.append(np.pad(window, (length - len(window), 0)))
            counted.append(length - 1 if start == 0 else stride)
            if start == 0:
                break
            end -= stride
    windows = np.asarray(rows, dtype=np.int64).reshape(-1, length)
    return windows, np.asarray(counted, dtype=np.int64)
