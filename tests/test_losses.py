"""The models' losses: code cross-entropy lives in test_recommender; here the alignment losses and the
tokenizer's code-usage deficit."""
from __future__ import annotations

import math

import pytest
import torch

from etegrec.models import catalogue_nce, info_nce, symmetric_kl, usage_deficit


def test_symmetric_kl_is_zero_for_equal_logits_and_symmetric_otherwise():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    torch.testing.assert_close(symmetric_kl(a, a + 3.0), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(symmetric_kl(a, b), symmetric_kl(b, a))
    assert symmetric_kl(a, b) > 0


def test_info_nce_is_lower_when_rows_match_their_partner():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(8, 5, generator=gen)
    shuffled = a[torch.randperm(8, generator=gen)]
    assert info_nce(a, 2.0 * a, 0.1) < info_nce(a, shuffled, 0.1)


def test_catalogue_nce_is_the_cross_entropy_of_the_target_among_every_item():
    items = torch.eye(5)  # orthonormal: a row's cosine is 1 with itself and 0 with every other item
    a = 3.0 * items[[2, 4]]
    expected = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + 4))
    assert catalogue_nce(a, items, torch.tensor([2, 4]), 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_catalogue_nce_never_takes_a_repeated_target_for_a_negative():
    gen = torch.Generator().manual_seed(2)
    items = torch.randn(6, 4, generator=gen)
    a = torch.randn(1, 4, generator=gen)
    twice, once = catalogue_nce(a.repeat(2, 1), items, torch.tensor([3, 3]), 0.1), catalogue_nce(a, items, torch.tensor([3]), 0.1)
    torch.testing.assert_close(twice, once)
    # in-batch InfoNCE counts the second copy of item 3 as a negative of the first
    assert info_nce(a.repeat(2, 1), items[[3, 3]], 0.1) > info_nce(a, items[[3]], 0.1)


def test_catalogue_nce_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="catalogue_nce needs"):
        catalogue_nce(torch.zeros(2, 4), torch.zeros(6, 3), torch.tensor([0, 1]), 0.1)


def test_usage_deficit_is_zero_for_even_usage_and_log_k_when_every_row_picks_one_code():
    even = torch.full((6, 4), 3.0)  # every row spreads evenly over 4 codes
    one_hot = torch.tensor([[0.0, -1e4, -1e4, -1e4]] * 6)  # every row on code 0
    spread = torch.tensor([[0.0, -1e4]] + [[-1e4, 0.0]])  # two rows, one on each of 2 codes: even usage
    assert usage_deficit([even]).item() == pytest.approx(0.0, abs=1e-6)
    assert usage_deficit([one_hot]).item() == pytest.approx(math.log(4), abs=1e-6)
    assert usage_deficit([spread]).item() == pytest.approx(0.0, abs=1e-6)
    assert usage_deficit([even, one_hot]).item() == pytest.approx(math.log(4), abs=1e-6)  # summed over levels
    three_of_four = torch.tensor([[0.0, -1e4], [0.0, -1e4], [0.0, -1e4], [-1e4, 0.0]])  # usage (3/4, 1/4)
    assert usage_deficit([three_of_four]).item() == pytest.approx(
        math.log(2) + 0.75 * math.log(0.75) + 0.25 * math.log(0.25), abs=1e-6)


def test_usage_deficit_pulls_crowded_rows_towards_unused_codes():
    logits = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0]], requires_grad=True)
    usage_deficit([logits]).backward()
    # code 1 is used least: descending the gradient raises its logit in every row
    assert (logits.grad[:, 1] < 0).all()
