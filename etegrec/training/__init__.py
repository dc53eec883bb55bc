"""Training: the stages (``python -m etegrec.training.embed | rqvae | joint``) and the machinery they share.

One room each: :mod:`.run` holds the run machinery (fit loop, run directory, checkpoints, options,
command line, stage cache, pipeline); :mod:`.embed`, :mod:`.rqvae` and :mod:`.joint` hold each
stage with its helpers, and declare it (:class:`Stage`); :mod:`.stages` registers them;
:mod:`.trained` loads a finished joint run for use (``etegrec.load_run``). See docs/architecture.md.
"""
from __future__ import annotations

from .run import (EarlyStopping, EpochResult, LoopPosition, NonFiniteLossError, Run, RunDir, RunOptions, StageTrainer,
                  atomic_write_bytes, atomic_write_text, fit_stage, shuffled_batches, train_epoch)
from .run.pipeline import run_stage
from .stage import Stage

__all__ = [
    "EarlyStopping",
    "EpochResult",
    "LoopPosition",
    "NonFiniteLossError",
    "Run",
    "RunDir",
    "RunOptions",
    "Stage",
    "StageTrainer",
    "atomic_write_bytes",
    "atomic_write_text",
    "fit_stage",
    "run_stage",
    "shuffled_batches",
    "train_epoch",
]
