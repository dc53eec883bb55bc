"""T5Decoding, the only code that reads T5's internals, against a stock T5 decoder's own forward.

A transformers release that changes T5's blocks fails here, not in evaluation.
"""
from __future__ import annotations

import pytest
import torch
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Stack

from etegrec.models.code_history import additive_mask
from etegrec.models.t5_decoding import T5Decoding

D_MODEL, HEADS, STEPS, MEMORY = 16, 2, 4, 5
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def t5_decoder(**overrides: object) -> T5Stack:
    """A tiny stock T5 decoder stack, every weight random (layer norms and position bias included)."""
    sizes = dict(d_model=D_MODEL, d_kv=8, d_ff=32, num_layers=3, num_heads=HEADS, dropout_rate=0.1,
                 feed_forward_proj="relu", is_decoder=True, use_cache=False, attn_implementation="sdpa")
    sizes.update(overrides)
    torch.manual_seed(0)
    decoder = T5Stack(T5Config(vocab_size=4, **sizes))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.5 + (parameter.dim() == 1))
    return decoder.eval()


def histories(batch: int, *, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder states (B, T, d) and a key mask (B, T) with left padding in every row but the last."""
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, MEMORY, D_MODEL, generator=gen)
    mask = torch.ones(batch, MEMORY, dtype=torch.bool)
    for row in range(batch - 1):
        mask[row, : row + 1] = False
    return states, mask


def inputs(rows: int, *, seed: int = 3) -> torch.Tensor:
    return torch.randn(rows, STEPS, D_MODEL, generator=torch.Generator().manual_seed(seed))


def t5_forward(decoder: T5Stack, x: torch.Tensor, states: torch.Tensor, cross_mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return decoder(inputs_embeds=x, encoder_hidden_states=states, encoder_attention_mask=cross_mask,
                       use_cache=False).last_hidden_state


def stepwise(decoder: T5Stack, x: torch.Tensor, states: torch.Tensor, cross_bias: torch.Tensor) -> torch.Tensor:
    """The adapter fed one token per call, with the cache it keeps."""
    adapter = T5Decoding(decoder)
    cache = adapter.cache(states, cross_bias)
    group = x.shape[0] // states.shape[0]
    with torch.no_grad():
        return torch.cat([adapter.step(x[:, t : t + 1], cache, group=group) for t in range(x.shape[1])], dim=1)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_stepwise_decoding_matches_the_teacher_forced_t5_decoder(
    attn_implementation: str, feed_forward_proj: str
) -> None:
    decoder = t5_decoder(attn_implementation=attn_implementation, feed_forward_proj=feed_forward_proj)
    states, mask = histories(3)
    x = inputs(3)
    expected = t5_forward(decoder, x, states, mask)
    got = stepwise(decoder, x, states, additive_mask(mask, x.dtype)[:, None, None, :])
    torch.testing.assert_close(got, expected, **TOLERANCE)


def test_one_step_over_a_whole_prefix_matches_the_teacher_forced_t5_decoder() -> None:
    decoder = t5_decoder()
    states, mask = histories(3)
    x = inputs(3)
    adapter = T5Decoding(decoder)
    cache = adapter.cache(states, additive_mask(mask, x.dtype)[:, None, None, :], incremental=False)
    with torch.no_grad():
        got = adapter.step(x, cache, group=1)  # all positions at once: the causal mask at work
    torch.testing.assert_close(got, t5_forward(decoder, x, states, mask), **TOLERANCE)
    assert cache.self_kv is None  # a non-incremental cache keeps the cross part only


def test_beams_sharing_a_history_match_t5_on_the_repeated_history() -> None:
    decoder, group = t5_decoder(), 3
    states, mask = histories(2)
    x = inputs(2 * group)
    expected = t5_forward(decoder, x, states.repeat_interleave(group, 0), mask.repeat_interleave(group, 0))
    got = stepwise(decoder, x, states, additive_mask(mask, x.dtype)[:, None, None, :])
    torch.testing.assert_close(got, expected, **TOLERANCE)


def test_per_head_cross_bias_matches_t5_given_the_same_4d_encoder_mask() -> None:
    decoder = t5_decoder()
    states, mask = histories(2)
    x = inputs(2)
    gen = torch.Generator().manual_seed(4)
    bias = additive_mask(mask[:, None, None, :], x.dtype) + torch.randn(1, HEADS, 1, MEMORY, generator=gen)
    expected = t5_forward(decoder, x, states, bias.expand(-1, -1, STEPS, -1))  # (B, heads, s, T)
    torch.testing.assert_close(stepwise(decoder, x, states, bias), expected, **TOLERANCE)


def test_reordered_cache_continues_the_rows_it_names() -> None:
    decoder, group, past = t5_decoder(), 2, 2
    states, mask = histories(2)
    x = inputs(2 * group)
    adapter = T5Decoding(decoder)
    cache = adapter.cache(states, additive_mask(mask, x.dtype)[:, None, None, :])
    rows = torch.tensor([1, 1, 3, 2])  # beams stay with their history; one is repeated, one dropped
    continued = torch.cat([x[rows, :past], inputs(2 * group, seed=5)[:, past:]], dim=1)
    with torch.no_grad():
        adapter.step(x[:, :past], cache, group=group)
        cache.reorder(rows)
        got = adapter.step(continued[:, past:], cache, group=group)
    expected = t5_forward(decoder, continued, states.repeat_interleave(group, 0), mask.repeat_interleave(group, 0))
    torch.testing.assert_close(got, expected[:, past:], **TOLERANCE)
