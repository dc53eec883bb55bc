"""Learning probes: each pure probe on a constructed case whose value is known, and the joint trainer's
``probed`` signal."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import write_structured_inter
from etegrec import signals
from etegrec.config import load_config
from etegrec.probes import code_floors, drop_last, popularity_nll, repeat_share, shuffle_histories, topk_overlap
from etegrec.training.joint import JOINT
from etegrec.training.run.pipeline import run_stage

CODES = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])  # items 1..4, two codes each
COUNTS = np.array([5, 1, 1, 1])  # training target counts of items 1..4; smoothed: 6, 2, 2, 2 (total 12)


def test_popularity_nll_is_minus_log_of_the_smoothed_share() -> None:
    assert popularity_nll(COUNTS, np.array([1])) == pytest.approx(-math.log(6 / 12))
    assert popularity_nll(COUNTS, np.array([1, 2])) == pytest.approx((-math.log(6 / 12) - math.log(2 / 12)) / 2)


def test_code_floors_are_the_conditional_code_frequencies_and_sum_to_the_popularity_nll() -> None:
    floors = code_floors(CODES, COUNTS, np.array([2]))  # item 2 = (0, 1): p(c0=0) = 8/12, p(c1=1 | 0) = 2/8
    assert floors == pytest.approx([-math.log(8 / 12), -math.log(2 / 8)])
    targets = np.array([1, 2, 3, 4, 4])
    assert code_floors(CODES, COUNTS, targets).sum() == pytest.approx(popularity_nll(COUNTS, targets))


def test_topk_overlap_counts_shared_items_per_row_and_never_matches_missing_slots() -> None:
    a = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    b = np.array([[4, 3, 9, 8], [6, 7, -1, -1]])
    assert topk_overlap(a, b) == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert topk_overlap(a, a) == pytest.approx((1 + 0.5) / 2)


def test_repeat_share_counts_slots_holding_history_items() -> None:
    ranked = np.array([[1, 2, 3, 4], [7, 8, 9, 10]])
    history = np.array([[0, 2, 4], [0, 0, 1]])  # padding 0 never counts
    assert repeat_share(ranked, history) == pytest.approx(2 / 8)


def test_shuffle_keeps_each_rows_items_and_its_padding() -> None:
    history = np.array([[0, 0, 1, 2, 3], [4, 5, 6, 7, 8]])
    shuffled = shuffle_histories(history, np.random.default_rng(0))
    assert (shuffled[0, :2] == 0).all()
    for row, new in zip(history, shuffled):
        assert sorted(row) == sorted(new)
    assert not np.array_equal(shuffled, history)


def test_drop_last_removes_the_most_recent_item_but_keeps_one() -> None:
    history = np.array([[0, 1, 2, 3], [0, 0, 0, 9]])
    assert drop_last(history).tolist() == [[0, 0, 1, 2], [0, 0, 0, 9]]


@pytest.fixture(scope="module")
def tiny_joint_run(tmp_path_factory):
    
    root = tmp_path_factory.mktemp("probes")
    inter = write_structured_inter(root / "structured.inter")
    overrides = [f"data.data_path={inter}", "data.dataset=structured", "data.max_users=null", "embed.epochs=1",
                 "rqvae.epochs=2", "rqvae.eval_step=2", "joint.epochs=2", "evaluation.probe_users=40",
                 "recommender.encoder_input=items", "recommender.repeat_bias=true", "joint.targets=all",
                 "recommender.renormalize=true"]  # the ml-100k config's recommender
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ETEGREC_HOME", str(root / "home"))
        with signals.recording() as events:
            run_stage(JOINT, load_config("tiny", overrides), output_dir=root / "run", wandb_mode="disabled")
    return events


def test_joint_trainer_emits_every_probe_after_each_validation(tiny_joint_run) -> None:
    events = tiny_joint_run
    probed = [e for e in events if e.signal == "probed"]
    evaluated = [e for e in events if e.signal == "evaluated" and e.payload["split"] == "valid"
                 and e.payload["stage"] == "joint"]
    assert [e.payload["epoch"] for e in probed] == [e.payload["epoch"] for e in evaluated]
    for event in probed:
        probes = event.payload["probes"]
        assert event.payload["users"] == 40
        assert set(probes) == {"item_nll", "popularity_nll", "shuffle_overlap", "drop_last_overlap", "repeat_share",
                               "data_repeat_rate", "codes_changed"} | {f"code_{k}_{p}" for k in ("ce", "floor")
                                                                      for p in range(4)}
        assert probes["item_nll"] == pytest.approx(sum(probes[f"code_ce_{p}"] for p in range(4)))
        assert probes["popularity_nll"] == pytest.approx(sum(probes[f"code_floor_{p}"] for p in range(4)), rel=1e-6)
        assert 0.0 <= probes["shuffle_overlap"] <= 1.0 and 0.0 <= probes["repeat_share"] <= 1.0
        assert 0.0 <= probes["codes_changed"] <= 1.0


def dense_code_floors(item_codes: np.ndarray, target_counts: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The floors as computed before grouping: every target against every item, (n, n_items) at once."""
    counts = np.asarray(target_counts, dtype=np.float64) + 1.0
    rows = item_codes[targets - 1]
    floors, previous = [], np.full(len(rows), counts.sum())
    for p in range(item_codes.shape[1]):
        mass = (item_codes[None, :, : p + 1] == rows[:, None, : p + 1]).all(axis=2) @ counts
        floors.append(float(np.mean(-np.log(mass / previous))))
        previous = mass
    return np.array(floors)


def test_code_floors_equal_those_of_every_target_against_every_item() -> None:
    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.integers(0, 4, (300, 3)), np.arange(300)[:, None] % 7], axis=1)  # shared prefixes
    counts, targets = rng.integers(0, 50, 300), rng.integers(1, 301, 500)
    assert np.array_equal(code_floors(codes, counts, targets), dense_code_floors(codes, counts, targets))


def test_code_floors_of_codes_too_wide_for_one_integer_key_equal_the_dense_ones():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 3, (200, 4)) * (2 ** 21 - 1) // 2  # 2^21 values a position: 84 bits in all
    counts, targets = rng.integers(0, 50, 200), rng.integers(1, 201, 300)
    assert np.array_equal(code_floors(codes, counts, targets), dense_code_floors(codes, counts, targets))
