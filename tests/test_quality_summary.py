"""benchmarks/quality.py's table: per-seed means over repeated runs, earlier results pooled in, and the
ETEGRec-against-TIGER gap, checked on constructed runs whose figures are known."""
from __future__ import annotations

import json
import math
import sys

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


def metrics(ndcg10: float) -> dict[str, float]:
    return {"recall@5": 2 * ndcg10, "recall@10": 3 * ndcg10, "ndcg@5": ndcg10 / 2, "ndcg@10": ndcg10}


def test_a_seed_is_the_mean_of_its_runs_and_run_std_is_their_pooled_spread(quality):
    table = quality.summarise({"etegrec": {2024: [metrics(0.10), metrics(0.20)], 2025: [metrics(0.30)]}})
    row = table["etegrec"]["ndcg@10"]
    assert table["etegrec"]["runs_per_seed"] == [2, 1]
    assert row["values"] == pytest.approx([0.15, 0.30])
    assert row["mean"] == pytest.approx(0.225)
    assert row["std"] == pytest.approx(math.sqrt(2) * 0.075)  # stdev of (0.15, 0.30)
    assert row["runs"] == [[0.10, 0.20], [0.30]]
    assert row["run_std"] == pytest.approx(math.sqrt(0.005))  # variance of (0.1, 0.2); seed 2025 has one run
    single = quality.summarise({"tiger": {2024: [metrics(0.1)], 2025: [metrics(0.2)]}})["tiger"]["ndcg@10"]
    assert "runs" not in single and "run_std" not in single


def test_gap_is_the_difference_of_means_against_the_pooled_std_over_seeds(quality):
    table = quality.summarise({
        "etegrec": {2024: [metrics(0.08)], 2025: [metrics(0.06)], 2026: [metrics(0.07)]},
        "tiger": {2024: [metrics(0.07)], 2025: [metrics(0.07)], 2026: [metrics(0.07)]},
    })
    result = quality.gap(table)
    assert result["seeds"] == [2024, 2025, 2026]
    assert result["difference"] == pytest.approx(0.0)
    assert result["pooled_std"] == pytest.approx(math.sqrt((0.01 ** 2 + 0.0) / 2))
    assert result["per_seed"] == pytest.approx([0.01, -0.01, 0.0])
    assert quality.gap(quality.summarise({"etegrec": {2024: [metrics(0.1)]}})) is None


def test_summarise_only_pools_an_earlier_results_file_as_one_more_run(quality, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    finished = {("etegrec", 2024, 1): 0.08, ("etegrec", 2024, 2): 0.06, ("etegrec", 2025, 1): 0.07,
                ("tiger", 2024, 1): 0.07, ("tiger", 2025, 1): 0.075}
    for (model, seed, repeat), value in finished.items():
        directory = quality.run_dir(runs, model, seed, repeat)
        directory.mkdir(parents=True)
        (directory / "metrics.json").write_text(json.dumps({"test": metrics(value)}))
    assert quality.run_dir(runs, "tiger", 2025, 1).name == "tiger-2025"
    assert quality.run_dir(runs, "tiger", 2025, 2).name == "tiger-2025-rep2"
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"models": quality.summarise(
        {"etegrec": {2024: [metrics(0.10)], 2025: [metrics(0.09)]}, "tiger": {2025: [metrics(0.065)]}})}))
    output = tmp_path / "quality.json"
    monkeypatch.setattr(sys, "argv", ["quality.py", "--summarise-only", "--models", "tiger", "etegrec",
                                      "--seeds", "2024", "2025", "--repeats", "2", "--runs", str(runs),
                                      "--pool", str(earlier), "--output", str(output)])
    quality.main()
    printed = capsys.readouterr().out
    assert "not finished (left out): tiger-2024-rep2, tiger-2025-rep2, etegrec-2025-rep2" in printed
    result = json.loads(output.read_text())
    assert result["models"]["etegrec"]["ndcg@10"]["runs"] == [[0.08, 0.06, 0.10], [0.07, 0.09]]
    assert result["models"]["etegrec"]["ndcg@10"]["values"] == pytest.approx([0.08, 0.08])
    assert result["models"]["tiger"]["ndcg@10"]["runs"] == [[0.07], [0.075, 0.065]]
    assert result["gap"]["per_seed"] == pytest.approx([0.01, 0.01])
    assert result["gap"]["difference"] == pytest.approx(0.01)
    assert "etegrec - tiger, test ndcg@10: +0.0100" in printed


def test_a_missing_pool_file_is_named_before_anything_runs(quality, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["quality.py", "--models", "etegrec", "--runs", str(tmp_path / "runs"),
                                      "--pool", str(tmp_path / "nowhere.json")])
    with pytest.raises(SystemExit) as stopped:
        quality.main()
    assert stopped.value.code == 2
    assert f"--pool: no results file at {tmp_path / 'nowhere.json'}" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_repeats_are_refused_while_a_rerun_repeats_its_numbers(quality, tmp_path, monkeypatch, capsys):
    """Under run.deterministic a second run of a seed is the first one again: K repeats would spend K times
    the time for a run_std of zero."""
    monkeypatch.setattr(sys, "argv", ["quality.py", "--config", "tiny", "--models", "etegrec", "--seeds", "2024",
                                      "--repeats", "2", "--runs", str(tmp_path / "runs")])
    with pytest.raises(SystemExit) as stopped:
        quality.main()
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--repeats 2 would train the same numbers 2 times: run.deterministic is on" in err
    assert "--set run.deterministic=false" in err
    assert not (tmp_path / "runs").exists()


def test_a_pool_file_of_another_config_is_refused_naming_the_key(quality, tmp_path, monkeypatch, capsys):
    """The results file records each model's config; pooling runs of other alignment weights into this
    table would average two configs under one name."""
    earlier = tmp_path / "earlier.json"
    recorded = quality.resolved_configs("tiny", ["losses.rec_kl_weight=0.001"], ["etegrec", "tiger"])
    assert recorded["etegrec"]["losses.rec_kl_weight"] == 0.001 and recorded["tiger"]["losses.rec_kl_weight"] == 0
    earlier.write_text(json.dumps({"models": quality.summarise({"etegrec": {2024: [metrics(0.1)]}}),
                                   "resolved": recorded}))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--config", "tiny", "--models", "tiger", "etegrec", "--seeds",
                                      "2024", "--runs", str(tmp_path / "runs"), "--pool", str(earlier)])
    with pytest.raises(SystemExit) as stopped:
        quality.main()
    assert stopped.value.code == 2
    assert (f"--pool {earlier}: its etegrec runs used another config: losses.rec_kl_weight=0.001 (now 0.0001)"
            in capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()
    # the same config pools; a key the file does not hold (added to the config later) is not compared
    same = quality.resolved_configs("tiny", [], ["etegrec", "tiger"])
    del same["etegrec"]["losses.rec_kl_weight"]
    earlier.write_text(json.dumps({"models": quality.summarise({"etegrec": {2024: [metrics(0.1)]}}),
                                   "resolved": same}))
    output = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["quality.py", "--config", "tiny", "--summarise-only", "--models", "etegrec",
                                      "--seeds", "2024", "--runs", str(tmp_path / "none"), "--pool", str(earlier),
                                      "--output", str(output)])
    quality.main()
    result = json.loads(output.read_text())
    assert result["models"]["etegrec"]["ndcg@10"]["values"] == [0.1]
    assert result["resolved"]["etegrec"]["losses.rec_kl_weight"] == 0.0001  # what the next pooling checks


def test_a_pool_file_that_records_no_config_is_pooled_and_said_so(quality, tmp_path, monkeypatch, capsys):
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"models": quality.summarise({"etegrec": {2024: [metrics(0.1)]}})}))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--config", "tiny", "--summarise-only", "--models", "etegrec",
                                      "--seeds", "2024", "--runs", str(tmp_path / "none"), "--pool", str(earlier),
                                      "--output", str(tmp_path / "out.json")])
    quality.main()
    assert f"--pool {earlier}: the file records no configs" in capsys.readouterr().out


def test_summarise_only_from_earlier_results_alone_says_there_are_no_runs(quality, tmp_path, monkeypatch, capsys):
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"models": quality.summarise({"etegrec": {2024: [metrics(0.1)]}})}))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--summarise-only", "--models", "etegrec", "--seeds", "2024",
                                      "--runs", str(tmp_path / "none"), "--pool", str(earlier), "--pool", str(earlier),
                                      "--output", str(tmp_path / "out.json")])
    quality.main()
    assert f"no runs under {tmp_path / 'none'}: only the --pool files are summarised" in capsys.readouterr().out
    row = json.loads((tmp_path / "out.json").read_text())["models"]["etegrec"]
    assert row["runs_per_seed"] == [2] and row["ndcg@10"]["runs"] == [[0.1, 0.1]]


def test_another_dataset_prints_its_published_rows_marked_as_published(quality, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    (quality.run_dir(runs, "etegrec", 2024, 1)).mkdir(parents=True)
    (quality.run_dir(runs, "etegrec", 2024, 1) / "metrics.json").write_text(json.dumps({"test": metrics(0.04)}))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--summarise-only", "--dataset", "amazon-beauty",
                                      "--models", "etegrec", "--seeds", "2024", "--runs", str(runs),
                                      "--output", str(tmp_path / "out.json")])
    quality.main()
    printed = capsys.readouterr().out
    assert printed.startswith("amazon-beauty test metrics, mean ± std over seeds [2024] (amazon config)")
    tiger = next(line for line in printed.splitlines() if line.startswith("published: TIGER (TIGER paper"))
    assert tiger.split()[-4:] == ["0.0454", "0.0648", "0.0321", "0.0384"]  # R@5, R@10, N@5, N@10
    assert "published: Pop (RecBole)" not in printed  # ml-100k's rows stay with ml-100k
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["dataset"] == "amazon-beauty" and result["config"] == "amazon"
    assert result["published"]["TIGER (GenRec library, 2026)"] == {"ndcg@10": 0.0354}


def test_each_run_s_wall_time_sums_its_attempts_and_is_written_with_the_table(quality, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    for model in ("etegrec", "tiger"):
        (quality.run_dir(runs, model, 2024, 1)).mkdir(parents=True)
        (quality.run_dir(runs, model, 2024, 1) / "metrics.json").write_text(json.dumps({"test": metrics(0.04)}))
    attempts = [{"signal": "run_started", "time": 0.0, "stage": "joint"},
                {"signal": "epoch_end", "time": 5.0, "stage": "joint", "seconds": 999.0},  # not an attempt's time
                {"signal": "run_finished", "time": 100.0, "stage": "joint", "status": "interrupted", "seconds": 1200.5},
                {"signal": "run_started", "time": 200.0, "stage": "joint", "resumed": True},
                {"signal": "run_finished", "time": 300.0, "stage": "joint", "status": "completed", "seconds": 2300.0}]
    (quality.run_dir(runs, "etegrec", 2024, 1) / "events.jsonl").write_text(
        "".join(json.dumps(record) + "\n" for record in attempts))
    assert quality.run_seconds(quality.run_dir(runs, "etegrec", 2024, 1)) == pytest.approx(3500.5)
    assert quality.run_seconds(quality.run_dir(runs, "tiger", 2024, 1)) is None  # no event log
    monkeypatch.setattr(sys, "argv", ["quality.py", "--summarise-only", "--models", "tiger", "etegrec", "--seeds", "2024",
                                      "--runs", str(runs), "--output", str(tmp_path / "out.json")])
    quality.main()
    assert "etegrec-2024 3,500 s" in capsys.readouterr().out
    assert json.loads((tmp_path / "out.json").read_text())["seconds"] == {"tiger": {"2024": [None]},
                                                                          "etegrec": {"2024": [3500.5]}}


def test_a_run_that_fails_is_named_with_its_log_in_one_line(quality, tmp_path):
    """A child run's failure (or Ctrl-C) ends the benchmark with the run, how it ended and its log, not a
    traceback of the subprocess call."""
    with pytest.raises(SystemExit) as stopped:
        quality.stage_run("joint", tmp_path / "runs" / "etegrec-2024", 2024, "tiny", ["nosuch.key=1"], 1)
    message = str(stopped.value.code)
    log = tmp_path / "runs" / "etegrec-2024.log"
    assert message == (f"etegrec-2024 failed (exit status 2): its log {log} says why; once that is mended, the same "
                       "command resumes the unfinished runs")
    assert "unknown config key 'nosuch.key'" in log.read_text()


def test_a_run_stopped_with_ctrl_c_says_the_same_command_resumes_it(quality, tmp_path, monkeypatch):
    import subprocess
    monkeypatch.setattr(quality.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 130))
    with pytest.raises(SystemExit) as stopped:
        quality.stage_run("joint", tmp_path / "etegrec-2024", 2024, "tiny", [], 1)
    assert str(stopped.value.code) == (f"etegrec-2024 was stopped (Ctrl-C): the same command resumes it from its last "
                                       f"checkpoint; its log is {tmp_path / 'etegrec-2024.log'}")


def test_a_set_only_the_ablation_can_run_is_checked_with_its_own_keys(quality, tmp_path, monkeypatch, capsys):
    """``codes.file`` needs the tokenizer off, which the ablation's runs add to every --set: accepted for
    ``--models tiger``, refused for ETEGRec in one line naming the model, before anything runs."""
    codes = tmp_path / "item_codes.tsv"
    codes.write_text("item_id\tc0\n")
    argv = ["quality.py", "--config", "tiny", "--seeds", "2024", "--runs", str(tmp_path / "runs"),
            "--output", str(tmp_path / "quality.json"), "--summarise-only", "--set", f"codes.file={codes}"]
    monkeypatch.setattr(sys, "argv", [*argv, "--models", "tiger"])
    quality.main()  # accepted: it summarises (no runs yet)
    out = capsys.readouterr()
    assert f"no runs under {tmp_path / 'runs'}" in out.out and not out.err
    assert f"nothing measured: {tmp_path / 'quality.json'} not written" in out.out  # no empty table over a results file
    assert not (tmp_path / "quality.json").exists()
    monkeypatch.setattr(sys, "argv", [*argv, "--models", "tiger", "etegrec"])
    with pytest.raises(SystemExit) as stopped:
        quality.main()
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"quality.py: error: --models etegrec: config key 'codes.file' is {str(codes)!r}, which "
                          "needs joint.train_tokenizer=false (got True)")
    assert not (tmp_path / "runs").exists()
