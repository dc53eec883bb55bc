"""A finished tiny run is usable: ``load_run`` reproduces its test metrics from raw ids, and the
``python -m etegrec.recommend`` command answers one history or a batch."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import etegrec
from conftest import tiny_command
from etegrec.config import load_config
from etegrec.metrics import ranking_metrics
from etegrec.training.stages import load_stage_data


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    tiny_command(root, "joint", "--wandb-mode", "disabled", "--set", "embed.epochs=1", "--set", "rqvae.epochs=2",
                 "--set", "joint.epochs=2", "--set", "recommender.encoder_input=items",
                 "--set", "recommender.repeat_bias=true", "--set", "joint.targets=all",
                 "--set", "joint.renormalize=true", "--output-dir", str(root / "run"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ETEGREC_HOME", str(root / "home"))
        data = load_stage_data(load_config(str(root / "run" / "config.yaml")))
    return root / "run", data


def test_load_run_reproduces_the_runs_test_metrics_from_raw_item_ids(finished_run):
    run_dir, data = finished_run
    run = etegrec.load_run(run_dir)
    history, target = data.split("test")
    raw = [[data.item_map[i - 1] for i in row if i > 0] for row in history]
    recommended = run.recommend(raw, k=10)
    ranks = [next((r + 1 for r, (item, _) in enumerate(recs) if item == data.item_map[t - 1]), 0)
             for recs, t in zip(recommended, target)]
    metrics = ranking_metrics(np.array(ranks))
    saved = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert metrics["recall@10"] == pytest.approx(saved["recall@10"], abs=1e-6)
    assert metrics["ndcg@10"] == pytest.approx(saved["ndcg@10"], abs=1e-6)
    assert all(a[1] >= b[1] for recs in recommended for a, b in zip(recs, recs[1:]))  # best first


def test_unknown_item_ids_are_named_or_skipped(finished_run, caplog):
    run = etegrec.load_run(finished_run[0])
    known = run.item_ids[0]
    with pytest.raises(ValueError, match=r"unknown item ids \['no-such-item'\]"):
        run.recommend([[known, "no-such-item"]])
    assert len(run.recommend([[known, "no-such-item"]], skip_unknown=True)[0]) == 10
    assert "no-such-item" in caplog.text


def test_the_command_line_answers_one_history_and_a_batch(finished_run, tmp_path):
    run_dir, data = finished_run
    ids = list(data.item_map)
    one = subprocess.run([sys.executable, "-m", "etegrec.recommend", str(run_dir), "--history", ",".join(ids[:3])],
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    answer = json.loads(one.stdout)
    assert answer["history"] == ids[:3] and len(answer["items"]) == 10 and set(answer["items"]) <= set(ids)
    histories = tmp_path / "h.jsonl"
    histories.write_text("\n".join(json.dumps({"history": ids[i:i + 4]}) for i in range(5)) + "\n")
    batch = subprocess.run([sys.executable, "-m", "etegrec.recommend", str(run_dir), "--input", str(histories),
                            "--output", str(tmp_path / "recs.jsonl")], capture_output=True, text=True, timeout=120)
    assert batch.returncode == 0, batch.stderr
    lines = [json.loads(line) for line in (tmp_path / "recs.jsonl").read_text().splitlines()]
    assert [line["history"] for line in lines] == [ids[i:i + 4] for i in range(5)]
    assert lines[0]["items"] == [i for i, _ in etegrec.load_run(run_dir).recommend([ids[:4]])[0]]
    bad = subprocess.run([sys.executable, "-m", "etegrec.recommend", str(run_dir), "--history", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: history 0: unknown item ids ['nope']")
