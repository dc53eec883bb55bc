from __future__ import annotations

import pytest
import torch

from etegrec.models import SASRec

torch.set_num_threads(1)


def _tiny(**overrides) -> SASRec:
    kwargs = dict(n_items=30, hidden=16, n_layers=2, n_heads=2, dropout=0.0, max_len=6)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return SASRec(**kwargs).eval()


def test_output_shapes():
    model = _tiny()
    history = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    assert model(history).shape == (2, 6, 16)
    assert model.score(history).shape == (2, 31)
    assert model.item_embeddings().shape == (31, 16)


def test_later_items_do_not_change_earlier_positions():
    model = _tiny()
    history = torch.tensor([[0, 1, 2, 3, 4, 5]])
    changed = history.clone()
    changed[0, -1] = 9
    with torch.no_grad():
        a, b = model(history), model(changed)
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-6)
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_more_left_padding_does_not_change_last_output():
    model = _tiny()
    with torch.no_grad():
        short = model(torch.tensor([[0, 7, 8, 9]]))[:, -1]
        padded = model(torch.tensor([[0, 0, 0, 7, 8, 9]]))[:, -1]
    assert torch.allclose(short, padded, atol=1e-5)


def test_score_column_zero_is_minus_inf():
    scores = _tiny().score(torch.tensor([[0, 0, 0, 1, 2, 3]]))
    assert torch.isneginf(scores[:, 0]).all()
    assert torch.isfinite(scores[:, 1:]).all()


def test_window_loss_decreases_when_overfitting():
    model = _tiny().train()
    windows = torch.tensor([[0, 0, 1, 2, 3, 4, 5], [0, 6, 7, 8, 9, 10, 11]])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.window_loss(windows)
    for _ in range(15):
        optimizer.zero_grad()
        loss = model.window_loss(windows)
        loss.backward()
        optimizer.step()
    assert model.window_loss(windows).item() < 0.5 * first.item()


def test_window_loss_ignores_targets_after_padding():
    model = _tiny()
    full = torch.tensor([[0, 0, 0, 0, 0, 1, 2]])
    # Only 1 -> 2 is a target; changing the first item's padding-predicted target has no effect.
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model.score(full[:, :-1]), full[:, -1])
        assert torch.allclose(model.window_loss(full), expected, atol=1e-6)


def test_history_longer_than_max_len_is_an_error():
    with pytest.raises(ValueError, match="max_len=6"):
        _tiny()(torch.ones(1, 7, dtype=torch.long))


def test_hidden_not_divisible_by_heads_is_an_error():
    with pytest.raises(ValueError, match="hidden=15"):
        SASRec(n_items=5, hidden=15, n_heads=2)


def test_untied_output_scores_against_its_own_table():
    model = _tiny(tied_output=False)
    history = torch.tensor([[0, 0, 0, 1, 2, 3]])
    with torch.no_grad():
        expected = model(history)[:, -1] @ model.output_emb.weight.T
        assert torch.allclose(model.score(history)[:, 1:], expected[:, 1:], atol=1e-6)
    assert model.output_emb.weight.data_ptr() != model.item_embeddings().data_ptr()


def test_window_loss_counts_only_the_last_targets_it_is_told():
    model = _tiny()
    window = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        # counted=2: only 5 -> 6 and 6 -> 7 (positions 4 and 5) are targets
        logits = model._logits(model(window[:, :-1]))[0, 4:]
        expected = torch.nn.functional.cross_entropy(logits, torch.tensor([6, 7]))
        assert torch.allclose(model.window_loss(window, torch.tensor([2])), expected, atol=1e-6)


@pytest.mark.parametrize("stride", [None, 1, 2, 3, 5])
def test_windows_make_every_item_after_the_first_a_target_exactly_once(stride):
    import numpy as np

    from etegrec.data import make_windows

    sequences = [np.arange(1, n + 1) + 100 * n for n in (1, 2, 5, 6, 7, 13)]
    windows, counted = make_windows(sequences, 6, stride)
    assert windows.shape == (len(counted), 6)
    targets = []
    for window, c in zip(windows, counted):
        inputs, next_items = window[:-1], window[1:]
        keep = (np.arange(5) >= 5 - c) & (inputs != 0)
        targets += next_items[keep].tolist()
        if stride is not None:
            assert c == stride or window[0] == 0 or window[0] % 100 == 1  # a sequence's first window counts all
    expected = [x for seq in sequences for x in seq[1:]]
    assert sorted(targets) == sorted(expected)


def test_window_stride_out_of_range_is_an_error():
    import numpy as np

    from etegrec.data import make_windows

    with pytest.raises(ValueError, match="stride=6"):
        make_windows([np.arange(1, 9)], 6, 6)


def test_repeat_bias_shifts_exactly_the_history_items():
    plain, biased = _tiny(), _tiny(repeat_bias=True)
    biased.load_state_dict({**plain.state_dict(), "repeat_bias": torch.tensor(-2.5)})
    history = torch.tensor([[0, 0, 3, 4, 5, 3], [1, 2, 7, 8, 9, 10]])
    with torch.no_grad():
        diff = biased.score(history) - plain.score(history)
    expected = torch.zeros(2, 31)
    expected[0, [3, 4, 5]] = -2.5
    expected[1, [1, 2, 7, 8, 9, 10]] = -2.5
    assert torch.allclose(diff[:, 1:], expected[:, 1:])  # column 0 (padding) is -inf in both


def test_repeat_bias_in_training_covers_each_positions_own_history_only():
    model = _tiny(repeat_bias=True)
    inputs = torch.tensor([[0, 0, 3, 4, 5, 3], [1, 2, 7, 8, 9, 10]])
    rows, positions = torch.meshgrid(torch.arange(2), torch.arange(6), indexing="ij")
    seen = model._seen(inputs, rows.flatten(), positions.flatten()).view(2, 6, 31)
    for b in range(2):
        for t in range(6):
            expected = torch.zeros(31)
            expected[inputs[b, : t + 1]] = 1.0
            # column 0 is padding: its logit is -inf whatever seen says
            assert torch.equal(seen[b, t, 1:], expected[1:]), (b, t)


def test_repeat_bias_learns_to_push_history_items_down_when_users_never_repeat():
    model = _tiny(repeat_bias=True).train()
    gen = torch.Generator().manual_seed(0)
    windows = torch.stack([torch.randperm(30, generator=gen)[:7] + 1 for _ in range(32)])  # no repeats
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        optimizer.zero_grad()
        model.window_loss(windows).backward()
        optimizer.step()
    assert model.repeat_bias.item() < -0.1


def test_window_loss_is_the_mean_loss_of_every_scored_position_with_its_own_history_biased():
    model = _tiny(repeat_bias=True)
    with torch.no_grad():
        model.repeat_bias.fill_(-2.0)
        windows = torch.tensor([[0, 0, 0, 4, 9, 4, 2], [3, 1, 5, 7, 3, 8, 6]])
        states = model(windows[:, :-1])  # (2, 6, hidden)
        losses = []
        for b in range(2):
            for t in range(6):
                history, target = windows[b, : t + 1], windows[b, t + 1]
                if history[-1] == 0 or target == 0:
                    continue
                seen = torch.zeros(31)
                seen[history] = 1.0
                logits = model._logits(states[b, t], seen)
                losses.append(torch.nn.functional.cross_entropy(logits[None], target[None]))
        assert len(losses) == 9
        assert torch.allclose(model.window_loss(windows), torch.stack(losses).mean(), atol=1e-6)


def test_sampled_loss_tends_to_the_full_softmax_as_the_draws_cover_the_catalogue():
    model = _tiny(repeat_bias=True)
    windows = torch.tensor([[0, 0, 0, 4, 9, 4, 2], [3, 1, 5, 7, 3, 8, 6]])
    with torch.no_grad():
        model.repeat_bias.fill_(-2.0)
        full = model.window_loss(windows)
        torch.manual_seed(0)
        sampled = model.window_loss(windows, negatives=200_000)  # ~6,700 draws of each of the 30 items
    assert sampled.item() == pytest.approx(full.item(), abs=0.01)


def test_sampled_loss_never_takes_the_target_for_a_negative():
    model = _tiny(n_items=1)  # every draw is the target: all of them are masked, the target stands alone
    with torch.no_grad():
        assert model.window_loss(torch.tensor([[0, 0, 0, 0, 1, 1, 1]]), negatives=8).item() == 0.0


def test_sampled_loss_trains_the_model_as_the_full_one_does():
    model = _tiny().train()
    windows = torch.tensor([[0, 0, 1, 2, 3, 4, 5], [0, 6, 7, 8, 9, 10, 11]])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    first = model.window_loss(windows).item()
    for _ in range(15):
        optimizer.zero_grad()
        model.window_loss(windows, negatives=8).backward()
        optimizer.step()
    assert model.window_loss(windows).item() < 0.5 * first  # judged by the full softmax


def test_sampled_loss_needs_at_least_one_negative():
    with pytest.raises(ValueError, match="negatives=0 must be a positive"):
        _tiny().window_loss(torch.tensor([[0, 0, 1, 2, 3, 4, 5]]), negatives=0)


def test_sampled_loss_biases_exactly_the_drawn_items_in_each_positions_history():
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 31, (5, 6), generator=gen)
    rows, positions = torch.arange(5).repeat_interleave(6), torch.arange(6).repeat(5)
    targets, drawn = torch.randint(1, 31, (30,), generator=gen), torch.randint(1, 31, (40,), generator=gen)
    seen = SASRec._seen_among(inputs, rows, positions, targets, drawn)
    for i in range(30):
        history = set(inputs[rows[i], : positions[i] + 1].tolist()) - {0}
        expected = [int(targets[i]) in history] + [int(d) in history for d in drawn]
        assert seen[i].tolist() == expected, i
