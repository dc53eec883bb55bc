from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

from etegrec import metrics, signals
from etegrec.hooks.codebook import FOLD_EVERY, CodebookHooks


class Quantized(NamedTuple):
    quantized: torch.Tensor  # (batch, dim)
    codes: torch.Tensor  # (batch,)


class StandInQuantizer(nn.Module):
    """The duck-typed quantizer interface the hooks rely on, nothing more."""

    is_quantizer = True

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim))

    def forward(self, x: torch.Tensor) -> Quantized:
        codes = torch.cdist(x, self.codebook).argmin(dim=1)
        return Quantized(self.codebook[codes], codes)


class TwoLayerModel(nn.Module):
    def __init__(self, sizes=(4, 6), dim: int = 3) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(StandInQuantizer(k, dim) for k in sizes)

    def forward(self, x: torch.Tensor):
        h = self.proj(x)
        outs = [layer(h) for layer in self.layers]
        return torch.stack([o.codes for o in outs], dim=1), sum(o.quantized for o in outs)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TwoLayerModel()


def batches(n: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(size, 3, generator=g) for _ in range(n)]


@pytest.mark.parametrize("n_batches, inference", [(3, False), (2 * FOLD_EVERY + 5, False), (FOLD_EVERY + 1, True)],
                         ids=["few-steps", "past-two-folds", "inference-mode"])
def test_counts_equal_the_codes_the_model_returned(model, n_batches, inference):
    seen = []
    with CodebookHooks(model, stage="rqvae") as hooks:
        for x in batches(n_batches, size=5):
            with torch.inference_mode(inference):
                codes, _ = model(x)
            seen.append(codes)
        stats = hooks.epoch_end(epoch=0)
    seen = torch.cat(seen)  # (n_samples, n_layers)
    assert [s["layer"] for s in stats] == [0, 1]
    for layer, k in enumerate((4, 6)):
        expected = torch.bincount(seen[:, layer], minlength=k).numpy()
        np.testing.assert_array_equal(stats[layer]["counts"], expected)


def test_hooked_outputs_equal_unhooked_outputs(model):
    x = batches(1)[0]
    plain_codes, plain_q = model(x)
    with CodebookHooks(model, stage="rqvae"):
        hooked_codes, hooked_q = model(x)
    assert torch.equal(plain_codes, hooked_codes)
    assert torch.equal(plain_q, hooked_q)


def test_remove_twice_is_harmless_and_stops_counting(model):
    hooks = CodebookHooks(model, stage="rqvae")
    hooks.remove()
    hooks.remove()
    model(batches(1)[0])
    assert all(layer._forward_hooks == {} for layer in model.layers)
    assert all(int(c.sum()) == 0 for c in hooks.counts)
    hooks.attach()
    hooks.attach()  # once attached, again does nothing
    model(batches(1)[0])
    assert all(len(layer._forward_hooks) == 1 for layer in model.layers)
    assert [int(c.sum()) for c in hooks.counts] == [16, 16]


@pytest.mark.parametrize("sizes", [(4, 6), (5, 5)], ids=["unequal-K", "equal-K"])
def test_payload_values_are_the_metrics_of_the_counts(sizes):
    torch.manual_seed(0)
    model = TwoLayerModel(sizes)
    owner = object()
    with CodebookHooks(model, stage="joint", sender=owner) as hooks:
        for x in batches():
            model(x)
        with signals.recording(signals.codebook_usage) as events:
            hooks.epoch_end(epoch=5)
    assert [e.payload["layer"] for e in events] == [0, 1]
    for event in events:
        p = event.payload
        assert event.sender is owner
        assert set(p) == {"stage", "epoch", "layer", "counts", "utilization", "perplexity", "gini",
                          "dead_codes"}
        assert (p["stage"], p["epoch"]) == ("joint", 5)
        assert p["counts"].sum() == 3 * 16
        assert len(p["counts"]) == sizes[p["layer"]]
        assert p["utilization"] == pytest.approx(metrics.utilization(p["counts"]), rel=1e-12)
        assert p["perplexity"] == pytest.approx(metrics.perplexity(p["counts"]), rel=1e-12)
        assert p["gini"] == pytest.approx(metrics.gini(p["counts"]), rel=1e-12)
        assert p["dead_codes"] == metrics.dead_codes(p["counts"])


def test_epoch_end_resets_the_counts(model):
    with CodebookHooks(model, stage="rqvae") as hooks:
        model(batches(1)[0])
        hooks.epoch_end(epoch=0)
        assert all(int(c.sum()) == 0 for c in hooks.counts)
        second = hooks.epoch_end(epoch=1)
    assert all(s["counts"].sum() == 0 for s in second)


def test_pause_skips_counting(model):
    with CodebookHooks(model, stage="rqvae") as hooks:
        with hooks.pause():
            model(batches(1)[0])
        assert all(int(c.sum()) == 0 for c in hooks.counts)


def test_no_signal_without_receivers_but_stats_are_returned(model):
    assert not signals.codebook_usage.receivers
    with CodebookHooks(model, stage="rqvae") as hooks:
        model(batches(1)[0])
        stats = hooks.epoch_end(epoch=0)
    assert sum(int(s["counts"].sum()) for s in stats) == 2 * 16


def test_model_without_quantizers_is_an_error():
    with pytest.raises(ValueError, match="no quantizer layer in 'Linear'"):
        CodebookHooks(nn.Linear(2, 2), stage="rqvae")


def test_real_rqvae_layers_are_counted():
    from etegrec.models.rqvae import RQVAE

    torch.manual_seed(0)
    model = RQVAE(in_dim=8, hidden_dims=(16,), e_dim=4, num_layers=3, codebook_size=5,
                  kmeans_init=False).eval()
    x = torch.randn(20, 8)
    with CodebookHooks(model, stage="rqvae") as hooks:
        codes = model(x).codes  # (20, 3)
        stats = hooks.epoch_end(epoch=0)
    assert len(stats) == 3
    for layer in range(3):
        np.testing.assert_array_equal(stats[layer]["counts"],
                                      torch.bincount(codes[:, layer], minlength=5).numpy())


def test_an_epoch_without_quantizer_forwards_reports_no_usage_instead_of_a_collapse(model):
    from etegrec import signals

    with CodebookHooks(model, stage="joint") as hooks, signals.recording(signals.codebook_usage) as events:
        model(batches(1)[0])
        assert len(hooks.epoch_end(epoch=0)) == 2  # both layers ran
        assert hooks.epoch_end(epoch=1) == []  # e.g. a fine-tuning epoch: the tokenizer never ran
    assert [e.payload["epoch"] for e in events] == [0, 0]
    assert all(e.payload["utilization"] > 0 for e in events)
