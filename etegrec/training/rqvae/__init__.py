"""Stage 2: RQ-VAE tokenizer pretraining (``python -m etegrec.training.rqvae``).

Trains the RQ-VAE (built in :mod:`.tokenizer`) on the SASRec item embeddings (built first, and
cached, when missing), with the items' attributes where ``tokenizer.attributes`` names them; the
trainer is :class:`.trainer.RQVAETrainer`. Every ``eval_step`` epochs it reports the collision rate
and the Gini coefficient of code usage per layer; keeps the best-collision and the last checkpoint;
stops after ``patience`` evaluations without improvement.
Its product, for the joint stage, is the best checkpoint's tokenizer (:func:`load_tokenizer`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from etegrec.config import Config
from etegrec.data import DataError, SequenceData
from etegrec.hooks.wandb_rows import KeyMap, plain_loss_key

from ..embed import EMBED
from ..run.checkpoint import read_checkpoint
from ..run.cli import stage_main
from ..stage import Stage
from .tokenizer import attribute_block, build_tokenizer, input_width, tokenizer_inputs
from .trainer import RQVAETrainer, code_quality, tokenize_all

__all__ = ["RQVAE", "RQVAETrainer", "attribute_block", "build_tokenizer", "code_quality", "input_width",
           "load_tokenizer", "main", "tokenize_all", "tokenizer_inputs"]


def load_tokenizer(run_dir: Path, config: Config, data: SequenceData, embeddings: np.ndarray) -> dict:
    """The pretrained tokenizer's weights (its best-collision checkpoint) in a finished rqvae run.

    Raises:
        DataError: a checkpoint whose tensors do not fit the tokenizer the config builds for
            ``embeddings`` (and the attributes it names), named with both shapes.
    """
    path = Path(run_dir) / "checkpoints" / "best.pt"
    state = read_checkpoint(path, stage=RQVAE.name)["model"]
    for name, tensor in build_tokenizer(config.tokenizer, input_width(config, embeddings.shape[1])).state_dict().items():
        found = state.get(name)
        if found is None or tuple(found.shape) != tuple(tensor.shape):
            shape = "missing" if found is None else f"of shape {list(found.shape)}"
            raise DataError(f"tokenizer checkpoint {str(path)!r} does not fit the tokenizer config: {name} is "
                            f"{shape}, the config needs {list(tensor.shape)}; delete {str(path.parent.parent)!r} "
                            "to pretrain again, or use the config it was made with")
    return state


RQVAE = Stage(
    name="rqvae", command="etegrec.training.rqvae", label="tokenizer",
    summary="pretrain the RQ-VAE item tokenizer on the item embeddings (built first when missing)",
    sections=("tokenizer", "rqvae"), needs=(EMBED,),
    trainer=lambda config, run, data, embeddings: RQVAETrainer(config.tokenizer, config.rqvae, config.run, run,
                                                                embeddings, data.item_map,
                                                                attributes=attribute_block(config, data)),
    load=load_tokenizer, project="ETEGRec-RQVAE-Pretrain",
    run_name=lambda config: f"{config.data.dataset}_layers{config.tokenizer.num_layers}_edim{config.tokenizer.e_dim}",
    key_map=KeyMap(loss_key=plain_loss_key, split_prefix={"valid": "val", "test": "test"}),
    check=attribute_block)


def main(argv: list[str] | None = None) -> int:
    """``python -m etegrec.training.rqvae [OPTIONS]``: exit status 0, 2 for a user error, 130 on Ctrl-C."""
    return stage_main(RQVAE, argv)
