"""Training stages (``python -m etegrec.training.embed | rqvae | joint``) and what they share.

See docs/architecture.md for which module does what.
"""
from __future__ import annotations

from .fit import LoopPosition, StageTrainer, fit_stage
from .loop import EpochResult, NonFiniteLossError, shuffled_batches, train_epoch
from .options import RunOptions
from .run import Run
from .rundir import RunDir, atomic_write_bytes, atomic_write_text
from .stopping import EarlyStopping

__all__ = [
    "EarlyStopping",
    "EpochResult",
    "LoopPosition",
    "NonFiniteLossError",
    "Run",
    "RunDir",
    "RunOptions",
    "StageTrainer",
    "atomic_write_bytes",
    "atomic_write_text",
    "fit_stage",
    "shuffled_batches",
    "train_epoch",
]
