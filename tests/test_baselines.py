"""Count baselines: the scores of constructed sequences, known by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from etegrec.baselines import cooccurrence, markov_chain, transition_counts
from etegrec.training.run.evaluation import rank_of_targets

SEQUENCES = [np.array([1, 2, 3]), np.array([1, 2, 4]), np.array([2, 3, 1]), np.array([4, 4, 4, 4])]


def test_transition_counts_count_each_consecutive_pair() -> None:
    counts = transition_counts(SEQUENCES, 4).toarray()
    assert counts[1, 2] == 2 and counts[2, 3] == 2 and counts[2, 4] == 1 and counts[3, 1] == 1
    assert counts[4, 4] == 3 and counts.sum() == 2 + 2 + 2 + 3


def test_window_counts_farther_pairs_at_one_over_their_gap() -> None:
    counts = transition_counts([np.array([1, 2, 3])], 3, window=2).toarray()
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


def dense_transition_counts(sequences, n_items: int, window: int) -> np.ndarray:
    """The dense (n_items + 1)^2 counts the baselines held before the sparse form: the reference."""
    counts = np.zeros((n_items + 1, n_items + 1))
    for seq in sequences:
        for gap in range(1, min(window, len(seq) - 1) + 1):
            np.add.at(counts, (seq[:-gap], seq[gap:]), 1.0 / gap)
    return counts


def random_sequences(n_items: int = 40, n_users: int = 60, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, n_items + 1, rng.integers(1, 25)) for _ in range(n_users)]


@pytest.mark.parametrize("window", [1, 3, 10])
def test_sparse_counts_equal_the_dense_matrix_to_the_bit(window: int) -> None:
    sequences = random_sequences()
    assert np.array_equal(transition_counts(sequences, 40, window=window).toarray(),
                          dense_transition_counts(sequences, 40, window))


def test_baseline_scores_and_top_10_equal_those_of_the_dense_counts() -> None:
    sequences, n_items = random_sequences(), 40
    history = np.random.default_rng(1).integers(0, n_items + 1, (30, 12))
    pop = np.bincount(np.concatenate(sequences), minlength=n_items + 1).astype(np.float64)
    pop[0] = 0.0
    dense_markov = dense_transition_counts(sequences, n_items, 1)[history[:, -1]] + pop / (pop.max() + 1.0)
    dense_cooc = sum(0.7 ** age * dense_transition_counts(sequences, n_items, 10)[history[:, -1 - age]]
                     for age in range(10)) + 1e-6 * pop / (pop.max() + 1.0)
    for scores, dense in ((markov_chain(sequences, n_items)(history), dense_markov),
                          (cooccurrence(sequences, n_items)(history), dense_cooc)):
        dense[:, 0] = -np.inf
        assert np.array_equal(scores, dense)
        assert np.array_equal(np.argsort(-scores, kind="stable")[:, :10], np.argsort(-dense, kind="stable")[:, :10])
