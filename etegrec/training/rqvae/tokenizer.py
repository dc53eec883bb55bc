"""The RQ-VAE tokenizer a config describes, and the item embeddings it reads: where the rqvae and
joint stages (and a loaded run) build it."""
from __future__ import annotations

import numpy as np

from etegrec.config import TokenizerConfig
from etegrec.models import RQVAE

__all__ = ["build_tokenizer", "tokenizer_inputs"]


def build_tokenizer(t: TokenizerConfig, in_dim: int) -> RQVAE:
    """The RQ-VAE of the ``tokenizer`` section ``t`` for item embeddings of width ``in_dim``."""
    return RQVAE(in_dim=in_dim, hidden_dims=t.hidden_dims, e_dim=t.e_dim, num_layers=t.num_layers,
                 codebook_size=t.codebook_size, beta=t.beta, dropout=t.dropout, kmeans_init=t.kmeans_init)


def tokenizer_inputs(t: TokenizerConfig, embeddings: np.ndarray) -> np.ndarray:
    """The item embeddings the tokenizer sees, ``[n_items + 1, d]`` with row 0 (padding) zero.

    With ``tokenizer.standardize`` each dimension is z-scored over the items: SASRec embeddings are
    small (init std 0.02), and an RQ-VAE fed them raw can reconstruct them from almost nothing
    and collapse onto a few codes.
    """
    out = np.asarray(embeddings, dtype=np.float32).copy()
    if t.standardize:
        items = out[1:]
        out[1:] = (items - items.mean(axis=0)) / (items.std(axis=0) + 1e-8)
    out[0] = 0.0
    return out
