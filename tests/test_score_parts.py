"""benchmarks/score_parts.py: the evaluation's beam search with parts of its scores scaled, and the first state's ranking."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import load_benchmark, tiny_command

import etegrec
from etegrec.training.run.cache import load_stage_data


@pytest.fixture(scope="module")
def parts():
    return load_benchmark("score_parts")


@pytest.fixture(scope="module")
def item_output_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    tiny_command(root, "joint", "--wandb-mode", "disabled", "--set", "embed.epochs=1", "--set", "rqvae.epochs=2",
                 "--set", "joint.epochs=2", "--set", "recommender.item_output=true", "--output-dir", str(root / "run"))
    return root


def test_the_unscaled_beam_is_the_runs_own_search_and_the_model_is_left_as_it_was(parts, item_output_run,
                                                                                 monkeypatch) -> None:
    monkeypatch.setenv("ETEGREC_HOME", str(item_output_run / "home"))
    run = etegrec.load_run(item_output_run / "run")
    history, target = load_stage_data(run.config).split("test")
    saved = json.loads((item_output_run / "run" / "metrics.json").read_text())["test"]
    assert parts.metrics(parts.scaled_beam(run, history, (1.0,)), target) == \
        f"N@10 {saved['ndcg@10']:.4f}  R@10 {saved['recall@10']:.4f}"
    parts.scaled_beam(run, history, (0.0,))
    assert "_score" not in vars(run.recommender)  # the class's scoring again
    assert parts.metrics(parts.scaled_beam(run, history, (1.0,)), target) == \
        f"N@10 {saved['ndcg@10']:.4f}  R@10 {saved['recall@10']:.4f}"

def test_the_first_states_ranking_pushes_the_history_down_when_asked(parts, item_output_run, monkeypatch) -> None:
    monkeypatch.setenv("ETEGREC_HOME", str(item_output_run / "home"))
    run = etegrec.load_run(item_output_run / "run")
    history, _ = load_stage_data(run.config).split("valid")
    plain = parts.first_state_ranking(run, history, mask_history=False)
    masked = parts.first_state_ranking(run, history, mask_history=True)
    seen = torch.as_tensor(history)
    assert not (masked[:, :, None] == seen[:, None, :]).any()  # no history item among the ten
    clean = ~(plain[:, :, None] == seen[:, None, :]).any(2).any(1)  # rows whose plain top 10 had none
    assert clean.any() and torch.equal(plain[clean], masked[clean])
    kept, share = parts.without_history(run, history)
    assert not parts.in_history(kept, history).any() and 0.0 <= share <= 1.0
    assert ((kept > 0).sum(1) == 10).all()  # the tiny catalogue leaves ten items besides any history


def test_the_command_prints_each_part_and_refuses_a_run_without_item_vectors(parts, item_output_run, monkeypatch,
                                                                             capsys, tmp_path) -> None:
    monkeypatch.setenv("ETEGREC_HOME", str(item_output_run / "home"))
    monkeypatch.setattr(sys, "argv", ["score_parts.py", str(item_output_run / "run"), "--split", "test"])
    parts.main()
    printed = capsys.readouterr().out
    for name in parts.SCALES:
        assert name in printed
    assert "first state's item scores, history pushed down" in printed and "history items dropped" in printed
    tiny_command(tmp_path, "joint", "--wandb-mode", "disabled", "--set", "embed.epochs=1", "--set", "rqvae.epochs=2",
                 "--set", "joint.epochs=1", "--output-dir", str(tmp_path / "codes-only"))
    monkeypatch.setattr(sys, "argv", ["score_parts.py", str(tmp_path / "codes-only")])
    with pytest.raises(SystemExit, match="has no item output vectors"):
        parts.main()
