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

import sys

from .cli import stage_main
from .evaluation import beam_recommend
from .factories import build_recommender
from .joint_trainer import JointTrainer, phase_of
from .pipeline import print_summary, run_joint

__all__ = ["JointTrainer", "beam_recommend", "build_recommender", "main", "phase_of", "print_summary", "run_joint"]


def main(argv: list[str] | None = None) -> int:
    return stage_main("python -m etegrec.training.joint", __doc__, run_joint, argv)


if __name__ == "__main__":
    sys.exit(main())
