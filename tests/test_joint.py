"""A tiny real joint run, checked through its signals, run directory and W&B records."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from conftest import write_structured_inter
from etegrec import signals
from etegrec.config import ConfigError, load_config
from etegrec.forge import assign_codes
from etegrec.training.joint import JointTrainer
from etegrec.training.run.options import RunOptions
from etegrec.training.run import Run
from etegrec.training.run.cache import load_stage_data
from etegrec.training.joint import JOINT
from etegrec.training.run.pipeline import run_stage

WANDB = str(Path(sys.executable).with_name("wandb"))
REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["data.dataset=structured", "data.max_users=null", "embed.epochs=2", "rqvae.epochs=6",
             "rqvae.eval_step=2", "joint.epochs=4", "joint.cycle=2", "losses.align_from_epoch=1",
             "evaluation.every_epochs=1", "evaluation.patience=10", "joint.finetune_epochs=1"]


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    inter = write_structured_inter(root / "structured.inter")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ETEGREC_HOME", str(root / "home"))
        config = load_config("tiny", [f"data.data_path={inter}", *OVERRIDES])
        with signals.recording() as events:
            result = run_stage(JOINT, config, output_dir=root / "run", wandb_mode="offline")
    return {"config": config, "events": events, "result": result, "out": root / "run", "root": root,
            "inter": inter}


def joint_events(run, name=None):
    return [e for e in run["events"] if e.payload.get("stage") == "joint" and (name is None or e.signal == name)]


def test_epochs_follow_the_cycle_then_finetune(joint_run):
    phases = [e.payload["phase"] for e in joint_events(joint_run, "epoch_end")]
    assert phases == ["id", "rec", "id", "rec", "finetune"]
    assert joint_events(joint_run, "run_started")[0].payload["phases"] == phases  # the plan the console times
    assert [e.payload["epoch"] for e in joint_events(joint_run, "epoch_end")] == [0, 1, 2, 3, 4]


def test_codes_are_assigned_at_the_start_and_after_every_id_epoch(joint_run):
    sequence = [(e.signal, e.payload.get("phase")) for e in joint_events(joint_run)
                if e.signal in ("epoch_end", "codes_assigned")]
    assert sequence == [("codes_assigned", None), ("epoch_end", "id"), ("codes_assigned", None),
                        ("epoch_end", "rec"), ("epoch_end", "id"), ("codes_assigned", None),
                        ("epoch_end", "rec"), ("epoch_end", "finetune")]
    assert [e.payload["epoch"] for e in joint_events(joint_run, "codes_assigned")] == [0, 1, 3]


def test_codes_assigned_payload_matches_what_its_codes_imply(joint_run):
    for e in joint_events(joint_run, "codes_assigned"):
        codes = np.asarray(e.payload["codes"])
        assert e.payload["max_conflict"] == codes[:, -1].max() + 1
        assert e.payload["max_conflict"] <= joint_run["config"].tokenizer.codebook_size
        assert assign_codes(codes[:, :-1], 16, use_forge=False).max_conflict == e.payload["max_conflict"]


def test_item_codes_tsv_holds_the_best_checkpoints_codes_by_raw_item_id(joint_run):
    lines = (joint_run["out"] / "item_codes.tsv").read_text().splitlines()
    assert lines[0] == "item_id\tc0\tc1\tc2\tsuffix"
    rows = [line.split("\t") for line in lines[1:]]
    data = load_stage_data(joint_run["config"])
    assert [r[0] for r in rows] == list(data.item_map)  # raw ids, as the data file spells them
    table = np.array([[int(v) for v in r[1:]] for r in rows])
    best = torch.load(joint_run["out"] / "checkpoints" / "best.pt", weights_only=True)
    np.testing.assert_array_equal(table, best["codes"][1:].numpy())
    # the codes validated at the best epoch: those of the last refresh up to it (a refresh after tokenizer
    # epoch e serves from e + 1 on, and epoch e is validated after it)
    refreshed = [e for e in joint_events(joint_run, "codes_assigned") if e.payload["epoch"] <= best["epoch"] + 1]
    np.testing.assert_array_equal(table, np.asarray(refreshed[-1].payload["codes"]))


def test_validation_every_epoch_then_test_then_run_finished_last(joint_run):
    mine = [e for e in joint_run["events"] if e.payload.get("stage") == "joint"]
    assert mine[0].signal == "run_started" and mine[-1].signal == "run_finished"
    evaluated = [(e.payload["split"], e.payload["epoch"]) for e in mine if e.signal == "evaluated"]
    best_epoch = json.loads((joint_run["out"] / "metrics.json").read_text())["best_epoch"]
    assert evaluated == [("valid", 0), ("valid", 1), ("valid", 2), ("valid", 3), ("valid", 4), ("test", best_epoch)]
    assert mine[-1].payload["status"] == "completed"


def test_alignment_weights_are_off_during_warm_up_and_on_after(joint_run):
    weights = {e.payload["epoch"]: e.payload["weights"] for e in joint_events(joint_run, "epoch_end")}
    assert weights[0] == {"vq_loss": 1.0, "code_loss": 1.0, "kl_loss": 0.0, "dec_cl_loss": 0.0}
    assert weights[1] == {"code_loss": 1.0, "kl_loss": 1e-4, "dec_cl_loss": 3e-4}
    assert weights[2] == {"vq_loss": 1.0, "code_loss": 1.0, "kl_loss": 1e-4, "dec_cl_loss": 3e-4}
    assert weights[4] == {"code_loss": 1.0}


def test_epoch_losses_are_finite_and_their_weighted_sum_is_the_loss(joint_run):
    for e in joint_events(joint_run, "epoch_end"):
        losses, weights = e.payload["losses"], e.payload["weights"]
        assert all(math.isfinite(v) for v in losses.values())
        expected = sum(w * losses[k] for k, w in weights.items() if w > 0)
        assert losses["loss_total"] == pytest.approx(expected, rel=1e-5)
    id_epoch = joint_events(joint_run, "epoch_end")[2].payload["losses"]
    assert {"vq_loss", "code_loss", "kl_loss", "dec_cl_loss", "loss_total"} <= set(id_epoch)


def test_learning_rates_follow_cosine_schedules_with_warm_up(joint_run):
    config = joint_run["config"]
    n_train = len(load_stage_data_at(joint_run).train_target)
    steps = math.ceil(n_train / config.joint.batch_size)
    warmup = min(steps * 2 // 2, round(config.joint.lr_warmup_epochs * steps))

    def lr_after(base, n_epochs_total, done_steps):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
        total = n_epochs_total * steps
        sched = get_cosine_schedule_with_warmup(opt, min(total // 2, warmup), total)
        for _ in range(done_steps):
            opt.step()
            sched.step()
        return opt.param_groups[0]["lr"]

    lrs = {e.payload["epoch"]: e.payload["lr"] for e in joint_events(joint_run, "epoch_end")}
    # id: 2 id epochs; rec: 2 rec epochs + 1 finetune epoch
    assert lrs[0]["id"] == pytest.approx(lr_after(config.joint.lr_id, 2, steps))
    assert lrs[2]["id"] == pytest.approx(lr_after(config.joint.lr_id, 2, 2 * steps))
    assert lrs[1]["rec"] == pytest.approx(lr_after(config.joint.lr_rec, 3, steps))
    assert lrs[3]["rec"] == pytest.approx(lr_after(config.joint.lr_rec, 3, 2 * steps))


def load_stage_data_at(run):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ETEGREC_HOME", str(run["root"] / "home"))
        return load_stage_data(run["config"])


def test_metrics_json_holds_the_best_valid_and_its_test_metrics(joint_run):
    saved = json.loads((joint_run["out"] / "metrics.json").read_text())
    assert saved["stage"] == "joint"
    assert saved["test"] == pytest.approx(joint_run["result"]["test"])
    assert set(saved["test"]) == {"recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10"}
    best = max(e.payload["metrics"]["ndcg@10"] for e in joint_events(joint_run, "evaluated")
               if e.payload["split"] == "valid")
    assert saved["valid"]["ndcg@10"] == pytest.approx(best)


def test_wandb_run_holds_every_joint_key(joint_run):
    log_file = next((joint_run["out"] / "wandb").glob("offline-run-*/run-*.wandb"))
    records = [json.loads(line) for line in subprocess.run(
        [WANDB, "leet", "inspect", "--json", str(log_file)], capture_output=True, text=True, check=True,
    ).stdout.splitlines() if line.strip()]
    run = next(r["run"] for r in records if r["type"] == "run")
    # no run.name set: the run is named after its (unique) run directory
    assert run["project"] == "ETEGRec-Joint" and run["display_name"] == "run"
    # the program and arguments are the training process's (here pytest's), not W&B's own child's
    environment = next(r["environment"] for r in records if r["type"] == "environment")
    assert environment.get("args", []) == sys.argv[1:] and "wandb_child" not in environment["program"]  # none: left out
    # the final code table travels with the run as an artifact
    artifact = next(r["artifact"] for r in records if r["type"] == "artifact")
    assert artifact["name"] == f"item-codes-{run['run_id']}" and artifact["type"] == "item-codes"
    assert [c["path"] for c in artifact["manifest"]["contents"]] == ["item_codes.tsv"]
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    keys = set().union(*rows)
    expected = {"epoch", "train/rec_loss_total", "train/rec_code_loss", "train/rec_kl_loss", "train/rec_dec_cl_loss",
                "lr/rec_lr", "train/id_loss_total", "train/id_vq_loss", "train/id_code_loss", "train/id_kl_loss",
                "train/id_dec_cl_loss", "lr/id_lr", "monitor/max_conflict", "monitor/max_conflict_before_forge",
                "monitor/collision_rate", "monitor/codes_changed", "eval/recall@5", "eval/recall@10",
                "eval/ndcg@5", "eval/ndcg@10", "test/ndcg@10", "codebook/layer0/utilization",
                "codebook/layer2/perplexity", "codebook/layer1/usage._type"}
    assert expected <= keys, expected - keys
    logged = [row["monitor/max_conflict"] for row in rows if "monitor/max_conflict" in row]
    assert logged == [e.payload["max_conflict"] for e in joint_events(joint_run, "codes_assigned")]
    assert all("epoch" in row for row in rows if any(k.startswith(("train/", "eval/", "monitor/")) for k in row))


def test_a_subscriber_given_on_the_command_line_receives_the_signals(joint_run, tmp_path):
    seen = tmp_path / "seen.txt"
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os\n"
        "def record(sender, *, signal, **payload):\n"
        "    with open(os.environ['PROBE_OUT'], 'a') as f:\n"
        "        f.write(signal + '\\n')\n")
    env = {**os.environ, "ETEGREC_HOME": str(joint_run["root"] / "home"), "PROBE_OUT": str(seen)}
    cmd = [sys.executable, "-m", "etegrec.training.joint", "--config", "tiny", "--wandb-mode", "disabled",
           "--data-path", str(joint_run["inter"]), "--output-dir", str(tmp_path / "run"),
           "--subscriber", f"{probe}:record", "--subscriber", "examples/conflict_watch.py:ConflictWatch"]
    for item in OVERRIDES + ["joint.epochs=2", "joint.finetune_epochs=0"]:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    received = seen.read_text().split()
    assert {"epoch_end", "codes_assigned", "evaluated", "run_finished"} <= set(received)
    assert "test" in proc.stdout and "run directory" in proc.stdout
    assert "[conflict-watch] epoch 0: max_conflict" in proc.stdout


def test_paper_config_builds_the_paper_model_and_takes_a_training_step(tmp_path, inter_file):
    config = load_config("paper", [f"data.data_path={inter_file}", "data.dataset=synthetic",
                                   "joint.batch_size=8", "joint.lr_warmup_epochs=0"])
    data = load_stage_data(config)
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(data.n_items + 1, 256)).astype(np.float32)
    from etegrec.training.rqvae import build_tokenizer, tokenizer_inputs
    tokenizer = build_tokenizer(config.tokenizer, 256)
    tokenizer.kmeans_init_from(torch.as_tensor(tokenizer_inputs(config.tokenizer, embeddings)[1:]))
    with Run(config, RunOptions(output_dir=tmp_path / "run", console=False), stage=JOINT) as run:
        trainer = JointTrainer(config, run, data, embeddings, tokenizer.state_dict())
        t5 = trainer.recommender
        assert (len(t5.encoder.block), len(t5.decoder.block)) == (6, 6)
        attention = t5.encoder.block[0].layer[0].SelfAttention
        assert (t5.d_model, attention.n_heads, attention.key_value_proj_dim) == (128, 4, 64)
        assert t5.encoder.block[0].layer[1].DenseReluDense.wi.out_features == 512
        with trainer.hooks:
            trainer.refresh_codes(0)
            trainer.set_phase("rec")
            before = t5.code_embedding.detach().clone()
            parts = trainer.losses(np.arange(8), phase="rec", weights=trainer.weights("rec", 100))
            parts["loss"].backward()
            trainer.opt_rec.step()
    assert math.isfinite(parts["loss"].item())
    assert not torch.equal(before, t5.code_embedding.detach())


def test_the_conflict_watch_example_works_from_python():
    sys.path.insert(0, str(REPO))
    try:
        from examples.conflict_watch import ConflictWatch
    finally:
        sys.path.remove(str(REPO))
    watch = ConflictWatch(warn_at=0.5)
    codes = np.zeros((4, 4), dtype=np.int64)
    codes[:, 3] = [0, 1, 2, 3]
    with signals.codes_assigned.connected_to(watch.on_codes_assigned), pytest.warns(UserWarning, match="above 50%"):
        signals.codes_assigned.send(None, stage="joint", epoch=3, codes=codes, use_forge=True, policy="round_robin",
                                    max_conflict=4, max_conflict_before=4, collision_rate=0.75, changed=4,
                                    seconds=0.0)
    assert watch.history == [(3, 4)]


def test_early_stopping_ends_the_joint_phase_and_finetuning_still_runs(joint_run, tmp_path, monkeypatch):
    monkeypatch.setenv("ETEGREC_HOME", str(joint_run["root"] / "home"))  # reuse the cached earlier stages
    scores = iter([0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.6])
    monkeypatch.setattr(JointTrainer, "evaluate",
                        lambda self, split: {"ndcg@10": next(scores) if split == "valid" else 0.0})
    config = load_config("tiny", [f"data.data_path={joint_run['inter']}", *OVERRIDES, "evaluation.patience=1",
                                  "joint.epochs=6", "joint.finetune_epochs=1"])
    with signals.recording(signals.epoch_end, signals.evaluated) as events:
        run_stage(JOINT, config, output_dir=tmp_path / "run", wandb_mode="disabled")
    phases = [e.payload["phase"] for e in events if e.signal == "epoch_end"]
    assert phases == ["id", "rec", "finetune"]  # valid fell at epoch 1: joint phase over, fine-tune from epoch 0
    assert [e.payload["epoch"] for e in events if e.signal == "epoch_end"] == [0, 1, 2]


def test_tiny_config_exercises_every_signal(joint_run):
    emitted = {e.signal for e in joint_run["events"]}
    assert emitted == {s.name for s in signals.ALL_SIGNALS}
    steps = [e.payload for e in joint_run["events"] if e.signal == "step_end" and e.payload["stage"] == "joint"]
    assert steps and all(p["step"] % 5 == 0 for p in steps)


def test_without_tokenizer_training_codes_stay_those_of_the_pretrained_tokenizer(joint_run, tmp_path, monkeypatch):
    monkeypatch.setenv("ETEGREC_HOME", str(joint_run["root"] / "home"))  # reuse the cached earlier stages
    config = load_config("tiny", [f"data.data_path={joint_run['inter']}", *OVERRIDES, "joint.train_tokenizer=false",
                                  "losses.rec_kl_weight=0", "losses.rec_dec_cl_weight=0"])
    with signals.recording(signals.epoch_end, signals.codes_assigned) as events:
        run_stage(JOINT, config, output_dir=tmp_path / "run", wandb_mode="disabled")
    assert [e.payload["phase"] for e in events if e.signal == "epoch_end"] == ["rec"] * 4 + ["finetune"]
    assigned = [e for e in events if e.signal == "codes_assigned"]
    assert len(assigned) == 1  # once, from the pretrained tokenizer, never refreshed
    first = next(e for e in joint_events(joint_run, "codes_assigned"))
    assert np.array_equal(np.asarray(assigned[0].payload["codes"]), np.asarray(first.payload["codes"]))
    assert all(set(e.payload["losses"]) == {"code_loss", "loss_total"} for e in events if e.signal == "epoch_end")


def test_id_until_epoch_ends_the_tokenizer_epochs_and_the_codes_stay_those_of_its_last_refresh(joint_run, tmp_path,
                                                                                                  monkeypatch):
    monkeypatch.setenv("ETEGREC_HOME", str(joint_run["root"] / "home"))  # reuse the cached earlier stages
    config = load_config("tiny", [f"data.data_path={joint_run['inter']}", *OVERRIDES, "joint.id_until_epoch=1"])
    with signals.recording(signals.run_started, signals.epoch_end, signals.codes_assigned) as events:
        run_stage(JOINT, config, output_dir=tmp_path / "run", wandb_mode="disabled")
    events = [e for e in events if e.payload.get("stage") == "joint"]
    phases = [e.payload["phase"] for e in events if e.signal == "epoch_end"]
    assert phases == ["id", "rec", "rec", "rec", "finetune"]  # the cycle of 2 would make epoch 2 a tokenizer epoch
    assert next(e for e in events if e.signal == "run_started").payload["phases"] == phases
    assigned = [e for e in events if e.signal == "codes_assigned"]
    assert [e.payload["epoch"] for e in assigned] == [0, 1]  # the start's, then the one after epoch 0
    in_use = np.loadtxt(tmp_path / "run" / "item_codes.tsv", dtype=str, delimiter="\t", skiprows=1)
    assert in_use[:, 1:].astype(int).tolist() == np.asarray(assigned[-1].payload["codes"]).tolist()
    with pytest.raises(ConfigError, match="joint.id_until_epoch.*must be positive"):
        load_config("tiny", ["joint.id_until_epoch=0"])


def test_tokenizer_epochs_train_the_recommender_too_with_id_trains_rec_and_sticky_codes_move_fewer_items(
        joint_run, tmp_path, monkeypatch):
    monkeypatch.setenv("ETEGREC_HOME", str(joint_run["root"] / "home"))  # reuse the cached earlier stages
    config = load_config("tiny", [f"data.data_path={joint_run['inter']}", *OVERRIDES, "joint.id_trains_rec=true",
                                  "codes.margin=0.5"])
    weights = []  # (phase, recommender weights, tokenizer weights) at every epoch's end

    def snapshot(sender, **payload):
        if payload["stage"] == "joint":
            weights.append((payload["phase"], [p.detach().clone() for p in sender.recommender.parameters()],
                            [p.detach().clone() for p in sender.tokenizer.parameters()]))

    signals.epoch_end.connect(snapshot)
    try:
        with signals.recording(signals.epoch_end, signals.codes_assigned) as events:
            run_stage(JOINT, config, output_dir=tmp_path / "run", wandb_mode="disabled")
    finally:
        signals.epoch_end.disconnect(snapshot)
    assert [phase for phase, _, _ in weights] == ["id", "rec", "id", "rec", "finetune"]
    changed = lambda before, after: any(not torch.equal(a, b) for a, b in zip(before, after))  # noqa: E731
    alternating = weights[:4]  # (fine-tuning starts from the best checkpoint's weights)
    for (_, rec_before, tok_before), (phase, rec_after, tok_after) in zip(alternating, alternating[1:]):
        assert changed(rec_before, rec_after), phase  # the recommender trains in every epoch, "id" ones too
        assert changed(tok_before, tok_after) == (phase == "id")
    id_lr = [e.payload["lr"]["rec"] for e in events if e.signal == "epoch_end" and e.payload["phase"] == "id"]
    assert id_lr[0] > 0  # its schedule counts the tokenizer epochs (no such step: still 0 after warm-up's first)
    sticky = [e.payload["changed"] for e in events if e.signal == "codes_assigned"][1:]
    default = [e.payload["changed"] for e in joint_events(joint_run, "codes_assigned")][1:]
    assert sum(sticky) < sum(default)


def test_bf16_mixed_precision_runs_the_recommender_under_autocast_and_keeps_losses_fp32(joint_run, tmp_path):
    data = load_stage_data(joint_run["config"])
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(data.n_items + 1, 256)).astype(np.float32)
    from etegrec.training.rqvae import build_tokenizer, tokenizer_inputs
    tokenizer = build_tokenizer(joint_run["config"].tokenizer, 256)
    tokenizer.kmeans_init_from(torch.as_tensor(tokenizer_inputs(joint_run["config"].tokenizer, embeddings)[1:]))
    losses, dtypes = {}, {}
    for precision in ("fp32", "bf16"):
        config = load_config("tiny", [f"data.data_path={joint_run['inter']}", *OVERRIDES,
                                      f"joint.mixed_precision={precision}", "recommender.dropout=0"])
        with Run(config, RunOptions(output_dir=tmp_path / precision, console=False), stage=JOINT) as run:
            torch.manual_seed(0)
            trainer = JointTrainer(config, run, data, embeddings, tokenizer.state_dict())
            seen = []
            trainer.recommender.encoder.block[0].layer[1].DenseReluDense.wi.register_forward_hook(
                lambda module, args, out: seen.append(out.dtype))
            with trainer.hooks:
                trainer.refresh_codes(0)
                trainer.set_phase("rec")
                parts = trainer.losses(np.arange(16), phase="rec", weights=trainer.weights("rec", 100))
                parts["loss"].backward()
            losses[precision], dtypes[precision] = parts, seen
            assert all(v.dtype == torch.float32 for v in parts.values())
            assert trainer.recommender.code_embedding.grad.dtype == torch.float32
    assert dtypes == {"fp32": [torch.float32], "bf16": [torch.bfloat16]}
    for name, value in losses["fp32"].items():  # bfloat16 keeps ~3 significant digits
        assert losses["bf16"][name].item() == pytest.approx(value.item(), rel=0.03), name
    assert losses["bf16"]["loss"].item() != losses["fp32"]["loss"].item()


def test_catalogue_negatives_contrast_the_decoder_state_with_every_items_reconstruction(joint_run, tmp_path):
    from etegrec.models import catalogue_nce
    from etegrec.training.rqvae import build_tokenizer, tokenizer_inputs
    data = load_stage_data(joint_run["config"])
    embeddings = np.random.default_rng(0).normal(size=(data.n_items + 1, 256)).astype(np.float32)
    tokenizer = build_tokenizer(joint_run["config"].tokenizer, 256)
    tokenizer.kmeans_init_from(torch.as_tensor(tokenizer_inputs(joint_run["config"].tokenizer, embeddings)[1:]))
    config = load_config("tiny", [f"data.data_path={joint_run['inter']}", *OVERRIDES, "losses.cl_negatives=catalogue",
                                  "recommender.dropout=0", "tokenizer.dropout=0"])
    with Run(config, RunOptions(output_dir=tmp_path / "run", console=False), stage=JOINT) as run:
        trainer = JointTrainer(config, run, data, embeddings, tokenizer.state_dict())
        with trainer.hooks:
            trainer.refresh_codes(0)
            index = np.arange(16)
            for phase in ("rec", "id"):
                trainer.set_phase(phase)
                trainer.tokenizer.zero_grad()
                torch.manual_seed(0)
                parts = trainer.losses(index, phase=phase, weights=trainer.weights(phase, 100))
                with torch.no_grad():
                    torch.manual_seed(0)
                    out, target = trainer._forward(torch.as_tensor(index))
                    recon = trainer.tokenizer(trainer.item_emb[1:]).recon
                expected = catalogue_nce(out.decoder_semantic, recon, target - 1, config.losses.cl_temperature)
                assert parts["dec_cl_loss"].item() == pytest.approx(expected.item(), rel=1e-5), phase
                parts["loss"].backward()
                grads = [p.grad for p in trainer.tokenizer.decoder.parameters()]
                # the tokenizer learns from the alignment in its own epochs only
                assert any(g is not None and g.abs().sum() > 0 for g in grads) == (phase == "id"), phase
        # a frozen tokenizer's reconstructions are kept until the trainer loads (or trains) new weights
        trainer.set_phase("rec")
        kept = trainer.alignment.catalogue(train=False)
        assert trainer.alignment.catalogue(train=False) is kept
        state = {k: v + 0.01 for k, v in trainer.tokenizer.state_dict().items()}
        trainer.load_state_dict({**trainer.state_dict(), "tokenizer": state})
        fresh = trainer.alignment.catalogue(train=False)
        assert fresh is not kept and not torch.allclose(fresh, kept)
        with torch.no_grad():
            torch.testing.assert_close(fresh, trainer.tokenizer(trainer.item_emb[1:]).recon)


def test_the_usage_deficit_trains_the_tokenizer_in_its_epochs_once_the_alignment_is_on(joint_run, tmp_path):
    from etegrec.models import usage_deficit
    from etegrec.training.rqvae import build_tokenizer, tokenizer_inputs
    data = load_stage_data(joint_run["config"])
    embeddings = np.random.default_rng(0).normal(size=(data.n_items + 1, 256)).astype(np.float32)
    config = load_config("tiny", [f"data.data_path={joint_run['inter']}", *OVERRIDES, "losses.id_usage_weight=0.5",
                                  "tokenizer.dropout=0"])
    tokenizer = build_tokenizer(config.tokenizer, 256)
    tokenizer.kmeans_init_from(torch.as_tensor(tokenizer_inputs(config.tokenizer, embeddings)[1:]))
    with Run(config, RunOptions(output_dir=tmp_path / "run", console=False), stage=JOINT) as run:
        trainer = JointTrainer(config, run, data, embeddings, tokenizer.state_dict())
        align_from = config.losses.align_from_epoch
        assert trainer.weights("id", align_from)["usage_loss"] == 0.5
        assert trainer.weights("id", align_from - 1)["usage_loss"] == 0.0  # off with the alignment
        assert "usage_loss" not in trainer.weights("rec", align_from)  # the tokenizer's alone
        with trainer.hooks:
            trainer.refresh_codes(0)
            trainer.set_phase("id")
            trainer.tokenizer.zero_grad()
            index = np.arange(16)
            parts = trainer.losses(index, phase="id", weights={"usage_loss": 1.0})
            with torch.no_grad():
                _, target = trainer._forward(torch.as_tensor(index))
                expected = usage_deficit(trainer.tokenizer(trainer.item_emb[target]).logits)
            assert parts["usage_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
            assert parts["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
            parts["loss"].backward()
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.tokenizer.encoder.parameters())


def test_a_second_pass_trains_a_fresh_recommender_on_the_codes_the_alternating_epochs_chose(joint_run, tmp_path,
                                                                                            monkeypatch):
    monkeypatch.setenv("ETEGREC_HOME", str(joint_run["root"] / "home"))  # reuse the cached earlier stages
    config = load_config("tiny", [f"data.data_path={joint_run['inter']}", *OVERRIDES, "joint.second_pass=true",
                                  "recommender.encoder_input=items", "recommender.item_embedding=embed"])
    started = {}
    original = JointTrainer.start_second_pass

    def spy(trainer):  # what the second pass starts from, against a recommender built afresh from the run's seed
        before = torch.get_rng_state()
        original(trainer)
        started["rng_untouched"] = torch.equal(torch.get_rng_state(), before)  # training's random stream goes on
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(trainer.config.run.seed)
            started["fresh"] = trainer._new_recommender().state_dict()
        started["model"] = {k: v.clone() for k, v in trainer.recommender.state_dict().items()}
        started["optimiser"], started["step"] = dict(trainer.opt_rec.state), trainer.sched_rec.last_epoch
        started["best_epoch"], started["codes"] = trainer.stopping.best_epoch, trainer.codes[1:].tolist()

    monkeypatch.setattr(JointTrainer, "start_second_pass", spy)
    with signals.recording(signals.epoch_end, signals.codes_assigned, signals.evaluated) as events:
        result = run_stage(JOINT, config, output_dir=tmp_path / "run", wandb_mode="disabled")
    events = [e for e in events if e.payload.get("stage") == "joint"]
    ends = [e.payload for e in events if e.signal == "epoch_end"]
    assert [e["phase"] for e in ends] == ["id", "rec", "id", "rec", "second", "second", "second", "second", "finetune"]
    assert all(set(e["losses"]) == {"code_loss", "loss_total"} for e in ends[4:])  # no tokenizer, no alignment
    assigned = [e.payload for e in events if e.signal == "codes_assigned"]
    assert [e["epoch"] for e in assigned] == [0, 1, 3]  # codes move in the alternating epochs only
    # the fresh start: the weights a new build gives (item vectors from the SASRec stage), a new optimiser and
    # schedule, and model selection from scratch
    assert started["model"].keys() == started["fresh"].keys()
    assert all(torch.equal(started["model"][k], started["fresh"][k]) for k in started["fresh"])
    assert started["optimiser"] == {} and started["step"] == 0 and started["best_epoch"] == -1
    assert started["rng_untouched"]
    # on the codes of the alternating epochs' best checkpoint: those in use after the last refresh before it
    valid = {e.payload["epoch"]: e.payload["metrics"]["ndcg@10"] for e in events
             if e.signal == "evaluated" and e.payload["split"] == "valid"}
    first_best = max(range(4), key=lambda epoch: (valid[epoch], -epoch))
    chosen = [e for e in assigned if e["epoch"] <= first_best + 1][-1]
    assert started["codes"] == np.asarray(chosen["codes"]).tolist()
    in_use = np.loadtxt(tmp_path / "run" / "item_codes.tsv", dtype=str, delimiter="\t", skiprows=1)
    assert in_use[:, 1:].astype(int).tolist() == started["codes"]
    # the run's model is the second pass's: its best epoch and its validation score
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["best_epoch"] >= 4
    assert result["valid"]["ndcg@10"] == max(valid[epoch] for epoch in range(4, 9))
    with pytest.raises(ConfigError, match="'joint.second_pass' is true, which needs joint.train_tokenizer=true"):
        load_config("tiny", ["joint.second_pass=true", "joint.train_tokenizer=false"])


FILE_CODES = ["joint.train_tokenizer=false", "losses.rec_kl_weight=0", "losses.rec_dec_cl_weight=0"]


def _codes_file(path: Path, item_ids, codes) -> Path:
    from etegrec.training.run.item_codes import format_item_codes
    path.write_text(format_item_codes(np.asarray(codes), list(item_ids)))
    return path


def test_a_run_on_codes_from_a_file_trains_on_them_fixed_and_serves_them(joint_run, tmp_path, monkeypatch, capsys):
    from etegrec.training.trained import load_run
    monkeypatch.setenv("ETEGREC_HOME", str(joint_run["root"] / "home"))  # reuse the cached earlier stages
    items = list(load_stage_data(joint_run["config"]).item_map)
    k = np.arange(len(items))
    mine = np.stack([k % 16, k // 16 % 16, np.full_like(k, 5), np.ones_like(k)], axis=1)  # no tokenizer gives these
    path = _codes_file(tmp_path / "mine.tsv", items[::-1], mine[::-1])  # rows in another order than the data's
    config = load_config("tiny", [f"data.data_path={joint_run['inter']}", *OVERRIDES, *FILE_CODES,
                                  f"codes.file={path}"])
    with signals.recording(signals.run_started, signals.epoch_end, signals.codes_assigned) as events:
        result = run_stage(JOINT, config, output_dir=tmp_path / "run", wandb_mode="disabled")
    events = [e for e in events if e.payload.get("stage") == "joint"]
    assert not [e for e in events if e.signal == "codes_assigned"]  # nothing assigned them: they are the file's
    assert next(e for e in events if e.signal == "run_started").payload["config"]["codes"]["file"] == str(path)
    assert f"run started in {tmp_path / 'run'} (1 process), on the codes of {path} (codes.file, fixed)" in \
        "".join(capsys.readouterr())
    assert [e.payload["phase"] for e in events if e.signal == "epoch_end"] == ["rec"] * 4 + ["finetune"]
    assert set(result["test"]) >= {"ndcg@10", "recall@10"}
    trained = load_run(tmp_path / "run")  # item_codes.tsv and the best checkpoint agree on the file's codes
    assert trained.item_ids == tuple(items) and trained.codes[1:].tolist() == mine.tolist()


def _bad_codes(items):
    k = np.arange(len(items))
    good = np.stack([k % 16, k // 16 % 16, np.zeros_like(k), np.zeros_like(k)], axis=1)
    shared = good.copy()
    shared[1] = shared[0]
    wide = np.concatenate([good, good[:, :1]], axis=1)
    high = good.copy()
    high[2, 0] = 16
    return [
        ("an item missing", items[1:], good[1:], r"1 of the dataset's \d+ items have no codes there \['"),
        ("an item the data lacks", [*items, "ghost"], [*good, [0, 0, 9, 9]],
         r"0 of the dataset's \d+ items have no codes there \[\], and it holds 1 items the dataset lacks \['ghost'\]"),
        ("an item twice", [*items, items[0]], [*good, [0, 0, 9, 9]], r"item '.*' has two rows \(lines 2 and \d+\)"),
        ("five codes per item", items, wide, r"5 codes per item, the recommender reads 4"),
        ("a code past the codebook", items, high, r"item '.*' has codes \[16, 0, 0, 0\], outside \[0, 16\)"),
        ("two items with one code", items, shared, r"items \['.*', '.*'\] share the codes \[0, 0, 0, 0\]"),
    ]


def test_a_codes_file_that_cannot_give_every_item_its_own_codes_is_one_line_naming_it(joint_run, tmp_path):
    from etegrec.training.run.item_codes import codes_for_items
    items = load_stage_data(joint_run["config"]).item_map
    for name, ids, codes, message in _bad_codes(list(items)):
        path = _codes_file(tmp_path / "codes.tsv", ids, codes)
        with pytest.raises(ConfigError, match=r"codes\.tsv \(codes\.file\): " + message):
            codes_for_items(path, items, code_num=16, width=4)
    with pytest.raises(ConfigError, match=r"nowhere\.tsv' does not exist: config key 'codes\.file' names no file"):
        codes_for_items(tmp_path / "nowhere.tsv", items, code_num=16, width=4)
    with pytest.raises(ConfigError, match=r"'codes\.file' is 'x\.tsv', which needs joint\.train_tokenizer=false "
                                          r"\(got True\), losses\.rec_kl_weight=0 \(got 0\.0001\)"):
        load_config("tiny", ["codes.file=x.tsv", "losses.rec_dec_cl_weight=0"])


def test_shuffled_codes_give_each_item_another_items_codes_and_keep_its_own_item_vector(joint_run, tmp_path):
    from etegrec.training.rqvae import build_tokenizer, tokenizer_inputs
    data = load_stage_data(joint_run["config"])
    embeddings = np.random.default_rng(0).normal(size=(data.n_items + 1, 256)).astype(np.float32)
    tokenizer = build_tokenizer(joint_run["config"].tokenizer, 256)  # one pretrained tokenizer for both runs
    tokenizer.kmeans_init_from(torch.as_tensor(tokenizer_inputs(joint_run["config"].tokenizer, embeddings)[1:]))
    trainers = {}
    for shuffled in (False, True):
        config = load_config("tiny", [f"data.data_path={joint_run['inter']}", *OVERRIDES, "recommender.item_output=true",
                                      "recommender.encoder_input=items", "recommender.item_embedding=embed",
                                      f"codes.shuffled={str(shuffled).lower()}"])
        torch.manual_seed(0)  # the recommender's initial weights: the same in both runs
        with Run(config, RunOptions(output_dir=tmp_path / f"run-{shuffled}", console=False), stage=JOINT) as run:
            trainers[shuffled] = trainer = JointTrainer(config, run, data, embeddings, tokenizer.state_dict())
            trainer.refresh_codes(0)
    plain, shuffled = trainers[False], trainers[True]
    # the tokenizer reads a permutation of the items: find it from its inputs, then check the codes follow it
    rows = {tuple(row.tolist()): i for i, row in enumerate(plain.item_emb[1:].numpy().round(5))}
    order = np.array([rows[tuple(row.tolist())] for row in shuffled.item_emb[1:].numpy().round(5)])
    assert sorted(order) == list(range(data.n_items)) and (order != np.arange(data.n_items)).mean() > 0.9
    rq = plain.codes.shape[1] - 2  # the RQ levels FORGE leaves alone (it rebalances the last one)
    assert torch.equal(shuffled.codes[1:, :rq], plain.codes[1:][torch.as_tensor(order), :rq])
    assert len({tuple(c) for c in shuffled.codes[1:].tolist()}) == data.n_items  # still one code per item
    # the recommender's item vectors are its own items', not permuted
    assert any(name.startswith("item_embedding") for name in plain.recommender.state_dict())
    for (name, a), (_, b) in zip(plain.recommender.state_dict().items(), shuffled.recommender.state_dict().items()):
        if "item" in name:
            assert torch.equal(a, b), name


def test_the_item_level_loss_teaches_the_first_code_position_to_rank_each_target_item_first(joint_run, tmp_path):
    from etegrec.training.rqvae import build_tokenizer, tokenizer_inputs
    data = load_stage_data(joint_run["config"])
    embeddings = np.random.default_rng(0).normal(size=(data.n_items + 1, 256)).astype(np.float32)
    config = load_config("tiny", [f"data.data_path={joint_run['inter']}", *OVERRIDES, "recommender.item_output=true",
                                  "losses.rec_item_weight=0.5", "recommender.dropout=0", "joint.id_trains_rec=false"])
    tokenizer = build_tokenizer(config.tokenizer, 256)
    tokenizer.kmeans_init_from(torch.as_tensor(tokenizer_inputs(config.tokenizer, embeddings)[1:]))
    with Run(config, RunOptions(output_dir=tmp_path / "run", console=False), stage=JOINT) as run:
        trainer = JointTrainer(config, run, data, embeddings, tokenizer.state_dict())
        trainer.refresh_codes(0)
        assert trainer.weights("rec", 0)["item_loss"] == 0.5 and trainer.weights("finetune", 0)["item_loss"] == 0.5
        assert "item_loss" not in trainer.weights("id", 0)  # the recommender does not train there
        trainer.set_phase("rec")
        index = np.arange(4)
        optimizer = torch.optim.Adam(trainer.recommender.parameters(), lr=0.005)
        for _ in range(200):  # the item-level loss alone: it must learn which item follows each history
            optimizer.zero_grad()
            parts = trainer.losses(index, phase="rec", weights={"item_loss": 1.0})
            assert set(parts) == {"code_loss", "item_loss", "loss"}
            parts["loss"].backward()
            optimizer.step()
        with torch.no_grad():
            out, target = trainer._forward(torch.as_tensor(index))
        assert parts["item_loss"].item() < 0.5
        assert (out.item_logits.argmax(dim=1) + 1).tolist() == target.tolist()  # column i is item i + 1


def test_lr_item_embedding_moves_the_history_item_vectors_at_their_own_rate(joint_run, tmp_path):
    from etegrec.training.rqvae import build_tokenizer, tokenizer_inputs
    data = load_stage_data(joint_run["config"])
    embeddings = np.random.default_rng(0).normal(size=(data.n_items + 1, 256)).astype(np.float32)
    moved = {}
    for rate in ("null", "0", "0.05"):
        config = load_config("tiny", [f"data.data_path={joint_run['inter']}", *OVERRIDES, "recommender.encoder_input=items",
                                      "recommender.item_embedding=embed", f"joint.lr_item_embedding={rate}",
                                      "joint.lr_warmup_epochs=0", "joint.weight_decay=0"])
        tokenizer = build_tokenizer(config.tokenizer, 256)
        tokenizer.kmeans_init_from(torch.as_tensor(tokenizer_inputs(config.tokenizer, embeddings)[1:]))
        with Run(config, RunOptions(output_dir=tmp_path / rate, console=False), stage=JOINT) as run:
            trainer = JointTrainer(config, run, data, embeddings, tokenizer.state_dict())
            trainer.refresh_codes(0)
            trainer.set_phase("rec")
            vectors, codes = trainer.recommender.item_embedding.weight, trainer.recommender.code_embedding
            start_vectors, start_codes = vectors.detach().clone(), codes.detach().clone()
            trainer.opt_rec.zero_grad()
            trainer.losses(np.arange(8), phase="rec", weights=trainer.weights("rec", 0))["loss"].backward()
            assert vectors.grad[1:].abs().sum() > 0  # the loss reaches the vectors: only the rate can keep them
            trainer.opt_rec.step()
            # without weight decay, Adam's first step moves each parameter with a gradient by its learning rate
            moved[rate] = (vectors.detach() - start_vectors)[vectors.grad.abs() > 0].abs().max().item()
            assert not torch.equal(start_codes, codes.detach())  # the rest trains at joint.lr_rec either way
    assert moved["0"] == 0.0
    assert moved["null"] == pytest.approx(0.005, rel=0.05)  # joint.lr_rec
    assert moved["0.05"] == pytest.approx(0.05, rel=0.05)


def test_lr_item_embedding_without_item_vectors_is_refused():
    from etegrec.config import ConfigError
    with pytest.raises(ConfigError, match="joint.lr_item_embedding' is 0.001, which needs recommender.item_embedding"):
        load_config("tiny", ["joint.lr_item_embedding=0.001"])


def test_an_item_level_loss_without_item_output_vectors_is_refused():
    from etegrec.config import ConfigError
    with pytest.raises(ConfigError, match="losses.rec_item_weight' is 0.1, which needs recommender.item_output=true"):
        load_config("tiny", ["losses.rec_item_weight=0.1"])


def test_window_targets_score_real_next_items_among_the_rows_last_counted_positions():
    from etegrec.models import window_targets
    windows = torch.tensor([[0, 0, 5, 6, 7],  # padded start: the first real input is item 5
                            [1, 2, 3, 4, 8]])  # overlaps the window before it: only its last 2 are new
    inputs, targets, scored = window_targets(windows, torch.tensor([4, 2]))
    assert inputs.tolist() == [[0, 0, 5, 6], [1, 2, 3, 4]]
    assert targets.tolist() == [[0, 5, 6, 7], [2, 3, 4, 8]]
    assert targets[scored].tolist() == [6, 7, 4, 8]


def test_catalogue_vq_items_train_the_tokenizer_on_items_drawn_uniformly_and_the_same_on_a_rerun(joint_run, tmp_path):
    from etegrec.training.rqvae import build_tokenizer, tokenizer_inputs
    data = load_stage_data(joint_run["config"])
    embeddings = np.random.default_rng(0).normal(size=(data.n_items + 1, 256)).astype(np.float32)
    tokenizer = build_tokenizer(joint_run["config"].tokenizer, 256)
    tokenizer.kmeans_init_from(torch.as_tensor(tokenizer_inputs(joint_run["config"].tokenizer, embeddings)[1:]))
    vq = {}
    for items in ("targets", "catalogue"):
        config = load_config("tiny", [f"data.data_path={joint_run['inter']}", *OVERRIDES, f"losses.id_vq_items={items}",
                                      "recommender.dropout=0", "tokenizer.dropout=0"])
        with Run(config, RunOptions(output_dir=tmp_path / items, console=False), stage=JOINT) as run:
            trainer = JointTrainer(config, run, data, embeddings, tokenizer.state_dict())
            with trainer.hooks:
                trainer.refresh_codes(0)
                trainer.set_phase("id")
                index = np.arange(5, 21)
                weights = trainer.weights("id", 100)
                before = [c.clone() for c in trainer.hooks.counts]
                vq[items] = [trainer.losses(index, phase="id", weights=weights, epoch=e)["vq_loss"].item()
                             for e in (3, 3, 4)]
                counted = [(c - b).sum().item() for c, b in zip(trainer.hooks.counts, before)]
                with torch.no_grad():
                    _, target = trainer._forward(torch.as_tensor(index))
                    on_targets = trainer.tokenizer(trainer.item_emb[target]).loss.item()
                    drawn = np.random.default_rng([config.run.seed, 3, 5]).choice(
                        data.n_items, size=min(len(target), data.n_items), replace=False) + 1
                    on_drawn = trainer.tokenizer(trainer.item_emb[torch.as_tensor(drawn)]).loss.item()
            # the codebook hooks count the targets' codes only (three calls), whichever items the loss reads
            assert counted == [3 * len(target)] * len(counted), items
        if items == "targets":
            assert vq[items] == pytest.approx([on_targets] * 3, rel=1e-5)
        else:  # distinct items of the whole catalogue, seeded by run seed, epoch and the batch's first sample
            assert len(set(drawn.tolist())) == len(drawn) and drawn.min() >= 1 and drawn.max() <= data.n_items
            assert vq[items][0] == pytest.approx(on_drawn, rel=1e-5) and vq[items][1] == vq[items][0]
            assert vq[items][2] != vq[items][0]  # another epoch draws other items
            assert on_drawn != pytest.approx(on_targets, rel=1e-3)


def test_unknown_vq_items_is_refused():
    from etegrec.config import ConfigError
    with pytest.raises(ConfigError, match="losses.id_vq_items.*catalogue.*'uniform'"):
        load_config("tiny", ["losses.id_vq_items=uniform"])


def test_unknown_cl_negatives_is_refused():
    from etegrec.config import ConfigError
    with pytest.raises(ConfigError, match="losses.cl_negatives.*catalogue.*'items'"):
        load_config("tiny", ["losses.cl_negatives=items"])


def test_unknown_mixed_precision_is_refused():
    from etegrec.config import ConfigError
    with pytest.raises(ConfigError, match="joint.mixed_precision.*bf16.*'fp16'"):
        load_config("tiny", ["joint.mixed_precision=fp16"])


def test_ema_decay_scores_the_averaged_weights_and_a_checkpoint_keeps_both_sets(joint_run, tmp_path):
    from etegrec.training.rqvae import build_tokenizer, tokenizer_inputs
    data = load_stage_data(joint_run["config"])
    embeddings = np.random.default_rng(0).normal(size=(data.n_items + 1, 256)).astype(np.float32)
    config = load_config("tiny", [f"data.data_path={joint_run['inter']}", *OVERRIDES, "joint.ema_decay=0.5", "joint.lr_warmup_epochs=0"])
    tokenizer = build_tokenizer(config.tokenizer, 256)
    tokenizer.kmeans_init_from(torch.as_tensor(tokenizer_inputs(config.tokenizer, embeddings)[1:]))

    def weights(model):
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    with Run(config, RunOptions(output_dir=tmp_path / "ema", console=False), stage=JOINT) as run:
        trainer = JointTrainer(config, run, data, embeddings, tokenizer.state_dict())
        trainer.refresh_codes(0)
        trainer.set_phase("rec")
        # one optimiser step: the average moves half way (decay 0.5) from the start to the new weights
        start = weights(trainer.recommender)
        trainer.opt_rec.zero_grad()
        trainer.losses(np.arange(8), phase="rec", weights=trainer.weights("rec", 0))["loss"].backward()
        trainer.opt_rec.step()
        trainer.average.update()
        stepped = weights(trainer.recommender)
        for name, average in trainer.average.average.items():
            assert torch.allclose(average, (start[name] + stepped[name]) / 2, atol=1e-6), name
        assert any(not torch.equal(start[n], stepped[n]) for n in start)

        # a training epoch updates the average after each of its steps
        updates = []
        update = trainer.average.update
        trainer.average.update = lambda: (updates.append(1), update())
        trainer.train_one_epoch(1, "rec")
        assert len(updates) == len(trainer._batches(1)) > 1
        live, average = weights(trainer.recommender), {n: a.clone() for n, a in trainer.average.average.items()}
        assert any(not torch.allclose(live[n], average[n]) for n in live)

        # validation scores the averaged weights; training goes on from the live ones
        scored = []
        trainer.evaluate = lambda split: (scored.append(weights(trainer.recommender)), {"ndcg@10": 0.0})[1]
        trainer.validate(1)
        assert all(torch.equal(scored[0][n], average[n]) for n in average)
        assert all(torch.equal(p, live[n]) for n, p in weights(trainer.recommender).items())

        # the checkpoint's "recommender" is what was scored; a resume restores the live weights and their average
        state = trainer.state_dict()
        assert all(torch.equal(state["recommender"][n], average[n]) for n in average)
        assert all(torch.equal(state["recommender_live"][n], live[n]) for n in live)
        resumed = JointTrainer(config, run, data, embeddings, tokenizer.state_dict())
        resumed.load_state_dict(state, resume=True)
        assert all(torch.equal(p, live[n]) for n, p in weights(resumed.recommender).items())
        assert all(torch.equal(resumed.average.average[n], average[n]) for n in average)
        # loading the best checkpoint for the test (or fine-tuning) takes the averaged weights, the average restarts there
        best = JointTrainer(config, run, data, embeddings, tokenizer.state_dict())
        best.load_state_dict(state)
        assert all(torch.equal(p, average[n]) for n, p in weights(best.recommender).items())
        assert all(torch.equal(best.average.average[n], average[n]) for n in average)


@pytest.mark.parametrize("decay", ["1.0", "-0.1"])
def test_an_ema_decay_outside_zero_to_one_is_refused(decay):
    from etegrec.config import ConfigError
    with pytest.raises(ConfigError, match=f"joint.ema_decay' is {decay}, which must lie in \\[0, 1\\)"):
        load_config("tiny", [f"joint.ema_decay={decay}"])


def test_a_weight_average_writes_a_shared_parameter_under_each_of_its_names():
    from etegrec.training.joint.averaging import WeightAverage
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].weight = model[0].weight  # tied: one parameter, two state_dict names
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.add_(2.0)
    average.update()  # half way: +1
    state = average.averaged_state_dict()
    assert torch.equal(state["0.weight"], state["1.weight"])
    assert torch.allclose(state["1.weight"], model[0].weight.detach() - 1.0)
    with average.applied():
        assert torch.allclose(model[1].weight, state["1.weight"])
    assert torch.allclose(model[1].weight, state["1.weight"] + 1.0)  # the live weights are back
