"""The pipeline: each stage trained after the ones it needs, those reused from the stage cache.

``run_rqvae`` builds (or reuses) the item embeddings first; ``run_joint``, the main job, the
embeddings and the pretrained tokenizer. A cached stage is a complete run directory of its own under
``$ETEGREC_HOME/stages/`` (see :mod:`etegrec.training.stages`); it logs to no tracker. This module
imports the stages; no stage imports it (only the ``python -m`` commands do).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from accelerate.utils import set_seed

from etegrec.config import Config
from etegrec.data import SequenceData

from .checkpoint import read_checkpoint
from .embed import EmbedTrainer
from .joint_trainer import JointTrainer
from .options import RunOptions
from .run import Run, prepare_process
from .stages import check_tokenizer_state, load_embeddings, load_stage_data, stage_dir
from .tokenizer import RQVAETrainer

__all__ = ["ensure_embeddings", "ensure_tokenizer", "print_summary", "run_joint", "run_rqvae"]


def _rebuild(folder: Path, accelerator) -> None:
    """``--rebuild``: move a cached stage out of the way (to ``<folder>.replaced``) so that it is trained again."""
    if accelerator.is_main_process and folder.exists():
        old = folder.with_name(folder.name + ".replaced")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        print(f"[{folder.name.split('-')[0]}] --rebuild: moved the cached stage to {old}; training it again")
    accelerator.wait_for_everyone()


def _train_cached(config: Config, stage: str, folder: Path, accelerator, trainer_of, what: str,
                  verbs: tuple[str, str]) -> None:
    """Train ``stage`` into its cache ``folder`` (resuming it when it was stopped), tracking nothing."""
    resume = (folder / "checkpoints" / "last.pt").exists()
    if accelerator.is_main_process:
        print(f"[{stage}] no cached {what} for this config; {verbs[resume]} in {folder}")
    with Run(config, RunOptions(output_dir=folder, resume=resume), stage=stage, tracked=False,
             accelerator=accelerator) as run:
        trainer_of(run).fit()
    accelerator.wait_for_everyone()


def ensure_embeddings(config: Config, data: SequenceData, accelerator, *, rebuild: bool = False
                      ) -> tuple[np.ndarray, Path]:
    """The cached embed run's embeddings for this config and data, training them first when missing
    (or always, with ``rebuild``).

    A cached run that was stopped before the end (killed, Ctrl-C) is resumed from its checkpoint.
    """
    folder = stage_dir(config, "embed", ("embed",), data)
    if rebuild:
        _rebuild(folder, accelerator)
    if not (folder / "embeddings.npy").exists():
        _train_cached(config, "embed", folder, accelerator, lambda run: EmbedTrainer(config, run, data),
                      "item embeddings", ("training SASRec", "resuming the stopped SASRec run"))
    return load_embeddings(folder, data), folder


def ensure_tokenizer(config: Config, embeddings: np.ndarray, accelerator, data: SequenceData, *,
                     rebuild: bool = False) -> tuple[dict, Path]:
    """The cached pretrained tokenizer (best-collision checkpoint) for this config and data, pretraining it
    when missing (or always, with ``rebuild``).

    The pretraining is complete when its ``metrics.json`` exists; a cached run stopped before that
    is resumed from its checkpoint.

    Raises:
        DataError: a cached checkpoint whose shapes do not fit the tokenizer config.
    """
    folder = stage_dir(config, "rqvae", ("embed", "tokenizer", "rqvae"), data)
    if rebuild:
        _rebuild(folder, accelerator)
    best = folder / "checkpoints" / "best.pt"
    if not (folder / "metrics.json").exists():
        _train_cached(config, "rqvae", folder, accelerator,
                      lambda run: RQVAETrainer(config, run, embeddings, data.item_map),
                      "tokenizer", ("pretraining the RQ-VAE", "resuming the stopped pretraining"))
    state = read_checkpoint(best, stage="rqvae")
    check_tokenizer_state(state["model"], config, embeddings.shape[1], best)
    return state["model"], folder


def run_rqvae(config: Config, options: RunOptions | None = None, *, accelerator=None, **option_args):
    """Build (or reuse) the embeddings, then pretrain the tokenizer in its own run directory;
    ``options`` (or the arguments of :meth:`RunOptions.resolve`) say how (``rebuild``: train the
    cached embeddings again first)."""
    options = options or RunOptions.resolve(config, **option_args)
    prepare_process(config)
    data = load_stage_data(config)
    run = Run(config, options, stage="rqvae", accelerator=accelerator, data_digest=data.digest)
    embeddings, _ = ensure_embeddings(config, data, run.accelerator, rebuild=options.rebuild)
    set_seed(config.run.seed)
    with run:
        return RQVAETrainer(config, run, embeddings, data.item_map).fit()


def run_joint(config: Config, options: RunOptions | None = None, *, accelerator=None, **option_args):
    """The whole pipeline: embeddings and tokenizer (cached; ``rebuild`` trains them again), then joint
    training in its run directory; ``options`` as for :func:`run_rqvae`."""
    options = options or RunOptions.resolve(config, **option_args)
    prepare_process(config)
    data = load_stage_data(config)
    run = Run(config, options, stage="joint", accelerator=accelerator, data_digest=data.digest)
    embeddings, _ = ensure_embeddings(config, data, run.accelerator, rebuild=options.rebuild)
    tokenizer_state, _ = ensure_tokenizer(config, embeddings, run.accelerator, data, rebuild=options.rebuild)
    set_seed(config.run.seed)
    with run:
        result = JointTrainer(config, run, data, embeddings, tokenizer_state).fit()
    if run.is_main:
        print_summary(result, run.run_dir)
    return result


def print_summary(result: dict, run_dir) -> None:
    names = ["recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10"]
    print("\n" + " " * 8 + "".join(f"{n:>11}" for n in names))
    for split in ("valid", "test"):
        print(f"{split:<8}" + "".join(f"{result[split].get(n, float('nan')):>11.4f}" for n in names))
    print(f"\nrun directory: {run_dir}")
