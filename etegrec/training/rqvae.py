"""Stage 2: RQ-VAE tokenizer pretraining (``python -m etegrec.training.rqvae``).

Trains the RQ-VAE on the SASRec item embeddings (built first, and cached, when missing); the trainer
is :class:`etegrec.training.tokenizer.RQVAETrainer`. Every ``eval_step`` epochs it reports the
collision rate and the Gini coefficient of code usage per layer; keeps the best-collision and the
last checkpoint; stops after ``patience`` evaluations without improvement. W&B project
``ETEGRec-RQVAE-Pretrain``.
"""
from __future__ import annotations

import sys

from .cli import stage_main
from .factories import build_tokenizer, tokenizer_inputs
from .pipeline import run_rqvae
from .tokenizer import RQVAETrainer, code_quality, tokenize_all

__all__ = ["RQVAETrainer", "build_tokenizer", "code_quality", "main", "run_rqvae", "tokenize_all", "tokenizer_inputs"]


def main(argv: list[str] | None = None) -> int:
    return stage_main("python -m etegrec.training.rqvae", __doc__, run_rqvae, argv)


if __name__ == "__main__":
    sys.exit(main())
