"""Beam search and the code trie, against brute force on a model with known logits."""
from __future__ import annotations

import itertools

import pytest
import torch

from etegrec.models import CodeTrie, T5Recommender, beam_search

K, L = 5, 3


class FixedLogits:
    """A stand-in model whose logits depend only on the prefix (a random table per depth)."""

    def __init__(self, seed: int = 0, *, favour: int | None = None) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.tables = [torch.randn(*(K,) * (depth + 1), generator=gen) * 2 for depth in range(L)]
        if favour is not None:  # push every position strongly towards one code
            for table in self.tables:
                table[..., favour] += 50.0
        self.encode_calls = 0

    def encode(self, history_codes: torch.Tensor, history_mask: torch.Tensor) -> tuple:
        self.encode_calls += 1
        return torch.zeros(history_codes.shape[0], 1, 1), history_mask

    def decode_logits(self, states: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor):
        return self.tables[prefix.shape[1]][tuple(prefix.T)].expand(len(prefix), K)  # (N, K)

    def log_prob(self, codes: tuple[int, ...], allowed: set[tuple[int, ...]] | None = None) -> float:
        """Total log-probability of ``codes``; with ``allowed``, renormalised over allowed children."""
        total = 0.0
        for depth, code in enumerate(codes):
            logits = self.tables[depth][codes[:depth]].clone()
            if allowed is not None:
                ok = torch.tensor([codes[:depth] + (c,) in allowed for c in range(K)])
                logits[~ok] = float("-inf")
            total += float(logits.log_softmax(-1)[code])
        return total


def item_codes(n: int = 40, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    every = torch.tensor(list(itertools.product(range(K), repeat=L)))
    return every[torch.randperm(len(every), generator=gen)[:n]]  # (n, L) unique


def history(size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(size, 4, L, dtype=torch.long), torch.ones(size, 4, dtype=torch.bool)


def brute_force(scored: list[tuple[float, int]], k: int) -> tuple[list[int], list[float]]:
    best = sorted(scored, reverse=True)[:k]
    return [item for _, item in best], [score for score, _ in best]


@pytest.mark.parametrize("renormalize", [False, True])
def test_wide_constrained_search_returns_the_true_top_items(renormalize: bool) -> None:
    model, codes = FixedLogits(), item_codes()
    allowed = {tuple(row[: d + 1]) for row in codes.tolist() for d in range(L)}
    scored = [(model.log_prob(tuple(row), allowed if renormalize else None), i + 1)
              for i, row in enumerate(codes.tolist())]
    items, scores = brute_force(scored, 10)
    out = beam_search(model, *history(), CodeTrie(codes, code_num=K), beam_size=K ** (L - 1),
                      top_k=10, renormalize=renormalize)
    assert out.items[0].tolist() == items
    torch.testing.assert_close(out.scores[0], torch.tensor(scores))


def test_wide_unconstrained_search_returns_the_true_top_tuples_with_misses_as_minus_one() -> None:
    model, codes = FixedLogits(), item_codes()
    item_of = {tuple(row): i + 1 for i, row in enumerate(codes.tolist())}
    scored = [(model.log_prob(t), item_of.get(t, -1)) for t in itertools.product(range(K), repeat=L)]
    items, scores = brute_force(scored, 10)
    out = beam_search(model, *history(), CodeTrie(codes, code_num=K), beam_size=K ** (L - 1),
                      top_k=10, constrained=False)
    assert -1 in items  # 40 of 125 tuples are items: the top 10 holds misses
    assert out.items[0].tolist() == items
    torch.testing.assert_close(out.scores[0], torch.tensor(scores))


def test_constrained_search_returns_only_items_even_when_logits_favour_non_items() -> None:
    codes = item_codes()
    favour = 0
    codes = codes[(codes != favour).all(dim=1)]  # no item uses the favoured code anywhere
    trie = CodeTrie(codes, code_num=K)
    out = beam_search(FixedLogits(favour=favour), *history(), trie, beam_size=4, top_k=4)
    assert set(out.items.flatten().tolist()) <= set(range(1, len(codes) + 1))


def test_scores_are_sorted_descending() -> None:
    trie = CodeTrie(item_codes(), code_num=K)
    out = beam_search(FixedLogits(), *history(), trie, beam_size=6, top_k=6)
    assert torch.all(out.scores[:, :-1] >= out.scores[:, 1:])


def test_beam_wider_than_the_catalogue_pads_with_minus_one_and_minus_inf() -> None:
    codes = item_codes(n=3)
    out = beam_search(FixedLogits(), *history(), CodeTrie(codes, code_num=K), beam_size=20, top_k=10)
    assert sorted(out.items[0, :3].tolist()) == [1, 2, 3]
    assert out.items[:, 3:].eq(-1).all() and out.scores[:, 3:].eq(float("-inf")).all()
    assert torch.isfinite(out.scores[:, :3]).all()


def test_history_is_encoded_once_per_search() -> None:
    model = FixedLogits()
    beam_search(model, *history(size=5), CodeTrie(item_codes(), code_num=K), beam_size=8, top_k=4)
    assert model.encode_calls == 1


def tiny_t5() -> T5Recommender:
    torch.manual_seed(0)
    return T5Recommender(code_num=K, code_length=L, num_layers=2, num_decoder_layers=2, d_model=16,
                         d_ff=32, num_heads=2, d_kv=8, latent_dim=4, semantic_dim=4).eval()


def t5_histories() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, K, (4, 6, L), generator=gen)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, :3] = False
    mask[3, :5] = False
    return codes, mask


def test_batch_rows_searched_together_match_rows_searched_alone() -> None:
    model, trie = tiny_t5(), CodeTrie(item_codes(), code_num=K)
    codes, mask = t5_histories()
    together = beam_search(model, codes, mask, trie, beam_size=6, top_k=5)
    for row in range(4):
        one = slice(row, row + 1)
        alone = beam_search(model, codes[one], mask[one], trie, beam_size=6, top_k=5)
        assert alone.items[0].tolist() == together.items[row].tolist()
        torch.testing.assert_close(alone.scores[0], together.scores[row], rtol=1e-5, atol=1e-5)


class WithoutCache:
    """The same T5, seen without ``decoder_cache``: every step re-runs the whole prefix."""

    def __init__(self, model: T5Recommender) -> None:
        self.encode, self.decode_logits = model.encode, model.decode_logits


@pytest.mark.parametrize("constrained", [True, False])
def test_t5_search_with_kv_cache_matches_search_without(constrained: bool) -> None:
    model, trie = tiny_t5(), CodeTrie(item_codes(), code_num=K)
    codes, mask = t5_histories()
    cached = beam_search(model, codes, mask, trie, beam_size=6, top_k=5, constrained=constrained)
    plain = beam_search(WithoutCache(model), codes, mask, trie, beam_size=6, top_k=5,
                        constrained=constrained)
    assert cached.items.tolist() == plain.items.tolist()
    torch.testing.assert_close(cached.scores, plain.scores, rtol=1e-5, atol=1e-5)


def test_trie_lookup_maps_item_codes_to_ids_and_other_tuples_to_minus_one() -> None:
    codes = item_codes(n=10)
    trie = CodeTrie(codes, code_num=K)
    every = torch.tensor(list(itertools.product(range(K), repeat=L)))
    found = trie.lookup(every)
    assert found.gt(0).sum() == 10
    assert trie.lookup(codes).tolist() == list(range(1, 11))


def test_trie_rejects_items_sharing_a_code() -> None:
    codes = item_codes(n=6)
    codes[4] = codes[1]
    with pytest.raises(ValueError, match=r"items \[2, 5\] share the code"):
        CodeTrie(codes, code_num=K)


def test_trie_rejects_codes_outside_code_num() -> None:
    with pytest.raises(ValueError, match="code_num=4"):
        CodeTrie(item_codes(), code_num=4)


def test_allowed_codes_are_the_children_of_each_prefix_in_the_trie() -> None:
    codes = torch.tensor([[0, 1], [0, 2], [3, 0]])  # items 1..3
    trie = CodeTrie(codes, code_num=4)
    allowed = trie.allowed(torch.tensor([[0, 2], [3, 0]]))  # (2, L, K)
    assert allowed[0, 0].tolist() == [True, False, False, True]  # first codes of any item
    assert allowed[0, 1].tolist() == [False, True, True, False]  # after 0: 1 or 2
    assert allowed[1, 1].tolist() == [True, False, False, False]  # after 3: 0 only
