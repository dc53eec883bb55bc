"""The checkpoint format, in one place: what a ``.pt`` file holds, how it is written, read back
safely, versioned and upgraded. Everything else asks this module.

A checkpoint is a dict of tensors and plain data (str, int, float, bool, None, lists, tuples,
dicts): ``stage``, ``format``, ``rng`` (every generator's state), the trainer's own keys
(``model``, ``recommender``, ``optimizer``, ...), and the loop's (``epoch``, ``position``,
``early_stopping``, ``progress``, ``hook_counts``). It is read with
``torch.load(weights_only=True)``, so nothing in a file, shared run directory or stage cache
can run code: a file whose pickle names anything else (a class, a function) is refused, by name.

Format 1 (no ``format`` key; written before this module) also held NumPy arrays (the NumPy
generator's key, the tokenizer stage's codes): those NumPy types alone are allowed in, and a
format-1 checkpoint from before the one fit loop is upgraded to today's layout on read.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from etegrec.config import ConfigError

from .atomic import atomic_write_bytes

__all__ = ["FORMAT", "CheckpointError", "read_checkpoint", "upgrade_checkpoint", "write_checkpoint"]

FORMAT = 2  # 2: plain data and tensors only; 1: NumPy arrays too, and before 1 the pre-fit-loop layout

# what format-1 files need to rebuild their NumPy arrays: the array type, its reconstructor and the
# dtypes written (building an array runs no code of the file's choosing); numpy 1.x spelled the module
# numpy.core, numpy 2 numpy._core
try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct
_NUMPY_TYPES = [np.ndarray, np.dtype, *(type(np.dtype(t)) for t in ("uint32", "int32", "int64", "float32", "float64"))]
_NUMPY_GLOBALS = [*_NUMPY_TYPES, *((_reconstruct, f"{m}.multiarray._reconstruct") for m in ("numpy._core", "numpy.core"))]


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: missing, unreadable, unsafe, of another stage or a newer format."""


def write_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors and plain data) to ``path`` in today's format, atomically."""
    buffer = io.BytesIO()
    torch.save({**state, "format": FORMAT}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def read_checkpoint(path: str | Path, *, stage: str | None = None, resumable: bool = False,
                    what: str = "checkpoint") -> dict[str, Any]:
    """The checkpoint in ``path``, on the CPU, loaded without running any code.

    Args:
        stage: the name of the stage it must belong to; None accepts any.
        resumable: it must hold the loop's position (``last.pt``); it comes back in today's layout.
        what: how the caller names the file in an error (``--resume``, ``checkpoint``, ...).

    Raises:
        CheckpointError: missing, unreadable (truncated, not a checkpoint), holding something that would
            run code, written by a newer etegrec, or of another stage; one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure of an untrusted file is the file's fault
        unsafe = _unsafe_globals(path, exc)
        if unsafe:
            raise CheckpointError(
                f"{what}: {str(path)!r} was refused: loading it would call {', '.join(unsafe)}, and an etegrec "
                "checkpoint holds only tensors and plain data; it was not written by etegrec or was altered, so "
                "delete it (and train again)") from None
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(f"{what}: {str(path)!r} could not be read ({reason}); it is truncated or not a "
                              "checkpoint: delete it (and train again)") from None
    if not isinstance(state, dict) or not isinstance(state.get("stage"), str):
        raise CheckpointError(f"{what}: {str(path)!r} is not an etegrec checkpoint (no stage); delete it")
    if not isinstance(state.get("format", 1), int) or state.get("format", 1) > FORMAT:
        raise CheckpointError(f"{what}: {str(path)!r} has checkpoint format {state.get('format')!r}, newer than "
                              f"this etegrec's {FORMAT}; upgrade etegrec to use it")
    if stage is not None and state["stage"] != stage:
        raise CheckpointError(f"{what}: {str(path)!r} belongs to a {state['stage']} run, not a {stage} run; pass "
                              f"the directory of a {stage} run")
    if not resumable:
        return state
    try:
        return upgrade_checkpoint(state)
    except (KeyError, TypeError, AttributeError):  # no position, or a format-1 layout with keys missing
        raise CheckpointError(f"{what}: {str(path)!r} is not a resumable {state['stage']} checkpoint") from None


def _unsafe_globals(path: Path, exc: Exception) -> list[str]:
    """What a refused pickle asked for beyond what :func:`read_checkpoint` allows (empty: not that)."""
    if not isinstance(exc, pickle.UnpicklingError):
        return []
    try:
        allowed = {f"{t.__module__}.{t.__qualname__}" for t in _NUMPY_TYPES}
        found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                 if g not in allowed and not g.endswith("multiarray._reconstruct")]
    except Exception:  # noqa: BLE001 - not even a readable archive: the message below names the global
        found = []
    return sorted(found) or re.findall(r"GLOBAL ([\w.]+)", str(exc))[:3]


def upgrade_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint in today's layout. Those written before the one fit loop kept each stage's own
    position dict and early-stopping numbers (the joint stage ``best_ndcg``, ``best_epoch``,
    ``best_valid``); today's come back unchanged.

    Raises:
        KeyError: not a resumable checkpoint (no ``position``, or keys of its old layout missing).
    """
    if "position" not in state:
        raise KeyError("position")
    if state.get("format", 1) >= 2 or "early_stopping" in state:
        return state
    state, old = dict(state), state.get("position") or {}
    if "best_ndcg" in state:  # the joint stage kept its own early-stopping numbers
        stopping = {"best_score": state["best_ndcg"], "best_epoch": state["best_epoch"],
                    "best_metrics": state["best_valid"], "wait_count": old.get("bad", 0)}
        position = {"epoch": old.get("epoch", 0), "segment": old.get("segment", 0), "index": old.get("index", 0)}
    else:  # embed and rqvae: one segment, so the index is the epoch
        stopping = {"best_score": old.get("best"), "best_epoch": old.get("best_epoch", -1),
                    "best_metrics": old.get("best_valid", old.get("best_quality", {})), "wait_count": old.get("bad", 0)}
        position = {"epoch": old.get("epoch", 0), "segment": 0, "index": old.get("epoch", 0)}
    state["early_stopping"], state["position"] = stopping, position
    return state
