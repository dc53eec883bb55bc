"""Bad input gets one clear sentence; a NaN stops the run and keeps the last good checkpoint; a
broken subscriber never stops training; W&B trouble falls back to offline."""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cached_tokenizer_stage, make_accelerator, write_crafted_checkpoint, write_structured_inter
from etegrec import signals
from etegrec.config import load_config
from etegrec.data import dataset_name_of
from etegrec.hooks import read_events
from etegrec.training import joint
from etegrec.training.run.cache import load_stage_data, stage_dir
from etegrec.training.embed import EMBED
from etegrec.training.joint import JOINT
from etegrec.training.run.pipeline import run_stage

BASE = ["--config", "tiny", "--wandb-mode", "disabled"]


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_structured_inter(tmp_path / "data.inter", n_users=60)


def _config(data_file: Path):
    # as the command line builds it: the dataset is named after the file
    return load_config("tiny", [f"data.data_path={data_file}", f"data.dataset={dataset_name_of(data_file)}"])


# --- a table of bad inputs: each gives exit status 2 and one line naming what is wrong ----------

def _malformed(tmp_path, data_file):
    bad = tmp_path / "bad.inter"
    bad.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\ti1\t4\t100\nu1\ti2\t5\n")
    return ["--data-path", str(bad)]


def _old_key_yaml(tmp_path, data_file):
    path = tmp_path / "mine.yaml"
    path.write_text("base: tiny\njoint: {rec_kl_weight: 0}\n")  # the TIGER-style ablation, as written before
    return ["--config", str(path)]


def _bad_yaml(tmp_path, data_file):
    path = tmp_path / "bad.yaml"
    path.write_text("joint: [epochs: 3\n")
    return ["--config", str(path)]


def _codes_file_short_of_an_item(tmp_path, data_file):
    items = load_stage_data(_config(data_file)).item_map
    from etegrec.training.run.item_codes import format_item_codes
    k = np.arange(len(items) - 1)
    path = tmp_path / "codes.tsv"
    path.write_text(format_item_codes(np.stack([k % 16, k // 16, 0 * k, 0 * k], axis=1), items[1:]))
    return ["--data-path", str(data_file), "--set", f"codes.file={path}", "--set", "joint.train_tokenizer=false",
            "--set", "losses.rec_kl_weight=0", "--set", "losses.rec_dec_cl_weight=0"]


def _short_embeddings(tmp_path, data_file):
    config = _config(data_file)
    folder = stage_dir(config, EMBED, load_stage_data(config))
    folder.mkdir(parents=True)
    np.save(folder / "embeddings.npy", np.zeros((7, config.embed.hidden), dtype=np.float32))
    return ["--data-path", str(data_file)]


def _misfit_tokenizer(tmp_path, data_file):
    from etegrec.training.rqvae import build_tokenizer

    best = cached_tokenizer_stage(data_file)
    other = load_config("tiny", ["tokenizer.codebook_size=8"])
    torch.save({"stage": "rqvae", "model": build_tokenizer(other.tokenizer, _config(data_file).embed.hidden).state_dict()}, best)
    return ["--data-path", str(data_file)]


def _torn_checkpoint(tmp_path, data_file):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    return ["--data-path", str(data_file), "--output-dir", str(run_dir), "--resume"]


def _held_run_dir(tmp_path, data_file):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"stage": "joint"}, run_dir / "checkpoints" / "last.pt")
    return ["--data-path", str(data_file), "--output-dir", str(run_dir)]


def _raising_factory(tmp_path, data_file):
    path = tmp_path / "factory.py"
    path.write_text("def make():\n    raise RuntimeError('no database')\n")
    return ["--data-path", str(data_file), "--subscriber", f"{path}:make"]


def _output_under_a_file(tmp_path, data_file):
    (tmp_path / "notes.txt").write_text("a file, not a directory")
    return ["--output-dir", str(tmp_path / "notes.txt" / "run")]


def _unwritable_home(tmp_path, data_file):
    os.environ["ETEGREC_HOME"] = "/sys/etegrec-home"  # not writable even by root; the fixture restores it
    return []


def _subscriber_syntax_error(tmp_path, data_file):
    path = tmp_path / "watch.py"
    path.write_text("def on_epoch_end(sender, **payload:\n    pass\n")
    return ["--subscriber", f"{path}:on_epoch_end"]


def _wandb_mode_dryrun(tmp_path, data_file):
    os.environ["WANDB_MODE"] = "dryrun"  # wandb's old name for offline; the test puts the variable back
    return []
# --- issue 24, safe files and truthful resumes ---------------------------------------------------------

def _crafted_last(tmp_path, data_file):
    write_crafted_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", tmp_path / "marker")
    return ["--data-path", str(data_file), "--output-dir", str(tmp_path / "run"), "--resume"]


def _crafted_cached_tokenizer(tmp_path, data_file):
    write_crafted_checkpoint(cached_tokenizer_stage(data_file), tmp_path / "marker", stage="rqvae")
    return ["--data-path", str(data_file)]


def _linked_lock(tmp_path, data_file):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(tmp_path / "victim.txt")
    return ["--data-path", str(data_file), "--output-dir", str(tmp_path / "run")]


def _resumable(tmp_path, data_file, **state):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"stage": "joint", "format": 2, "position": {"epoch": 1, "segment": 0, "index": 1}, **state},
               tmp_path / "run" / "checkpoints" / "last.pt")
    return ["--data-path", str(data_file), "--output-dir", str(tmp_path / "run"), "--resume"]


def _args(*args):
    return lambda tmp_path, data_file: [a.format(data=data_file, tmp=tmp_path) for a in args]


BAD_INPUTS = [
    # data
    ("missing data file", _args("--data-path", "{tmp}/nowhere.inter"), r"nowhere\.inter.*(does not exist|not found)"),
    ("malformed line", _malformed, r"bad\.inter: line 3: expected 4 tab-separated fields"),
    ("unknown dataset", _args("--dataset", "ml-1b"), r"ml-1b"),
    # config
    ("unknown key", _args("--set", "joint.lr_recc=0.1"), r"joint\.lr_recc.*joint\.lr_rec"),
    ("wrong type", _args("--set", "joint.epochs=many"), r"joint\.epochs.*many"),
    ("non-positive size", _args("--set", "recommender.d_model=0"), r"recommender\.d_model.*must be positive"),
    ("unknown config", _args("--config", "nosuch"), r"nosuch"),
    ("invalid YAML", _bad_yaml, r"bad\.yaml.*not valid YAML"),
    ("moved key", _args("--set", "joint.beam_size=5"), r"config key 'joint\.beam_size' moved to 'evaluation\.beam_size'"),
    ("moved key in a file", _old_key_yaml,
     r"mine\.yaml: config key 'joint\.rec_kl_weight' moved to 'losses\.rec_kl_weight'"),
    ("top_k above beam", _args("--set", "evaluation.top_k=50"), r"evaluation\.top_k.*beam_size"),
    ("FORGE policy", _args("--set", "codes.forge_policy=bogus"), r"codes\.forge_policy.*round_robin.*'bogus'"),
    ("T5 activation", _args("--set", "recommender.feed_forward_proj=bogus"),
     r"recommender\.feed_forward_proj.*'bogus'"),
    # paths
    ("output dir under a file", _output_under_a_file, r"--output-dir '.*notes\.txt/run' cannot be used.*Not a directory"),
    ("unwritable output dir", _args("--output-dir", "/sys/etegrec-run"),
     r"--output-dir '/sys/etegrec-run' cannot be used.*not permitted"),
    ("unwritable ETEGREC_HOME", _unwritable_home, r"\$ETEGREC_HOME '/sys/etegrec-home' cannot be used.*not permitted"),
    # artefacts
    ("embedding rows", _short_embeddings, r"embeddings\.npy.*shape \(7, 32\).*items"),
    ("tokenizer shape", _misfit_tokenizer, r"tokenizer checkpoint .*does not fit the tokenizer config.*\[8, 16\].*\[16, 16\]"),
    ("resume without checkpoint", _args("--output-dir", "{tmp}/empty", "--resume"), r"nothing to resume"),
    ("unreadable checkpoint", _torn_checkpoint, r"last\.pt.*could not be read"),
    ("run directory taken", _held_run_dir, r"already holds a run.*--resume"),
    # subscribers
    ("subscriber module", _args("--subscriber", "no_such_module:thing"), r"no_such_module"),
    ("subscriber attribute", _args("--subscriber", "json:no_such_thing"), r"no_such_thing"),
    ("subscriber factory raises", _raising_factory, r"make.*no database"),
    ("subscriber syntax error", _subscriber_syntax_error, r"watch\.py' line 1: syntax error"),
    # issue 24: inputs
    ("NaN rate", _args("--set", "joint.lr_rec=nan"), r"joint\.lr_rec' must be a finite number, got nan"),
    ("infinite rate", _args("--set", "joint.lr_rec=inf"), r"joint\.lr_rec' must be a finite number, got inf"),
    ("negative seed", _args("--seed", "-1"), r"run\.seed' \(--seed\) must lie in \[0, 4294967295\], got -1"),
    ("seed too large", _args("--seed", "99999999999"), r"run\.seed' \(--seed\) must lie in .*got 99999999999"),
    ("WANDB_MODE=dryrun", _wandb_mode_dryrun, r"WANDB_MODE='dryrun' in the environment is not one of .*offline"),
    # issue 24, safe files and truthful resumes: a file that would run code, a linked lock, other data, a newer format
    ("unsafe checkpoint on resume", _crafted_last, r"--resume: .*last\.pt' was refused: loading it would call builtins\.exec"),
    ("unsafe cached tokenizer", _crafted_cached_tokenizer, r"stages/rqvae-.*best\.pt' was refused.*builtins\.exec"),
    ("lock file is a link", _linked_lock, r"run/\.lock' is a symbolic link .*victim\.txt.*remove the link"),
    ("codes file short of an item", _codes_file_short_of_an_item,
     r"codes\.tsv \(codes\.file\): 1 of the dataset's \d+ items have no codes there"),
    ("codes file beside a training tokenizer", _args("--set", "codes.file={tmp}/codes.tsv"),
     r"'codes\.file' is '.*codes\.tsv', which needs joint\.train_tokenizer=false"),
    ("resume on other data", lambda tmp_path, data_file: _resumable(tmp_path, data_file, data_digest="0" * 16),
     r"--resume: the data .*data\.inter' changed since the run .*it trained on 0000000000000000"),
    ("checkpoint of a newer format", lambda tmp_path, data_file: _resumable(tmp_path, data_file, format=99),
     r"last\.pt' has checkpoint format 99, newer than this etegrec's 2; upgrade etegrec"),
]


@pytest.mark.parametrize("name,make_args,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_clear_line(name, make_args, message, tmp_path, data_file, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "offline"))  # put back after a case that sets it
    argv = BASE + make_args(tmp_path, data_file)
    start = time.perf_counter()
    assert joint.main(argv) == 2
    assert time.perf_counter() - start < 10  # refused before any stage trains (the cache is empty)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert re.search(message, errors[0]), errors[0]


def test_bad_input_on_the_real_command_line_has_no_traceback(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "etegrec.training.joint", *BASE, "--set", "joint.lr_recc=1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr


# --- a NaN stops the run with where it happened; the last good checkpoint stays ------------------

def test_a_nan_loss_names_stage_epoch_step_and_parts_and_keeps_the_last_checkpoint(
        tmp_path, data_file, monkeypatch, capsys):
    original = joint.JointTrainer.losses
    calls = {"n": 0}

    def poisoned(self, index, *, phase, weights, epoch=0):
        parts = original(self, index, phase=phase, weights=weights, epoch=epoch)
        if phase == "rec" and self.run.checkpoint_dir.joinpath("last.pt").exists():
            calls["n"] += 1
            if calls["n"] == 4:  # the 4th step of epoch 1 (steps count from 0)
                parts["code_loss"] = parts["code_loss"] * float("nan")
                parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(joint.JointTrainer, "losses", poisoned)
    run_dir = tmp_path / "run"
    argv = BASE + ["--data-path", str(data_file), "--set", "joint.batch_size=16", "--set",
                   "joint.sample_fraction=1.0", "--output-dir", str(run_dir)]
    assert joint.main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(r"error: joint rec epoch 1 step 3: non-finite loss \(code_loss=nan, .*loss=nan", err), err
    assert "Traceback" not in err
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["recommender"].values())
    events = read_events(run_dir / "events.jsonl")
    assert events[-1]["signal"] == "run_finished" and events[-1]["status"] == "failed"
    assert [e["epoch"] for e in events if e["signal"] == "epoch_end"] == [0]


# --- a subscriber that raises on every event ------------------------------------------------------

class Raiser:
    def __init__(self):
        for sig in signals.ALL_SIGNALS:
            setattr(self, f"on_{sig.name}", self._boom)

    def _boom(self, sender, **payload):
        raise RuntimeError("subscriber bug")


def test_a_subscriber_raising_on_every_event_never_stops_training(tmp_path, data_file, monkeypatch, caplog):
    from etegrec.hooks import FunctionSubscriber

    monkeypatch.setenv(signals.STRICT_ENV, "0")
    seen = []
    recorder = FunctionSubscriber(lambda sender, *, signal, **payload: seen.append(signal))
    config = _config(data_file)
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.ERROR):
        result = run_stage(JOINT, config, output_dir=run_dir, wandb_mode="disabled",
                                 subscribers=[Raiser(), recorder])
    assert set(result) == {"valid", "test"}
    reports = [re.search(r"subscriber .*Raiser\._boom raised on signal '(\w+)'", r.getMessage())
               for r in caplog.records]
    per_signal = {}
    for match in filter(None, reports):
        per_signal[match[1]] = per_signal.get(match[1], 0) + 1
    joint_events = [e["signal"] for e in read_events(run_dir / "events.jsonl")]
    assert per_signal == {name: 1 for name in joint_events}  # every signal it saw, reported once
    assert seen[-len(joint_events):] == joint_events  # the recorder saw every event of the joint run


# --- W&B trouble falls back to offline ------------------------------------------------------------

def test_online_without_an_api_key_logs_offline_with_one_warning(tmp_path, data_file, wandb_env, caplog):
    config = load_config("tiny", [f"data.data_path={data_file}", "joint.epochs=2", "joint.finetune_epochs=0"])
    with caplog.at_level(logging.WARNING):
        run_stage(JOINT, config, output_dir=tmp_path / "run", wandb_mode="online")
    warnings = [r for r in caplog.records if "no API key" in r.getMessage()]
    assert len(warnings) == 1
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_online_without_a_reachable_server_falls_back_to_offline(tmp_path, wandb_env, monkeypatch, caplog):
    import time


    from etegrec.hooks.wandb import WandbSubscriber

    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    subscriber = WandbSubscriber(accelerator=make_accelerator(log_with="wandb"), project="p", run_name="r",
                                 config={"a": 1}, run_dir=tmp_path, stage="joint", key_map=JOINT.key_map, mode="online",
                                 init_timeout=5)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        subscriber.start()
    seconds = time.perf_counter() - start
    try:
        assert subscriber.mode == "offline" and subscriber.run is not None
        assert [r for r in caplog.records if "could not start online" in r.getMessage()]
        assert seconds < 30  # W&B gives up after its init_timeout plus its own retries
        run_id = (tmp_path / "wandb" / "run-id").read_text().strip()
        assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    finally:
        subscriber.finish()
