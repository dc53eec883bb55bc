"""ETEGRec's two alignment losses between the recommender and the tokenizer (the joint stage's).

- sequence-item alignment (``kl_loss``): the symmetric KL between the code distributions (negative
  distances to each codebook) of the recommender's sequence latent and of the target item;
- preference-semantic alignment (``dec_cl_loss``): InfoNCE of the decoder's first state against the
  tokenizer's reconstruction of the target, the batch's other targets the negatives (the paper), or
  with ``losses.cl_negatives=catalogue`` every other item, so a target repeated in a batch is never
  its own negative.
"""
from __future__ import annotations

import torch

from etegrec.config import Config
from etegrec.hooks.codebook import CodebookHooks
from etegrec.models import RQVAE, RecommenderOutput, catalogue_nce, info_nce, symmetric_kl

__all__ = ["Alignment"]


class Alignment:
    """The alignment losses of one joint run: ``tokenizer``, the items it reads ``item_emb``
    (n_items + 1, d; row 0 padding) and the ``hooks`` that must not count its extra encodings."""

    def __init__(self, config: Config, tokenizer: RQVAE, item_emb: torch.Tensor, hooks: CodebookHooks) -> None:
        self.config, self.tokenizer, self.item_emb, self.hooks = config, tokenizer, item_emb, hooks
        self._kept: torch.Tensor | None = None  # see catalogue()

    def losses(self, out: RecommenderOutput, tok, target: torch.Tensor, *, train_tokenizer: bool
               ) -> dict[str, torch.Tensor]:
        """``kl_loss`` and ``dec_cl_loss`` of the recommender's outputs ``out`` for the items ``target``
        (N,), whose tokenizer output is ``tok``; ``train_tokenizer``: gradients reach the tokenizer."""
        cfg = self.config.losses
        seq_logits = self.tokenizer.code_logits(out.encoder_latent)  # negative distances
        parts = {"kl_loss": sum(symmetric_kl(s, t) for s, t in zip(seq_logits, tok.logits))}
        if cfg.cl_negatives == "batch":
            parts["dec_cl_loss"] = info_nce(out.decoder_semantic, tok.recon, cfg.cl_temperature)
        else:
            items = self.catalogue(train=train_tokenizer)
            parts["dec_cl_loss"] = catalogue_nce(out.decoder_semantic, items, target - 1, cfg.cl_temperature)
        return parts

    def catalogue(self, *, train: bool) -> torch.Tensor:
        """The tokenizer's reconstruction of every item (n_items, d), row i = item i + 1. A frozen
        tokenizer (eval mode, no gradient) gives the same rows until its weights change, so they are
        kept until :meth:`forget` (the trainer calls it whenever it trains or loads the tokenizer);
        a training one recomputes them at every call."""
        frozen = not train and not self.tokenizer.training
        if frozen and self._kept is not None:
            return self._kept
        with torch.set_grad_enabled(train), self.hooks.pause():  # not code usage: no histogram counts it
            items = self.tokenizer(self.item_emb[1:]).recon
        self._kept = items if frozen else None
        return items

    def forget(self) -> None:
        """Drop the kept reconstructions: the tokenizer's weights changed."""
        self._kept = None
