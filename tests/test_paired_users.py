"""benchmarks/paired_users.py: per-user NDCG@10 that averages to the run's own test figure, and paired differences."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from conftest import load_benchmark, tiny_command

from etegrec.metrics import ranking_metrics


@pytest.fixture(scope="module")
def paired_users():
    return load_benchmark("paired_users")


def test_a_users_ndcg_is_the_gain_at_the_targets_rank(paired_users) -> None:
    ranks = np.array([1, 2, 0, 3, 10])
    scores = paired_users.user_ndcg(ranks)
    assert scores == pytest.approx([1.0, 1 / math.log2(3), 0.0, 0.5, 1 / math.log2(11)])
    assert scores.mean() == pytest.approx(ranking_metrics(ranks)["ndcg@10"])


def test_the_paired_difference_and_its_standard_error(paired_users) -> None:
    mean, se = paired_users.paired(np.array([1.0, 0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0, 1.0]))
    assert mean == pytest.approx(0.0)
    assert se == pytest.approx(np.std([1, 0, 0, -1], ddof=1) / 2)


def test_runs_that_selected_on_other_validation_users_compare_on_both_sets_and_the_rest(paired_users) -> None:
    valid_a, valid_b = np.array([1.0, 0.5, 0.0, 1.0]), np.array([0.0, 0.5, 0.0, 0.0])
    test = np.array([0.5, 0.0, 1.0])

    def run(valid, fixed):
        return {"valid": valid, "test": test, "fixed": np.array(fixed)}

    two_draws = paired_users.compare(run(valid_a, [True, False, False, False]),
                                     run(valid_b, [False, True, False, False]))
    assert two_draws["valid, selection users"] == pytest.approx(paired_users.paired(valid_a[:2], valid_b[:2]))
    assert two_draws["valid, other users"] == pytest.approx(paired_users.paired(valid_a[2:], valid_b[2:]))
    assert two_draws["test, every user"] == (0.0, 0.0)
    every_user = paired_users.compare(run(valid_a, [True] * 4), run(valid_b, [True, False, False, False]))
    assert list(every_user) == ["valid, selection users", "test, every user"]  # no one is left over: no empty line
    assert every_user["valid, selection users"][0] == pytest.approx(0.5)
    with pytest.raises(SystemExit, match="other users"):
        paired_users.compare(run(valid_a, [True] * 4), run(valid_b[:3], [True] * 3))


def test_a_run_scored_per_user_gives_its_own_metrics_and_no_difference_with_itself(paired_users, tmp_path_factory,
                                                                                   monkeypatch, capsys) -> None:
    root = tmp_path_factory.mktemp("paired")
    tiny_command(root, "joint", "--wandb-mode", "disabled", "--set", "embed.epochs=1", "--set", "rqvae.epochs=2",
                 "--set", "joint.epochs=2", "--set", "evaluation.valid_users=10", "--output-dir", str(root / "run"))
    monkeypatch.setenv("ETEGREC_HOME", str(root / "home"))
    scored = paired_users.scored(root / "run")
    saved = json.loads((root / "run" / "metrics.json").read_text())
    assert scored["test"].mean() == pytest.approx(saved["test"]["ndcg@10"], abs=1e-6)
    assert scored["fixed"].sum() == 10  # the validation users model selection scored
    assert scored["valid"][scored["fixed"]].mean() == pytest.approx(saved["valid"]["ndcg@10"], abs=1e-6)
    monkeypatch.setattr(sys, "argv", ["paired_users.py", str(root / "run"), str(root / "run")])
    paired_users.main()
    printed = capsys.readouterr().out
    assert "test, every user +0.0000 (se 0.0000)" in printed
    monkeypatch.setattr(sys, "argv", ["paired_users.py", str(root / "run")])
    with pytest.raises(SystemExit) as stopped:
        paired_users.main()
    assert stopped.value.code == 2
    assert "runs come in pairs (A B); got 1" in capsys.readouterr().err
