"""A killed or interrupted run resumes where it stopped and ends exactly like an uninterrupted one.

Every run here is a real command in a subprocess (``python -m etegrec.training.joint``); a small
subscriber file kills (SIGKILL) or interrupts (SIGINT) its own process in the middle of an epoch.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_accelerator, write_structured_inter
from etegrec.hooks.eventlog import read_events
from etegrec.training.run.checkpoint import read_checkpoint

ARGS = ["--config", "tiny", "--set", "joint.batch_size=16", "--set", "joint.sample_fraction=1.0"]

STOPPER = """
import os, signal

class Stopper:
    fired = False

    def on_step_end(self, sender, *, epoch, step, **payload):
        if epoch == {epoch} and not self.fired:  # the first step_end of that epoch: mid-epoch
            self.fired = True
            os.kill(os.getpid(), signal.{signal})
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Data, a shared stage cache, and the uninterrupted reference run."""
    root = tmp_path_factory.mktemp("resume")
    write_structured_inter(root / "data.inter", n_users=60)
    result = _joint(root, "reference", "--wandb-mode", "disabled")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def _joint(root: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ETEGREC_HOME": str(root / "home")}
    return subprocess.run([sys.executable, "-m", "etegrec.training.joint", *ARGS, "--data-path",
                           str(root / "data.inter"), "--output-dir", str(root / name), *extra],
                          env=env, capture_output=True, text=True, timeout=240)


def _stopper(root: Path, sig: str, epoch: int) -> str:
    path = root / f"stop_{sig}.py"
    path.write_text(STOPPER.format(signal=sig, epoch=epoch))
    return f"{path}:Stopper"


def _by_epoch(events: list[dict], name: str, **match) -> dict[int, dict]:
    chosen = [e for e in events if e["signal"] == name and all(e.get(k) == v for k, v in match.items())]
    epochs = [e["epoch"] for e in chosen]
    assert len(epochs) == len(set(epochs)), f"{name} logged twice for an epoch: {epochs}"
    return {e["epoch"]: e for e in chosen}


def _assert_same_training(run_dir: Path, reference: Path, renamed: dict[str, str] | None = None,
                          weights_atol: float = 1e-6) -> None:
    """Every epoch once, with the reference's losses, codebook counts, validation and test metrics
    (``renamed``: loss names of the run's older records that today's trainers emit under another name)."""
    events, ref = read_events(run_dir / "events.jsonl"), read_events(reference / "events.jsonl")
    ends, ref_ends = _by_epoch(events, "epoch_end"), _by_epoch(ref, "epoch_end")
    assert sorted(ends) == sorted(ref_ends) == list(range(5))
    for epoch, end in ends.items():
        assert end["phase"] == ref_ends[epoch]["phase"]
        losses = {(renamed or {}).get(k, k): v for k, v in end["losses"].items()}
        assert losses == pytest.approx(ref_ends[epoch]["losses"], abs=1e-6), epoch
    valid, ref_valid = _by_epoch(events, "evaluated", split="valid"), _by_epoch(ref, "evaluated", split="valid")
    assert sorted(valid) == sorted(ref_valid)
    for epoch in valid:
        assert valid[epoch]["metrics"] == pytest.approx(ref_valid[epoch]["metrics"], abs=1e-6)
    usage = [(e["epoch"], e["layer"], e["counts"]) for e in events if e["signal"] == "codebook_usage"]
    assert usage == [(e["epoch"], e["layer"], e["counts"]) for e in ref if e["signal"] == "codebook_usage"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ref_metrics = json.loads((reference / "metrics.json").read_text())
    assert metrics["test"] == pytest.approx(ref_metrics["test"], abs=1e-6)
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    ref_last = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    for name, tensor in ref_last["recommender"].items():
        assert torch.allclose(last["recommender"][name], tensor, atol=weights_atol), name
    assert torch.equal(last["codes"], ref_last["codes"])


def test_a_killed_run_resumes_and_ends_like_an_uninterrupted_one(workspace):
    killed = _joint(workspace, "killed", "--wandb-mode", "disabled", "--subscriber",
                    _stopper(workspace, "SIGKILL", epoch=3))
    assert killed.returncode == -signal.SIGKILL
    run_dir = workspace / "killed"
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["position"]["epoch"] == 3
    assert 3 in {e["epoch"] for e in read_events(run_dir / "events.jsonl") if e["signal"] == "step_end"}

    resumed = _joint(workspace, "killed", "--wandb-mode", "disabled", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_training(run_dir, workspace / "reference")
    starts = [e for e in read_events(run_dir / "events.jsonl") if e["signal"] == "run_started"]
    assert [(s["resumed"], s["start_epoch"]) for s in starts] == [(False, 0), (True, 3)]
    # the records of the epoch the kill cut short were kept aside, not lost
    superseded = read_events(run_dir / "events.superseded.jsonl")
    assert {e["epoch"] for e in superseded if e["signal"] == "step_end"} == {3}


def test_ctrl_c_writes_a_checkpoint_exits_130_and_resumes_mid_epoch(workspace):
    stopped = _joint(workspace, "stopped", "--wandb-mode", "offline", "--subscriber",
                     _stopper(workspace, "SIGINT", epoch=2))
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    run_dir = workspace / "stopped"
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["progress"]["step"] > 0  # in the middle of epoch 2 (a tokenizer epoch)
    events = read_events(run_dir / "events.jsonl")
    assert events[-1]["signal"] == "run_finished" and events[-1]["status"] == "interrupted"
    assert events[-1]["best_checkpoint"] == str(run_dir / "checkpoints" / "best.pt")  # it exists: say so
    assert events[-2]["signal"] == "checkpoint_saved" and events[-2]["epoch"] == 2
    assert 2 not in {e["epoch"] for e in events if e["signal"] == "epoch_end"}
    # the last line says how to go on, with the run's own options
    hint = stopped.stderr.strip().splitlines()[-1]
    assert hint.startswith("interrupted; continue with: python -m etegrec.training.joint ")
    assert hint.endswith(f"--output-dir {run_dir} --resume") and "--subscriber" in hint

    resumed = _joint(workspace, "stopped", "--wandb-mode", "offline", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_training(run_dir, workspace / "reference")
    statuses = [e["status"] for e in read_events(run_dir / "events.jsonl") if e["signal"] == "run_finished"]
    assert statuses == ["interrupted", "completed"]
    # one W&B run, continued: both offline run folders carry the id kept in the run directory
    run_id = (run_dir / "wandb" / "run-id").read_text().strip()
    folders = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.endswith(f"-{run_id}") for f in folders)


# Fields that differ between any two runs, interrupted or not: the wall clock (when a record was
# written, how long an epoch took, its speed). Paths differ only by the run directory's own name,
# which is replaced by RUN rather than left out.
CLOCK_FIELDS = ("time", "seconds", "samples_per_second")


def _payloads(events: list[dict], run_dir: Path) -> list[dict]:
    out = []
    for event in events:
        event = {k: v for k, v in event.items() if k not in CLOCK_FIELDS}
        out.append(json.loads(json.dumps(event).replace(str(run_dir), "RUN")))
    return out


def _assert_same_records(events: list[dict], reference: list[dict]) -> None:
    """The same signals in the same order, each with the reference's payload."""
    assert [e["signal"] for e in events] == [e["signal"] for e in reference]
    for event, expected in zip(events, reference):
        assert event == expected


def test_every_record_after_a_resume_carries_the_uninterrupted_runs_payload(workspace):
    # one thread (the tiny config's run.num_threads=1): every float comes out bit for bit, so payloads compare with ==
    run_dir = workspace / "stopped-events"
    stopped = _joint(workspace, run_dir.name, "--wandb-mode", "disabled", "--subscriber",
                     _stopper(workspace, "SIGINT", epoch=3))  # a recommender epoch: no code refresh before its probes
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    resumed = _joint(workspace, run_dir.name, "--wandb-mode", "disabled", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = _payloads(read_events(run_dir / "events.jsonl"), run_dir)
    reference = _payloads(read_events(workspace / "reference" / "events.jsonl"), workspace / "reference")
    # the only records the interruption adds: the Ctrl-C checkpoint's, the first attempt's end, the second's start
    end = next(i for i, e in enumerate(events) if e["signal"] == "run_finished")
    saved, finished, started = events[end - 1:end + 2]
    assert (saved["signal"], saved["epoch"], saved["is_best"]) == ("checkpoint_saved", 3, False)
    assert finished["status"] == "interrupted"
    assert (started["signal"], started["resumed"], started["start_epoch"]) == ("run_started", True, 3)
    del events[end - 1:end + 2]
    _assert_same_records(events, reference)


def test_a_run_stopped_in_its_second_pass_resumes_with_the_fresh_recommender_and_repeats_every_record(workspace):
    # joint.second_pass: epochs 0-3 alternate, 4-7 train a fresh recommender (its own optimiser, schedule and
    # model selection, none of which the first pass's state holds), 8 fine-tunes; Ctrl-C in the middle of epoch 4
    second = ("--wandb-mode", "disabled", "--set", "joint.second_pass=true")
    reference = _joint(workspace, "second-reference", *second)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = workspace / "second-stopped"
    stopped = _joint(workspace, run_dir.name, *second, "--subscriber", _stopper(workspace, "SIGINT", epoch=4))
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    state = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["second_pass"] and state["progress"]["step"] > 0 and state["early_stopping"]["best_epoch"] == -1
    resumed = _joint(workspace, run_dir.name, *second, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = _payloads(read_events(run_dir / "events.jsonl"), run_dir)
    ref = _payloads(read_events(workspace / "second-reference" / "events.jsonl"), workspace / "second-reference")
    assert [e["phase"] for e in ref if e["signal"] == "epoch_end"] == ["id", "rec"] * 2 + ["second"] * 4 + ["finetune"]
    end = next(i for i, e in enumerate(events) if e["signal"] == "run_finished")
    assert [e["signal"] for e in events[end - 1:end + 2]] == ["checkpoint_saved", "run_finished", "run_started"]
    del events[end - 1:end + 2]
    _assert_same_records(events, ref)


def test_the_same_command_on_two_threads_repeats_every_record(workspace):
    # two threads add the gradients of repeated rows (code embeddings, gathered encoder states) in parallel
    # once a batch has enough of them (64 samples here; 16 stay on one thread); run.deterministic (the
    # default) keeps their order, so a rerun repeats every float. Measured with it off: the records differ
    runs = [workspace / f"two-threads-{i}" for i in (1, 2)]
    for run_dir in runs:
        result = _joint(workspace, run_dir.name, "--wandb-mode", "disabled",
                        "--set", "run.num_threads=2", "--set", "joint.batch_size=64")
        assert result.returncode == 0, result.stderr[-3000:]
    first, second = (_payloads(read_events(run_dir / "events.jsonl"), run_dir) for run_dir in runs)
    _assert_same_records(second, first)


def test_a_checkpoint_written_before_the_one_fit_loop_still_resumes_and_ends_like_an_uninterrupted_run(workspace):
    # tests/data/joint-run-v1: this workspace's run (same data, config and seed) stopped by Ctrl-C in
    # epoch 2, written by the code of commit bc4d9e8, when each stage kept its own position dict and
    # the joint checkpoint its best_ndcg/best_epoch/best_valid
    run_dir = workspace / "joint-run-v1"
    shutil.copytree(Path(__file__).parent / "data" / "joint-run-v1", run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["data"]["data_path"] = str(workspace / "data.inter")  # the run moved here with its data
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert "early_stopping" not in read_checkpoint(run_dir / "checkpoints" / "last.pt")  # as written, not upgraded

    resumed = _joint(workspace, "joint-run-v1", "--wandb-mode", "disabled", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the epochs before the stop were logged when the optimised sum was still called "loss". Those epochs
    # ran on whichever CPU wrote the checkpoint: on one with other vector kernels (AVX-512 here, none there) the
    # final weights come out up to 1.3e-5 apart (measured) while every loss and metric still agrees to 1e-6
    _assert_same_training(run_dir, workspace / "reference", renamed={"loss": "loss_total"}, weights_atol=1e-4)
    starts = [e for e in read_events(run_dir / "events.jsonl") if e["signal"] == "run_started"]
    assert [(s["resumed"], s["start_epoch"]) for s in starts] == [(False, 0), (True, 2)]


def test_a_fresh_run_into_a_run_directory_is_refused(workspace):
    again = _joint(workspace, "reference", "--wandb-mode", "disabled")
    assert again.returncode == 2
    assert "already holds a run" in again.stderr and "--resume" in again.stderr
    assert "Traceback" not in again.stderr


def test_resume_with_a_changed_config_is_refused(workspace):
    changed = _joint(workspace, "reference", "--wandb-mode", "disabled", "--resume", "--set", "joint.lr_rec=0.1")
    assert changed.returncode == 2
    assert "joint.lr_rec" in changed.stderr and "Traceback" not in changed.stderr


# --- the embed and tokenizer stages resume the same way (in this process) ------------------------

class _CtrlC:
    """Sends this process one SIGINT at the first step_end (or epoch_end) of ``epoch``."""

    def __init__(self, epoch: int, on: str):
        self.epoch, self.fired = epoch, False
        setattr(self, f"on_{on}", self._maybe)

    def _maybe(self, sender, *, epoch, **payload):
        if epoch == self.epoch and not self.fired:
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("stage", ["embed", "rqvae"])
def test_embed_and_tokenizer_stages_resume_after_ctrl_c_like_an_uninterrupted_run(stage, tmp_path):
    from functools import partial

    from etegrec.config import load_config
    from etegrec.training.run.cache import load_stage_data
    from etegrec.training.embed import EMBED
    from etegrec.training.run.pipeline import ensure, run_stage
    from etegrec.training.rqvae import RQVAE

    inter = write_structured_inter(tmp_path / "data.inter", n_users=60)
    config = load_config("tiny", [f"data.data_path={inter}", "embed.batch_size=8", "embed.epochs=3",
                                  "embed.patience=5", "rqvae.epochs=8", "rqvae.eval_step=2", "rqvae.patience=5",
                                  "tokenizer.dropout=0.1", "rqvae.restart_dead_every=3"])  # randomness after the stop
    if stage == "embed":
        run, on, stop_epoch = partial(run_stage, EMBED), "step_end", 1  # mid-epoch
    else:
        run, on, stop_epoch = partial(run_stage, RQVAE), "epoch_end", 2  # the epoch is finished first (they take milliseconds)
        ensure(EMBED, config, load_stage_data(config), make_accelerator())  # built once, shared
    run(config, output_dir=tmp_path / "reference", wandb_mode="disabled")
    with pytest.raises(KeyboardInterrupt):
        run(config, output_dir=tmp_path / "stopped", wandb_mode="disabled", subscribers=[_CtrlC(stop_epoch, on)])
    events = read_events(tmp_path / "stopped" / "events.jsonl")
    assert events[-1]["signal"] == "run_finished" and events[-1]["status"] == "interrupted"
    run(config, output_dir=tmp_path / "stopped", wandb_mode="disabled", resume=True)

    ends, ref_ends = (_by_epoch(read_events(tmp_path / d / "events.jsonl"), "epoch_end") for d in ("stopped", "reference"))
    assert sorted(ends) == sorted(ref_ends)
    for epoch in ends:
        assert ends[epoch]["losses"] == pytest.approx(ref_ends[epoch]["losses"], abs=1e-6)
    metrics, ref = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("stopped", "reference"))
    assert metrics["valid"] == pytest.approx(ref["valid"], abs=1e-6)


def test_a_run_from_before_a_config_key_existed_resumes_when_the_key_keeps_its_default():
    from etegrec.config import load_config
    from etegrec.training.run.resume import _config_changes

    current = load_config("tiny").to_dict()
    saved = {section: dict(values) for section, values in current.items()}
    del saved["joint"]["shuffle_ties"]  # an older version wrote no such key
    assert _config_changes(saved, current) == []
    changed = load_config("tiny", ["joint.shuffle_ties=true"]).to_dict()
    assert _config_changes(saved, changed) == ["joint.shuffle_ties (None -> True)"]


def test_a_run_directory_with_the_joint_keys_of_before_the_split_resumes_and_a_changed_moved_key_is_refused(
        tmp_path):
    from etegrec.config import ConfigError, MOVED_KEYS, load_config
    from etegrec.training.run.cli import common_parser, parse_stage_args

    saved = load_config("tiny").to_dict()
    for old, new in MOVED_KEYS.items():  # the config.yaml a run wrote before the split
        section, name = new.split(".")
        saved["joint"][old.split(".")[1]] = saved[section].pop(name)
    for section, name in (("losses", "rec_item_weight"), ("losses", "id_usage_weight"), ("losses", "id_vq_items"),
                          ("codes", "shuffled"), ("recommender", "item_state"), ("recommender", "repeat_item_bias"),
                          ("joint", "id_until_epoch"), ("codes", "file")):
        del saved[section][name]  # added after the split: such a run's config.yaml lacks them
    for section in ("losses", "codes", "evaluation"):
        assert saved.pop(section) == {}
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").touch()
    (run / "config.yaml").write_text(yaml.safe_dump(saved))

    def resume(*args: str):
        argv = ["--output-dir", str(run), "--resume", *args]
        return parse_stage_args(common_parser("python -m etegrec.training.joint", "x"), argv, stage="joint")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ETEGREC_HOME", str(tmp_path / "home"))
        assert resume().config.evaluation.beam_size == load_config("tiny").evaluation.beam_size == 10
        with pytest.raises(ConfigError, match=r"differs .* in evaluation\.beam_size \(10 -> 20\)"):
            resume("--set", "evaluation.beam_size=20")


def test_a_finished_run_extended_by_two_epochs_trains_exactly_two_more_into_the_same_logs(tmp_path):
    from etegrec.training import joint

    inter = write_structured_inter(tmp_path / "walk.inter")
    argv = ["--config", "tiny", "--data-path", str(inter), "--wandb-mode", "offline", "--set", "embed.epochs=1",
            "--set", "rqvae.epochs=2", "--set", "joint.epochs=2", "--set", "joint.finetune_epochs=1",
            "--output-dir", str(tmp_path / "run")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ETEGREC_HOME", str(tmp_path / "home"))
        assert joint.main(argv) == 0
        assert joint.main([*argv, "--resume", "--set", "joint.finetune_epochs=3"]) == 0
        assert joint.main([*argv, "--resume", "--set", "joint.finetune_epochs=3"]) == 0  # finished again: no-op
        assert joint.main([*argv, "--resume", "--set", "joint.finetune_epochs=2"]) == 2  # shorter: refused
    events = read_events(tmp_path / "run" / "events.jsonl")
    epochs = [(e["epoch"], e["phase"]) for e in events if e["signal"] == "epoch_end"]
    assert epochs == [(0, "id"), (1, "rec"), (2, "finetune"), (3, "finetune"), (4, "finetune")]
    assert [e["status"] for e in events if e["signal"] == "run_finished"] == ["completed", "completed"]
    run_id = (tmp_path / "run" / "wandb" / "run-id").read_text().strip()
    folders = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(run_id) for f in folders)  # one W&B run, continued
