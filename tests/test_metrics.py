from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from etegrec import metrics

K = 8


def test_uniform_usage_is_perfectly_balanced():
    counts = np.full(K, 5)
    assert metrics.gini(counts) == pytest.approx(0.0, abs=1e-12)
    assert metrics.perplexity(counts) == pytest.approx(K)
    assert metrics.utilization(counts) == 1.0
    assert metrics.dead_codes(counts) == 0


def test_single_code_usage_is_collapsed():
    counts = np.zeros(K, dtype=np.int64)
    counts[3] = 17
    assert metrics.gini(counts) == pytest.approx((K - 1) / K)
    assert metrics.perplexity(counts) == pytest.approx(1.0)
    assert metrics.utilization(counts) == 1 / K
    assert metrics.dead_codes(counts) == K - 1


def test_gini_of_a_known_vector():
    # sorted x = [1, 2, 3, 4], n = 4, sum = 10, sum(i * x_i) = 1 + 4 + 9 + 16 = 30
    # G = 2 * 30 / (4 * 10) - 5 / 4 = 1.5 - 1.25 = 0.25
    assert metrics.gini([4, 1, 3, 2]) == pytest.approx(0.25)


def test_perplexity_ignores_unused_codes():
    # p = (1/4, 1/4, 1/2): H = 2 * (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2, exp(H) = 2 ** 1.5
    assert metrics.perplexity([1, 1, 2, 0]) == pytest.approx(2**1.5)


def test_all_zero_counts_are_defined():
    zeros = np.zeros(K)
    assert metrics.gini(zeros) == 0.0
    assert metrics.perplexity(zeros) == 0.0
    assert metrics.utilization(zeros) == 0.0
    assert metrics.dead_codes(zeros) == K


def test_usage_metrics_accept_torch_tensors_and_return_python_numbers():
    counts = torch.tensor([4, 1, 3, 2])
    value = metrics.gini(counts)
    assert type(value) is float and value == pytest.approx(0.25)
    assert type(metrics.dead_codes(torch.tensor([0, 1]))) is int


def test_negative_counts_are_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        metrics.gini([1, -1])


def test_collision_rate_of_a_known_array():
    codes = np.array([[1, 2], [1, 2], [3, 4], [1, 2], [5, 6]])
    # 5 items, 3 distinct rows -> (5 - 3) / 5
    assert metrics.collision_rate(codes) == pytest.approx(0.4)
    assert metrics.collision_rate(np.arange(10).reshape(5, 2)) == 0.0
    assert metrics.collision_rate(np.zeros((0, 3), dtype=np.int64)) == 0.0


def test_collision_rate_rejects_a_flat_array():
    with pytest.raises(ValueError, match=r"\[n_items, code_len\]"):
        metrics.collision_rate(np.arange(4))


def test_ranking_metrics_of_a_known_ranking():
    ranks = np.array([1, 3, 0, 7, 12])  # 0 = the item was not returned
    got = metrics.ranking_metrics(ranks)
    assert set(got) == {"recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10"}
    assert got["recall@1"] == pytest.approx(1 / 5)
    assert got["recall@5"] == pytest.approx(2 / 5)  # ranks 1, 3
    assert got["recall@10"] == pytest.approx(3 / 5)  # ranks 1, 3, 7
    # 1/log2(2) = 1, 1/log2(4) = 1/2, 1/log2(8) = 1/3
    assert got["ndcg@5"] == pytest.approx((1 + 1 / 2) / 5)
    assert got["ndcg@10"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 5)
    assert all(type(v) is float for v in got.values())


def test_ranking_metrics_custom_cutoffs():
    got = metrics.ranking_metrics([2], ks=(2,), ndcg_ks=(2,))
    assert got == {"recall@2": 1.0, "ndcg@2": pytest.approx(1 / math.log2(3))}


@pytest.mark.parametrize("bad", [[-1, 2], [np.inf, 1], [1.5]])
def test_ranking_metrics_reject_other_miss_markers(bad):
    with pytest.raises(ValueError, match="0 for a miss"):
        metrics.ranking_metrics(np.array(bad))


@pytest.mark.parametrize("counts", [[1, 2, 3, 4], [0, 0, 5, 0], [3, 3, 3], [0, 0, 0], [7, 0, 1, 0, 2]])
def test_usage_stats_agree_with_the_single_metrics(counts):
    stats = metrics.usage_stats(counts)
    assert stats["utilization"] == pytest.approx(metrics.utilization(counts))
    assert stats["perplexity"] == pytest.approx(metrics.perplexity(counts))
    assert stats["gini"] == pytest.approx(metrics.gini(counts))
    assert stats["dead_codes"] == metrics.dead_codes(counts)


def test_usage_stats_rows_equal_each_row_on_its_own():
    rows = np.array([[1, 2, 3, 4, 0], [0, 0, 5, 0, 0], [0, 0, 0, 0, 0], [7, 0, 1, 0, 2]])
    got = metrics.usage_stats_rows(rows)
    assert len(got) == 4
    for row, stats in zip(rows, got):
        assert stats == pytest.approx(metrics.usage_stats(row))
    assert got[1] == {"utilization": 0.2, "perplexity": 1.0, "gini": pytest.approx(0.8), "dead_codes": 4}


def test_usage_stats_rows_rejects_a_1d_histogram_and_negative_counts():
    with pytest.raises(ValueError, match="2-d"):
        metrics.usage_stats_rows([1, 2, 3])
    with pytest.raises(ValueError, match="non-negative"):
        metrics.usage_stats_rows([[1, -2, 3]])


def test_usage_stats_rows_takes_histograms_of_different_sizes():
    rows = [np.array([1, 2, 3, 4, 0]), np.array([0, 5, 0])]
    assert metrics.usage_stats_rows(rows) == [pytest.approx(metrics.usage_stats(r)) for r in rows]
