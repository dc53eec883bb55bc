from __future__ import annotations

import pytest
import torch

from etegrec.models import RQVAE, ResidualQuantizer, VectorQuantizer, kmeans

torch.set_num_threads(1)


def _tiny(**overrides) -> RQVAE:
    kwargs = dict(in_dim=16, hidden_dims=(12, 8), e_dim=4, num_layers=3, codebook_size=8)
    kwargs.update(overrides)
    return RQVAE(**kwargs)


def test_codes_lie_in_codebook_range():
    torch.manual_seed(0)
    out = _tiny(codebook_size=[8, 5, 3], num_layers=None)(torch.randn(32, 16))
    assert out.codes.dtype == torch.long
    assert out.codes.shape == (32, 3)
    for layer, size in enumerate([8, 5, 3]):
        assert out.codes[:, layer].min() >= 0
        assert out.codes[:, layer].max() < size


def test_codes_to_quantized_matches_forward_in_eval():
    torch.manual_seed(0)
    model = _tiny()
    model.kmeans_init_from(torch.randn(64, 16))
    model.eval()
    out = model(torch.randn(10, 16))
    assert torch.allclose(model.codes_to_quantized(out.codes), out.quantized, atol=1e-5)


def test_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    model = _tiny()
    model(torch.randn(8, 16)).recon_loss.backward()
    first_linear = model.encoder[0]
    assert first_linear.weight.grad is not None
    assert first_linear.weight.grad.abs().sum() > 0


def test_logits_are_negative_distances_and_argmax_is_the_code():
    torch.manual_seed(0)
    model = _tiny()
    model.kmeans_init_from(torch.randn(64, 16))
    out = model(torch.randn(10, 16))
    residual = out.latent.detach()
    for layer, logits in zip(model.quantizer.layers, out.logits):
        expected = -torch.cdist(residual, layer.codebook.detach()).pow(2)
        assert torch.allclose(logits.detach(), expected, atol=1e-4)
        residual = residual - layer.codebook.detach()[logits.argmax(dim=1)]
    assert torch.equal(torch.stack([lg.argmax(dim=1) for lg in out.logits], dim=1), out.codes)


def test_depth_and_sizes_are_configurable():
    model = _tiny(num_layers=None, codebook_size=[4, 6])
    assert model.code_length == 2
    assert model.codebook_size == 6
    assert [layer.codebook_size for layer in model.quantizer.layers] == [4, 6]
    assert all(layer.is_quantizer for layer in model.quantizer.layers)


def test_mismatched_layer_count_is_an_error():
    with pytest.raises(ValueError, match="num_layers=3"):
        ResidualQuantizer(num_layers=3, codebook_size=[4, 6], dim=4)


def test_wrong_input_dim_names_expected_dim():
    with pytest.raises(ValueError, match=r"\(batch, 16\)"):
        _tiny()(torch.randn(2, 15))


def test_kmeans_init_with_as_many_points_as_codes_uses_the_points():
    torch.manual_seed(0)
    data = torch.randn(8, 4) * 10
    vq = VectorQuantizer(codebook_size=8, dim=4, kmeans_init=True)
    vq.init_from(data)
    assert bool(vq.initted)
    matched = torch.cdist(vq.codebook.detach(), data).min(dim=1).values
    assert torch.all(matched < 1e-4)
    assert len({tuple(row.tolist()) for row in vq.codebook.detach()}) == 8


def test_kmeans_with_fewer_points_than_codes_samples_points():
    torch.manual_seed(0)
    data = torch.randn(3, 4)
    centers = kmeans(data, 8, iters=5)
    assert torch.all(torch.cdist(centers, data).min(dim=1).values < 1e-5)


def test_kmeans_centers_stay_inside_data_bounds():
    torch.manual_seed(0)
    data = torch.rand(200, 3)
    centers = kmeans(data, 16, iters=5)
    assert torch.all(centers >= data.min(dim=0).values - 1e-6)
    assert torch.all(centers <= data.max(dim=0).values + 1e-6)


def test_kmeans_is_deterministic_given_seed():
    data = torch.rand(50, 3, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    first = kmeans(data, 5)
    torch.manual_seed(7)
    assert torch.equal(kmeans(data, 5), first)


def test_first_training_forward_initialises_codebooks():
    torch.manual_seed(0)
    model = _tiny()
    assert not any(bool(layer.initted) for layer in model.quantizer.layers)
    model(torch.randn(32, 16))
    assert all(bool(layer.initted) for layer in model.quantizer.layers)


def test_eval_forward_does_not_initialise_codebooks():
    model = _tiny().eval()
    model(torch.randn(4, 16))
    assert not bool(model.quantizer.layers[0].initted)


def test_kmeans_init_from_sets_every_layer():
    torch.manual_seed(0)
    model = _tiny()
    model.kmeans_init_from(torch.randn(64, 16))
    assert all(bool(layer.initted) for layer in model.quantizer.layers)
    assert model.training


def test_loss_is_recon_plus_quant():
    torch.manual_seed(0)
    out = _tiny()(torch.randn(8, 16))
    assert torch.allclose(out.loss, out.recon_loss + out.quant_loss)
    assert out.commit_loss is out.quant_loss


def test_restart_dead_codes_moves_unused_codes_onto_data_residuals():
    torch.manual_seed(0)
    model = RQVAE(in_dim=8, hidden_dims=(16,), e_dim=4, num_layers=2, codebook_size=6, kmeans_init=False)
    x = torch.randn(40, 8)
    with torch.no_grad():
        model.quantizer.layers[0].embedding.weight[1:] = 1e3  # five codes nobody can pick
    latent = model.eval().encode(x)
    before = model.quantizer.layers[0].distances(latent).argmin(1).unique().numel()
    restarted = model.restart_dead_codes(x)
    assert before == 1 and restarted[0] == 5
    codebook = model.quantizer.layers[0].codebook
    for row in codebook[1:]:  # each restarted code is the latent of some item
        assert torch.isclose(latent, row).all(dim=1).any()
    assert model.quantizer.layers[0].distances(latent).argmin(1).unique().numel() > 1


def test_a_quantizer_layer_restarts_its_own_dead_codes_and_returns_the_codes_after():
    vq = VectorQuantizer(codebook_size=4, dim=2)
    residual = torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vq.embedding.weight[1:] = 1e3  # three codes nobody can pick
    restarted, codes = vq.restart_dead_codes(residual, generator=torch.Generator().manual_seed(1))
    assert restarted == 3
    assert torch.equal(codes, vq.distances(residual).argmin(1))
    assert all(torch.isclose(residual, row).all(dim=1).any() for row in vq.codebook[1:])


def test_walk_gives_each_layer_the_residual_the_previous_layers_left():
    rq = ResidualQuantizer(num_layers=3, codebook_size=4, dim=2)
    x = torch.randn(5, 2)
    seen = rq.walk(x, lambda layer, residual: (residual, torch.full_like(residual, 1.0)))
    for depth, residual in enumerate(seen):
        torch.testing.assert_close(residual, x - depth)


def _two_level_tokenizer() -> RQVAE:
    """An RQVAE whose encoder is the identity on 2-d inputs, with hand-set codebooks:
    level 0 codes (0, 0) and (1, 0); level 1 codes (0.5, 0) and (-0.5, 0)."""
    model = RQVAE(in_dim=2, hidden_dims=[], e_dim=2, num_layers=2, codebook_size=2, kmeans_init=False).eval()
    with torch.no_grad():
        model.encoder[0].weight.copy_(torch.eye(2))
        model.encoder[0].bias.zero_()
        model.quantizer.layers[0].embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
        model.quantizer.layers[1].embedding.weight.copy_(torch.tensor([[0.5, 0.0], [-0.5, 0.0]]))
    return model


def test_sticky_codes_keep_a_previous_code_within_the_margin_and_quantize_the_rest_along_it():
    model = _two_level_tokenizer()
    x = torch.tensor([[0.52, 0.0]])  # level 0: d(code 0) = 0.2704, d(code 1) = 0.2304, ratio 1.17
    assert model(x).codes.tolist() == [[1, 1]]  # nearest: code 1, residual (-0.48, 0) -> code 1
    previous = torch.tensor([[0, 1]])
    codes, distances = model.sticky_codes(x, previous, margin=0.0)
    assert codes.tolist() == [[1, 1]]  # margin 0: the nearest codes
    codes, _ = model.sticky_codes(x, previous, margin=0.1)
    assert codes.tolist() == [[1, 1]]  # 0.2704 > 1.1 * 0.2304: moves
    codes, distances = model.sticky_codes(x, previous, margin=0.2)
    # 0.2704 <= 1.2 * 0.2304: keeps code 0; level 1 then sees the residual (0.52, 0), whose nearest is
    # code 0 (d 0.0004) and not the previous code 1 (d 1.0404): it moves there
    assert codes.tolist() == [[0, 0]]
    assert torch.allclose(distances[1], torch.tensor([[0.0004, 1.0404]]), atol=1e-5)
    assert torch.allclose(distances[0], torch.tensor([[0.2704, 0.2304]]), atol=1e-5)


def test_sticky_codes_refuse_previous_codes_of_the_wrong_shape():
    model = _two_level_tokenizer()
    with pytest.raises(ValueError, match=r"previous has shape \(1, 3\).*\(1, 2\)"):
        model.sticky_codes(torch.zeros(1, 2), torch.zeros(1, 3, dtype=torch.long), margin=0.1)


def test_kmeans_in_blocks_gives_the_centers_of_the_whole_distance_matrix():
    data = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    whole = kmeans(data, 16, chunk=len(data))
    torch.manual_seed(1)
    assert torch.equal(kmeans(data, 16, chunk=64), whole)


def test_nearest_in_blocks_picks_the_codes_of_the_whole_distance_matrix():
    layer = VectorQuantizer(codebook_size=32, dim=8)
    residual = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer.nearest(residual, chunk=64), layer.distances(residual).argmin(dim=1))
