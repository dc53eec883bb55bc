"""The run machinery every stage shares, and knows no stage by name.

One fit loop (:mod:`.fit`, :mod:`.loop`, :mod:`.stopping`), the run around it (:mod:`.options`
resolved once, :mod:`.run` the Accelerator, subscribers and Ctrl-C, :mod:`.rundir` the files,
:mod:`.checkpoint` the checkpoint format, :mod:`.resume`, :mod:`.atomic`, :mod:`.item_codes`), the
evaluation every stage shares (:mod:`.evaluation`), the stage cache (:mod:`.cache`), the pipeline
that chains stages by their declarations (:mod:`.pipeline`) and the command line (:mod:`.cli`).
"""
from __future__ import annotations

from .atomic import atomic_write_bytes, atomic_write_text
from .evaluation import evaluate_full_ranking
from .fit import LoopPosition, StageTrainer, fit_stage
from .loop import EpochProgress, EpochResult, NonFiniteLossError, shuffled_batches, train_epoch
from .options import RunOptions
from .run import Run, check_world, launch_rank, prepare_process
from .rundir import RunDir
from .stopping import EarlyStopping

__all__ = [
    "EarlyStopping",
    "EpochProgress",
    "EpochResult",
    "LoopPosition",
    "NonFiniteLossError",
    "Run",
    "RunDir",
    "RunOptions",
    "StageTrainer",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_world",
    "evaluate_full_ranking",
    "fit_stage",
    "launch_rank",
    "prepare_process",
    "shuffled_batches",
    "train_epoch",
]
