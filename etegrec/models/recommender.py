"""The T5 generative recommender of ETEGRec: item-code histories in, the next item's codes out.

Every item is ``code_length`` tokens, token ``p`` in ``[0, code_num)`` drawn from its own vocabulary:
the model keeps one embedding table per code position (``code_embedding[p]``, ``(code_num,
d_model)``). The encoder reads the history as the flat token sequence ``item_1 code_0 .. item_1
code_{L-1}, item_2 code_0, ..`` (left-padded items masked out); the decoder starts from a learned
BOS vector and reads the target's codes ``0..L-2`` (teacher forcing). The decoder output at position
``p`` is scored against table ``p`` with tied weights, rescaled like T5's tied head:
``logits_p = (h_p @ code_embedding[p].T) * d_model ** -0.5``. With the tables initialised like T5's
shared embedding (std 1) and ``h_p`` RMS-normalised, the initial logits have unit scale.

The decoder side (inputs, tied scores, repeat offsets and the incremental decoder of beam search,
:meth:`T5Recommender.decode_logits`) lives in :mod:`etegrec.models.code_decoding`; what touches T5's
internals (building the stacks, the cached decoding step) in :mod:`etegrec.models.t5_decoding`.
The tests check the incremental decoder against the teacher-forced :meth:`T5Recommender.forward`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from etegrec.models.beam import CodeTrie
from etegrec.models.code_decoding import CodeDecoding
from etegrec.models.code_history import additive_mask, causal_mask, check_history, check_history_values
from etegrec.models.losses import code_loss
from etegrec.models.t5_decoding import DecoderCache, t5_stacks

__all__ = ["DecoderCache", "ENCODER_INPUTS", "ITEM_STATES", "RecommenderOutput", "T5Recommender", "code_loss"]

ENCODER_INPUTS = ("codes", "items")
ITEM_STATES = ("each", "first")  # the decoder state the item output vectors score at each code position


class RecommenderOutput(NamedTuple):
    """Output of :meth:`T5Recommender.forward`."""

    logits: torch.Tensor  # (batch, code_length, code_num) next item's code logits
    encoder_latent: torch.Tensor  # (batch, latent_dim) pooled encoder state, for the quantizer
    decoder_semantic: torch.Tensor  # (batch, semantic_dim) first decoder state, for the item embedding
    item_logits: torch.Tensor | None = None  # (batch, n_items) every item's score at the first code (item_output)


def _check_positive(owner: str, **sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner} {name}={value!r} must be a positive integer; pass a size >= 1.")


class T5Recommender(CodeDecoding, nn.Module):
    """T5 encoder-decoder over item-code tokens with per-position tied code embeddings.

    Args:
        code_num: codes per position K (vocabulary of each position).
        code_length: tokens per item L (3 RQ codes + 1 suffix in the paper).
        num_layers, num_decoder_layers: encoder and decoder blocks.
        d_model, d_ff, num_heads, d_kv: T5 widths (``d_kv`` per head).
        dropout: T5 dropout rate (embeddings, attention, feed-forward, outputs).
        feed_forward_proj: T5 feed-forward kind, ``"relu"`` (paper) or e.g. ``"gated-gelu"``.
        latent_dim: width of :attr:`RecommenderOutput.encoder_latent` (the tokenizer's ``e_dim``).
        semantic_dim: width of :attr:`RecommenderOutput.decoder_semantic` (item embedding width).
        encoder_input: ``"codes"`` (paper): one encoder token per code, ``code_length`` per item, order
            carried only by T5's relative bias; ``"items"``: one token per item, the sum of its code
            embeddings plus a learned recency embedding (0 = the most recent item): ``code_length``
            times fewer encoder tokens, and the order of the history is explicit.
        max_history: longest history (items) the recency embedding covers (``"items"`` input).
        num_items: with ``"items"`` input and ``num_items > 0``, one learned vector per item (ids
            ``1..num_items``, 0 = padding) is added to each history item's token: the encoder then
            tells apart items whose codes are near, as an ID model does (the codes stay the only
            output). Its calls then take the history's item ids (``history_items``).
        item_dropout: in training, each history item's vector (``num_items``) is left out with this
            probability, its codes kept: the encoder cannot lean on item identity alone to memorise the
            training windows (no rescaling: a token holds the vector whole or not at all).
        output_items: with ``output_items > 0``, one learned output vector per item (ids
            ``1..output_items``): each item scores the decoder state's dot product with its vector, and
            every code's logit adds the log-mean-exp of the scores of the items it leads to
            (:meth:`CodeDecoding._item_scores`): what an ID model's output table holds, inside the
            code-by-code generation. The vectors start at zero (the codes-only model); the model
            must be told the codes in use (:meth:`use_trie`).
        tie_item_vectors: one table for both: the output vectors are the history item vectors
            (``num_items`` and ``output_items`` both set, equal), as SASRec's tied output table. An item
            then learns from being read and from being predicted, and the model keeps one vector per
            item instead of two; the output starts from wherever the input vectors start.
        item_state: which decoder state the item output vectors score at code position ``t``:
            ``"each"``, the state of position ``t`` (after the prefix ``c_<t``); ``"first"``, the first
            state (before any code) at every position, so that the item scores are one ranking of the
            whole catalogue per history, SASRec's, which the code positions then split: with the code
            logits at zero the summed positions give each item its softmax probability over all
            items (up to the group sizes of the log-mean-exp), and every position's loss trains that
            one state to tell the target from every other item, not only from its siblings.
        repeat_bias: learn one logit offset per code position for the codes that continue an item of
            the history (:meth:`history_bias`); it is part of the scores of both training and beam
            search, so the model learns how likely a repeat is (no evaluation mask).
        repeat_item_bias: learn one offset for the item output score of every history item, inside the
            log-mean-exp of each code (needs ``output_items`` and ``num_items``: the history's ids). A
            code offset pushes down every item that shares the repeated item's codes, and with
            meaningful codes those are the items most like it, the likeliest next ones; this one
            pushes down the repeated item alone.
        gradient_checkpointing: recompute each T5 block's activations in the backward pass instead
            of keeping them (PyTorch activation checkpointing, dropout masks replayed exactly):
            much less memory for the same gradients, at the price of a second forward pass.
        attn_implementation: the T5 attention kernel, ``"sdpa"`` (PyTorch's fused attention) or
            ``"eager"`` (plain matmul and softmax, the faster one under bfloat16 autocast on CPU,
            where SDPA falls back to an fp32 path).

    Raises:
        ValueError: for a non-positive size, a dropout outside ``[0, 1)`` or an unknown
            ``attn_implementation``.
    """

    #: Check the history values (codes in range, a real item per row) on every forward off the CPU
    #: too, not only on the first: a device sync per forward, for debugging.
    check_every_history: bool = False

    def __init__(
        self,
        *,
        code_num: int = 256,
        code_length: int = 4,
        num_layers: int = 6,
        num_decoder_layers: int = 6,
        d_model: int = 128,
        d_ff: int = 512,
        num_heads: int = 4,
        d_kv: int = 64,
        dropout: float = 0.1,
        feed_forward_proj: str = "relu",
        latent_dim: int = 128,
        semantic_dim: int = 256,
        gradient_checkpointing: bool = False,
        attn_implementation: str = "sdpa",
        encoder_input: str = "codes",
        max_history: int = 50,
        repeat_bias: bool = False,
        causal_encoder: bool = False,
        num_items: int = 0,
        item_dropout: float = 0.0,
        output_items: int = 0,
        tie_item_vectors: bool = False,
        item_state: str = "each",
        repeat_item_bias: bool = False,
    ) -> None:
        super().__init__()
        _check_positive(
            "T5Recommender", code_num=code_num, code_length=code_length, num_layers=num_layers,
            num_decoder_layers=num_decoder_layers, d_model=d_model, d_ff=d_ff,
            num_heads=num_heads, d_kv=d_kv, latent_dim=latent_dim, semantic_dim=semantic_dim,
            max_history=max_history,
        )
        if output_items < 0:
            raise ValueError(f"T5Recommender output_items={output_items!r} must be >= 0 (0: no item output vectors)")
        if encoder_input not in ENCODER_INPUTS:
            raise ValueError(f"T5Recommender encoder_input={encoder_input!r} must be one of {ENCODER_INPUTS!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"T5Recommender dropout={dropout!r} must lie in [0, 1); pass e.g. 0.1.")
        if num_items < 0 or (num_items and encoder_input != "items"):
            raise ValueError(f"T5Recommender num_items={num_items!r} must be >= 0, and > 0 only with "
                             "encoder_input='items' (one token per item)")
        if not 0.0 <= item_dropout < 1.0 or (item_dropout and not num_items):
            raise ValueError(f"T5Recommender item_dropout={item_dropout!r} must lie in [0, 1), and be > 0 only "
                             "with num_items > 0 (item vectors to leave out)")
        if tie_item_vectors and not (num_items and output_items == num_items):
            raise ValueError(f"T5Recommender tie_item_vectors=True needs num_items and output_items equal and > 0 "
                             f"(got {num_items!r} and {output_items!r}): one table serves both sides")
        if item_state not in ITEM_STATES or (item_state != "each" and not output_items):
            raise ValueError(f"T5Recommender item_state={item_state!r} must be one of {ITEM_STATES!r}, and other "
                             "than 'each' only with output_items > 0 (item output vectors to score)")
        if repeat_item_bias and not (num_items and output_items):
            raise ValueError(f"T5Recommender repeat_item_bias=True needs num_items and output_items > 0 (got {num_items!r} "
                             f"and {output_items!r}): it offsets the output scores of the history's items, read by id")
        if attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"T5Recommender attn_implementation={attn_implementation!r} must be 'sdpa' or 'eager'.")
        self.code_num = code_num
        self.code_length = code_length
        self.latent_dim = latent_dim
        self.semantic_dim = semantic_dim
        self.d_model = d_model
        self.num_heads = num_heads
        self.d_kv = d_kv
        self.encoder_input = encoder_input
        self.causal_encoder = causal_encoder
        self.max_history = max_history
        self.encoder, self.decoder = t5_stacks(
            d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers, num_decoder_layers=num_decoder_layers,
            num_heads=num_heads, dropout=dropout, feed_forward_proj=feed_forward_proj,
            attn_implementation=attn_implementation, gradient_checkpointing=gradient_checkpointing,
        )
        self.code_embedding = nn.Parameter(torch.randn(code_length, code_num, d_model))  # (L, K, d)
        self.bos = nn.Parameter(torch.randn(d_model))  # (d,)
        self.encoder_proj = nn.Linear(d_model, latent_dim)
        self.decoder_proj = nn.Linear(d_model, semantic_dim)
        # recency: of each item in the input (bidirectional encoder), or, with a causal encoder whose
        # states serve several targets, as a learned per-head bias of the cross-attention by how many
        # items before the target a state lies
        self.recency = nn.Embedding(max_history, d_model) if encoder_input == "items" and not causal_encoder else None
        self.cross_recency = None
        if causal_encoder:  # (heads, H); starts as ALiBi-like slopes 1, 1/2, 1/4, ...: head 0 reads mostly the
            # newest state, the last head nearly all of them (a prior for recency, which SASRec gets from using
            # its last state only); learned from there
            slopes = 2.0 ** -torch.arange(num_heads, dtype=torch.float32)
            self.cross_recency = nn.Parameter(-slopes[:, None] * torch.arange(max_history, dtype=torch.float32))
        self.repeat_logit = nn.Parameter(torch.zeros(code_length)) if repeat_bias else None  # (L,)
        self.repeat_item_logit = nn.Parameter(torch.zeros(())) if repeat_item_bias else None  # ()
        # per-item input vectors; zero at start, so the model starts as the codes-only one
        self.item_embedding = nn.Embedding(num_items + 1, d_model, padding_idx=0) if num_items else None
        self.item_dropout = item_dropout
        if self.item_embedding is not None:
            nn.init.zeros_(self.item_embedding.weight)
        # per-item output vectors; zero at start, so the model starts as the codes-only one (tied: the input ones)
        self.item_output = nn.Embedding(output_items + 1, d_model) if output_items and not tie_item_vectors else None
        if self.item_output is not None:
            nn.init.zeros_(self.item_output.weight)
        if tie_item_vectors:
            self.item_output = self.item_embedding  # the same module under both names (state dicts hold both keys)
        self.item_state = item_state
        self.output_trie: CodeTrie | None = None  # the codes in use (use_trie), read by the item output vectors
        self._history_checked = False  # see _check_history

    def _check_history(self, history_codes: torch.Tensor, history_mask: torch.Tensor) -> None:
        check_history(history_codes, history_mask, code_length=self.code_length)
        # The value check needs its verdict on the host: free on the CPU, but on an accelerator a sync
        # on every forward (defeating the training loop's deferred NaN check). There it runs on the
        # first call only (a code_num too small for the tokenizer's codes shows at once), or on
        # every call with check_every_history.
        if history_codes.device.type == "cpu" or self.check_every_history or not self._history_checked:
            # host sync: once per model off the CPU (see above)
            check_history_values(history_codes, history_mask, code_num=self.code_num)
            self._history_checked = True

    def _check_items(self, history_items: torch.Tensor | None, history_mask: torch.Tensor) -> torch.Tensor | None:
        """``history_items`` if the model reads item ids (then they are required, shaped like the mask)."""
        if self.item_embedding is None:
            return None
        if history_items is None or history_items.shape != history_mask.shape:
            got = None if history_items is None else tuple(history_items.shape)
            raise ValueError(f"this recommender has an item embedding: pass history_items of shape "
                             f"{tuple(history_mask.shape)!r} (the history's item ids), got {got!r}")
        return history_items

    def encode(
        self, history_codes: torch.Tensor, history_mask: torch.Tensor, history_items: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode histories ``history_codes`` (B, H, L) with ``history_mask`` (B, H), True = real item;
        ``history_items`` (B, H), their item ids, when the model has an :attr:`item_embedding`.

        Returns:
            ``(encoder_states, attention_mask)``: (B, T, d_model) and (B, T) bool, T = H' * L (``"codes"`` input) or
            H' (``"items"``) where
            H' drops the leading items that are padding in every row (they cannot change anything).

        Raises:
            ValueError: for wrong shapes, a real item's code outside ``[0, code_num)`` or a row
                without any real item (values checked on the CPU, elsewhere on the first call only
                unless :attr:`check_every_history`).
        """
        history_mask = history_mask.bool()
        self._check_history(history_codes, history_mask)
        history_items = self._check_items(history_items, history_mask)
        # Items padded in every row change nothing (masked keys, relative positions): skip them.
        # host sync: the slice's start sets the encoder's input shape, so it must be on the host
        first = int(history_mask.any(dim=0).int().argmax())
        history_codes, history_mask = history_codes[:, first:], history_mask[:, first:]
        batch, history, length = history_codes.shape
        codes = history_codes.masked_fill(~history_mask[..., None], 0)  # padding: any valid code
        tokens = self.code_embedding[torch.arange(length, device=codes.device), codes]  # (B, H, L, d)
        if self.encoder_input == "codes":  # one token per code
            attention_mask = history_mask.repeat_interleave(length, dim=1)  # (B, H * L)
            inputs = tokens.reshape(batch, history * length, self.d_model)
        else:  # one token per item: its codes summed, plus how recent it is (0 = last)
            if history > self.max_history:
                raise ValueError(
                    f"histories of {history} items exceed max_history={self.max_history}; "
                    "truncate them or build the model with a larger max_history."
                )
            attention_mask = history_mask  # (B, H)
            inputs = tokens.sum(dim=2)  # (B, H, d)
            if self.item_embedding is not None:
                items = history_items[:, first:].masked_fill(~history_mask, 0)
                if self.training and self.item_dropout:  # id 0 is padding: a zero vector
                    items = items.masked_fill(torch.rand(items.shape, device=items.device) < self.item_dropout, 0)
                inputs = inputs + self.item_embedding(items)
            if self.recency is not None:
                inputs = inputs + self.recency(torch.arange(history - 1, -1, -1, device=codes.device))
        if self.causal_encoder:
            encoder_mask = additive_mask(causal_mask(attention_mask), self.code_embedding.dtype)
        else:
            encoder_mask = attention_mask
        states = self.encoder(inputs_embeds=inputs, attention_mask=encoder_mask).last_hidden_state
        return states, attention_mask

    def forward(
        self, history_codes: torch.Tensor, history_mask: torch.Tensor, target_codes: torch.Tensor,
        history_items: torch.Tensor | None = None,
    ) -> RecommenderOutput:
        """Teacher-forced logits of ``target_codes`` (B, L) after the histories; alignment heads."""
        if target_codes.dim() != 2 or target_codes.shape[1] != self.code_length:
            raise ValueError(
                f"target_codes must have shape (batch, {self.code_length}), got "
                f"{tuple(target_codes.shape)!r}; pass the next item's code_length codes."
            )
        states, attention_mask = self.encode(history_codes, history_mask, history_items)
        last = torch.full((self.code_length,), states.shape[1] - 1, device=states.device)  # the target follows it
        hidden = self.decoder(
            inputs_embeds=self._decoder_inputs(target_codes[:, :-1]),  # (B, L, d)
            encoder_hidden_states=states,
            encoder_attention_mask=self._cross_mask(attention_mask, last),
            use_cache=False,
        ).last_hidden_state  # (B, L, d)
        weights = attention_mask.to(states.dtype)[..., None]  # (B, T, 1)
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1)  # (B, d)
        logits, item_logits = self._score(hidden), None
        if self.item_output is not None:
            history = None if history_items is None else history_items.masked_fill(~history_mask.bool(), 0)
            offsets, item_logits = self._item_scores_all(hidden, target_codes, history)
            logits = logits + offsets
        if self.repeat_logit is not None:
            logits = logits + self._history_bias_all(history_codes, history_mask.bool(), target_codes)
        return RecommenderOutput(
            logits=logits,
            encoder_latent=self.encoder_proj(pooled),
            decoder_semantic=self.decoder_proj(hidden[:, 0]),
            item_logits=item_logits,
        )

    def forward_all(
        self, items_codes: torch.Tensor, items_mask: torch.Tensor, target_codes: torch.Tensor,
        scored: torch.Tensor, items: torch.Tensor | None = None,
    ) -> RecommenderOutput:
        """Teacher-forced logits of the ``scored`` targets of windows (causal encoder).

        ``items_codes`` (B, W, L) with ``items_mask`` (B, W) are the inputs, ``target_codes``
        (B, W, L) the item that follows each of them, ``scored`` (B, W) which of those targets to
        predict (each after a real input), ``items`` (B, W) the inputs' item ids when the model has an
        :attr:`item_embedding`: target ``i`` is predicted from items ``<= i``. One causal
        encoder pass serves every target of a window; the decoder then runs once per scored target,
        on the encoder states ``<= i`` shifted so that the target follows the last one, exactly as
        :meth:`forward` decodes a lone history (the tests check it). Decoding only the scored targets
        matters on short sequences: on the Amazon sets most of a 20-item window is padding.

        Returns:
            one row per scored target, in ``scored.nonzero()`` order: logits (N, L, K),
            encoder_latent (N, latent_dim) (mean of the states ``<= i``), decoder_semantic (N, semantic_dim).
        """
        if not self.causal_encoder or self.encoder_input != "items":
            raise ValueError("forward_all needs causal_encoder=True and encoder_input='items'; build the "
                             "model with both, or train on one target per history with forward().")
        items_mask = items_mask.bool()
        # host sync: columns padded in every row change nothing; where they end sets the shapes
        first = int(items_mask.any(dim=0).int().argmax())
        items_codes, items_mask = items_codes[:, first:], items_mask[:, first:]
        target_codes, scored = target_codes[:, first:], scored[:, first:]
        items = None if items is None else items[:, first:]
        states, attention_mask = self.encode(items_codes, items_mask, items)  # (B, W, d), (B, W)
        rows, at = scored.nonzero(as_tuple=True)  # (N,) each: window and position of every target
        window = states.shape[1]
        # each target's states <= its position, right-aligned: source column at - W + 1 + j (< 0: padding)
        source = at[:, None] + torch.arange(1 - window, 1, device=states.device)[None, :]  # (N, W)
        gather = (rows[:, None], source.clamp_min(0))  # a padding column reads column 0, masked out below
        mask = attention_mask[gather] & (source >= 0)  # (N, W)
        states = states[gather]  # (N, W, d)
        codes = target_codes[rows, at]  # (N, L)
        last = torch.full((self.code_length,), window - 1, device=states.device)  # the target follows it
        hidden = self.decoder(
            inputs_embeds=self._decoder_inputs(codes[:, :-1]),  # (N, L, d)
            encoder_hidden_states=states,
            encoder_attention_mask=self._cross_mask(mask, last),
            use_cache=False,
        ).last_hidden_state  # (N, L, d)
        logits, item_logits = self._score(hidden), None
        if self.item_output is not None:  # target i's history is items <= i
            history = None if items is None else items[gather].masked_fill(~mask, 0)
            offsets, item_logits = self._item_scores_all(hidden, codes, history)
            logits = logits + offsets
        if self.repeat_logit is not None:  # target i's history is items <= i
            logits = logits + self._history_bias_all(items_codes[gather], mask, codes)
        weights = mask.to(states.dtype)[..., None]  # (N, W, 1)
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1)  # (N, d)
        return RecommenderOutput(
            logits=logits,
            encoder_latent=self.encoder_proj(pooled),
            decoder_semantic=self.decoder_proj(hidden[:, 0]),
            item_logits=item_logits,
        )
