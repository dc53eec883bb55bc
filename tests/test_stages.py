"""Tiny real runs of the embed and RQ-VAE stages, checked through their signals and run directory."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from etegrec import metrics, signals
from etegrec.config import load_config
from etegrec.hooks import read_events
from etegrec.training.run.cache import KNOWN_DATA, load_stage_data, stage_dir

from conftest import write_structured_inter
from etegrec.training.embed import EMBED
from etegrec.training.rqvae import RQVAE
from etegrec.training.run.pipeline import run_stage

WANDB = str(Path(sys.executable).with_name("wandb"))


@pytest.fixture
def tiny_config(tmp_path):
    inter = write_structured_inter(tmp_path / "structured.inter")
    return load_config("tiny", [f"data.data_path={inter}", "data.dataset=structured", "data.max_users=null",
                                "embed.epochs=2", "rqvae.epochs=4", "rqvae.eval_step=2"])


def _of_stage(events, stage):
    return [e for e in events if e.payload.get("stage") == stage or
            (e.signal == "checkpoint_saved" and e.payload["stage"] == stage)]


@pytest.fixture
def rqvae_run(tiny_config, tmp_path):
    out = tmp_path / "rqvae-run"
    with signals.recording() as events:
        result = run_stage(RQVAE, tiny_config, output_dir=out, wandb_mode="offline")
    return tiny_config, out, events, result


def test_rqvae_stage_signals_come_in_order_with_contiguous_epochs(rqvae_run):
    _, _, events, _ = rqvae_run
    mine = _of_stage(events, "rqvae")
    assert mine[0].signal == "run_started" and mine[-1].signal == "run_finished"
    epochs = [e.payload["epoch"] for e in mine if e.signal == "epoch_end"]
    assert epochs == [0, 1, 2, 3]
    assert [e.payload["epoch"] for e in mine if e.signal == "evaluated"] == [1, 3]
    assert mine[-1].payload["status"] == "completed"


def test_rqvae_epoch_losses_are_finite_and_named(rqvae_run):
    _, _, events, _ = rqvae_run
    for e in _of_stage(events, "rqvae"):
        if e.signal == "epoch_end":
            assert e.payload["phase"] == "rqvae"
            assert set(e.payload["losses"]) == {"loss_total", "loss_recon", "loss_commit"}
            assert all(math.isfinite(v) for v in e.payload["losses"].values())
            assert e.payload["losses"]["loss_total"] == pytest.approx(
                e.payload["losses"]["loss_recon"] + e.payload["losses"]["loss_commit"], rel=1e-5)


def test_codebook_usage_counts_every_item_once_per_epoch(rqvae_run):
    config, _, events, _ = rqvae_run
    usage = [e.payload for e in events if e.signal == "codebook_usage"]
    n_epochs = 4
    assert len(usage) == n_epochs * config.tokenizer.num_layers
    totals = {int(np.sum(p["counts"])) for p in usage}
    assert len(totals) == 1  # every layer of every epoch saw the same items
    n_items = totals.pop()
    assert n_items > config.tokenizer.codebook_size
    for p in usage:
        assert p["utilization"] == pytest.approx(metrics.utilization(p["counts"]))
        assert p["gini"] == pytest.approx(metrics.gini(p["counts"]))


def test_reported_collision_rate_matches_the_checkpoint_codes(rqvae_run):
    _, out, events, _ = rqvae_run
    last_eval = [e for e in events if e.signal == "evaluated" and e.payload["stage"] == "rqvae"][-1]
    ckpt = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    codes = np.asarray(ckpt["codes"])
    assert last_eval.payload["metrics"]["collision_rate"] == pytest.approx(metrics.collision_rate(codes))
    ginis = [metrics.gini(np.bincount(codes[:, i], minlength=16)) for i in range(codes.shape[1])]
    assert last_eval.payload["metrics"]["gini_coefficient"] == pytest.approx(np.mean(ginis))


def test_rqvae_run_directory_holds_config_events_metrics_and_checkpoints(rqvae_run):
    _, out, events, result = rqvae_run
    assert (out / "config.yaml").exists()
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"best.pt", "last.pt"}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["stage"] == "rqvae" and saved["valid"] == pytest.approx(result["valid"])
    logged = read_events(out / "events.jsonl")
    assert [e["signal"] for e in logged] == [e.signal for e in _of_stage(events, "rqvae")]


def test_rqvae_stage_writes_its_best_codes_with_their_suffix_by_raw_item_id(rqvae_run):
    from etegrec.forge import assign_codes

    config, out, _, _ = rqvae_run
    lines = (out / "item_codes.tsv").read_text().splitlines()
    data = load_stage_data(config)
    assert lines[0] == "item_id\tc0\tc1\tc2\tsuffix" and [l.split("\t")[0] for l in lines[1:]] == list(data.item_map)
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)["codes"].numpy()
    expected = assign_codes(best, config.tokenizer.codebook_size, use_forge=False).codes
    np.testing.assert_array_equal(np.array([[int(v) for v in l.split("\t")[1:]] for l in lines[1:]]), expected)


def test_rqvae_stage_reuses_cached_embeddings(rqvae_run, tmp_path):
    config, _, _, _ = rqvae_run
    folder = stage_dir(config, EMBED, load_stage_data(config))
    assert (folder / "embeddings.npy").exists()
    with signals.recording(signals.run_started) as started:
        run_stage(RQVAE, config, output_dir=tmp_path / "again", wandb_mode="disabled")
    assert [e.payload["stage"] for e in started] == ["rqvae"]  # no second embed run


def test_rqvae_wandb_run_holds_every_key_with_the_event_values(rqvae_run):
    _, out, events, _ = rqvae_run
    log_file = next((out / "wandb").glob("offline-run-*/run-*.wandb"))
    records = [json.loads(line) for line in subprocess.run(
        [WANDB, "leet", "inspect", "--json", str(log_file)], capture_output=True, text=True, check=True,
    ).stdout.splitlines() if line.strip()]
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["project"] == "ETEGRec-RQVAE-Pretrain" and run["display_name"] == "structured_layers3_edim16"
    by_epoch = {}
    for row in rows:
        by_epoch.setdefault(row["epoch"], {}).update(row)
    for e in _of_stage(events, "rqvae"):
        row = by_epoch[e.payload.get("epoch")] if "epoch" in e.payload else None
        if e.signal == "epoch_end":
            assert row["train/loss_total"] == pytest.approx(e.payload["losses"]["loss_total"])
            assert row["train/loss_recon"] == pytest.approx(e.payload["losses"]["loss_recon"])
        elif e.signal == "evaluated":
            assert row["val/collision_rate"] == pytest.approx(e.payload["metrics"]["collision_rate"])
            assert row["val/gini_coefficient"] == pytest.approx(e.payload["metrics"]["gini_coefficient"])
        elif e.signal == "codebook_usage":
            prefix = f"codebook/layer{e.payload['layer']}"
            assert row[f"{prefix}/utilization"] == pytest.approx(e.payload["utilization"])
            assert row[f"{prefix}/perplexity"] == pytest.approx(e.payload["perplexity"])
            assert sum(row[f"{prefix}/usage.values"]) == int(np.sum(e.payload["counts"]))
    steps = [r["history"]["step"]["num"] for r in records if r["type"] == "history"]
    assert steps == sorted(steps)  # W&B's own step never goes backwards


def test_embed_stage_writes_embeddings_and_test_metrics(rqvae_run):
    config, _, events, _ = rqvae_run
    embed = _of_stage(events, "embed")
    assert embed[0].signal == "run_started" and embed[-1].signal == "run_finished"
    assert [e.payload["epoch"] for e in embed if e.signal == "epoch_end"] == [0, 1]
    assert all(e.payload["phase"] == "embed" for e in embed if e.signal == "epoch_end")
    splits = [e.payload["split"] for e in embed if e.signal == "evaluated"]
    assert splits == ["valid", "valid", "test"]
    folder = stage_dir(config, EMBED, load_stage_data(config))
    emb = np.load(folder / "embeddings.npy")
    items = json.loads((folder / "item_map.json").read_text())["items"]
    assert emb.shape == (len(items) + 1, config.embed.hidden)
    saved = json.loads((folder / "metrics.json").read_text())
    assert set(saved["test"]) == {"recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10"}
    assert saved["test"] == pytest.approx(embed[-2].payload["metrics"])


def test_a_launch_whose_processes_stayed_alone_stops_with_a_clear_error(monkeypatch):
    from types import SimpleNamespace

    from etegrec.config import ConfigError
    from etegrec.training.run import check_world
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_world(SimpleNamespace(num_processes=1))  # plain python: fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_world(SimpleNamespace(num_processes=2))  # a real world of two: fine
    with pytest.raises(ConfigError, match=r"asked for 2 processes but the accelerator got a world of 1"):
        check_world(SimpleNamespace(num_processes=1))  # torchrun's processes that each ended up alone


def test_resume_without_a_checkpoint_is_refused_before_reading_data(capsys, tmp_path):
    from etegrec.training.rqvae import main
    assert main(["--config", "tiny", "--resume", "--output-dir", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "fetching" not in err


def test_embed_stage_with_repeat_bias_learns_it_at_its_own_rate(tiny_config, tmp_path):
    from etegrec.training.embed import REPEAT_BIAS_LR
    tiny_config.embed.repeat_bias = True
    out = tmp_path / "embed-run"
    run_stage(EMBED, tiny_config, output_dir=out, wandb_mode="disabled")
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [tiny_config.embed.lr, REPEAT_BIAS_LR]
    assert len(groups[1]["params"]) == 1  # the bias alone; every other parameter in the first group
    assert len(groups[0]["params"]) + 1 == len(state["model"])  # SASRec has parameters only, no buffers
    # the structured data never repeats an item: each Adam step moves the bias down by about its own
    # rate, far more than the model's learning rate would allow
    steps = int(state["optimizer"]["state"][0]["step"])
    assert state["model"]["repeat_bias"].item() < -20 * tiny_config.embed.lr * steps


def test_embed_stage_trains_with_the_sampled_softmax_and_ranks_every_item(tiny_config, tmp_path):
    from etegrec.training.run.pipeline import run_stage
    tiny_config.embed.loss, tiny_config.embed.negatives = "sampled", 16
    result = run_stage(EMBED, tiny_config, output_dir=tmp_path / "embed-run", wandb_mode="disabled")
    assert set(result["test"]) >= {"recall@10", "ndcg@10"}
    assert np.load(tmp_path / "embed-run" / "embeddings.npy").shape[0] == len(
        json.loads((tmp_path / "embed-run" / "item_map.json").read_text())["items"]) + 1


def test_cache_keys_of_the_default_config_stay_those_of_existing_caches():
    # Golden keys: a new config key in the data/embed/tokenizer/rqvae sections changes them and so
    # orphans every user's cached stages, unless it is listed in stages.ADDED_LATER.
    # (the repeat bias became the ml-100k default after these caches were made)
    config = load_config("ml-100k", ["run.seed=2024", "embed.repeat_bias=false"])
    # The data's digest joined the key later too: the default ml-100k preparation's is left out.
    ml100k = KNOWN_DATA["ml-100k"]
    assert stage_dir(config, EMBED, ml100k).name == "embed-ml-100k-767aad455e9f"
    assert stage_dir(config, RQVAE, ml100k).name == "rqvae-ml-100k-b6f2d73aafc2"
    config.embed.repeat_bias = True  # a new key away from its neutral value is a different stage
    assert stage_dir(config, EMBED, ml100k).name != "embed-ml-100k-767aad455e9f"
    config.embed.repeat_bias = False  # other content under the same name: another stage
    assert stage_dir(config, EMBED, "0" * 16).name != "embed-ml-100k-767aad455e9f"
