"""The payload-to-row functions of the tracking subscriber: a known payload in, exact keys and values out."""
from __future__ import annotations

import numpy as np

from etegrec.hooks.wandb_rows import (
    best_metrics_row,
    codebook_usage_row,
    codes_assigned_row,
    lr_key,
    merge_pending,
    probed_row,
)
from etegrec.training.embed import EMBED
from etegrec.training.joint import JOINT
from etegrec.training.rqvae import RQVAE


def test_rqvae_losses_are_keyed_by_their_own_names():
    row = RQVAE.key_map.epoch_end(phase="rqvae", losses={"loss_total": 1.0, "loss_recon": 0.5, "loss_commit": 0.25})
    assert row == {"train/loss_total": 1.0, "train/loss_recon": 0.5, "train/loss_commit": 0.25}


def test_joint_losses_get_their_phase_in_front():
    row = JOINT.key_map.epoch_end(phase="id", losses={"loss_total": 3.0, "vq_loss": 0.5})
    assert row == {"train/id_loss_total": 3.0, "train/id_vq_loss": 0.5}


def test_embed_losses_get_their_phase_in_front():
    assert EMBED.key_map.epoch_end(phase="embed", losses={"loss_total": 6.5}) == {"train/embed_loss_total": 6.5}


def test_a_loss_name_is_never_renamed():
    # the trainers emit final names: a bare "loss" stays "loss"
    assert JOINT.key_map.epoch_end(phase="rec", losses={"loss": 2.0}) == {"train/rec_loss": 2.0}


def test_learning_rates_are_named_after_the_optimiser_or_else_the_phase():
    assert lr_key("rec", "rec") == "lr/rec_lr"
    assert lr_key("finetune", "rec") == "lr/rec_lr"
    assert lr_key("id", "id_lr") == "lr/id_lr"
    assert lr_key("rqvae", "lr") == "lr/rqvae_lr"


def test_epoch_end_row_has_learning_rates_and_timings_as_floats():
    row = JOINT.key_map.epoch_end(phase="rec", losses={"code_loss": np.float32(1.5)}, lr={"rec": 5e-3},
                                      seconds=2, samples_per_second=50)
    assert row == {"train/rec_code_loss": 1.5, "lr/rec_lr": 5e-3, "perf/rec_epoch_seconds": 2.0,
                   "perf/rec_samples_per_second": 50.0}
    assert all(type(v) is float for v in row.values())


def test_epoch_end_row_leaves_out_timings_it_was_not_given():
    assert RQVAE.key_map.epoch_end(phase="rqvae", losses={"loss_total": 1.0}, lr=None) == {"train/loss_total": 1.0}


def test_validation_is_eval_in_the_joint_stage_and_val_in_the_others():
    metrics = {"ndcg@10": 0.25}
    assert JOINT.key_map.evaluated(split="valid", metrics=metrics) == {"eval/ndcg@10": 0.25}
    assert RQVAE.key_map.evaluated(split="valid", metrics=metrics) == {"val/ndcg@10": 0.25}
    assert EMBED.key_map.evaluated(split="valid", metrics=metrics) == {"val/ndcg@10": 0.25}


def test_test_and_other_splits_are_keyed_by_their_name():
    assert JOINT.key_map.evaluated(split="test", metrics={"recall@10": 0.5}) == {"test/recall@10": 0.5}
    assert JOINT.key_map.evaluated(split="cold", metrics={"recall@10": 0.5}) == {"cold/recall@10": 0.5}


def test_codes_assigned_row_has_the_share_of_items_whose_codes_changed():
    row = codes_assigned_row(codes=np.zeros((10, 4), dtype=np.int64), max_conflict=np.int64(3), max_conflict_before=9,
                             collision_rate=0.2, changed=4, use_forge=True, policy="adler32", seconds=0.01)
    assert row == {"monitor/max_conflict": 3, "monitor/max_conflict_before_forge": 9, "monitor/collision_rate": 0.2,
                   "monitor/codes_changed": 0.4}
    assert type(row["monitor/max_conflict"]) is int


def test_codes_assigned_row_without_codes_has_no_change():
    row = codes_assigned_row(codes=None, max_conflict=1, max_conflict_before=1, collision_rate=0.0, changed=0)
    assert row["monitor/codes_changed"] == 0.0


def test_codebook_usage_row_splits_scalars_from_the_usage_counts():
    counts = np.arange(8)
    scalars, histograms = codebook_usage_row(stage="rqvae", layer=2, counts=counts, utilization=0.75, perplexity=5.5,
                                             gini=0.25, dead_codes=np.int64(2))
    assert scalars == {"codebook/layer2/utilization": 0.75, "codebook/layer2/perplexity": 5.5,
                       "codebook/layer2/gini": 0.25, "codebook/layer2/dead_codes": 2}
    assert histograms.keys() == {"codebook/layer2/usage"} and histograms["codebook/layer2/usage"] is counts


def test_probes_and_best_metrics_are_prefixed():
    assert probed_row(probes={"acc": 1}) == {"probe/acc": 1.0}
    assert best_metrics_row({"ndcg@10": 0.5}) == {"best/ndcg@10": 0.5}


def test_held_back_rows_of_the_same_epoch_go_with_the_row():
    pending = [(3, {"codebook/layer0/gini": 0.1}, {"codebook/layer0/usage": [1]}),
               (3, {"codebook/layer1/gini": 0.2}, {"codebook/layer1/usage": [2]})]
    assert merge_pending(pending, (3, {"train/loss_total": 1.0}, {})) == [
        (3, {"codebook/layer0/gini": 0.1, "codebook/layer1/gini": 0.2, "train/loss_total": 1.0},
         {"codebook/layer0/usage": [1], "codebook/layer1/usage": [2]})]


def test_held_back_rows_of_another_epoch_go_first_on_their_own():
    pending = [(2, {"a": 1.0}, {"h": [1]}), (3, {"b": 2.0}, {})]
    assert merge_pending(pending, (3, {"c": 3.0}, {})) == [(2, {"a": 1.0}, {"h": [1]}), (3, {"b": 2.0, "c": 3.0}, {})]


def test_the_rows_own_scalars_win_over_held_back_ones():
    assert merge_pending([(1, {"a": 1.0}, {})], (1, {"a": 2.0}, {})) == [(1, {"a": 2.0}, {})]


def test_nothing_held_back_sends_the_row_as_it_is():
    assert merge_pending([], (0, {"a": 1.0}, {})) == [(0, {"a": 1.0}, {})]
