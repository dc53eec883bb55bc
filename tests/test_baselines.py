"""Count baselines: the scores of constructed sequences, known by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from etegrec.baselines import cooccurrence, markov_chain, transition_counts
from etegrec.training.run.evaluation import rank_of_targets

SEQUENCES = [np.array([1, 2, 3]), np.array([1, 2, 4]), np.array([2, 3, 1]), np.array([4, 4, 4, 4])]


def test_transition_counts_count_each_consecutive_pair() -> None:
    counts = transition_counts(SEQUENCES, 4)
    assert counts[1, 2] == 2 and counts[2, 3] == 2 and counts[2, 4] == 1 and counts[3, 1] == 1
    assert counts[4, 4] == 3 and counts.sum() == 2 + 2 + 2 + 3


def test_window_counts_farther_pairs_at_one_over_their_gap() -> None:
    counts = transition_counts([np.array([1, 2, 3])], 3, window=2)
    assert counts[1, 2] == 1 and counts[2, 3] == 1 and counts[1, 3] == 0.5


def test_markov_chain_ranks_what_followed_the_last_item_then_by_popularity() -> None:
    score = markov_chain(SEQUENCES, 4)
    history = np.array([[0, 5 % 5, 2], [0, 0, 3]])  # last items 2 and 3
    scores = score(history)
    assert np.isneginf(scores[:, 0]).all()
    # after 2: item 3 (2 times) over 4 (once); 1 and 2 never followed 2 and are ordered by popularity
    order = list(np.argsort(-scores[0], kind="stable"))
    assert order[:2] == [3, 4] and set(order[2:4]) == {1, 2}
    ranks = rank_of_targets(torch.as_tensor(scores), torch.tensor([3, 1]))
    assert ranks.tolist() == [1, 1]  # after 3 came 1


def test_cooccurrence_weights_recent_history_items_more() -> None:
    score = cooccurrence([np.array([1, 2]), np.array([3, 4])], 4, window=1, decay=0.5, recent=2)
    scores = score(np.array([[1, 3]]))  # 3 is the most recent: what followed it (4) outranks 2
    assert scores[0, 4] == pytest.approx(1.0, abs=1e-5) and scores[0, 2] == pytest.approx(0.5, abs=1e-5)
