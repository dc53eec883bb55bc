"""benchmarks/code_levels.py: the per-level ranks of a target code, checked on scores whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def levels():
    return load_benchmark("code_levels")


def test_a_group_scores_the_log_of_its_items_summed_probability(levels) -> None:
    item_scores = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]))
    groups = np.array([0, 1, 1, 0])  # group 0: items 0 and 3; group 1: items 1 and 2
    got = np.exp(levels.group_scores(item_scores, groups, 2))
    np.testing.assert_allclose(got, [[0.5, 0.5], [0.8, 0.2]])
    assert levels.group_scores(item_scores, np.array([0, 0, 0, 0]), 2)[0, 1] == -np.inf  # an empty group


def test_a_target_is_ranked_among_its_candidates_only(levels) -> None:
    scores = np.array([[0.9, 0.5, 0.7, 0.1], [0.2, 0.8, 0.8, 0.3]])
    candidates = np.array([[False, True, True, True], [True, True, True, True]])
    ranks = levels.ranks(scores, np.array([1, 2]), candidates)
    assert ranks.tolist() == [2, 1]  # row 0: 0.9 is no candidate, 0.7 is; row 1: a tie counts for the target


def test_the_code_nll_is_renormalised_over_the_candidates(levels) -> None:
    scores = np.log(np.array([[0.5, 0.25, 0.25, 0.0 + 1e-300], [0.1, 0.2, 0.3, 0.4]]))
    candidates = np.array([[False, True, True, False], [True, True, True, True]])
    got = levels.nll(scores, np.array([1, 3]), candidates)
    np.testing.assert_allclose(got, [np.log(2.0), -np.log(0.4)])  # row 0: 0.25 of the 0.5 left


def test_users_are_split_by_where_the_targets_first_code_stands_in_the_history(levels) -> None:
    history = np.array([[-1, 4, 7], [-1, 4, 7], [3, 3, 3], [-1, -1, 5]])  # -1: padding
    places = levels.first_code_places(history, np.array([7, 4, 9, 5]))
    assert places["the last item's"].tolist() == [True, False, False, True]
    assert places["another history item's"].tolist() == [False, True, False, False]
    assert places["new to the history"].tolist() == [False, False, True, False]


def test_level_summaries_by_place_and_both_levels_together(levels) -> None:
    r = np.array([1, 2, 4, 10])
    loss = np.array([0.5, 1.0, 2.0, 3.0])
    places = {"the last item's": np.array([True, True, False, False]),
              "another history item's": np.array([False] * 4), "new to the history": np.array([False, False, True, True])}
    assert levels.by_place(r, loss, places) == "the 0.7500 / 0.750; new 0.1750 / 2.500"  # empty groups left out
    first, second = np.array([1, 6, 5, 2]), np.array([3, 1, 4, 2])
    both, independent = levels.both_levels(first, second, np.array([True, True, True, True]))
    assert both == 0.5 and independent == 0.75 * 0.75  # users 0 and 3; 3 of 4 pass each level
