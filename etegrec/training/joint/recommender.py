"""The T5 recommender a config describes: where the joint stage (and a loaded run) builds it."""
from __future__ import annotations

import numpy as np
import torch

from etegrec.config import Config
from etegrec.models import RQVAE, T5Recommender

__all__ = ["build_recommender", "init_codes_from_codebooks", "init_items_from_embeddings"]


def build_recommender(config: Config, tokenizer: RQVAE, *, semantic_dim: int, num_items: int = 0,
                      embeddings: np.ndarray | None = None) -> T5Recommender:
    """The T5 recommender the config describes, for ``tokenizer``'s codes (its codes plus the suffix);
    with ``recommender.code_init: tokenizer`` its code embeddings start from the tokenizer's codebooks.

    With ``recommender.item_embedding`` other than ``none`` it keeps a vector per item of ``num_items``
    (required then); ``embed`` starts them from the SASRec stage's ``embeddings`` [num_items + 1, d]
    (when given; a loaded run's checkpoint holds them anyway). ``recommender.item_output`` also needs
    ``num_items`` (a learned output vector per item)."""
    r, cfg = config.recommender, config.joint
    if (r.item_embedding != "none" or r.item_output) and num_items < 1:
        raise ValueError("recommender.item_embedding / item_output need the catalogue size: pass num_items")
    model = T5Recommender(
        code_num=tokenizer.codebook_size, code_length=tokenizer.code_length + 1,
        num_layers=r.num_layers, num_decoder_layers=r.num_decoder_layers, d_model=r.d_model, d_ff=r.d_ff,
        num_heads=r.num_heads, d_kv=r.d_kv, dropout=r.dropout, feed_forward_proj=r.feed_forward_proj,
        latent_dim=config.tokenizer.e_dim, semantic_dim=semantic_dim,
        gradient_checkpointing=r.gradient_checkpointing, encoder_input=r.encoder_input,
        max_history=config.data.max_his_len, repeat_bias=r.repeat_bias, causal_encoder=cfg.targets == "all",
        # under bf16 autocast SDPA falls back to an fp32 path on CPU; plain attention is ~1.7x faster
        attn_implementation="eager" if cfg.mixed_precision == "bf16" else "sdpa",
        num_items=num_items if r.item_embedding != "none" else 0, item_dropout=r.item_dropout, output_items=num_items if r.item_output else 0,
        tie_item_vectors=r.tie_item_vectors, item_state=r.item_state,
        repeat_item_bias=r.repeat_item_bias)
    if r.code_init == "tokenizer":
        init_codes_from_codebooks(model, tokenizer)
    if r.item_embedding == "embed" and embeddings is not None:
        init_items_from_embeddings(model, embeddings)
    return model


@torch.no_grad()
def init_items_from_embeddings(model: T5Recommender, embeddings: np.ndarray) -> None:
    """Start the item vectors as the SASRec stage's item embeddings [n_items + 1, d] projected on
    their ``d_model`` principal directions (all d of them when d <= d_model, the other columns zero),
    scaled to unit std (T5's init scale); row 0 (padding) stays zero."""
    items = torch.as_tensor(np.asarray(embeddings, dtype=np.float32)[1:])
    items = items - items.mean(dim=0)
    width = model.item_embedding.weight.shape[1]
    _, _, v = torch.linalg.svd(items, full_matrices=False)  # v: (min(n, d), d) directions, largest first
    projected = items @ v[:width].T  # (n, min(width, d))
    projected = projected / projected.std().clamp_min(1e-8)
    model.item_embedding.weight.zero_()
    model.item_embedding.weight[1:, : projected.shape[1]] = projected


@torch.no_grad()
def init_codes_from_codebooks(model: T5Recommender, tokenizer: RQVAE) -> None:
    """Start each RQ level's code embeddings (K, d) as that level's codebook vectors, rescaled to unit
    std (T5's init scale), so that an item's input token (its codes summed) starts near its latent and
    code logits start from the tokenizer's geometry; the suffix level keeps its random init."""
    for level, layer in enumerate(tokenizer.quantizer.layers):
        book = layer.codebook  # (K, e_dim), e_dim = d_model (the config rule checks it)
        model.code_embedding[level, : book.shape[0]] = (book - book.mean()) / book.std().clamp_min(1e-8)
