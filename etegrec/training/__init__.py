"""Training stages (``python -m etegrec.training.embed | rqvae``) and what they share."""
from __future__ import annotations

from .loop import EpochResult, NonFiniteLossError, shuffled_batches, train_epoch
from .run import Run, atomic_write_bytes, atomic_write_text

__all__ = [
    "EpochResult",
    "NonFiniteLossError",
    "Run",
    "atomic_write_bytes",
    "atomic_write_text",
    "shuffled_batches",
    "train_epoch",
]
