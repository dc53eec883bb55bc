"""A finished tiny run is usable: ``load_run`` reproduces its test metrics from raw ids, and the
``python -m etegrec.recommend`` command answers one history or a batch."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import etegrec
from conftest import tiny_command
from etegrec.config import load_config
from etegrec.metrics import ranking_metrics
from etegrec.training.run.cache import load_stage_data


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    tiny_command(root, "joint", "--wandb-mode", "disabled", "--set", "embed.epochs=1", "--set", "rqvae.epochs=2",
                 "--set", "joint.epochs=2", "--set", "recommender.encoder_input=items",
                 "--set", "recommender.repeat_bias=true", "--set", "joint.targets=all",
                 "--set", "recommender.renormalize=true", "--set", "recommender.item_embedding=embed",
                 "--set", "recommender.item_output=true", "--output-dir", str(root / "run"))
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
    assert run.recommender.item_output.weight[1:].abs().sum() > 0  # the item output vectors were trained


def test_a_search_on_other_codes_than_the_item_output_reads_is_refused(finished_run):
    from etegrec.models import CodeTrie
    from etegrec.training.joint.evaluation import beam_recommend

    run = etegrec.load_run(finished_run[0])
    other = CodeTrie(run.codes[1:], code_num=run.recommender.code_num)  # equal codes, but not the model's trie
    with pytest.raises(ValueError, match=r"call recommender.use_trie\(trie\)"):
        beam_recommend(run.recommender, run.codes, other, np.array([[0, 1, 2]]), run.config.evaluation,
                       renormalize=True)


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


# --- issue 24: ids that need quoting, a string for a list, --skip-unknown, bad recommend options ---

AWKWARD_IDS = ["tab\there", "new\nline", 'a "quoted" id', '"leading quote', "back\\slash", "crlf\r\n",
               "ünïcødé ✓", "1234567890123456789012345678901234567890", " padded ", ""]


def test_awkward_item_ids_round_trip_through_item_codes_tsv(tmp_path):
    from etegrec.training.run.item_codes import read_item_codes
    from etegrec.training.run.rundir import RunDir

    codes = np.arange(len(AWKWARD_IDS) * 4).reshape(-1, 4)
    path = RunDir(tmp_path, stage="joint", is_main=True).write_item_codes(codes, AWKWARD_IDS)
    ids, table = read_item_codes(path)
    assert list(ids) == AWKWARD_IDS
    np.testing.assert_array_equal(table, codes)


def test_an_item_codes_file_written_before_quoting_reads_the_same(tmp_path):
    from etegrec.training.run.item_codes import read_item_codes

    path = tmp_path / "item_codes.tsv"
    path.write_text("item_id\tc0\tsuffix\n50\t3\t0\nB00X'1\t4\t1\nback\\slash\t5\t0\n", encoding="utf-8")
    ids, table = read_item_codes(path)
    assert ids == ("50", "B00X'1", "back\\slash") and table.tolist() == [[3, 0], [4, 1], [5, 0]]


@pytest.fixture(scope="module")
def awkward_run(finished_run, tmp_path_factory):
    """The finished run with its first items renamed to awkward ids (same codes), as a JSON dataset could name them."""
    import shutil

    from etegrec.training.run.item_codes import read_item_codes
    from etegrec.training.run.rundir import RunDir

    run_dir = tmp_path_factory.mktemp("awkward") / "run"
    shutil.copytree(finished_run[0], run_dir)
    ids, table = read_item_codes(run_dir / "item_codes.tsv")
    renamed = AWKWARD_IDS[:-1] + list(ids[len(AWKWARD_IDS) - 1:])
    RunDir(run_dir, stage="joint", is_main=True).write_item_codes(table, renamed)
    return run_dir, renamed


def test_load_run_and_the_command_line_recommend_with_awkward_item_ids(awkward_run, tmp_path):
    run_dir, ids = awkward_run
    run = etegrec.load_run(run_dir)
    assert list(run.item_ids) == ids
    history = ids[:4]
    recommended = [item for item, _ in run.recommend([history], k=10)[0]]
    assert len(recommended) == 10 and set(recommended) <= set(ids)
    (tmp_path / "h.jsonl").write_text(json.dumps(history) + "\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "etegrec.recommend", str(run_dir), "--input",
                             str(tmp_path / "h.jsonl")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"history": history, "items": recommended,
                                         "scores": json.loads(result.stdout)["scores"]}


def test_a_string_is_not_taken_for_a_list_of_item_ids(finished_run):
    run = etegrec.load_run(finished_run[0])
    with pytest.raises(TypeError, match=r"got the string '12'; pass \[\[\.\.\.\]\]"):
        run.recommend("12")
    with pytest.raises(TypeError, match=r"history 1 is the string '12', not a list"):
        run.recommend([[run.item_ids[0]], "12"])


def test_skip_unknown_drops_only_the_histories_with_no_known_item(finished_run, caplog):
    run = etegrec.load_run(finished_run[0])
    known = list(run.item_ids[:3])
    answers = run.recommend([known, ["nope", "nada"], known], skip_unknown=True)
    assert answers[1] == [] and "history 1 has no known item" in caplog.text
    alone = run.recommend([known])[0]  # the same items as asked alone (scores to float noise of the batch size)
    for answer in (answers[0], answers[2]):
        assert [i for i, _ in answer] == [i for i, _ in alone]
        assert [s for _, s in answer] == pytest.approx([s for _, s in alone], abs=1e-5)
    with pytest.raises(ValueError, match=r"history 1: unknown item ids \['nope', 'nada'\]"):
        run.recommend([known, ["nope", "nada"]])


def test_the_command_line_skip_unknown_answers_the_other_histories(finished_run, tmp_path):
    from etegrec.recommend import main

    known = list(etegrec.load_run(finished_run[0]).item_ids[:3])
    (tmp_path / "h.jsonl").write_text(f"{json.dumps(known)}\n{json.dumps(['nope'])}\n", encoding="utf-8")
    assert main([str(finished_run[0]), "--input", str(tmp_path / "h.jsonl"), "--output", str(tmp_path / "r.jsonl"),
                 "--skip-unknown"]) == 0
    first, second = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(first["items"]) == 10 and second == {"history": ["nope"], "items": [], "scores": []}


BAD_RECOMMENDS = [  # each one line naming the value and the remedy, exit status 2, before any model is loaded
    pytest.param(["--history", ""], r"--history '' holds an empty item id; give comma-separated", id="empty history"),
    pytest.param(["--history", "1", "--output", "{tmp}/no/recs.jsonl"],
                 r"--output '.*no/recs\.jsonl': the directory '.*no' does not exist; create it",
                 id="output into a missing directory"),
    pytest.param(["--history", "1", "--device", "cuda"],
                 r"--device 'cuda': this machine has no CUDA device .*--device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
                 id="cuda without CUDA"),
    pytest.param(["--history", "1", "--device", "tpu9"], r"--device 'tpu9' is not a torch device", id="unknown device"),
]


@pytest.mark.parametrize("args,message", BAD_RECOMMENDS)
def test_a_bad_recommend_option_is_one_line_before_the_run_is_loaded(args, message, tmp_path, capsys):
    from etegrec.recommend import main

    start = time.perf_counter()
    # a run directory that does not exist: the option is checked first, so the error is about the option
    assert main([str(tmp_path / "no-run"), *[a.format(tmp=tmp_path) for a in args]]) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
