"""Stage 1: SASRec collaborative item embeddings (``python -m etegrec.training.embed``).

A SASRec trained with full-softmax cross-entropy at every position of windows cut from each
user's training sequence; early stopping on validation NDCG@10. Its product is the item embedding
matrix ``embeddings.npy`` ``[n_items + 1, hidden]`` (row 0 = padding), with the item map and the
valid/test metrics of the best epoch. This stage is also the project's SASRec baseline.
"""
from __future__ import annotations

from etegrec.hooks.wandb_rows import KeyMap, phase_loss_key

from ..run.cli import stage_main
from ..stage import Stage
from .trainer import REPEAT_BIAS_LR, EmbedTrainer, load_embeddings, save_embeddings

__all__ = ["EMBED", "REPEAT_BIAS_LR", "EmbedTrainer", "load_embeddings", "main", "save_embeddings"]

EMBED = Stage(
    name="embed", command="etegrec.training.embed", label="item embeddings",
    summary="SASRec on the training split: the item embeddings embeddings.npy (and the SASRec baseline's metrics)",
    sections=("embed",), trainer=lambda config, run, data: EmbedTrainer(config.embed, config.run, run, data),
    produces="embeddings.npy", load=lambda run_dir, config, data: load_embeddings(run_dir, data),
    project="ETEGRec-Embed", key_map=KeyMap(loss_key=phase_loss_key, split_prefix={"valid": "val", "test": "test"}))


def main(argv: list[str] | None = None) -> int:
    """``python -m etegrec.training.embed [OPTIONS]``: exit status 0, 2 for a user error, 130 on Ctrl-C."""
    return stage_main(EMBED, argv)
