"""The one place that knows transformers' T5: building the stacks and decoding with a cache.

:func:`t5_stacks` builds the encoder and decoder :class:`~transformers.models.t5.modeling_t5.T5Stack`
of :class:`~etegrec.models.T5Recommender`. :class:`T5Decoding` runs the same decoder weights
incrementally without re-encoding: the cross-attention keys and values are computed once per
history and shared by all of its beams (the beams of a history are stacked on the query axis), and
the decoder self-attention keys and values are cached between steps (:class:`DecoderCache`). It
reads T5's blocks from the inside (``block.layer[i]``, ``compute_bias``), which transformers may
change between releases: ``tests/test_t5_adapter.py`` holds it to the T5 decoder's own forward, so
an upgrade that breaks it fails there.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Stack

__all__ = ["DecoderCache", "T5Decoding", "t5_stacks"]


def t5_stacks(
    *,
    d_model: int,
    d_kv: int,
    d_ff: int,
    num_layers: int,
    num_decoder_layers: int,
    num_heads: int,
    dropout: float,
    feed_forward_proj: str,
    attn_implementation: str,
    gradient_checkpointing: bool,
) -> tuple[T5Stack, T5Stack]:
    """A randomly initialised T5 encoder and decoder stack that take ``inputs_embeds`` only."""
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
    encoder, decoder = T5Stack(encoder_config), T5Stack(decoder_config)
    # The stacks only ever get inputs_embeds: drop their (1-row) token tables.
    encoder.embed_tokens = None
    decoder.embed_tokens = None
    if gradient_checkpointing:  # only takes effect in training mode (T5Stack checks self.training)
        for stack in (encoder, decoder):
            stack.main_input_name = "inputs_embeds"  # true here; spares a warning about token embeddings
            # the newer name where transformers has it (the old one is deprecated in 5.x)
            enable = getattr(stack, "activation_checkpointing_enable", None) or stack.gradient_checkpointing_enable
            enable({"use_reentrant": False})
    return encoder, decoder


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
    # (B, 1 or heads, 1, T) additive mask: 0 (or a learned bias) for real tokens, dtype min for padding
    cross_bias: torch.Tensor
    incremental: bool = True
    self_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # layers x 2 x (N, heads, t, d_kv)
    first_state: torch.Tensor | None = None  # (N, d) the decoder's output at BOS, for models that score with it
    history_items: torch.Tensor | None = None  # (B, H) the histories' item ids, for models that score with them

    @property
    def length(self) -> int:
        """Decoder input tokens (BOS included) held in the self-attention cache."""
        return 0 if self.self_kv is None else self.self_kv[0][0].shape[2]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep (and repeat) cached rows: new row i continues old row ``rows[i]`` (``rows``: (N',))."""
        if self.self_kv is not None:
            self.self_kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.self_kv]
        if self.first_state is not None:
            self.first_state = self.first_state.index_select(0, rows)


class T5Decoding:
    """Cached, incremental inference with the weights of a T5 decoder stack (eval mode, no dropout).

    It holds no state of its own (the run's state is a :class:`DecoderCache`), so it is cheap to make
    one per call around the stack that is current.

    Args:
        decoder: a :class:`T5Stack` built with ``is_decoder=True`` (as :func:`t5_stacks` makes it).
    """

    def __init__(self, decoder: T5Stack) -> None:
        self.decoder = decoder
        config = decoder.config
        self.d_model, self.num_heads, self.d_kv = config.d_model, config.num_heads, config.d_kv

    def cache(
        self, encoder_states: torch.Tensor, cross_bias: torch.Tensor, *, incremental: bool = True
    ) -> DecoderCache:
        """A fresh cache of the cross-attention keys and values of ``encoder_states`` (B, T, d).

        ``cross_bias`` (B, 1 or heads, 1, T) is the additive cross-attention mask, as T5 takes its
        ``encoder_attention_mask`` once made additive: 0 (or a bias) for keys to read, the dtype's
        minimum for padding.
        """
        batch, length, _ = encoder_states.shape
        cross = []
        for block in self.decoder.block:
            attention = block.layer[1].EncDecAttention
            k = attention.k(encoder_states).view(batch, length, self.num_heads, self.d_kv)
            v = attention.v(encoder_states).view(batch, length, self.num_heads, self.d_kv)
            cross.append((k.transpose(1, 2), v.transpose(1, 2)))  # 2 x (B, heads, T, d_kv)
        return DecoderCache(cross=cross, cross_bias=cross_bias, incremental=incremental)

    def step(self, inputs: torch.Tensor, cache: DecoderCache, *, group: int) -> torch.Tensor:
        """Final-norm decoder states (N, s, d) of ``inputs`` (N, s, d) after ``cache.length`` cached tokens.

        Row ``n`` of ``inputs`` continues history ``n // group`` of the cache. With an incremental
        cache the self-attention keys and values of ``inputs`` are appended to it. Mirrors
        ``T5Block`` in eval mode (pre-norm residual sublayers, unscaled dot products, relative
        position bias shared by all self-attention layers).
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
