"""Stage 3: ETEGRec joint training (``python -m etegrec.training.joint``), the main job.

The tokenizer (RQ-VAE) and a T5 generative recommender are trained in cycles of ``cycle`` epochs:
the first epoch of a cycle trains the tokenizer with the recommender frozen (phase ``id``), the
others train the recommender with the tokenizer frozen (phase ``rec``). Item codes come from
``etegrec.forge.get_code`` (with FORGE) at the start and after every tokenizer epoch. Validation by
beam search, early stopping on NDCG@10, optional fine-tuning of the recommender alone on fixed
codes, and a final test with the best checkpoint. With no arguments, the whole pipeline runs on
ml-100k: item embeddings and the pretrained tokenizer are built first (and cached) when missing.
"""
from __future__ import annotations

from etegrec.hooks.wandb_rows import KeyMap, phase_loss_key

from ..embed import EMBED
from ..rqvae import RQVAE
from ..run.cli import stage_main
from ..stage import Stage
from .evaluation import beam_recommend
from .recommender import build_recommender
from .trainer import JointTrainer, file_codes, phase_of

__all__ = ["JOINT", "JointTrainer", "beam_recommend", "build_recommender", "main", "phase_of"]

JOINT = Stage(
    name="joint", command="etegrec.training.joint", label="joint",
    summary="ETEGRec joint training of the tokenizer and the T5 recommender, the main job (builds what it needs)",
    sections=("recommender", "joint", "losses", "codes", "evaluation"), needs=(EMBED, RQVAE), trainer=JointTrainer,
    project="ETEGRec-Joint",
    key_map=KeyMap(loss_key=phase_loss_key, split_prefix={"valid": "eval", "test": "test"}), recommends=True,
    check=file_codes)


def main(argv: list[str] | None = None) -> int:
    """``python -m etegrec.training.joint [OPTIONS]``: exit status 0, 2 for a user error, 130 on Ctrl-C."""
    return stage_main(JOINT, argv)
