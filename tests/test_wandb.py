"""The W&B subscriber against real offline runs, read back with ``wandb leet inspect --json``."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_accelerator
from etegrec import signals
from etegrec.hooks.wandb import (
    WandbSubscriber,
    resolve_mode,
    usage_histogram,
)
from etegrec.hooks.wandb_process import RemoteRun, WandbProcessError, WandbProcessTracker
from etegrec.training.joint import JOINT
from etegrec.training.rqvae import RQVAE

accelerate = pytest.importorskip("accelerate")

WANDB_CLI = Path(sys.executable).with_name("wandb")
K = 8


def inspect_records(run_dir: Path) -> list[dict]:
    logs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    out = subprocess.run([str(WANDB_CLI), "leet", "inspect", "--json", str(logs[0])],
                         capture_output=True, text=True, check=True, timeout=60)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def logged(records: list[dict], key: str) -> list[tuple[int, object]]:
    """(epoch, value) of every history row that has ``key``."""
    return [(row["epoch"], row[key]) for row in history(records) if key in row]


def usage(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 5, size=K)


def run_stage(tmp_path_factory, *, stage, project, emit, status) -> tuple[Path, list[dict]]:
    run_dir = tmp_path_factory.mktemp(stage.name)
    accelerator = make_accelerator(log_with="wandb")
    config = {"stage": stage.name, "seed": 7, "tokenizer": {"code_num": K, "e_dim": 4}}
    subscriber = WandbSubscriber(accelerator=accelerator, project=project, run_name=f"{stage.name}_name",
                                 config=config, run_dir=run_dir, stage=stage.name, key_map=stage.key_map,
                                 mode="offline")
    subscriber.start()
    subscriber.connect()
    with signals.strict():
        signals.run_started.send(None, stage=stage.name, config=config, run_dir=str(run_dir), rank=0,
                                 world_size=1, resumed=False, start_epoch=0)
        emit()
        signals.run_finished.send(None, stage=stage.name, status=status, best_metrics={"ndcg@10": 0.5},
                                  best_checkpoint=None, seconds=3.0)
    accelerator.end_training()  # what the trainer does last: a second finish is a no-op
    assert subscriber.on_epoch_end not in list(signals.epoch_end.receivers_for(None))  # disconnected
    return run_dir, inspect_records(run_dir)


def emit_pretrain():
    for epoch in range(2):
        signals.epoch_end.send(None, stage="rqvae", phase="rqvae", epoch=epoch,
                               losses={"loss_total": 1.0 - 0.1 * epoch, "loss_recon": 0.5 - 0.1 * epoch,
                                       "loss_quant": 0.25},
                               lr={"rqvae": 1e-3}, seconds=2.0, samples_per_second=50.0)
        for layer in range(3):
            counts = usage(10 * epoch + layer)
            signals.codebook_usage.send(None, stage="rqvae", epoch=epoch, layer=layer, counts=counts,
                                        utilization=0.75, perplexity=5.5, gini=0.25 + layer, dead_codes=2)
        signals.evaluated.send(None, stage="rqvae", split="valid", epoch=epoch,
                               metrics={"collision_rate": 0.125 / (epoch + 1), "gini_coefficient": 0.375,
                                        "recon_mse": 0.0625})
        signals.checkpoint_saved.send(None, stage="rqvae", epoch=epoch, path="ckpt.pt", is_best=True)


def emit_joint():
    codes = np.zeros((10, 4), dtype=np.int64)
    rec = {"loss_total": 2.0, "code_loss": 1.5, "kl_loss": 0.25, "dec_cl_loss": 0.125}
    id_ = {"loss_total": 3.0, "vq_loss": 0.5, "code_loss": 1.75, "kl_loss": 0.5, "dec_cl_loss": 0.25}
    for epoch, phase, losses, lr in [(0, "id", id_, {"id": 1e-4}), (1, "rec", rec, {"rec": 5e-3}),
                                     (2, "id", id_, {"id": 2e-4})]:
        signals.epoch_end.send(None, stage="joint", phase=phase, epoch=epoch, losses=losses, lr=lr,
                               seconds=1.0, samples_per_second=10.0)
        if phase == "id":
            signals.codebook_usage.send(None, stage="joint", epoch=epoch, layer=0, counts=usage(epoch),
                                        utilization=1.0, perplexity=7.0, gini=0.125, dead_codes=0)
            signals.codes_assigned.send(None, stage="joint", epoch=epoch, codes=codes, use_forge=True, policy="adler32",
                                        max_conflict=2 + epoch, max_conflict_before=9, collision_rate=0.2,
                                        changed=10 if epoch == 0 else 3, seconds=0.01)
        signals.evaluated.send(None, stage="joint", split="valid", epoch=epoch,
                               metrics={"recall@10": 0.25 + epoch, "ndcg@10": 0.125 + epoch})
    signals.epoch_end.send(None, stage="joint", phase="finetune", epoch=3,
                           losses={"loss_total": 1.25, "code_loss": 1.0}, lr={"rec": 1e-3}, seconds=1.0,
                           samples_per_second=10.0)
    # An earlier stage's payload in the same process must not land in this run.
    signals.epoch_end.send(None, stage="rqvae", phase="rqvae", epoch=0, losses={"loss_total": 9.0})
    # The test metrics of the best epoch come after epoch 3: W&B must not drop this row.
    signals.evaluated.send(None, stage="joint", split="test", epoch=1,
                           metrics={"recall@10": 0.5, "ndcg@10": 0.375})


@pytest.fixture(scope="module")
def pretrain(wandb_env, tmp_path_factory):
    return run_stage(tmp_path_factory, stage=RQVAE, project=RQVAE.project, emit=emit_pretrain,
                     status="completed")


@pytest.fixture(scope="module")
def joint(wandb_env, tmp_path_factory):
    return run_stage(tmp_path_factory, stage=JOINT, project=JOINT.project, emit=emit_joint,
                     status="interrupted")


def test_pretrain_losses_and_validation_keys(pretrain):
    _, records = pretrain
    assert logged(records, "train/loss_total") == [(0, 1.0), (1, 0.9)]
    assert logged(records, "train/loss_recon") == [(0, 0.5), (1, 0.4)]
    assert logged(records, "train/loss_quant") == [(0, 0.25), (1, 0.25)]
    assert logged(records, "lr/rqvae_lr") == [(0, 1e-3), (1, 1e-3)]
    assert logged(records, "val/collision_rate") == [(0, 0.125), (1, 0.0625)]
    assert logged(records, "val/gini_coefficient") == [(0, 0.375), (1, 0.375)]
    assert logged(records, "val/recon_mse") == [(0, 0.0625), (1, 0.0625)]


def test_codebook_usage_is_a_histogram_of_the_counts(pretrain):
    _, records = pretrain
    for layer in range(3):
        prefix = f"codebook/layer{layer}"
        rows = [row for row in history(records) if f"{prefix}/usage._type" in row]
        assert [row["epoch"] for row in rows] == [0, 1]
        for row in rows:
            assert row[f"{prefix}/usage._type"] == "histogram"
            assert row[f"{prefix}/usage.values"] == usage(10 * row["epoch"] + layer).tolist()
            assert row[f"{prefix}/usage.bins"] == list(range(K + 1))
            assert row[f"{prefix}/utilization"] == 0.75
            assert row[f"{prefix}/perplexity"] == 5.5
            assert row[f"{prefix}/gini"] == 0.25 + layer
            assert row[f"{prefix}/dead_codes"] == 2


def test_joint_phase_losses_and_learning_rates(joint):
    _, records = joint
    assert logged(records, "train/rec_loss_total") == [(1, 2.0)]
    assert logged(records, "train/rec_code_loss") == [(1, 1.5)]
    assert logged(records, "train/rec_kl_loss") == [(1, 0.25)]
    assert logged(records, "train/rec_dec_cl_loss") == [(1, 0.125)]
    assert logged(records, "lr/rec_lr") == [(1, 5e-3), (3, 1e-3)]
    assert logged(records, "train/id_loss_total") == [(0, 3.0), (2, 3.0)]
    assert logged(records, "train/id_vq_loss") == [(0, 0.5), (2, 0.5)]
    assert logged(records, "train/id_code_loss") == [(0, 1.75), (2, 1.75)]
    assert logged(records, "train/id_kl_loss") == [(0, 0.5), (2, 0.5)]
    assert logged(records, "train/id_dec_cl_loss") == [(0, 0.25), (2, 0.25)]
    assert logged(records, "lr/id_lr") == [(0, 1e-4), (2, 2e-4)]
    assert logged(records, "train/finetune_loss_total") == [(3, 1.25)]
    assert logged(records, "train/finetune_code_loss") == [(3, 1.0)]


def test_joint_monitor_keys(joint):
    _, records = joint
    assert logged(records, "monitor/max_conflict") == [(0, 2), (2, 4)]
    assert logged(records, "monitor/max_conflict_before_forge") == [(0, 9), (2, 9)]
    assert logged(records, "monitor/collision_rate") == [(0, 0.2), (2, 0.2)]
    assert logged(records, "monitor/codes_changed") == [(0, 1.0), (2, 0.3)]
    assert logged(records, "codebook/layer0/gini") == [(0, 0.125), (2, 0.125)]


def test_joint_eval_and_test_metrics_even_when_the_epoch_goes_back(joint):
    _, records = joint
    assert logged(records, "eval/ndcg@10") == [(0, 0.125), (1, 1.125), (2, 2.125)]
    assert logged(records, "eval/recall@10") == [(0, 0.25), (1, 1.25), (2, 2.25)]
    assert logged(records, "test/ndcg@10") == [(1, 0.375)]
    assert logged(records, "test/recall@10") == [(1, 0.5)]


def test_other_stages_payloads_are_ignored(joint):
    _, records = joint
    assert logged(records, "train/loss_total") == []


@pytest.mark.parametrize("stage_run", ["pretrain", "joint"])
def test_every_row_has_epoch_and_wandb_steps_only_increase(stage_run, request):
    _, records = request.getfixturevalue(stage_run)
    rows = [r["history"] for r in records if r["type"] == "history"]
    assert rows and all("epoch" in row["item"] for row in rows)
    steps = [row["step"]["num"] for row in rows]
    assert steps == sorted(set(steps))


@pytest.mark.parametrize("stage_run", ["pretrain", "joint"])
def test_epoch_is_declared_the_step_metric(stage_run, request):
    _, records = request.getfixturevalue(stage_run)
    metrics = [r["metric"] for r in records if r["type"] == "metric"]
    assert {"name": "epoch", "options": {"defined": True}} in metrics
    assert any(m.get("glob_name") == "*" and m.get("step_metric") == "epoch" for m in metrics)


@pytest.mark.parametrize("stage_run, project", [("pretrain", RQVAE.project), ("joint", JOINT.project)])
def test_run_name_project_and_config(stage_run, project, request):
    run_dir, records = request.getfixturevalue(stage_run)
    stage = "rqvae" if stage_run == "pretrain" else "joint"
    run = next(r["run"] for r in records if r["type"] == "run")
    assert (run["project"], run["display_name"]) == (project, f"{stage}_name")
    config = {}
    for r in records:
        if r["type"] == "config":
            config.update(r["config"]["update"])
    assert config["stage"] == stage and config["seed"] == 7
    assert config["tokenizer"] == {"code_num": K, "e_dim": 4}
    assert run_dir.joinpath("wandb").is_dir()


def test_best_metrics_go_to_the_summary(pretrain):
    _, records = pretrain
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    assert summary["best/ndcg@10"] == 0.5


def test_completed_run_exits_0_and_other_statuses_mark_it_failed(pretrain, joint):
    exits = [[r["exit"]["exit_code"] for r in records if r["type"] == "exit"] for _, records in (pretrain, joint)]
    assert exits == [[0], [1]]


def test_a_wandb_error_is_warned_once_and_the_run_goes_on(wandb_env, tmp_path, caplog):
    accelerator = make_accelerator(log_with="wandb")
    subscriber = WandbSubscriber(accelerator=accelerator, project=JOINT.project, run_name="broken",
                                 config={}, run_dir=tmp_path, stage="joint", key_map=JOINT.key_map, mode="disabled")
    subscriber.start()
    subscriber.connect()
    calls = []

    def broken_log(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("W&B is down")

    subscriber.run.log = broken_log
    try:
        with signals.strict(), caplog.at_level(logging.WARNING, logger="etegrec.hooks.wandb"):
            for epoch in range(3):
                signals.evaluated.send(None, stage="joint", split="valid", epoch=epoch, metrics={"ndcg@10": 0.1})
    finally:
        subscriber.finish("completed")
    assert len(calls) == 1
    warnings = [r for r in caplog.records if "W&B is down" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


class ListTracker(accelerate.tracking.GeneralTracker):
    """Another Accelerate tracker (stands in for TensorBoard): scalars only, explicit steps."""

    name = "list"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def tracker(self):
        return self.rows

    def log(self, values, step=None, **kwargs):
        self.rows.append((step, dict(values)))


def test_other_trackers_get_the_scalars_with_epoch_as_step(wandb_env, tmp_path):
    other = ListTracker()
    accelerator = make_accelerator(log_with=["wandb", other])
    subscriber = WandbSubscriber(accelerator=accelerator, project=JOINT.project, run_name="two",
                                 config={}, run_dir=tmp_path, stage="joint", key_map=JOINT.key_map, mode="disabled")
    subscriber.start()
    subscriber.connect()
    try:
        with signals.strict():
            signals.codebook_usage.send(None, stage="joint", epoch=4, layer=1, counts=np.ones(K),
                                        utilization=1.0, perplexity=8.0, gini=0.0, dead_codes=0)
    finally:
        subscriber.finish()
    assert other.rows == [(4, {"codebook/layer1/utilization": 1.0,
                               "codebook/layer1/perplexity": 8.0, "codebook/layer1/gini": 0.0,
                               "codebook/layer1/dead_codes": 0})]


# --- W&B in its own process ------------------------------------------------------------------

def test_the_wandb_run_lives_in_another_process(wandb_env, tmp_path):
    accelerator = make_accelerator(log_with="wandb")
    subscriber = WandbSubscriber(accelerator=accelerator, project=RQVAE.project, run_name="p",
                                 config={}, run_dir=tmp_path, stage="rqvae", key_map=RQVAE.key_map, mode="offline")
    subscriber.start()
    try:
        assert isinstance(subscriber.run, RemoteRun)
        assert accelerator.get_tracker("wandb", unwrap=True) is subscriber.run
        child = subscriber.run._process
        assert child.pid != os.getpid() and child.poll() is None
    finally:
        subscriber.finish("completed")
    assert child.returncode == 0


def test_start_leaves_the_accelerators_trackers_as_it_was_built_with(wandb_env, tmp_path):
    accelerator = make_accelerator(log_with="wandb")
    log_with = list(accelerator.log_with)
    subscriber = WandbSubscriber(accelerator=accelerator, project="p", run_name="r", config={}, run_dir=tmp_path,
                                 stage="rqvae", key_map=RQVAE.key_map, mode="disabled")
    subscriber.start()
    try:
        assert list(accelerator.log_with) == log_with
        assert [type(t) for t in accelerator.trackers] == [WandbProcessTracker]
        assert accelerate.tracking.LOGGER_TYPE_TO_CLASS["wandb"] is accelerate.tracking.WandBTracker
    finally:
        subscriber.finish()


def test_online_without_an_api_key_starts_offline_with_one_warning(wandb_env, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    tracker = WandbProcessTracker("p", name="r", dir=str(tmp_path), mode="online", id="nokey1",
                                  settings={"finish_timeout": 30})
    with caplog.at_level(logging.WARNING, logger="etegrec.hooks.wandb_process"):
        tracker.start()
    try:
        assert tracker.init_kwargs["mode"] == "offline"
        assert len([r for r in caplog.records if "no API key" in r.getMessage()]) == 1
    finally:
        tracker.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*-nokey1"))


def test_an_invalid_mode_is_an_error_for_the_subscriber(tmp_path):
    with pytest.raises(ValueError, match="wandb mode 'cloud'"):
        WandbSubscriber(accelerator=make_accelerator(log_with="wandb"), project="p", run_name="r", config={},
                        run_dir=tmp_path, stage="joint", key_map=JOINT.key_map, mode="cloud")


KILLED_DURING_TRAINING = """
import os, sys
import accelerate
from etegrec import signals
from etegrec.hooks.wandb import WandbSubscriber
from etegrec.training.rqvae import RQVAE
sub = WandbSubscriber(accelerator=accelerate.Accelerator(log_with="wandb", cpu=True), project="p",
                      run_name="killed", config={}, run_dir=sys.argv[1], stage="rqvae", key_map=RQVAE.key_map,
                      mode="offline")
sub.start()
sub.connect()
signals.epoch_end.send(None, stage="rqvae", phase="rqvae", epoch=0, losses={"loss_total": 0.5})
os._exit(9)  # the row is in W&B's socket once send returns: die without finishing
"""


def test_a_training_process_that_dies_leaves_a_finished_failed_run(wandb_env, tmp_path):
    done = subprocess.run([sys.executable, "-c", KILLED_DURING_TRAINING, str(tmp_path)], timeout=120)
    assert done.returncode == 9
    deadline = time.monotonic() + 60  # W&B's process finishes the run on its own once the socket closes
    while time.monotonic() < deadline and not any(r["type"] == "exit" for r in _records_or_none(tmp_path)):
        time.sleep(0.5)
    records = inspect_records(tmp_path)
    assert logged(records, "train/loss_total") == [(0, 0.5)]
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [1]


def _records_or_none(run_dir: Path) -> list[dict]:
    try:
        return inspect_records(run_dir)
    except (AssertionError, subprocess.CalledProcessError):
        return []


def test_a_wandb_tracker_object_of_the_users_own_logs_in_process_with_the_same_rows(wandb_env, tmp_path):
    mine = accelerate.tracking.WandBTracker("p", dir=str(tmp_path), mode="offline", name="mine")
    accelerator = make_accelerator(log_with=[mine])
    subscriber = WandbSubscriber(accelerator=accelerator, project="p", run_name="mine", config={},
                                 run_dir=tmp_path, stage="rqvae", key_map=RQVAE.key_map, mode="offline")
    subscriber.start()
    subscriber.connect()
    try:
        assert not isinstance(subscriber.run, RemoteRun)  # the user's tracker, as built
        with signals.strict():
            signals.codebook_usage.send(None, stage="rqvae", epoch=0, layer=0, counts=np.arange(K),
                                        utilization=0.875, perplexity=6.5, gini=0.25, dead_codes=1)
            signals.epoch_end.send(None, stage="rqvae", phase="rqvae", epoch=0, losses={"loss_total": 0.5})
    finally:
        subscriber.finish("completed")
    records = inspect_records(tmp_path)
    assert logged(records, "train/loss_total") == [(0, 0.5)]
    assert logged(records, "codebook/layer0/usage.values") == [(0, list(range(K)))]
    assert logged(records, "codebook/layer0/utilization") == [(0, 0.875)]


def test_an_error_in_the_wandb_process_is_raised_in_the_training_process(wandb_env, tmp_path):
    tracker = WandbProcessTracker("p", name="r", dir=str(tmp_path), mode="offline", id="errorcase1",
                                  settings={"finish_timeout": 30})
    tracker.start()
    try:
        tracker.run.define_metric("x", step_metric=object())  # W&B rejects it, in its own process
        with pytest.raises(WandbProcessError, match="step_metric"):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                tracker.run.log({"epoch": 0})
                time.sleep(0.2)
    finally:
        tracker.finish()


def test_finish_waits_for_a_slow_wandb_process_until_it_has_finished():
    import threading
    from multiprocessing import Pipe

    ours, theirs = Pipe()

    def slow_child():  # W&B uploading for a while, reporting an error first
        assert theirs.recv() == ("finish", 1)
        theirs.send(("error", "RuntimeError: late"))
        time.sleep(2.5)
        theirs.send(("finished",))

    child = threading.Thread(target=slow_child)
    child.start()
    start = time.monotonic()
    RemoteRun(ours, None, "r", finish_timeout=60).finish(exit_code=1)
    assert time.monotonic() - start >= 2.5
    child.join()


def test_a_failed_wandb_start_is_an_error_naming_the_cause(wandb_env, tmp_path):
    tracker = WandbProcessTracker("p", name="r", dir=str(tmp_path), mode="offline", id="bad/id!",
                                  settings={"finish_timeout": 5})
    with pytest.raises(WandbProcessError, match="UsageError: Run ID cannot contain"):
        tracker.start()


def test_non_main_process_starts_and_connects_nothing(monkeypatch, tmp_path):
    accelerator = make_accelerator(log_with="wandb")
    monkeypatch.setattr(type(accelerator), "is_main_process", property(lambda self: False))
    subscriber = WandbSubscriber(accelerator=accelerator, project=JOINT.project, run_name="r",
                                 config={}, run_dir=tmp_path / "run", stage="joint", key_map=JOINT.key_map, mode="offline")
    subscriber.start()
    subscriber.connect()
    assert subscriber.run is None and accelerator.trackers == []
    assert subscriber.on_epoch_end not in list(signals.epoch_end.receivers_for(None))
    assert not (tmp_path / "run").exists()
    subscriber.finish("failed")


def test_accelerator_without_a_tracker_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="needs an Accelerator with a tracker, got log_with=\\[\\]"):
        WandbSubscriber(accelerator=make_accelerator(), project=JOINT.project, run_name="r",
                        config={}, run_dir=tmp_path, stage="joint", key_map=JOINT.key_map)


def test_mode_is_offline_without_credentials(tmp_path):
    no_netrc = {"NETRC": str(tmp_path / "missing")}
    assert resolve_mode(None, environ=no_netrc) == "offline"
    assert resolve_mode(None, environ={**no_netrc, "WANDB_API_KEY": "x" * 40}) == "online"
    assert resolve_mode(None, environ={**no_netrc, "WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_mode("offline", environ={"WANDB_API_KEY": "x"}) == "offline"


def test_mode_is_online_with_a_netrc_entry(tmp_path):
    path = tmp_path / "netrc"
    path.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    path.chmod(0o600)
    assert resolve_mode(None, environ={"NETRC": str(path)}) == "online"


def test_invalid_mode_is_an_error():
    with pytest.raises(ValueError, match="wandb mode 'cloud'"):
        resolve_mode("cloud")


def test_usage_histogram_keeps_codes_as_unit_bins():
    values, edges = usage_histogram(np.arange(6))
    assert values.tolist() == list(range(6)) and edges.tolist() == list(range(7))


def test_usage_histogram_merges_adjacent_codes_above_512():
    counts = np.ones(1025, dtype=np.int64)
    values, edges = usage_histogram(counts)
    assert len(values) <= 512 and len(edges) == len(values) + 1
    assert values.sum() == 1025 and edges[0] == 0 and edges[-1] == 1025
    assert values[0] == 3 and values[-1] == 1025 - 3 * (len(values) - 1)


def test_a_training_process_killed_during_wandb_start_up_leaves_no_child_traceback(tmp_path, wandb_env):
    # What a SIGKILL of the training process looks like to W&B's child: its socket closes right after
    # it was asked for a run, while wandb.init is still starting.
    import socket
    import subprocess
    import sys
    from multiprocessing.connection import Connection

    ours, theirs = socket.socketpair()
    with ours, theirs:
        child = subprocess.Popen([sys.executable, "-m", "etegrec.hooks.wandb_child", str(theirs.fileno())],
                                 pass_fds=[theirs.fileno()], stderr=subprocess.PIPE, text=True)
        conn = Connection(ours.detach())
    conn.send(("init", {"project": "t", "name": "t", "dir": str(tmp_path), "mode": "offline",
                        "settings": {"console": "off"}}))
    conn.close()  # gone before the child could answer "started"
    _, err = child.communicate(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
