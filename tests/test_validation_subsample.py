"""``evaluation.valid_users``: model selection on a fixed subsample of validation users, test on all."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from etegrec.training.joint.evaluation import BeamEvaluation, validation_subsample


def _split(n: int) -> tuple[np.ndarray, np.ndarray]:
    history = np.arange(n * 3).reshape(n, 3)
    return history, np.arange(n) + 1


def test_subsample_is_the_same_rows_for_every_call_in_file_order():
    history, target = _split(1000)
    first = validation_subsample(history, target, 100)
    again = validation_subsample(history, target, 100)
    assert len(first[1]) == 100 and len(set(first[1].tolist())) == 100
    assert np.array_equal(first[1], again[1]) and np.array_equal(first[0], again[0])
    assert np.all(np.diff(first[1]) > 0)  # rows keep their order
    assert np.array_equal(first[0], history[first[1] - 1])  # each history stays with its target


def test_zero_or_more_users_than_the_split_keeps_every_row():
    history, target = _split(50)
    for users in (0, 50, 80):
        kept = validation_subsample(history, target, users)
        assert kept[0] is history and kept[1] is target


class _Scored(BeamEvaluation):
    """The evaluation mixin over a fake dataset; ``evaluate_samples`` reports which targets it got."""

    def __init__(self, valid_users: int) -> None:
        self.config = SimpleNamespace(evaluation=SimpleNamespace(valid_users=valid_users))
        self.data = SimpleNamespace(split=lambda name: _split(400))

    def evaluate_samples(self, history, target):
        return {"users": len(target)}


def test_validation_scores_the_subsample_and_test_scores_every_user():
    trainer = _Scored(valid_users=64)
    assert trainer.evaluate("valid") == {"users": 64}
    assert trainer.evaluate("test") == {"users": 400}
    assert _Scored(valid_users=0).evaluate("valid") == {"users": 400}
