"""The T5 generative recommender of ETEGRec: item-code histories in, the next item's codes out.

Every item is ``code_length`` tokens, token ``p`` in ``[0, code_num)`` drawn from its own vocabulary:
the model keeps one embedding table per code position (``code_embedding[p]``, ``(code_num,
d_model)``). The encoder reads the history as the flat token sequence ``item_1 code_0 .. item_1
code_{L-1}, item_2 code_0, ..`` (left-padded items masked out); the decoder starts from a learned
BOS vector and reads the target's codes ``0..L-2`` (teacher forcing). The decoder output at position
``p`` is scored against table ``p`` with tied weights, rescaled like T5's tied head:
``logits_p = (h_p @ code_embedding[p].T) * d_model ** -0.5``. With the tables initialised like T5's
shared embedding (std 1) and ``h_p`` RMS-normalised, the initial logits have unit scale.

Inference (beam search) uses :meth:`T5Recommender.decode_logits`, an incremental decoder that runs
the same T5 weights without re-encoding: the cross-attention keys and values are computed once per
history and shared by all of its beams (the beams of a history are stacked on the query axis), and
the decoder self-attention keys and values are cached between steps (:class:`DecoderCache`).
The tests check it against the teacher-forced :meth:`T5Recommender.forward`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Stack

__all__ = ["DecoderCache", "ENCODER_INPUTS", "RecommenderOutput", "T5Recommender", "code_loss"]

ENCODER_INPUTS = ("codes", "items")


class RecommenderOutput(NamedTuple):
    """Output of :meth:`T5Recommender.forward`."""

    logits: torch.Tensor  # (batch, code_length, code_num) next item's code logits
    encoder_latent: torch.Tensor  # (batch, latent_dim) pooled encoder state, for the quantizer
    decoder_semantic: torch.Tensor  # (batch, semantic_dim) first decoder state, for the item embedding


def code_loss(logits: torch.Tensor, target_codes: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (B, L, K) for ``target_codes`` (B, L), batch and positions."""
    if logits.dim() != 3 or target_codes.shape != logits.shape[:2]:
        raise ValueError(
            f"code_loss needs logits (batch, code_length, code_num) and target_codes (batch, "
            f"code_length), got {tuple(logits.shape)!r} and {tuple(target_codes.shape)!r}; "
            "pass the logits of T5Recommender.forward and the codes it was given."
        )
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target_codes.reshape(-1))


@dataclass
class DecoderCache:
    """State of one incremental decoding run over a batch of encoded histories.

    ``cross`` holds every decoder layer's cross-attention keys and values, computed once from the
    encoder states of the B histories; ``self_kv`` the decoder self-attention keys and values of the
    N = B * G rows decoded so far (row ``n`` belongs to history ``n // G``).
    With ``incremental=False`` only the cross part is kept and every call re-runs the decoder over
    the whole prefix (at most ``code_length`` tokens).
    """

    cross: list[tuple[torch.Tensor, torch.Tensor]]  # layers x 2 x (B, heads, T, d_kv)
    cross_bias: torch.Tensor  # (B, 1 or heads, 1, T) additive mask: 0 (or a learned bias) for real tokens, dtype min for padding
    incremental: bool = True
    self_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # layers x 2 x (N, heads, t, d_kv)

    @property
    def length(self) -> int:
        """Decoder input tokens (BOS included) held in the self-attention cache."""
        return 0 if self.self_kv is None else self.self_kv[0][0].shape[2]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep (and repeat) cached rows: new row i continues old row ``rows[i]`` (``rows``: (N',))."""
        if self.self_kv is not None:
            self.self_kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.self_kv]


def _check_positive(owner: str, **sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner} {name}={value!r} must be a positive integer; pass a size >= 1.")


class T5Recommender(nn.Module):
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
        repeat_bias: learn one logit offset per code position for the codes that continue an item of
            the history (:meth:`history_bias`); it is part of the scores of both training and beam
            search, so the model learns how likely a repeat is (no evaluation mask).
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
    ) -> None:
        super().__init__()
        _check_positive(
            "T5Recommender", code_num=code_num, code_length=code_length, num_layers=num_layers,
            num_decoder_layers=num_decoder_layers, d_model=d_model, d_ff=d_ff,
            num_heads=num_heads, d_kv=d_kv, latent_dim=latent_dim, semantic_dim=semantic_dim,
            max_history=max_history,
        )
        if encoder_input not in ENCODER_INPUTS:
            raise ValueError(f"T5Recommender encoder_input={encoder_input!r} must be one of {ENCODER_INPUTS!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"T5Recommender dropout={dropout!r} must lie in [0, 1); pass e.g. 0.1.")
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
        config = T5Config(
            vocab_size=1, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
            num_decoder_layers=num_decoder_layers, num_heads=num_heads, dropout_rate=dropout,
            feed_forward_proj=feed_forward_proj, is_encoder_decoder=True, use_cache=False,
            pad_token_id=0, eos_token_id=None, decoder_start_token_id=0,
            attn_implementation=attn_implementation,
        )
        encoder_config = copy.deepcopy(config)
        encoder_config.is_decoder = False
        decoder_config = copy.deepcopy(config)
        decoder_config.is_decoder = True
        decoder_config.num_layers = num_decoder_layers
        self.encoder = T5Stack(encoder_config)
        self.decoder = T5Stack(decoder_config)
        # The stacks only ever get inputs_embeds: drop their (1-row) token tables.
        self.encoder.embed_tokens = None
        self.decoder.embed_tokens = None
        if gradient_checkpointing:  # only takes effect in training mode (T5Stack checks self.training)
            for stack in (self.encoder, self.decoder):
                stack.main_input_name = "inputs_embeds"  # true here; spares a warning about token embeddings
                # the newer name where transformers has it (the old one is deprecated in 5.x)
                enable = getattr(stack, "activation_checkpointing_enable", None) or stack.gradient_checkpointing_enable
                enable({"use_reentrant": False})
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

    # ----------------------------------------------------------------------------- inputs

    def _check_history(self, history_codes: torch.Tensor, history_mask: torch.Tensor) -> None:
        if history_codes.dim() != 3 or history_codes.shape[2] != self.code_length:
            raise ValueError(
                f"history_codes must have shape (batch, history, {self.code_length}), got "
                f"{tuple(history_codes.shape)!r}; pass code_length={self.code_length} codes per item."
            )
        if history_mask.shape != history_codes.shape[:2]:
            raise ValueError(
                f"history_mask has shape {tuple(history_mask.shape)!r} but history_codes has "
                f"{tuple(history_codes.shape)!r}; pass one mask entry (True = real item) per item."
            )
        real = history_codes[history_mask]  # (n_real, L)
        bad_code, empty = torch.stack([
            ((real < 0) | (real >= self.code_num)).any(), ~history_mask.any(dim=1).all()
        ]).tolist()
        if bad_code:
            raise ValueError(
                f"history_codes of real items must lie in [0, {self.code_num}), got values in "
                f"[{int(real.min())}, {int(real.max())}]; build the model with a code_num that "
                "covers every code (suffix tokens included)."
            )
        if empty:
            rows = (~history_mask.any(dim=1)).nonzero().flatten()[:5].tolist()
            raise ValueError(
                f"history rows {rows!r} have no real item (history_mask all False); drop samples "
                "with an empty history."
            )

    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Embeddings (..., t, d) of ``codes`` (..., t), token j looked up in table j (t <= L)."""
        positions = torch.arange(codes.shape[-1], device=codes.device)
        return self.code_embedding[positions, codes]

    def _decoder_inputs(self, prefix_codes: torch.Tensor) -> torch.Tensor:
        """BOS then the embedded ``prefix_codes`` (N, t): decoder inputs (N, t + 1, d)."""
        bos = self.bos.expand(prefix_codes.shape[0], 1, self.d_model)
        return torch.cat([bos, self._embed(prefix_codes)], dim=1)

    def _score(self, hidden: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Tied logits: ``hidden`` (N, L, d) -> (N, L, K), or (N, d) -> (N, K) for one ``position``."""
        scale = self.d_model ** -0.5
        if position is None:
            return torch.einsum("nld,lkd->nlk", hidden, self.code_embedding) * scale
        return (hidden @ self.code_embedding[position].T) * scale

    # ----------------------------------------------------------------------------- training

    def encode(
        self, history_codes: torch.Tensor, history_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode histories ``history_codes`` (B, H, L) with ``history_mask`` (B, H), True = real item.

        Returns:
            ``(encoder_states, attention_mask)``: (B, T, d_model) and (B, T) bool, T = H' * L (``"codes"`` input) or
            H' (``"items"``) where
            H' drops the leading items that are padding in every row (they cannot change anything).

        Raises:
            ValueError: for wrong shapes, a real item's code outside ``[0, code_num)`` or a row
                without any real item.
        """
        history_mask = history_mask.bool()
        self._check_history(history_codes, history_mask)
        # Items padded in every row change nothing (masked keys, relative positions): skip them.
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
            if self.recency is not None:
                inputs = inputs + self.recency(torch.arange(history - 1, -1, -1, device=codes.device))
        encoder_mask = self._additive(self._causal(attention_mask)) if self.causal_encoder else attention_mask
        states = self.encoder(inputs_embeds=inputs, attention_mask=encoder_mask).last_hidden_state
        return states, attention_mask

    @staticmethod
    def _causal(mask: torch.Tensor) -> torch.Tensor:
        """(B, T) key mask -> (B, 1, T, T): query q sees real keys k <= q (and itself, so no row is empty)."""
        t = mask.shape[1]
        lower = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
        return ((mask[:, None, None, :] & lower) | torch.eye(t, dtype=torch.bool, device=mask.device))

    def _cross_mask(self, attention_mask: torch.Tensor, target_at: torch.Tensor) -> torch.Tensor | torch.Tensor:
        """Cross-attention mask of decoder queries whose target follows encoder position ``target_at``
        (Q,): (B, heads, Q, T) additive, real states ``<= target_at`` only, plus the learned bias of
        their distance from the target. Without a causal encoder: the plain (B, T) key mask."""
        if self.cross_recency is None:
            return attention_mask
        keys = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        distance = target_at[:, None] - keys[None, :]  # (Q, T)
        allowed = attention_mask[:, None, None, :] & (distance >= 0)[None, None]  # (B, 1, Q, T)
        bias = self.cross_recency[:, distance.clamp(0, self.max_history - 1)]  # (heads, Q, T)
        return (self._additive(allowed) + bias[None]).to(self.code_embedding.dtype)

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean 4-d mask as T5's additive one: 0 where allowed, the dtype's minimum elsewhere."""
        dtype = self.code_embedding.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    def history_bias(
        self, history_codes: torch.Tensor, history_mask: torch.Tensor, prefix_codes: torch.Tensor
    ) -> torch.Tensor | None:
        """The learned repeat offsets (N, K) for code position ``t`` after ``prefix_codes`` (N, t).

        Code ``k`` gets ``repeat_logit[t]`` when some real item of the row's history has the codes
        ``prefix_codes`` followed by ``k``: choosing ``k`` keeps a repeat of that item possible. Row
        ``n`` of ``prefix_codes`` belongs to history ``n // G`` of ``history_codes`` (B, H, L) and
        ``history_mask`` (B, H), as in :meth:`decode_logits`. None when the model has no repeat bias.
        """
        if self.repeat_logit is None:
            return None
        rows, t = prefix_codes.shape
        group = rows // history_codes.shape[0]
        history_codes = history_codes.repeat_interleave(group, dim=0)  # (N, H, L)
        match = history_mask.bool().repeat_interleave(group, dim=0)  # (N, H)
        if t:
            match = match & (history_codes[:, :, :t] == prefix_codes[:, None, :]).all(dim=2)
        hits = torch.zeros(rows, self.code_num, device=prefix_codes.device, dtype=self.repeat_logit.dtype)
        # 1 where some matching item continues with code k (amax: items sharing a code do not overwrite)
        hits.scatter_reduce_(1, history_codes[:, :, t], match.to(hits.dtype), reduce="amax")
        return hits * self.repeat_logit[t]

    def _history_bias_all(
        self, history_codes: torch.Tensor, history_mask: torch.Tensor, target_codes: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`history_bias` of every teacher-forced position: (B, L, K)."""
        return torch.stack([self.history_bias(history_codes, history_mask, target_codes[:, :t])
                            for t in range(self.code_length)], dim=1)

    def forward(
        self, history_codes: torch.Tensor, history_mask: torch.Tensor, target_codes: torch.Tensor
    ) -> RecommenderOutput:
        """Teacher-forced logits of ``target_codes`` (B, L) after the histories; alignment heads."""
        if target_codes.dim() != 2 or target_codes.shape[1] != self.code_length:
            raise ValueError(
                f"target_codes must have shape (batch, {self.code_length}), got "
                f"{tuple(target_codes.shape)!r}; pass the next item's code_length codes."
            )
        states, attention_mask = self.encode(history_codes, history_mask)
        last = torch.full((self.code_length,), states.shape[1] - 1, device=states.device)  # the target follows it
        hidden = self.decoder(
            inputs_embeds=self._decoder_inputs(target_codes[:, :-1]),  # (B, L, d)
            encoder_hidden_states=states,
            encoder_attention_mask=self._cross_mask(attention_mask, last),
            use_cache=False,
        ).last_hidden_state  # (B, L, d)
        weights = attention_mask.to(states.dtype)[..., None]  # (B, T, 1)
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1)  # (B, d)
        logits = self._score(hidden)
        if self.repeat_logit is not None:
            logits = logits + self._history_bias_all(history_codes, history_mask.bool(), target_codes)
        return RecommenderOutput(
            logits=logits,
            encoder_latent=self.encoder_proj(pooled),
            decoder_semantic=self.decoder_proj(hidden[:, 0]),
        )

    def forward_all(
        self, items_codes: torch.Tensor, items_mask: torch.Tensor, target_codes: torch.Tensor
    ) -> RecommenderOutput:
        """Teacher-forced logits of a target after *every* position of a window (causal encoder).

        ``items_codes`` (B, W, L) with ``items_mask`` (B, W) are the inputs, ``target_codes``
        (B, W, L) the item that follows each of them: target ``i`` is predicted from items ``<= i``.
        One encoder pass serves all W targets; the decoder reads every target's code prefix in one
        row of W * L tokens, each target attending only to its own prefix (its relative positions are
        those of a lone decoding) and to the encoder states ``<= i``. Equal to :meth:`forward` on
        each prefix (the tests check it).

        Returns:
            logits (B, W, L, K), encoder_latent (B, W, latent_dim) (mean of the states ``<= i``),
            decoder_semantic (B, W, semantic_dim).
        """
        if not self.causal_encoder or self.encoder_input != "items":
            raise ValueError("forward_all needs causal_encoder=True and encoder_input='items'; build the "
                             "model with both, or train on one target per history with forward().")
        items_mask = items_mask.bool()
        first = int(items_mask.any(dim=0).int().argmax())  # columns padded in every row change nothing
        items_codes, items_mask, target_codes = items_codes[:, first:], items_mask[:, first:], target_codes[:, first:]
        batch, window, length = target_codes.shape
        states, attention_mask = self.encode(items_codes, items_mask)  # (B, W, d), (B, W)
        inputs = self._decoder_inputs(target_codes.reshape(batch * window, length)[:, :-1])  # (B * W, L, d)
        block = torch.arange(window * length, device=states.device) // length  # target of each decoder token
        self_allowed = (block[:, None] == block[None, :]) & torch.ones(
            window * length, window * length, dtype=torch.bool, device=states.device).tril()
        hidden = self.decoder(
            inputs_embeds=inputs.reshape(batch, window * length, self.d_model),
            attention_mask=self._additive(self_allowed[None, None]),
            encoder_hidden_states=states,
            encoder_attention_mask=self._cross_mask(attention_mask, block),  # (B, heads, W * L, W)
            use_cache=False,
        ).last_hidden_state.reshape(batch, window, length, self.d_model)
        logits = torch.einsum("bwld,lkd->bwlk", hidden, self.code_embedding) * self.d_model ** -0.5
        if self.repeat_logit is not None:  # target i's history is items <= i
            rows = items_codes.repeat_interleave(window, dim=0)  # (B * W, W, L)
            seen = items_mask[:, None, :] & torch.ones(window, window, dtype=torch.bool, device=states.device).tril()
            bias = self._history_bias_all(rows, seen.reshape(batch * window, window),
                                          target_codes.reshape(batch * window, length))
            logits = logits + bias.view(batch, window, length, -1)
        weights = attention_mask.to(states.dtype)[..., None]  # (B, W, 1)
        pooled = (states * weights).cumsum(dim=1) / weights.cumsum(dim=1).clamp_min(1.0)  # (B, W, d)
        return RecommenderOutput(
            logits=logits,
            encoder_latent=self.encoder_proj(pooled),
            decoder_semantic=self.decoder_proj(hidden[:, :, 0]),
        )

    # ----------------------------------------------------------------------------- inference

    def decoder_cache(
        self, encoder_states: torch.Tensor, attention_mask: torch.Tensor, *, incremental: bool = True
    ) -> DecoderCache:
        """Cross-attention keys/values of ``encoder_states`` (B, T, d) for :meth:`decode_logits`."""
        batch, length, _ = encoder_states.shape
        cross = []
        for block in self.decoder.block:
            attention = block.layer[1].EncDecAttention
            k = attention.k(encoder_states).view(batch, length, self.num_heads, self.d_kv)
            v = attention.v(encoder_states).view(batch, length, self.num_heads, self.d_kv)
            cross.append((k.transpose(1, 2), v.transpose(1, 2)))  # 2 x (B, heads, T, d_kv)
        dtype = encoder_states.dtype
        if self.cross_recency is not None:  # the target follows the last position
            last = torch.full((1,), length - 1, device=encoder_states.device)
            bias = self._cross_mask(attention_mask.bool(), last).to(dtype)  # (B, heads, 1, T)
            return DecoderCache(cross=cross, cross_bias=bias, incremental=incremental)
        bias = torch.zeros(attention_mask.shape, dtype=dtype, device=encoder_states.device)
        bias = bias.masked_fill(~attention_mask.bool(), torch.finfo(dtype).min)  # (B, T)
        return DecoderCache(cross=cross, cross_bias=bias[:, None, None, :], incremental=incremental)

    def decode_logits(
        self,
        encoder_states: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix_codes: torch.Tensor,
        *,
        cache: DecoderCache | None = None,
    ) -> torch.Tensor:
        """Logits (N, K) of code position ``t`` after ``prefix_codes`` (N, t); inference, no dropout.

        ``encoder_states`` (B, T, d) and ``attention_mask`` (B, T) come from :meth:`encode`, once per
        history; N must be a multiple G of B and row ``n`` of ``prefix_codes`` continues history
        ``n // G`` (the beams of a history are consecutive rows, as ``repeat_interleave`` lays them
        out). Without ``cache`` the cross-attention keys and values are computed in this call; with an
        incremental ``cache`` (from :meth:`decoder_cache`) only the newest prefix token is run, the
        cache must hold exactly t tokens and the caller re-aligns it with ``cache.reorder`` whenever
        it reorders or repeats rows.

        Raises:
            ValueError: in training mode, for ``t >= code_length``, N not a multiple of B, or a cache
                of the wrong length.
        """
        if self.training:
            raise ValueError(
                "T5Recommender.decode_logits runs without dropout and is for inference only; call "
                "model.eval() first."
            )
        rows, t = prefix_codes.shape
        batch = encoder_states.shape[0]
        if t >= self.code_length or rows % batch:
            raise ValueError(
                f"decode_logits got prefix_codes of shape {tuple(prefix_codes.shape)!r} for "
                f"{batch} encoded histories; pass fewer than code_length={self.code_length} codes "
                "per row and a whole number of rows per history."
            )
        if cache is None:
            cache = self.decoder_cache(encoder_states, attention_mask, incremental=False)
        if cache.incremental:
            if cache.length != t:
                raise ValueError(
                    f"the decoder cache holds {cache.length} tokens but prefix_codes has {t}; "
                    "feed the prefixes one code longer per call, starting from an empty prefix."
                )
            new_inputs = self._decoder_inputs(prefix_codes)[:, t:]  # (N, 1, d)
        else:
            cache.self_kv = None
            new_inputs = self._decoder_inputs(prefix_codes)  # (N, t + 1, d)
        hidden = self._decoder_step(new_inputs, cache, group=rows // batch)  # (N, s, d)
        return self._score(hidden[:, -1], t)

    def _decoder_step(self, inputs: torch.Tensor, cache: DecoderCache, *, group: int) -> torch.Tensor:
        """Run the decoder blocks on ``inputs`` (N, s, d) after ``cache.length`` cached tokens.

        Mirrors ``T5Block`` in eval mode (pre-norm residual sublayers, unscaled dot products, relative
        position bias shared by all self-attention layers); the tests hold it to the T5 forward.
        """
        rows, new, _ = inputs.shape
        past = cache.length
        heads, d_kv = self.num_heads, self.d_kv
        first = self.decoder.block[0].layer[0].SelfAttention
        bias = first.compute_bias(new, past + new, device=inputs.device, past_seen_tokens=past)
        bias = bias.to(inputs.dtype)  # (1, heads, s, past + s)
        if new > 1:  # causal: query i sees keys <= past + i
            causal = torch.ones(new, past + new, dtype=torch.bool, device=inputs.device)
            causal = causal.tril(diagonal=past)
            bias = bias.masked_fill(~causal, torch.finfo(inputs.dtype).min)
        hidden = inputs
        self_kv = []
        for i, block in enumerate(self.decoder.block):
            sublayer = block.layer[0]
            attention = sublayer.SelfAttention
            x = sublayer.layer_norm(hidden)
            q = attention.q(x).view(rows, new, heads, d_kv).transpose(1, 2)  # (N, heads, s, d_kv)
            k = attention.k(x).view(rows, new, heads, d_kv).transpose(1, 2)
            v = attention.v(x).view(rows, new, heads, d_kv).transpose(1, 2)
            if past:
                k = torch.cat([cache.self_kv[i][0], k], dim=2)  # (N, heads, past + s, d_kv)
                v = torch.cat([cache.self_kv[i][1], v], dim=2)
            self_kv.append((k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
            hidden = hidden + attention.o(out.transpose(1, 2).reshape(rows, new, heads * d_kv))

            # Cross-attention: the G beams of a history share its keys, so they go on the query axis.
            sublayer = block.layer[1]
            attention = sublayer.EncDecAttention
            x = sublayer.layer_norm(hidden).reshape(rows // group, group * new, self.d_model)
            q = attention.q(x).view(rows // group, group * new, heads, d_kv).transpose(1, 2)
            k, v = cache.cross[i]  # (B, heads, T, d_kv)
            mask = cache.cross_bias.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
            out = out.transpose(1, 2).reshape(rows, new, heads * d_kv)
            hidden = hidden + attention.o(out)
            hidden = block.layer[2](hidden)  # feed-forward sublayer with its residual
        if cache.incremental:
            cache.self_kv = self_kv
        return self.decoder.final_layer_norm(hidden)
