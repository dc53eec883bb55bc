"""Two CPU processes (torchrun, gloo): one W&B run, one event log, the same values and codes on
every rank, and the metrics of a one-process evaluation of the same checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_accelerator, run_while_embed_stage_held, write_structured_inter
from etegrec.hooks.eventlog import read_events

RECORDER = """
import hashlib, json, os, time

from etegrec.training.run import pipeline

if os.environ.get("RANK") == "1" and float(os.environ["RANK1_LATE"]):  # rank 1 comes late to each cached stage
    def late_stage_dir(*args, _stage_dir=pipeline.stage_dir):
        time.sleep(float(os.environ["RANK1_LATE"]))
        return _stage_dir(*args)
    pipeline.stage_dir = late_stage_dir

class Recorder:
    # every rank writes what it saw into its own file
    def __init__(self):
        self.path = os.path.join(os.environ["RANK_RECORDS"], f"rank{os.environ.get('RANK', '0')}.jsonl")

    def _write(self, **record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\\n")

    def on_epoch_end(self, sender, *, stage, phase, epoch, losses, **payload):
        self._write(signal="epoch_end", stage=stage, phase=phase, epoch=epoch, losses=losses)

    def on_evaluated(self, sender, *, stage, split, epoch, metrics, **payload):
        self._write(signal="evaluated", stage=stage, split=split, epoch=epoch, metrics=metrics)

    def on_codebook_usage(self, sender, *, stage, epoch, layer, counts, **payload):
        self._write(signal="codebook_usage", stage=stage, epoch=epoch, layer=layer, counts=counts.tolist())

    def on_codes_assigned(self, sender, *, epoch, codes, **payload):
        digest = hashlib.sha256(bytes(memoryview(codes.tobytes()))).hexdigest()
        self._write(signal="codes_assigned", epoch=epoch, codes=digest)
"""


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    write_structured_inter(root / "data.inter", n_users=60)
    (root / "recorder.py").write_text(RECORDER)

    def command(module: str, name: str, *extra: str, home: str = "home",
                rank1_late: float = 0) -> tuple[list[str], dict[str, str]]:
        (root / f"{name}-records").mkdir()
        # two CPU processes on any machine: on a one-GPU machine both ranks would share the GPU,
        # which NCCL refuses ("invalid usage")
        env = {**os.environ, "ETEGREC_HOME": str(root / home), "RANK_RECORDS": str(root / f"{name}-records"),
               "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "RANK1_LATE": str(rank1_late)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", module, "--config", "tiny", "--data-path", str(root / "data.inter"),
               "--output-dir", str(root / name), "--wandb-mode", "offline",
               "--subscriber", f"{root / 'recorder.py'}:Recorder", *extra]
        return cmd, env

    def run(module: str, name: str, *extra: str, **how) -> tuple[Path, Path, subprocess.CompletedProcess]:
        cmd, env = command(module, name, *extra, **how)
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        return root / name, root / f"{name}-records", result

    run.root = root
    run.command = command
    return run


RECOMMENDERS = {  # the paper's recommender, and the ml-100k config's (item tokens, windows, renormalised)
    "paper-recommender": [],
    "ml-100k-recommender": ["--set", "recommender.encoder_input=items", "--set", "recommender.repeat_bias=true",
                            "--set", "joint.targets=all", "--set", "recommender.renormalize=true"],
}


@pytest.fixture(scope="module", params=list(RECOMMENDERS))
def joint_run(launch, request):
    return launch("etegrec.training.joint", f"joint-{request.param}", "--set", "joint.batch_size=16", "--set",
                  "joint.sample_fraction=1.0", *RECOMMENDERS[request.param])


def _records(records: Path) -> tuple[list[dict], list[dict]]:
    files = sorted(records.glob("rank*.jsonl"))
    assert [f.name for f in files] == ["rank0.jsonl", "rank1.jsonl"]
    return tuple([json.loads(line) for line in f.read_text().splitlines()] for f in files)


def test_joint_run_has_one_wandb_run_one_event_log_and_a_world_of_two(joint_run):
    run_dir, _, result = joint_run
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert [p.name for p in run_dir.rglob("events*.jsonl")] == ["events.jsonl"]
    events = read_events(run_dir / "events.jsonl")
    assert {e["rank"] for e in events} == {0}
    started = [e for e in events if e["signal"] == "run_started"]
    assert [(s["world_size"], s["rank"]) for s in started] == [(2, 0)]
    assert result.stdout.count("run directory:") == 1  # only the main rank prints
    assert result.stdout.count("python -m etegrec.report") == 1


def test_every_rank_emits_the_same_losses_counts_metrics_and_codes(joint_run):
    _, records, _ = joint_run
    rank0, rank1 = _records(records)
    assert [r["signal"] for r in rank0] == [r["signal"] for r in rank1]
    for a, b in zip(rank0, rank1):
        if a["signal"] == "epoch_end":
            assert a["losses"] == pytest.approx(b["losses"], abs=1e-6)
        else:
            assert a == b
    joint_epochs = [r["epoch"] for r in rank0 if r["signal"] == "epoch_end" and r["stage"] == "joint"]
    assert joint_epochs == list(range(5))
    assert [r for r in rank0 if r["signal"] == "codes_assigned"]


def test_the_event_log_holds_the_reduced_values_every_rank_saw(joint_run):
    run_dir, records, _ = joint_run
    rank0, _ = _records(records)
    logged = [(e["epoch"], e["losses"]) for e in read_events(run_dir / "events.jsonl") if e["signal"] == "epoch_end"]
    seen = [(r["epoch"], r["losses"]) for r in rank0 if r["signal"] == "epoch_end" and r["stage"] == "joint"]
    assert logged == seen


def test_test_metrics_equal_a_one_process_evaluation_of_the_same_checkpoint(joint_run, launch, monkeypatch):

    from etegrec.config import load_config
    from etegrec.training.run.cache import load_stage_data
    from etegrec.training.embed import EMBED
    from etegrec.training.joint import JOINT, JointTrainer
    from etegrec.training.run.options import RunOptions
    from etegrec.training.run.pipeline import ensure
    from etegrec.training.rqvae import RQVAE
    from etegrec.training.run import Run

    run_dir, _, _ = joint_run
    monkeypatch.setenv("ETEGREC_HOME", str(launch.root / "home"))  # the stages the 2-process run built
    config = load_config(str(run_dir / "config.yaml"))
    data = load_stage_data(config)
    accelerator = make_accelerator()
    embeddings, tokenizer_state = (ensure(stage, config, data, accelerator) for stage in (EMBED, RQVAE))
    with Run(config, RunOptions(output_dir=launch.root / f"one-process-{run_dir.name}", console=False),
             stage=JOINT, accelerator=accelerator) as run:
        trainer = JointTrainer(config, run, data, embeddings, tokenizer_state)
        trainer.load_state_dict(torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True))
        one_process = trainer.evaluate("test")
    two_processes = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert one_process == pytest.approx(two_processes, abs=1e-6)


def test_tokenizer_pretraining_on_two_processes(launch):
    # its own ETEGREC_HOME, so that the item embeddings it needs are trained as a cached stage, with rank 1
    # coming to that stage late: it must join rank 0's training of it, not wait for rank 0's lock to go
    run_dir, records, result = launch("etegrec.training.rqvae", "rqvae", home="rqvae-home", rank1_late=5)
    assert result.stdout.count("[embed] no cached item embeddings for this config; training it in") == 1
    assert "waiting for it to end" not in result.stdout
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    rank0, rank1 = _records(records)
    mine = [r for r in rank0 if r.get("stage") == "rqvae"]
    assert mine == [r for r in rank1 if r.get("stage") == "rqvae"]  # reduced: the same everywhere
    assert [r["epoch"] for r in mine if r["signal"] == "epoch_end"] == list(range(6))
    logged = [e["losses"] for e in read_events(run_dir / "events.jsonl") if e["signal"] == "epoch_end"]
    assert logged == [r["losses"] for r in mine if r["signal"] == "epoch_end"]


def test_a_two_process_run_waits_for_another_command_training_a_stage_it_needs(launch):
    cmd, env = launch.command("etegrec.training.rqvae", "rqvae-waits", home="waiting-home")
    log = launch.root / "rqvae-waits.log"  # both ranks wait, then reuse what the other command built
    holder, folder = run_while_embed_stage_held(["--config", "tiny", "--data-path", str(launch.root / "data.inter")],
                                                cmd, log, env)
    text = log.read_text()
    assert text.count(f"[embed] another run (pid {holder}) is training the cached item embeddings for this "
                      f"config in {folder}; waiting for it to end") == 1  # the main rank says it
    assert "[embed] no cached" not in text  # reused, not trained again
    assert (launch.root / "rqvae-waits" / "metrics.json").exists()


def test_a_half_set_launch_environment_is_one_clear_error(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2",  # one of torchrun's variables, without the others
           "CUDA_VISIBLE_DEVICES": ""}  # the CPU launch this test is about, on any machine
    result = subprocess.run([sys.executable, "-m", "etegrec.training.rqvae", "--config", "tiny", "--data-path",
                             str(write_structured_inter(tmp_path / "d.inter")), "--wandb-mode", "disabled",
                             "--output-dir", str(tmp_path / "run")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "processes of this launch could not be set up" in result.stderr and "MASTER_ADDR" in result.stderr
    assert "Traceback" not in result.stderr
