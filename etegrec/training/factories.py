"""The models a config describes: where every stage (and a loaded run) builds them."""
from __future__ import annotations

import numpy as np
import torch

from etegrec.config import Config
from etegrec.models import RQVAE, T5Recommender

__all__ = ["build_recommender", "build_tokenizer", "init_codes_from_codebooks", "tokenizer_inputs"]


def build_tokenizer(config: Config, in_dim: int) -> RQVAE:
    """The RQ-VAE of ``config.tokenizer`` for item embeddings of width ``in_dim``."""
    t = config.tokenizer
    return RQVAE(in_dim=in_dim, hidden_dims=t.hidden_dims, e_dim=t.e_dim, num_layers=t.num_layers,
                 codebook_size=t.codebook_size, beta=t.beta, dropout=t.dropout, kmeans_init=t.kmeans_init)


def tokenizer_inputs(config: Config, embeddings: np.ndarray) -> np.ndarray:
    """The item embeddings the tokenizer sees, ``[n_items + 1, d]`` with row 0 (padding) zero.

    With ``tokenizer.standardize`` each dimension is z-scored over the items: SASRec embeddings are
    small (init std 0.02), and an RQ-VAE fed them raw can reconstruct them from almost nothing
    and collapse onto a few codes.
    """
    out = np.asarray(embeddings, dtype=np.float32).copy()
    if config.tokenizer.standardize:
        items = out[1:]
        out[1:] = (items - items.mean(axis=0)) / (items.std(axis=0) + 1e-8)
    out[0] = 0.0
    return out


def build_recommender(config: Config, tokenizer: RQVAE, *, semantic_dim: int) -> T5Recommender:
    """The T5 recommender the config describes, for ``tokenizer``'s codes (its codes plus the suffix);
    with ``recommender.code_init: tokenizer`` its code embeddings start from the tokenizer's codebooks."""
    r, cfg = config.recommender, config.joint
    model = T5Recommender(
        code_num=tokenizer.codebook_size, code_length=tokenizer.code_length + 1,
        num_layers=r.num_layers, num_decoder_layers=r.num_decoder_layers, d_model=r.d_model, d_ff=r.d_ff,
        num_heads=r.num_heads, d_kv=r.d_kv, dropout=r.dropout, feed_forward_proj=r.feed_forward_proj,
        latent_dim=config.tokenizer.e_dim, semantic_dim=semantic_dim,
        gradient_checkpointing=r.gradient_checkpointing, encoder_input=r.encoder_input,
        max_history=config.data.max_his_len, repeat_bias=r.repeat_bias, causal_encoder=cfg.targets == "all",
        # under bf16 autocast SDPA falls back to an fp32 path on CPU; plain attention is ~1.7x faster
        attn_implementation="eager" if cfg.mixed_precision == "bf16" else "sdpa")
    if r.code_init == "tokenizer":
        init_codes_from_codebooks(model, tokenizer)
    return model


@torch.no_grad()
def init_codes_from_codebooks(model: T5Recommender, tokenizer: RQVAE) -> None:
    """Start each RQ level's code embeddings (K, d) as that level's codebook vectors, rescaled to unit
    std (T5's init scale), so that an item's input token (its codes summed) starts near its latent and
    code logits start from the tokenizer's geometry; the suffix level keeps its random init."""
    for level, layer in enumerate(tokenizer.quantizer.layers):
        book = layer.codebook  # (K, e_dim), e_dim = d_model (the config rule checks it)
        model.code_embedding[level, : book.shape[0]] = (book - book.mean()) / book.std().clamp_min(1e-8)
