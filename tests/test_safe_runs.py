"""Files in a run directory or the stage cache are data, never code, and what a run leaves behind
after a crash (a torn log, temporary files, a full disk, an edited config) is dealt with in one line."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import etegrec
from conftest import cached_tokenizer_stage, tiny_command, write_crafted_checkpoint, write_structured_inter
from etegrec import recommend
from etegrec.config import ConfigError
from etegrec.hooks.eventlog import EventLog, read_events
from etegrec.training import joint
from etegrec.training.run.checkpoint import CheckpointError, read_checkpoint
from etegrec.training.run.rundir import hold_run_dir

BASE = ["--config", "tiny", "--wandb-mode", "disabled"]


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny joint run (its stage cache under ``home``)."""
    root = tmp_path_factory.mktemp("finished")
    tiny_command(root, "joint", "--wandb-mode", "disabled", "--set", "joint.epochs=2", "--output-dir",
                 str(root / "run"))
    return root


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_structured_inter(tmp_path / "data.inter", n_users=60)


# --- no code from a file ------------------------------------------------------------------------------

def test_a_crafted_best_pt_runs_no_code_in_load_run_or_recommend(finished, tmp_path, capsys):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(finished / "run", run_dir)
    write_crafted_checkpoint(run_dir / "checkpoints" / "best.pt", marker)
    with pytest.raises(CheckpointError, match=r"best\.pt' was refused: loading it would call builtins\.exec"):
        etegrec.load_run(run_dir)
    assert recommend.main([str(run_dir), "--history", "i1,i2"]) == 2
    assert re.search(r"best\.pt' was refused.*builtins\.exec.*delete it", _one_error_line(capsys.readouterr().err))
    assert not marker.exists()


def test_a_crafted_last_pt_runs_no_code_on_resume(tmp_path, data_file, capsys):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    write_crafted_checkpoint(run_dir / "checkpoints" / "last.pt", marker)
    assert joint.main(BASE + ["--data-path", str(data_file), "--output-dir", str(run_dir), "--resume"]) == 2
    assert re.search(r"--resume: .*last\.pt' was refused.*builtins\.exec", _one_error_line(capsys.readouterr().err))
    assert not marker.exists()


def test_a_crafted_tokenizer_in_the_stage_cache_runs_no_code(tmp_path, data_file, capsys):
    marker = tmp_path / "marker"
    write_crafted_checkpoint(cached_tokenizer_stage(data_file), marker, stage="rqvae")
    assert joint.main(BASE + ["--data-path", str(data_file)]) == 2
    assert re.search(r"stages/rqvae-.*best\.pt' was refused.*builtins\.exec", _one_error_line(capsys.readouterr().err))
    assert not marker.exists()


def test_checkpoints_of_the_format_before_this_one_still_load():
    # tests/data/joint-run-v1 was written with NumPy arrays in it (the NumPy generator's key)
    state = read_checkpoint(Path(__file__).parent / "data" / "joint-run-v1" / "checkpoints" / "last.pt",
                            stage="joint", resumable=True)
    assert state["rng"]["numpy"][1].dtype == np.uint32 and state["early_stopping"]["best_epoch"] == 1


def test_every_checkpoint_a_run_writes_loads_with_weights_only(finished):
    paths = sorted(finished.rglob("*.pt"))
    assert len(paths) == 6  # best and last of the embed, tokenizer and joint stages
    for path in paths:
        assert torch.load(path, weights_only=True)["format"] == 2, path


# --- the run directory's own files ---------------------------------------------------------------------

def test_a_lock_file_linked_to_another_file_is_refused_and_that_file_left_alone(tmp_path, data_file, capsys):
    victim, run_dir = tmp_path / "victim.txt", tmp_path / "run"
    victim.write_text("precious\n")
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(victim)
    assert joint.main(BASE + ["--data-path", str(data_file), "--output-dir", str(run_dir)]) == 2
    assert re.search(r"\.lock' is a symbolic link .*victim\.txt", _one_error_line(capsys.readouterr().err))
    assert victim.read_text() == "precious\n"


def test_temporary_files_of_a_killed_writer_are_removed_when_the_directory_is_next_held(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    stale = [run_dir / "checkpoints" / ".last.pt.k3j2x9.tmp", run_dir / ".metrics.json.a8b7c6.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    (run_dir / "notes.tmp").write_text("the user's")
    hold_run_dir(run_dir)
    assert not any(path.exists() for path in stale)
    assert (run_dir / "notes.tmp").exists()


def test_a_full_disk_names_the_file_and_the_printed_command_resumes_the_run(tmp_path, data_file, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    real_fsync = os.fsync

    def full_after_the_first_checkpoint(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name.startswith(str(run_dir / "checkpoints" / ".last.pt.")) and (run_dir / "checkpoints" / "last.pt").exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    argv = BASE + ["--data-path", str(data_file), "--output-dir", str(run_dir)]
    with monkeypatch.context() as mp:
        mp.setattr(os, "fsync", full_after_the_first_checkpoint)
        assert joint.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert re.search(r"no space left on the device to write '.*/run/checkpoints/last\.pt'.*free some space; "
                     r"continue with: python -m etegrec\.training\.joint .*--resume$", line), line
    resume = line.split("continue with: python -m etegrec.training.joint ")[1].split()
    assert joint.main(resume) == 0
    assert (run_dir / "metrics.json").exists()


def test_a_resume_from_another_directory_needs_neither_the_data_path_nor_the_config_again(tmp_path, monkeypatch):
    inter = write_structured_inter(tmp_path / "walk.inter")
    monkeypatch.chdir(tmp_path)
    argv = BASE + ["--data-path", "walk.inter", "--set", "joint.epochs=2", "--output-dir", str(tmp_path / "run")]
    assert joint.main(argv) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["data_path"] == str(inter)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert joint.main(["--output-dir", str(tmp_path / "run"), "--resume", "--wandb-mode", "disabled",
                       "--set", "joint.finetune_epochs=2"]) == 0  # one more epoch, with the run's own config
    events = read_events(tmp_path / "run" / "events.jsonl")
    assert [e["epoch"] for e in events if e["signal"] == "epoch_end"] == [0, 1, 2, 3]


def test_a_resume_on_changed_data_is_refused(tmp_path, data_file, capsys):
    run_dir = tmp_path / "run"
    argv = BASE + ["--data-path", str(data_file), "--set", "joint.epochs=2", "--output-dir", str(run_dir)]
    assert joint.main(argv) == 0
    write_structured_inter(data_file, n_users=60, n_items=47)  # the same users walking over one item less
    assert joint.main([*argv, "--resume", "--set", "joint.finetune_epochs=2"]) == 2
    assert re.search(r"--resume: the data .*data\.inter' changed since the run .* started",
                     _one_error_line(capsys.readouterr().err))


def test_a_fresh_run_into_a_run_that_failed_before_its_first_checkpoint_sets_its_records_aside(
        tmp_path, data_file, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("data: {dataset: other}\n")
    (run_dir / "events.jsonl").write_text('{"signal":"run_started","dataset":"other"}\n{"signal":"run_fini')
    with caplog.at_level(logging.WARNING):
        assert joint.main(BASE + ["--data-path", str(data_file), "--set", "joint.epochs=2", "--output-dir",
                                  str(run_dir)]) == 0
    starts = [e for e in read_events(run_dir / "events.jsonl") if e["signal"] == "run_started"]
    assert len(starts) == 1 and starts[0]["config"]["data"]["data_path"] == str(data_file)
    aside = read_events(run_dir / "events.superseded.jsonl")
    assert aside[0] == {"signal": "run_started", "dataset": "other"} and aside[1]["unreadable_line"] == 2
    assert (run_dir / "config.superseded.yaml").read_text() == "data: {dataset: other}\n"
    said = [r.getMessage() for r in caplog.records if "moved them aside" in r.getMessage()]
    assert len(said) == 1 and "events.superseded.jsonl and config.superseded.yaml" in said[0]


# --- the event log on resume ----------------------------------------------------------------------------

def _log(path: Path, *lines: str) -> EventLog:
    path.write_text("".join(lines))
    return EventLog(path)


RECORDS = ['{"signal":"run_started","epoch":null}\n', '{"signal":"step_end","epoch":0,"step":0}\n',
           '{"signal":"checkpoint_saved","epoch":0,"path":"/r/checkpoints/last.pt","is_best":false}\n']


def test_a_torn_last_line_is_cut_before_a_resume_appends(tmp_path, caplog):
    # killed while writing the checkpoint's own record: the log holds no checkpoint_saved of epoch 0
    log = _log(tmp_path / "events.jsonl", *RECORDS[:2], '{"signal":"checkpoint_sa')
    with caplog.at_level(logging.WARNING):
        log.cut_back("last.pt", 0)
    log.write("run_started", {"resumed": True})
    log.finish()
    assert [e["signal"] for e in read_events(tmp_path / "events.jsonl")] == ["run_started", "step_end", "run_started"]
    superseded = read_events(tmp_path / "events.superseded.jsonl")
    assert superseded == [{"signal": None, "unreadable_line": 3, "text": '{"signal":"checkpoint_sa'}]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "1 unreadable line(s) (line 3)" in said[0] and "events.superseded.jsonl" in said[0]


def test_a_damaged_line_in_the_middle_does_not_stop_a_resume(tmp_path):
    log = _log(tmp_path / "events.jsonl", RECORDS[0], "\x00\x00garbage\n", *RECORDS[1:],
               '{"signal":"step_end","epoch":1,"step":0}\n')
    log.cut_back("last.pt", 0)
    assert read_events(tmp_path / "events.jsonl") == [json.loads(r) for r in RECORDS]
    superseded = read_events(tmp_path / "events.superseded.jsonl")
    assert [e.get("unreadable_line") or e["signal"] for e in superseded] == ["step_end", 2]


# --- a finished run's directory, edited or of another stage, in recommend ------------------------------

def _truncated_best(run_dir: Path, finished: Path) -> None:
    best = run_dir / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])


def _edited_config(run_dir: Path, finished: Path) -> None:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["recommender"]["d_model"] = 48
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))


def _tokenizer_run(run_dir: Path, finished: Path) -> None:
    shutil.rmtree(run_dir)
    shutil.copytree(next((finished / "home" / "stages").glob("rqvae-*")), run_dir)


BROKEN_RUNS = [
    ("truncated best.pt", _truncated_best, r"best\.pt' could not be read.*truncated"),
    ("edited config.yaml", _edited_config, r"config\.yaml' does not describe the models in checkpoints/best\.pt"),
    ("tokenizer run", _tokenizer_run, r"best\.pt' belongs to a rqvae run, not a joint run"),
]


@pytest.mark.parametrize("name,damage,message", BROKEN_RUNS, ids=[b[0] for b in BROKEN_RUNS])
def test_recommend_on_a_broken_or_foreign_run_directory_is_one_line(name, damage, message, finished, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished / "run", run_dir)
    damage(run_dir, finished)
    start = time.perf_counter()
    assert recommend.main([str(run_dir), "--history", "i1,i2"]) == 2
    assert time.perf_counter() - start < 10
    assert re.search(message, _one_error_line(capsys.readouterr().err))
    with pytest.raises(ConfigError, match=message):
        etegrec.load_run(run_dir)


# --- Ctrl-C with a subscriber that hangs --------------------------------------------------------------

HANGING = """
import pathlib, time

class Hang:
    '''Hangs in step_end of epoch 2, and in every later call while the marker says so.'''

    def __init__(self):
        from etegrec import signals
        for sig in signals.ALL_SIGNALS:
            setattr(self, "on_" + sig.name, self._maybe_hang)

    def _maybe_hang(self, sender, *, epoch=None, **payload):
        marker = pathlib.Path({marker!r})
        if (epoch == 2 and not marker.exists()) or (marker.exists() and marker.read_text() == "hanging"):
            marker.write_text("hanging")
            time.sleep(600)

    def finish(self, status="completed"):
        self._maybe_hang(None)
"""


def test_a_second_ctrl_c_stops_a_run_whose_subscriber_hangs_and_the_printed_command_resumes_it(finished, tmp_path):
    import shlex
    import signal
    import subprocess
    import sys

    marker, run_dir = tmp_path / "hanging", tmp_path / "run"
    (tmp_path / "hang.py").write_text(HANGING.format(marker=str(marker)))
    env = {**os.environ, "ETEGREC_HOME": str(finished / "home")}
    argv = ["-m", "etegrec.training.joint", *BASE, "--data-path", str(finished / "walk.inter"), "--set",
            "joint.epochs=2", "--subscriber", f"{tmp_path / 'hang.py'}:Hang", "--output-dir", str(run_dir)]
    process = subprocess.Popen([sys.executable, *argv], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # well inside the hanging handler
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
    finally:
        process.kill()
    hint = process.stderr.read().strip().splitlines()[-1]
    assert hint.startswith("interrupted; continue with: python -m etegrec.training.joint ") and "--resume" in hint
    marker.write_text("done")
    again = shlex.split(hint.split("continue with: python ", 1)[1])
    resumed = subprocess.run([sys.executable, *again], env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run_dir / "metrics.json").exists()


def test_a_resume_reads_an_old_runs_missing_keys_as_built_in_defaults_not_as_ml_100k(tmp_path, monkeypatch):
    from etegrec.config import Config, load_config
    from etegrec.training.run.cli import common_parser, parse_stage_args

    monkeypatch.setenv("ETEGREC_HOME", str(tmp_path / "home"))
    run = tmp_path / "old-run"
    run.mkdir()
    saved = load_config("tiny").to_dict()
    del saved["joint"]["id_trains_rec"]  # a key added after the run was written
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"")  # only its presence is checked before loading
    assert load_config("ml-100k").joint.id_trains_rec != Config().joint.id_trains_rec  # the two readings differ
    args = parse_stage_args(common_parser("python -m etegrec.training.joint", "x"),
                            ["--output-dir", str(run), "--resume", "--set", "joint.epochs=7"])
    assert args.config.joint.id_trains_rec == Config().joint.id_trains_rec  # what the run trained with
    assert args.config.joint.epochs == 7 and args.config.recommender.d_model == load_config("tiny").recommender.d_model
