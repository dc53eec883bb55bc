"""Accelerate trackers other than W&B (TensorBoard), read back from the event files they write."""
from __future__ import annotations

import importlib.util
import re
import struct
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_accelerator, write_structured_inter
from etegrec import signals
from etegrec.config import load_config
from etegrec.hooks.wandb import WandbSubscriber, flat_config
from etegrec.training import joint
from etegrec.training.run.cli import common_parser
from etegrec.training.run.options import RunOptions, check_trackers
from etegrec.training.run import Run
from test_wandb import K, ListTracker, emit_joint, inspect_records, logged
from etegrec.training.joint import JOINT

accelerate = pytest.importorskip("accelerate")
event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")

CONFIG = {"seed": 7, "tokenizer": {"code_num": K, "hidden_dims": [64, 32]}, "joint": {"lr_rec": 0.005}}


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every scalar in ``folder``'s event files (TFRecord framing, no TensorFlow).

    Only ``folder`` itself: ``add_hparams`` writes its own event files into sub-folders.
    """
    scalars = defaultdict(list)
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)  # then a crc of the length, the record, its crc
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars[value.tag].append((event.step, value.simple_value))
    return dict(scalars)


def run_joint_signals(run_dir: Path, log_with: list[str]) -> tuple[WandbSubscriber, Path]:
    """Emit the joint stage's signal sequence through a subscriber on ``log_with``; finish it."""
    accelerator = make_accelerator(log_with=log_with, project_dir=run_dir)
    subscriber = WandbSubscriber(accelerator=accelerator, project=JOINT.project, run_name="tb", config=CONFIG,
                                 run_dir=run_dir, stage="joint", key_map=JOINT.key_map, mode="offline")
    subscriber.start()
    subscriber.connect()
    with signals.strict():
        emit_joint()
        signals.run_finished.send(None, stage="joint", status="completed", best_metrics={"ndcg@10": 0.5},
                                  best_checkpoint=None, seconds=3.0)
    return subscriber, run_dir / JOINT.project  # accelerate's TensorBoard folder: logging_dir/project


@pytest.fixture(scope="module")
def both(wandb_env, tmp_path_factory):
    subscriber, folder = run_joint_signals(tmp_path_factory.mktemp("both"), ["wandb", "tensorboard"])
    return {"subscriber": subscriber, "scalars": tensorboard_scalars(folder), "folder": folder,
            "records": inspect_records(folder.parent)}


@pytest.fixture(scope="module")
def tensorboard_only(wandb_env, tmp_path_factory):
    subscriber, folder = run_joint_signals(tmp_path_factory.mktemp("alone"), ["tensorboard"])
    return {"subscriber": subscriber, "scalars": tensorboard_scalars(folder), "folder": folder}


def tag(key: str) -> str:
    """``key`` as TensorBoard stores it: tensorboardX (Accelerate's writer when the tensorboard
    package is absent) writes characters outside ``[-/\\w.]`` as ``_``; torch's writer keeps them."""
    return re.sub(r"[^-/\w.]", "_", key) if importlib.util.find_spec("tensorboard") is None else key


# what emit_joint sends, keyed as on W&B, with the epoch as TensorBoard's step
EXPECTED = {
    "train/rec_loss_total": [(1, 2.0)],
    "train/id_loss_total": [(0, 3.0), (2, 3.0)],
    "train/id_vq_loss": [(0, 0.5), (2, 0.5)],
    "lr/id_lr": [(0, 1e-4), (2, 2e-4)],
    "lr/rec_lr": [(1, 5e-3), (3, 1e-3)],
    "eval/ndcg@10": [(0, 0.125), (1, 1.125), (2, 2.125)],
    "test/ndcg@10": [(1, 0.375)],
    "monitor/max_conflict": [(0, 2), (2, 4)],
    "monitor/codes_changed": [(0, 1.0), (2, 0.3)],
    "codebook/layer0/gini": [(0, 0.125), (2, 0.125)],
}


@pytest.mark.parametrize("trackers", ["both", "tensorboard_only"])
def test_tensorboard_gets_the_scalars_with_epoch_as_step(trackers, request):
    scalars = request.getfixturevalue(trackers)["scalars"]
    for key, expected in EXPECTED.items():
        assert scalars.get(tag(key)) == [(step, pytest.approx(v)) for step, v in expected], key
    assert "train/loss_total" not in scalars  # the rqvae payload emit_joint also sends
    assert "epoch" not in scalars  # it is the step
    assert not any("usage" in key for key in scalars)  # histograms are for W&B only


def test_wandb_alongside_tensorboard_keeps_rows_histograms_and_nested_config(both):
    records = both["records"]
    assert logged(records, "eval/ndcg@10") == [(0, 0.125), (1, 1.125), (2, 2.125)]
    assert any("codebook/layer0/usage._type" in r["history"]["item"] for r in records if r["type"] == "history")
    config = {}
    for r in records:
        if r["type"] == "config":
            config.update(r["config"]["update"])
    assert config["tokenizer"] == {"code_num": K, "hidden_dims": [64, 32]}


@pytest.mark.parametrize("trackers", ["both", "tensorboard_only"])
def test_tensorboard_hparams_are_the_flattened_config(trackers, request):
    (hparams,) = request.getfixturevalue(trackers)["folder"].glob("*/hparams.yml")
    assert yaml.safe_load(hparams.read_text()) == {"seed": 7, "tokenizer.code_num": K,
                                                   "tokenizer.hidden_dims": "[64, 32]", "joint.lr_rec": 0.005}


def test_tensorboard_alone_starts_no_wandb_run(tensorboard_only):
    assert tensorboard_only["subscriber"].run is None
    assert not (tensorboard_only["folder"].parent / "wandb").exists()


def test_start_twice_starts_each_tracker_once(wandb_env, tmp_path):
    accelerator = make_accelerator(log_with=["tensorboard"], project_dir=tmp_path)
    subscriber = WandbSubscriber(accelerator=accelerator, project=JOINT.project, run_name="r", config={},
                                 run_dir=tmp_path, stage="joint", key_map=JOINT.key_map)
    subscriber.start()
    subscriber.start()
    subscriber.finish()
    assert [t.name for t in accelerator.trackers] == ["tensorboard"]


def test_flat_config_joins_keys_and_turns_lists_into_strings():
    assert flat_config({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": None, "f": True}) == {
        "a.b.c": 1, "a.d": "[1, 2]", "e": None, "f": True}


def test_wandb_mode_disabled_drops_wandb_and_keeps_the_other_trackers(tmp_path):
    config = load_config("tiny")
    run = Run(config, RunOptions.resolve(config, output_dir=tmp_path, wandb_mode="disabled",
                                         log_with=("wandb", "tensorboard"), console=False), stage=JOINT)
    assert [str(t) for t in run.accelerator.log_with] == ["tensorboard"]
    assert run.accelerator.logging_dir == str(tmp_path / "tensorboard")
    assert any(isinstance(s, WandbSubscriber) for s in run.subscribers)
    alone = Run(config, RunOptions.resolve(config, output_dir=tmp_path, wandb_mode="disabled", console=False),
                stage=JOINT)
    assert not alone.accelerator.log_with and not any(isinstance(s, WandbSubscriber) for s in alone.subscribers)


def test_a_tracker_object_in_run_options_gets_the_runs_scalars(tmp_path):
    config = load_config("tiny")
    mine = ListTracker()
    run = Run(config, RunOptions.resolve(config, output_dir=tmp_path, wandb_mode="disabled", log_with=(mine,),
                                         console=False), stage=JOINT)
    with run, signals.strict():
        signals.evaluated.send(None, stage="joint", split="valid", epoch=2, metrics={"ndcg@10": 0.25})
    assert run.accelerator.trackers == [mine]
    assert mine.rows == [(2, {"eval/ndcg@10": 0.25})]


def test_log_with_option_parses_names_and_none():
    parser = common_parser("prog", "test")
    assert parser.parse_args([]).log_with == ("wandb",)
    assert parser.parse_args(["--log-with", "wandb,tensorboard"]).log_with == ("wandb", "tensorboard")
    assert parser.parse_args(["--log-with", "none"]).log_with == ()


def test_unknown_tracker_is_an_error():
    with pytest.raises(ValueError, match="unknown tracker 'tensorbord' in log_with"):
        check_trackers(["tensorbord"])


def test_joint_command_logs_to_tensorboard(tmp_path, capsys):
    torch.set_num_threads(1)
    inter = write_structured_inter(tmp_path / "structured.inter")
    out = tmp_path / "run"
    argv = ["--config", "tiny", "--log-with", "tensorboard", "--data-path", str(inter), "--output-dir", str(out)]
    for item in ["data.dataset=structured", "data.max_users=null", "embed.epochs=1", "rqvae.epochs=2",
                 "rqvae.eval_step=1", "joint.epochs=2", "joint.cycle=2", "losses.align_from_epoch=1",
                 "evaluation.every_epochs=1", "joint.finetune_epochs=0"]:
        argv += ["--set", item]
    assert joint.main(argv) == 0, capsys.readouterr().err
    scalars = tensorboard_scalars(out / "tensorboard" / JOINT.project)
    assert [step for step, _ in scalars[tag("eval/ndcg@10")]] == [0, 1]
    assert [step for step, _ in scalars["train/id_loss_total"]] == [0]
    assert [step for step, _ in scalars["train/rec_loss_total"]] == [1]
    assert [step for step, _ in scalars["monitor/max_conflict"]] == [0, 1]
    assert not (out / "wandb").exists()
