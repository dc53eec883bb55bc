"""T5Recommender: shapes, padding invariance, causality, the paper size, incremental decoding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from etegrec.models import T5Recommender, code_loss

CODE_NUM, CODE_LEN = 7, 3


def tiny_model(**overrides: object) -> T5Recommender:
    torch.manual_seed(0)
    sizes = dict(
        code_num=CODE_NUM, code_length=CODE_LEN, num_layers=2, num_decoder_layers=2, d_model=16,
        d_ff=32, num_heads=2, d_kv=8, latent_dim=5, semantic_dim=6,
    )
    sizes.update(overrides)
    return T5Recommender(**sizes)


def batch(size: int = 3, history: int = 4, *, seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, CODE_NUM, (size, history, CODE_LEN), generator=gen)
    mask = torch.ones(size, history, dtype=torch.bool)
    mask[0, :2] = False  # row 0 is left-padded
    target = torch.randint(0, CODE_NUM, (size, CODE_LEN), generator=gen)
    return codes, mask, target


def assert_decodes_as_teacher_forced(model: T5Recommender, codes: torch.Tensor, mask: torch.Tensor,
                                     target: torch.Tensor, *, incremental: bool = True, history_bias: bool = False) -> None:
    """``decode_logits`` step by step (rows of ``target`` grouped per history, consecutive, as beam search
    lays them out; plus ``history_bias`` when asked) gives the teacher-forced logits of ``forward``."""
    group = len(target) // len(codes)
    with torch.no_grad():
        expected = model(codes.repeat_interleave(group, 0), mask.repeat_interleave(group, 0), target).logits
        states, attention_mask = model.encode(codes, mask)
        cache = model.decoder_cache(states, attention_mask, incremental=incremental)
        for t in range(CODE_LEN):
            logits = model.decode_logits(states, attention_mask, target[:, :t], cache=cache)
            if history_bias:
                logits = logits + model.history_bias(codes, mask, target[:, :t])
            torch.testing.assert_close(logits, expected[:, t], rtol=1e-5, atol=1e-5)


def test_forward_returns_logits_and_alignment_heads_of_documented_shapes() -> None:
    codes, mask, target = batch()
    out = tiny_model()(codes, mask, target)
    assert out.logits.shape == (3, CODE_LEN, CODE_NUM)
    assert out.encoder_latent.shape == (3, 5)
    assert out.decoder_semantic.shape == (3, 6)


def test_more_left_padding_leaves_every_output_unchanged() -> None:
    model = tiny_model().eval()
    codes, mask, target = batch()
    gen = torch.Generator().manual_seed(7)
    extra = 3  # padded items carrying arbitrary codes, which must be masked out
    junk = torch.randint(0, CODE_NUM, (3, extra, CODE_LEN), generator=gen)
    padded_codes = torch.cat([junk, codes], dim=1)
    padded_mask = torch.cat([torch.zeros(3, extra, dtype=torch.bool), mask], dim=1)
    # A fourth row that is real everywhere keeps the padded columns in the encoder input.
    padded_codes = torch.cat([padded_codes, torch.randint(0, CODE_NUM, (1, 4 + extra, CODE_LEN))])
    padded_mask = torch.cat([padded_mask, torch.ones(1, 4 + extra, dtype=torch.bool)])
    padded_target = torch.cat([target, target[:1]])
    with torch.no_grad():
        short, long = model(codes, mask, target), model(padded_codes, padded_mask, padded_target)
    for name, a, b in zip(short._fields, short, long):
        if a is None:  # item_logits: this model has no item output vectors
            assert b is None, name
        else:
            torch.testing.assert_close(a, b[:3], rtol=1e-5, atol=1e-5)


def test_encode_skips_items_that_are_padding_in_every_row() -> None:
    codes, mask, _ = batch()
    mask[:, 0] = False
    states, attention_mask = tiny_model().encode(codes, mask)
    assert states.shape == (3, 3 * CODE_LEN, 16) and attention_mask.shape == (3, 3 * CODE_LEN)


def test_logits_at_position_i_ignore_target_codes_from_i_on() -> None:
    model = tiny_model().eval()
    codes, mask, target = batch()
    with torch.no_grad():
        reference = model(codes, mask, target).logits
        for i in range(CODE_LEN):
            changed = target.clone()
            changed[:, i:] = (changed[:, i:] + 1) % CODE_NUM
            logits = model(codes, mask, changed).logits
            torch.testing.assert_close(logits[:, : i + 1], reference[:, : i + 1])
            if i + 1 < CODE_LEN:  # the change is visible right after it: the check has teeth
                assert not torch.allclose(logits[:, i + 1], reference[:, i + 1])


def test_paper_size_model_has_the_expected_parameter_count() -> None:
    model = T5Recommender()  # 6 + 6 layers, d_model 128, d_ff 512, 4 heads, d_kv 64
    encoder_layer = 4 * 128 * 256 + 2 * 128 + 2 * 128 * 512  # attention, 2 norms, FFN
    decoder_layer = 2 * 4 * 128 * 256 + 3 * 128 + 2 * 128 * 512  # self + cross attention
    stacks = 6 * encoder_layer + 6 * decoder_layer + 2 * (32 * 4 + 128)  # + rel. bias, final norm
    heads = 4 * 256 * 128 + 128 + (128 * 128 + 128) + (128 * 256 + 256)  # tables, BOS, projections
    assert sum(p.numel() for p in model.parameters()) == stacks + heads == 4_117_248


def test_paper_size_training_step_has_finite_loss_and_moves_parameters() -> None:
    torch.manual_seed(0)
    model = T5Recommender()
    codes = torch.randint(0, 256, (4, 20, 4))
    mask = torch.ones(4, 20, dtype=torch.bool)
    mask[:2, :5] = False
    target = torch.randint(0, 256, (4, 4))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    out = model(codes, mask, target)
    alignment = out.encoder_latent.pow(2).mean() + out.decoder_semantic.pow(2).mean()
    loss = code_loss(out.logits, target) + alignment
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_code_loss_is_mean_cross_entropy_over_positions() -> None:
    logits = torch.randn(2, CODE_LEN, CODE_NUM)
    target = torch.randint(0, CODE_NUM, (2, CODE_LEN))
    per_position = [F.cross_entropy(logits[:, i], target[:, i]) for i in range(CODE_LEN)]
    expected = torch.stack(per_position).mean()
    torch.testing.assert_close(code_loss(logits, target), expected)


@pytest.mark.parametrize("incremental", [True, False])
def test_decode_logits_match_teacher_forced_logits_for_grouped_rows(incremental: bool) -> None:
    model = tiny_model().eval()
    codes, mask, _ = batch()
    group = 2  # two beams per history, consecutive rows
    gen = torch.Generator().manual_seed(3)
    target = torch.randint(0, CODE_NUM, (3 * group, CODE_LEN), generator=gen)
    assert_decodes_as_teacher_forced(model, codes, mask, target, incremental=incremental)


def test_decode_logits_refuses_training_mode() -> None:
    model = tiny_model()
    codes, mask, _ = batch()
    states, attention_mask = model.encode(codes, mask)
    with pytest.raises(ValueError, match="model.eval"):
        model.decode_logits(states, attention_mask, torch.zeros(3, 0, dtype=torch.long))


def test_code_of_a_real_item_outside_code_num_is_rejected() -> None:
    codes, mask, target = batch()
    codes[1, 2, 0] = CODE_NUM
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        tiny_model()(codes, mask, target)


def test_history_without_real_items_is_rejected() -> None:
    codes, mask, target = batch()
    mask[2] = False
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        tiny_model()(codes, mask, target)


def test_non_positive_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="num_heads=0"):
        T5Recommender(num_heads=0)


def _gradients(model: T5Recommender) -> dict[str, torch.Tensor]:
    codes, mask, target = batch(size=4, history=5)
    model.train()
    torch.manual_seed(3)  # the same dropout masks in both models
    out = model(codes, mask, target)
    loss = code_loss(out.logits, target) + out.encoder_latent.pow(2).mean() + out.decoder_semantic.pow(2).mean()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_gradients_with_dropout_on() -> None:
    plain = _gradients(tiny_model(dropout=0.3))
    checkpointed = _gradients(tiny_model(dropout=0.3, gradient_checkpointing=True))
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():  # the recomputed forward replays the same dropout masks
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert plain["code_embedding"].abs().sum() > 0  # the gradient reaches the inputs' embeddings


def test_gradient_checkpointing_keeps_fewer_activations() -> None:
    def saved_bytes(model: T5Recommender) -> int:
        codes, mask, target = batch(size=8, history=20)
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.train()(codes, mask, target)
        return total

    assert saved_bytes(tiny_model(gradient_checkpointing=True)) < 0.5 * saved_bytes(tiny_model())


def test_eager_attention_gives_the_outputs_of_sdpa() -> None:
    codes, mask, target = batch()
    sdpa, eager = tiny_model().eval(), tiny_model(attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    for a, b in zip(sdpa(codes, mask, target), eager(codes, mask, target)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="attn_implementation"):
        tiny_model(attn_implementation="flash")


@pytest.mark.parametrize("encoder_input, causal", [("codes", False), ("items", False), ("items", True)])
def test_incremental_logits_plus_history_bias_match_teacher_forced_logits(encoder_input: str, causal: bool) -> None:
    model = tiny_model(encoder_input=encoder_input, max_history=6, repeat_bias=True, causal_encoder=causal).eval()
    with torch.no_grad():
        model.repeat_logit.copy_(torch.tensor([-1.0, -2.0, 3.0]))
        if causal:  # a cross-attention recency bias that matters
            model.cross_recency.copy_(torch.randn(model.cross_recency.shape, generator=torch.Generator().manual_seed(2)))
    codes, mask, _ = batch()
    group = 2
    target = codes[:, -1].repeat_interleave(group, 0).clone()  # repeats of the last item: the bias fires
    target[::2, 1] = (target[::2, 1] + 1) % CODE_NUM  # and rows that leave the repeat after one code
    assert_decodes_as_teacher_forced(model, codes, mask, target, history_bias=True)


def test_history_bias_marks_the_codes_that_continue_a_history_item() -> None:
    model = tiny_model(repeat_bias=True)
    with torch.no_grad():
        model.repeat_logit.copy_(torch.tensor([-1.0, -2.0, -3.0]))
    history = torch.tensor([[[9 % CODE_NUM, 0, 0], [1, 2, 3], [1, 4, 5]]])  # (1, 3, L); item 0 is padding
    mask = torch.tensor([[False, True, True]])
    first = model.history_bias(history, mask, torch.zeros(1, 0, dtype=torch.long))[0]
    assert first.nonzero().flatten().tolist() == [1] and first[1] == -1.0  # code 1 starts both real items
    second = model.history_bias(history, mask, torch.tensor([[1]]))[0]
    assert second.nonzero().flatten().tolist() == [2, 4] and second[2] == -2.0
    third = model.history_bias(history, mask, torch.tensor([[1, 4]]))[0]
    assert third.nonzero().flatten().tolist() == [5] and third[5] == -3.0
    assert not model.history_bias(history, mask, torch.tensor([[2]])).any()  # no history item starts with 2
    assert tiny_model().history_bias(history, mask, torch.tensor([[1]])) is None


def test_item_tokens_make_the_encoder_see_the_order_of_the_history() -> None:
    codes, mask, target = batch(size=2)
    mask[:] = True
    model = tiny_model(encoder_input="items", max_history=4).eval()
    states, attention_mask = model.encode(codes, mask)
    assert states.shape == (2, 4, 16) and attention_mask.shape == (2, 4)  # one token per item
    with torch.no_grad():
        forward, backward = model(codes, mask, target).logits, model(codes.flip(1), mask, target).logits
    assert not torch.allclose(forward, backward, atol=1e-4)
    with pytest.raises(ValueError, match="max_history=3"):
        tiny_model(encoder_input="items", max_history=3)(codes, mask, target)


def test_forward_all_equals_forward_on_every_prefix_of_the_window() -> None:
    model = tiny_model(encoder_input="items", max_history=6, repeat_bias=True, causal_encoder=True).eval()
    with torch.no_grad():
        model.repeat_logit.copy_(torch.tensor([-1.0, 0.5, -2.0]))
        model.cross_recency.copy_(torch.randn(model.cross_recency.shape, generator=torch.Generator().manual_seed(2)))
    gen = torch.Generator().manual_seed(5)
    items = torch.randint(0, CODE_NUM, (2, 5, CODE_LEN), generator=gen)
    targets = torch.cat([items[:, 1:], torch.randint(0, CODE_NUM, (2, 1, CODE_LEN), generator=gen)], dim=1)
    targets[0, 3] = items[0, 1]  # a repeat, so that the repeat bias takes part
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, :2] = False  # row 0 is left-padded
    scored = mask.clone()  # a target after every real item
    scored[1, 3] = False  # one left out: the others keep their rows
    with torch.no_grad():
        out = model.forward_all(items, mask, targets, scored)
        assert out.logits.shape[0] == int(scored.sum()) == 7
        for n, (row, i) in enumerate(scored.nonzero().tolist()):
            one = model(items[[row], : i + 1], mask[[row], : i + 1], targets[[row], i])
            torch.testing.assert_close(out.logits[n], one.logits[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out.encoder_latent[n], one.encoder_latent[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out.decoder_semantic[n], one.decoder_semantic[0], rtol=1e-4, atol=1e-5)


def test_code_init_tokenizer_starts_each_level_from_its_codebook_at_unit_scale() -> None:
    from etegrec.config import load_config
    from etegrec.training.joint import build_recommender
    from etegrec.training.rqvae import build_tokenizer

    config = load_config("tiny", ["recommender.code_init=tokenizer", "recommender.d_model=16"])  # tiny: e_dim 16
    torch.manual_seed(0)
    tokenizer = build_tokenizer(config.tokenizer, in_dim=8)
    model = build_recommender(config, tokenizer, semantic_dim=8)
    for level, layer in enumerate(tokenizer.quantizer.layers):
        book, table = layer.codebook.detach(), model.code_embedding[level].detach()
        scale = table.std() / book.std()
        torch.testing.assert_close(table, (book - book.mean()) * scale)  # the codebook, shifted and rescaled
        assert abs(float(table.std()) - 1.0) < 1e-4
    assert not torch.allclose(model.code_embedding[-1], torch.zeros_like(model.code_embedding[-1]))  # suffix: random


def test_code_init_tokenizer_needs_d_model_equal_to_the_code_width() -> None:
    from etegrec.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"recommender\.d_model \(32\) equal to tokenizer\.e_dim \(16\)"):
        load_config("tiny", ["recommender.code_init=tokenizer"])


def _with_item_vectors(**overrides: object) -> T5Recommender:
    model = tiny_model(encoder_input="items", max_history=6, num_items=9, **overrides).eval()
    with torch.no_grad():
        model.item_embedding.weight[1:] = torch.randn(9, 16, generator=torch.Generator().manual_seed(3))
    return model


def test_item_vectors_tell_apart_items_with_the_same_codes() -> None:
    model = _with_item_vectors()
    codes, mask, target = batch(size=2)
    mask[:] = True
    codes[1] = codes[0]  # two histories of the same codes ...
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]])  # ... but another last item
    with torch.no_grad():
        out = model(codes, mask, target[[0, 0]], ids).logits
        assert not torch.allclose(out[0], out[1], atol=1e-4)
        model.item_embedding.weight.zero_()  # zero vectors (the "zero" init): the codes-only model
        plain = tiny_model(encoder_input="items", max_history=6).eval()
        torch.testing.assert_close(model(codes, mask, target[[0, 0]], ids).logits, plain(codes, mask, target[[0, 0]]).logits)
    with pytest.raises(ValueError, match=r"pass history_items of shape \(2, 4\)"):
        model(codes, mask, target)
    with pytest.raises(ValueError, match="only with encoder_input='items'"):
        tiny_model(num_items=9)


def test_item_dropout_leaves_out_whole_item_vectors_in_training_only() -> None:
    model = _with_item_vectors(dropout=0.0, item_dropout=0.5)
    seen = []
    model.encoder.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True)
    codes, mask, _ = batch(size=300, history=4)
    ids = torch.randint(1, 10, (300, 4), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model.encode(codes, mask, ids)  # eval: every vector in
        torch.manual_seed(5)
        model.train().encode(codes, mask, ids)
    full, dropped = seen
    missing = full - dropped  # per token: zero (kept) or exactly its item's vector (left out)
    vectors = model.item_embedding.weight[ids.masked_fill(~mask, 0)].detach()
    left_out = (missing - vectors).abs().amax(dim=-1) < 1e-5
    kept = missing.abs().amax(dim=-1) < 1e-6
    real = mask & (vectors.abs().amax(dim=-1) > 0)
    assert bool((left_out | kept)[real].all())  # whole vectors, not rescaled ones
    share = left_out[real].float().mean().item()
    assert 0.4 < share < 0.6, share  # about half (1,198 items: std 0.015)
    assert bool(kept[~mask].all())  # padding has no vector to leave out


def test_item_dropout_reaches_the_model_and_is_refused_without_item_vectors_or_at_one() -> None:
    from etegrec.config import ConfigError, load_config
    from etegrec.training.joint import build_recommender
    from etegrec.training.rqvae import build_tokenizer

    config = load_config("tiny", ["recommender.encoder_input=items", "recommender.item_embedding=zero",
                                  "recommender.item_dropout=0.3"])
    model = build_recommender(config, build_tokenizer(config.tokenizer, in_dim=8), semantic_dim=8, num_items=12)
    assert model.item_dropout == 0.3
    with pytest.raises(ConfigError, match="'recommender.item_dropout' is 0.5, which must lie in"):
        load_config("tiny", ["recommender.item_dropout=0.5"])
    with pytest.raises(ConfigError, match="'recommender.item_dropout' is 1.0"):
        load_config("tiny", ["recommender.encoder_input=items", "recommender.item_embedding=embed",
                             "recommender.item_dropout=1.0"])
    with pytest.raises(ValueError, match="item_dropout=0.2 must lie in"):
        tiny_model(item_dropout=0.2)


def test_forward_all_and_beam_search_read_the_item_ids_as_forward_does() -> None:
    from etegrec.models import CodeTrie, beam_search

    model = _with_item_vectors(causal_encoder=True)
    gen = torch.Generator().manual_seed(5)
    ids = torch.tensor([[0, 0, 4, 7, 2], [1, 3, 9, 5, 6]])
    table = torch.randint(0, CODE_NUM, (10, CODE_LEN), generator=gen)
    mask, scored = ids != 0, ids != 0
    targets = torch.cat([ids[:, 1:], torch.tensor([[8], [8]])], dim=1)
    with torch.no_grad():
        out = model.forward_all(table[ids], mask, table[targets], scored, ids)
        for n, (row, i) in enumerate(scored.nonzero().tolist()):
            h = ids[[row], : i + 1]
            one = model(table[h], h != 0, table[targets[[row], i]], h)
            torch.testing.assert_close(out.logits[n], one.logits[0], rtol=1e-4, atol=1e-5)
        trie = CodeTrie(table[1:], code_num=CODE_NUM)
        found = beam_search(model, table[ids], mask, trie, history_items=ids, beam_size=4, top_k=2)
        other = beam_search(model, table[ids], mask, trie, history_items=ids.roll(1, dims=1) * mask, beam_size=4, top_k=2)
    assert not torch.equal(found.scores, other.scores)  # the ids reach the encoder


def test_item_vectors_start_from_the_embed_stages_geometry() -> None:
    from etegrec.config import ConfigError, load_config
    from etegrec.training.joint import build_recommender
    from etegrec.training.rqvae import build_tokenizer

    config = load_config("tiny", ["recommender.encoder_input=items", "recommender.item_embedding=embed"])
    emb = torch.randn(13, 8, generator=torch.Generator().manual_seed(4)).numpy()  # 12 items + padding, d 8
    torch.manual_seed(0)
    model = build_recommender(config, build_tokenizer(config.tokenizer, in_dim=8), semantic_dim=8, num_items=12, embeddings=emb)
    table = model.item_embedding.weight.detach()
    assert table.shape == (13, config.recommender.d_model) and not table[0].any()
    assert abs(float(table[1:, :8].std()) - 1.0) < 1e-4 and not table[:, 8:].any()  # d 8 < d_model: the rest zero
    centred = torch.as_tensor(emb[1:]) - torch.as_tensor(emb[1:]).mean(0)
    gram, got = centred @ centred.T, table[1:] @ table[1:].T  # a rotation and one scale: inner products kept
    torch.testing.assert_close(got / got[0, 0], gram / gram[0, 0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="item_embedding' is 'zero', which needs recommender.encoder_input=items"):
        load_config("tiny", ["recommender.encoder_input=codes", "recommender.item_embedding=zero"])


def _with_item_output(table: torch.Tensor, **overrides: object) -> T5Recommender:
    """A tiny model with output vectors for the items of ``table`` (row i = item i + 1), set at random."""
    from etegrec.models import CodeTrie

    model = tiny_model(output_items=len(table), **overrides).eval()
    with torch.no_grad():
        model.item_output.weight.normal_(generator=torch.Generator().manual_seed(4))
    model.use_trie(CodeTrie(table, code_num=CODE_NUM))
    return model


ITEM_TABLE = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 4, 2], [5, 1, 2], [5, 6, 0]])  # items 1..5
# 12 items: more second-level prefixes (10) than codes (7), which the sparse path scores
WIDE_TABLE = torch.tensor([[a, b, c] for a, b, c in zip([0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 6], [0, 1, 1, 2, 3, 0, 0, 4, 5, 6, 0, 1],
                                                        [0, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3])])


@pytest.mark.parametrize("table", [ITEM_TABLE, WIDE_TABLE], ids=["few-prefixes", "many-prefixes"])
def test_item_output_adds_the_log_mean_exp_of_each_codes_item_scores(table: torch.Tensor) -> None:
    model = _with_item_output(table)
    plain = tiny_model().eval()  # the same weights (same seed) without item vectors
    codes, mask, _ = batch(size=len(table))
    target = table  # each row a real item's codes
    vectors = model.item_output.weight.detach()[1:]
    with torch.no_grad():
        hidden = model.decoder(inputs_embeds=model._decoder_inputs(target[:, :-1]),
                               encoder_hidden_states=model.encode(codes, mask)[0],
                               encoder_attention_mask=model.encode(codes, mask)[1]).last_hidden_state
        out = model(codes, mask, target)
        diff = out.logits - plain(codes, mask, target).logits
    # every item's score at the first code (column i = item i + 1), what the item-level loss reads
    torch.testing.assert_close(out.item_logits, hidden[:, 0] @ vectors.T / 16 ** 0.5)
    assert plain(codes, mask, target).item_logits is None
    expected = torch.zeros_like(diff)
    for n in range(len(target)):
        for t in range(CODE_LEN):
            for k in range(CODE_NUM):  # the items whose codes start with the target's prefix, then k
                under = [i for i, row in enumerate(table.tolist()) if row[:t] == target[n, :t].tolist() and row[t] == k]
                if under:  # log-mean-exp of the items' scores, on the tied logits' scale
                    scores = vectors[under] @ hidden[n, t] / 16 ** 0.5
                    expected[n, t, k] = torch.logsumexp(scores, 0) - torch.log(torch.tensor(float(len(under))))
    torch.testing.assert_close(diff, expected, rtol=1e-4, atol=1e-5)
    first_codes = len(table[:, 0].unique())
    assert (expected[:, 0] != 0).sum() == first_codes * len(table)  # first code: every code with items, every row
    with torch.no_grad():  # zero vectors: the codes-only model
        model.item_output.weight.zero_()
        torch.testing.assert_close(model(codes, mask, target).logits, plain(codes, mask, target).logits)


def test_item_output_decodes_step_by_step_as_teacher_forced_and_trains() -> None:
    from etegrec.models import CodeTrie

    model = _with_item_output(ITEM_TABLE, encoder_input="items", max_history=6, causal_encoder=True)
    codes, mask, _ = batch(size=2)
    target = ITEM_TABLE[[0, 1, 2, 3, 4, 0]]  # three rows per history
    target[5, 1] = 6  # a prefix that leads to no item: no vector there
    assert_decodes_as_teacher_forced(model, codes, mask, target)
    model.train()
    code_loss(model(codes[[0, 1, 1]], mask[[0, 1, 1]], ITEM_TABLE[[0, 3, 4]]).logits, ITEM_TABLE[[0, 3, 4]]).backward()
    moved = model.item_output.weight.grad.abs().sum(dim=1)
    assert moved[0] == 0 and (moved[1:] > 0).all()  # every item sits under some scored code; padding never
    fresh = tiny_model(output_items=5)
    with pytest.raises(ValueError, match=r"use_trie\(CodeTrie"):
        fresh(codes, mask, ITEM_TABLE[:2])
    fresh.use_trie(CodeTrie(ITEM_TABLE, code_num=CODE_NUM))
    assert fresh(codes, mask, ITEM_TABLE[:2]).logits.shape == (2, CODE_LEN, CODE_NUM)


def test_tied_item_vectors_are_one_table_read_on_both_sides_and_trained_from_both() -> None:
    from etegrec.config import ConfigError, load_config
    from etegrec.models import CodeTrie
    from etegrec.training.joint import build_recommender
    from etegrec.training.rqvae import build_tokenizer

    untied = tiny_model(encoder_input="items", max_history=6, num_items=5, output_items=5)
    model = tiny_model(encoder_input="items", max_history=6, num_items=5, output_items=5, tie_item_vectors=True).eval()
    assert model.item_output.weight is model.item_embedding.weight
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in model.parameters()) == 6 * 16
    with torch.no_grad():
        model.item_embedding.weight[1:].normal_(generator=torch.Generator().manual_seed(4))
    model.use_trie(CodeTrie(ITEM_TABLE, code_num=CODE_NUM))
    ids = torch.tensor([[0, 1, 2], [2, 1, 2]])  # histories of items 1 and 2 only
    history, mask = ITEM_TABLE[ids.clamp_min(1) - 1], ids != 0
    target = ITEM_TABLE[[3, 4]]  # items 4 and 5
    out = model(history, mask, target, ids)
    hidden = model.decoder(inputs_embeds=model._decoder_inputs(target[:, :-1]),
                           encoder_hidden_states=model.encode(history, mask, ids)[0],
                           encoder_attention_mask=model.encode(history, mask, ids)[1]).last_hidden_state
    # the output scores read the input table (row i + 1 = item i + 1)
    torch.testing.assert_close(out.item_logits, hidden[:, 0] @ model.item_embedding.weight[1:].T / 16 ** 0.5)
    code_loss(out.logits, target).backward()
    grad = model.item_embedding.weight.grad.abs().sum(dim=1)
    assert grad[0] == 0 and (grad[3:] > 0).all()  # items 3-5 are never read: their gradient comes from the output
    read_only = tiny_model(encoder_input="items", max_history=6, num_items=5).eval()
    code_loss(read_only(history, mask, target, ids).logits, target).backward()
    assert not read_only.item_embedding.weight.grad[3:].any()  # untied, nothing but reading moves them
    state = model.state_dict()  # both names, one tensor; a fresh tied model takes it back whole
    assert torch.equal(state["item_output.weight"], state["item_embedding.weight"])
    again = tiny_model(encoder_input="items", max_history=6, num_items=5, output_items=5, tie_item_vectors=True).eval()
    again.load_state_dict(state)
    again.use_trie(CodeTrie(ITEM_TABLE, code_num=CODE_NUM))
    with torch.no_grad():
        torch.testing.assert_close(again(history, mask, target, ids).logits, model(history, mask, target, ids).logits)
    with pytest.raises(ValueError, match="tie_item_vectors=True needs num_items and output_items equal"):
        tiny_model(encoder_input="items", num_items=5, tie_item_vectors=True)
    # from a config: the SASRec stage's geometry starts both sides
    config = load_config("tiny", ["recommender.encoder_input=items", "recommender.item_embedding=embed",
                                  "recommender.item_output=true", "recommender.tie_item_vectors=true"])
    emb = torch.randn(13, 8, generator=torch.Generator().manual_seed(4)).numpy()
    built = build_recommender(config, build_tokenizer(config.tokenizer, in_dim=8), semantic_dim=8, num_items=12, embeddings=emb)
    assert built.item_output.weight is built.item_embedding.weight and built.item_output.weight[1:, :8].abs().sum() > 0
    with pytest.raises(ConfigError, match="'recommender.tie_item_vectors' is true, which needs recommender.item_output=true"):
        load_config("tiny", ["recommender.encoder_input=items", "recommender.item_embedding=embed",
                             "recommender.tie_item_vectors=true"])


def test_log_mean_exp_is_stable_and_an_empty_group_is_zero_without_nan_gradients() -> None:
    from etegrec.models.code_decoding import log_mean_exp

    values = torch.tensor([1000.0, 1000.0, -3.0, 0.5, 2.0], requires_grad=True)
    got = log_mean_exp(values, torch.tensor([0, 0, 2, 2, 2]), 4)  # groups 1 and 3 empty
    expected = torch.stack([torch.tensor(1000.0), torch.tensor(0.0),
                            torch.logsumexp(values[2:].detach(), 0) - torch.log(torch.tensor(3.0)), torch.tensor(0.0)])
    torch.testing.assert_close(got.detach(), expected)
    got.sum().backward()
    torch.testing.assert_close(values.grad[:2], torch.tensor([0.5, 0.5]))  # softmax weights inside each group
    assert torch.isfinite(values.grad).all()


BALANCED_TABLE = torch.tensor([[a, b, c] for a in (1, 4) for b in (0, 2) for c in (3, 5)])  # 8 items, 2 per node


def test_item_state_first_scores_every_code_with_the_first_state_and_sums_to_its_item_softmax() -> None:
    model = _with_item_output(BALANCED_TABLE, item_state="first")
    each = _with_item_output(BALANCED_TABLE)  # the same weights, item scores of each position's state
    codes, mask, _ = batch(size=len(BALANCED_TABLE))
    target = BALANCED_TABLE  # row n: item n + 1
    with torch.no_grad():
        out, other = model(codes, mask, target), each(codes, mask, target)
        torch.testing.assert_close(out.item_logits, other.item_logits)  # the first position reads the same state
        torch.testing.assert_close(out.logits[:, 0], other.logits[:, 0])
        assert not torch.allclose(out.logits[:, 1:], other.logits[:, 1:])
        model.code_embedding.zero_()  # no code logits (and no code inputs): the item vectors alone
        out = model(codes, mask, target)
    # each position's softmax over the codes that lead to an item, summed: the item's softmax over every item
    trie_codes = torch.zeros(CODE_LEN, CODE_NUM, dtype=torch.bool)
    for t in range(CODE_LEN):
        trie_codes[t, BALANCED_TABLE[:, t].unique()] = True
    allowed = out.logits.masked_fill(~trie_codes, float("-inf")).log_softmax(-1)
    summed = allowed.gather(2, target[..., None]).squeeze(-1).sum(1)  # (items,)
    item_softmax = out.item_logits.log_softmax(-1).diagonal()  # row n scores its own target, item n + 1
    torch.testing.assert_close(summed, item_softmax, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="item_state='last' must be one of"):
        tiny_model(output_items=8, item_state="last")
    with pytest.raises(ValueError, match="other than 'each' only with output_items > 0"):
        tiny_model(item_state="first")


@pytest.mark.parametrize("incremental", [True, False], ids=["incremental", "rerun"])
def test_item_state_first_decodes_step_by_step_as_teacher_forced(incremental: bool) -> None:
    model = _with_item_output(WIDE_TABLE, item_state="first")
    codes, mask, _ = batch(size=2)
    target = WIDE_TABLE[[0, 1, 2, 4, 6, 9, 10, 11]]  # four rows per history, prefixes shared and not
    assert_decodes_as_teacher_forced(model, codes, mask, target, incremental=incremental)
    # beam search reorders the cache between steps: the kept first states follow their rows
    with torch.no_grad():
        expected = model(codes.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), target).logits
        states, attention_mask = model.encode(codes, mask)
        cache = model.decoder_cache(states, attention_mask, incremental=incremental)
        model.decode_logits(states, attention_mask, target[:, :0], cache=cache)
        rows = torch.tensor([3, 2, 1, 0, 7, 6, 5, 4])  # each history's beams in reverse
        cache.reorder(rows)
        step = model.decode_logits(states, attention_mask, target[rows, :1], cache=cache)
        torch.testing.assert_close(step, expected[rows, 1], rtol=1e-5, atol=1e-5)


def test_item_state_is_a_config_key_that_needs_item_output() -> None:
    from etegrec.config import ConfigError, load_config
    from etegrec.training.joint import build_recommender
    from etegrec.training.rqvae import build_tokenizer

    config = load_config("tiny", ["recommender.item_output=true", "recommender.item_state=first"])
    built = build_recommender(config, build_tokenizer(config.tokenizer, in_dim=8), semantic_dim=8, num_items=12)
    assert built.item_state == "first"
    with pytest.raises(ConfigError, match="'recommender.item_state' is 'first', which needs recommender.item_output=true"):
        load_config("tiny", ["recommender.item_state=first"])
    with pytest.raises(ConfigError, match="recommender.item_state"):
        load_config("tiny", ["recommender.item_output=true", "recommender.item_state=last"])


def _with_repeat_items(table: torch.Tensor, offset: float, **overrides: object) -> T5Recommender:
    """A tiny model reading item ids, with output vectors for the items of ``table`` (random) and the
    item-level repeat offset set to ``offset``."""
    from etegrec.models import CodeTrie

    model = tiny_model(encoder_input="items", max_history=6, num_items=len(table), output_items=len(table),
                       repeat_item_bias=True, **overrides).eval()
    with torch.no_grad():
        model.item_output.weight.normal_(generator=torch.Generator().manual_seed(4))
        model.item_embedding.weight.normal_(generator=torch.Generator().manual_seed(5))
        model.repeat_item_logit.fill_(offset)
    model.use_trie(CodeTrie(table, code_num=CODE_NUM))
    return model


REPEAT_IDS = torch.tensor([[0, 0, 2, 7], [1, 3, 9, 12], [5, 5, 11, 4]])  # histories of item ids (0: padding)


@pytest.mark.parametrize("state", ["each", "first"])
def test_the_item_repeat_offset_moves_the_history_items_score_inside_each_codes_log_mean_exp(state: str) -> None:
    model = _with_repeat_items(WIDE_TABLE, -2.5, item_state=state)
    target = WIDE_TABLE[[1, 6, 10]]
    history, mask = WIDE_TABLE[REPEAT_IDS.clamp_min(1) - 1], REPEAT_IDS != 0
    vectors = model.item_output.weight.detach()[1:]
    with torch.no_grad():
        out = model(history, mask, target, REPEAT_IDS)
        model.repeat_item_logit.zero_()
        plain = model(history, mask, target, REPEAT_IDS)
        states, attention = model.encode(history, mask, REPEAT_IDS)
        hidden = model.decoder(inputs_embeds=model._decoder_inputs(target[:, :-1]), encoder_hidden_states=states,
                               encoder_attention_mask=model._cross_mask(attention, torch.full((CODE_LEN,), states.shape[1] - 1))
                               ).last_hidden_state
    seen = torch.zeros(3, len(WIDE_TABLE), dtype=torch.bool)
    for n, row in enumerate(REPEAT_IDS.tolist()):
        seen[n, [i - 1 for i in row if i]] = True
    torch.testing.assert_close(out.item_logits, plain.item_logits - 2.5 * seen)  # the item scores, first state
    model.repeat_item_logit.grad = None  # a repeated history item (5, 5) gets the offset, and its gradient, once
    model(history, mask, target, REPEAT_IDS).item_logits.sum().backward()
    assert model.repeat_item_logit.grad.item() == seen.sum().item() == 9
    diff = out.logits - plain.logits
    expected = torch.zeros_like(diff)
    for n in range(3):
        for t in range(CODE_LEN):
            h = hidden[n, 0 if state == "first" else t]
            for k in range(CODE_NUM):
                under = [i for i, row in enumerate(WIDE_TABLE.tolist()) if row[:t] == target[n, :t].tolist() and row[t] == k]
                if under:
                    scores = vectors[under] @ h / 16 ** 0.5
                    moved = torch.logsumexp(scores - 2.5 * seen[n, under], 0) - torch.logsumexp(scores, 0)
                    expected[n, t, k] = moved
    torch.testing.assert_close(diff, expected, rtol=1e-4, atol=1e-5)
    assert (diff <= 1e-6).all() and (diff < -1e-3).any()  # only codes over history items move, and only down


@pytest.mark.parametrize("incremental", [True, False], ids=["incremental", "rerun"])
def test_the_item_repeat_offset_decodes_step_by_step_as_teacher_forced(incremental: bool) -> None:
    model = _with_repeat_items(WIDE_TABLE, -1.5, item_state="first", causal_encoder=True)
    history, mask = WIDE_TABLE[REPEAT_IDS.clamp_min(1) - 1], REPEAT_IDS != 0
    target = WIDE_TABLE[[0, 1, 2, 4, 6, 9, 10, 11, 3, 5, 7, 8]]  # four rows per history, as beam search lays them
    ids = REPEAT_IDS.repeat_interleave(4, 0)
    with torch.no_grad():
        expected = model(history.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), target, ids).logits
        states, attention_mask = model.encode(history, mask, REPEAT_IDS)
        cache = model.decoder_cache(states, attention_mask, incremental=incremental, history_items=REPEAT_IDS)
        for t in range(CODE_LEN):
            logits = model.decode_logits(states, attention_mask, target[:, :t], cache=cache)
            torch.testing.assert_close(logits, expected[:, t], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="pass the history's item ids"):
            model.decode_logits(states, attention_mask, target[:, :0])
        torch.testing.assert_close(model.decode_logits(states, attention_mask, target[:, :1], history_items=REPEAT_IDS),
                                   expected[:, 1], rtol=1e-5, atol=1e-5)
        out = model.forward_all(history, mask, WIDE_TABLE[torch.tensor([[1, 1, 1, 6], [2, 8, 11, 3], [4, 10, 3, 9]])],
                                mask, REPEAT_IDS)
        for n, (row, i) in enumerate(mask.nonzero().tolist()):  # each target's history is the items up to it
            h = REPEAT_IDS[[row], : i + 1]
            tgt = WIDE_TABLE[torch.tensor([[1, 1, 1, 6], [2, 8, 11, 3], [4, 10, 3, 9]])][[row], i]
            one = model(WIDE_TABLE[h.clamp_min(1) - 1], h != 0, tgt, h)
            torch.testing.assert_close(out.logits[n], one.logits[0], rtol=1e-4, atol=1e-5)


def test_a_strong_item_repeat_offset_keeps_the_history_out_of_the_beam() -> None:
    from etegrec.config import ConfigError, load_config
    from etegrec.models import beam_search

    history, mask = WIDE_TABLE[REPEAT_IDS.clamp_min(1) - 1], REPEAT_IDS != 0
    found = {}
    for offset in (0.0, -50.0):
        model = _with_repeat_items(WIDE_TABLE, offset, item_state="first")
        with torch.no_grad():  # history items score highest of all, unless pushed down
            model.item_output.weight[1:] += 40 * torch.zeros(len(WIDE_TABLE), 16).index_fill_(
                0, REPEAT_IDS[REPEAT_IDS > 0].unique() - 1, 1.0) * model.bos.sign()
        found[offset] = beam_search(model, history, mask, model.output_trie, history_items=REPEAT_IDS,
                                    beam_size=12, top_k=3).items
    def repeats(items):
        return (items[:, :, None] == REPEAT_IDS[:, None, :]).any(2).sum()
    assert repeats(found[0.0]) > 0 and repeats(found[-50.0]) == 0
    with pytest.raises(ValueError, match="repeat_item_bias=True needs num_items and output_items"):
        tiny_model(output_items=5, repeat_item_bias=True)
    with pytest.raises(ConfigError, match="'recommender.repeat_item_bias' is true, which needs recommender.item_output"):
        load_config("tiny", ["recommender.repeat_item_bias=true"])
    assert load_config("tiny", ["recommender.encoder_input=items", "recommender.item_embedding=zero",
                                "recommender.item_output=true", "recommender.repeat_item_bias=true"]).recommender.repeat_item_bias
