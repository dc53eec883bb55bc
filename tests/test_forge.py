"""FORGE code assignment (``assign_codes``) and ``get_code``, checked against plain-loop references."""
from __future__ import annotations

from pathlib import Path

import hashlib
import os
import subprocess
import sys
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from etegrec import signals
from etegrec.forge import CodeAssignment, CodeOverflowError, ItemCodes, assign_codes, get_code
from etegrec.forge import assign as assign_module
from etegrec.forge.assign import prefix_offsets

ASSIGN_PATH = assign_module.__file__


# ---------------------------------------------------------------- references: one item at a time

def _with_suffix(rows: list[list[int]]) -> np.ndarray:
    """Append to each row how many earlier rows have the same codes."""
    seen: dict[tuple[int, ...], int] = {}
    out = []
    for row in rows:
        key = tuple(row)
        out.append(row + [seen.get(key, 0)])
        seen[key] = seen.get(key, 0) + 1
    return np.array(out, dtype=np.int64).reshape(len(rows), -1)


def reference_codes(rq: np.ndarray, code_num: int, use_forge: bool = True) -> np.ndarray:
    """SPEC §2 FORGE written as directly as possible (round_robin)."""
    rows = [[int(c) for c in row] for row in rq]
    if use_forge:
        taken: dict[tuple[int, ...], int] = {}
        for row in rows:
            prefix = tuple(row[:-1])
            k = taken.get(prefix, 0)
            taken[prefix] = k + 1
            row[-1] = (zlib.adler32(str(prefix).encode("utf-8")) % code_num + k) % code_num
    return _with_suffix(rows) if rows else np.zeros((0, rq.shape[1] + 1), np.int64)


def reference_nearest_free(rq: np.ndarray, code_num: int, distances: np.ndarray) -> np.ndarray:
    """Duplicates (not the first holder of their full code) move to the nearest free last code."""
    rows = [[int(c) for c in row] for row in rq]
    holders: dict[tuple[int, ...], int] = {}
    movers = []
    for item, row in enumerate(rows):
        if tuple(row) in holders:
            movers.append(item)
        else:
            holders[tuple(row)] = item
    used: dict[tuple[int, ...], set[int]] = {}
    for full in holders:
        used.setdefault(full[:-1], set()).add(full[-1])
    for item in movers:
        taken = used[tuple(rows[item][:-1])]
        free = [c for c in range(code_num) if c not in taken]
        if free:
            code = min(free, key=lambda c: (distances[item][c], c))
            taken.add(code)
            rows[item][-1] = code
    return _with_suffix(rows)


def random_codes(n: int, length: int, code_num: int, alphabet: int | None = None, seed: int = 0):
    """Random RQ codes; a small ``alphabet`` for the prefix columns gives few, large prefix groups."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, code_num, size=(n, length))
    if alphabet is not None and length > 1:
        codes[:, :-1] = rng.integers(0, alphabet, size=(n, length - 1))
    return codes


# ------------------------------------------------------------------------ assign_codes: reference

CASES = [  # (n_items, L, code_num, prefix alphabet)
    (0, 3, 256, None), (1, 3, 256, None), (2, 3, 256, None), (2, 1, 4, None),
    (3000, 3, 256, None), (3000, 3, 8, None), (3000, 2, 8, None), (3000, 1, 256, None),
    (3000, 3, 256, 2), (3000, 2, 64, 1), (3000, 2, 8, 3), (50, 1, 8, None), (200, 3, 4, 1),
    (300, 7, 256, None), (300, 10, 256, 2),  # keys too wide for the packed sort; for one int64
]


@pytest.mark.parametrize("use_forge", [True, False])
@pytest.mark.parametrize("n, length, code_num, alphabet", CASES)
def test_round_robin_matches_reference(n, length, code_num, alphabet, use_forge):
    rq = random_codes(n, length, code_num, alphabet)
    expected = reference_codes(rq, code_num, use_forge)
    if n and expected[:, -1].max() + 1 > code_num:
        with pytest.raises(CodeOverflowError):
            assign_codes(rq, code_num, use_forge=use_forge)
    else:
        np.testing.assert_array_equal(assign_codes(rq, code_num, use_forge=use_forge).codes, expected)


@pytest.mark.parametrize("n, length, code_num, alphabet",
                         [(3000, 3, 256, None), (3000, 2, 64, 3), (7, 1, 16, None)])
def test_summary_fields_match_reference(n, length, code_num, alphabet):
    rq = random_codes(n, length, code_num, alphabet, seed=1)
    after, before = reference_codes(rq, code_num), reference_codes(rq, code_num, use_forge=False)
    result = assign_codes(rq, code_num)
    prefix_sizes: dict[tuple[int, ...], int] = {}
    for row in rq.tolist():
        prefix_sizes[tuple(row[:-1])] = prefix_sizes.get(tuple(row[:-1]), 0) + 1
    assert result.max_conflict == after[:, -1].max() + 1
    assert result.max_conflict_before == before[:, -1].max() + 1
    assert result.collision_rate == (n - len({tuple(r) for r in after[:, :-1].tolist()})) / n
    assert result.collision_rate_before == (n - len({tuple(r) for r in rq.tolist()})) / n
    assert result.n_prefix_groups == len(prefix_sizes)
    assert result.largest_prefix_group == max(prefix_sizes.values())


def test_no_items_give_empty_codes_and_zero_conflict():
    result = assign_codes(np.zeros((0, 3), np.int64), 256)
    assert result.codes.shape == (0, 4)
    assert (result.max_conflict, result.collision_rate, result.changed) == (0, 0.0, 0)
    assert (result.n_prefix_groups, result.largest_prefix_group) == (0, 0)


# ------------------------------------------------------------------------ assign_codes: by hand

def test_hand_example_uses_adler32_offset_of_prefix_text():
    # zlib.adler32(b"(10, 1)") = 80740656 and 80740656 % 256 = 48, so the three items with prefix
    # (10, 1) get 48, 49, 50 in item order; zlib.adler32(b"(3, 4)") = 60162309, % 256 = 5.
    rq = np.array([[10, 1, 7], [3, 4, 9], [10, 1, 7], [10, 1, 200]])
    result = assign_codes(rq, 256)
    np.testing.assert_array_equal(result.codes,
                                  [[10, 1, 48, 0], [3, 4, 5, 0], [10, 1, 49, 0], [10, 1, 50, 0]])
    assert (result.max_conflict, result.max_conflict_before, result.collision_rate_before) == (1, 2, 0.25)


def test_one_code_prefix_is_written_with_trailing_comma_and_wraps_around():
    # zlib.adler32(b"(10,)") = 44171487 and 44171487 % 16 = 15: seventeen items with prefix (10,)
    # get 15, 0, 1, ..., 14, 15; the last shares (10, 15) with the first, so its suffix is 1.
    result = assign_codes(np.array([[10, 3]] * 17), 16)
    np.testing.assert_array_equal(result.codes[:, 1], [15] + list(range(15)) + [15])
    np.testing.assert_array_equal(result.codes[:, 2], [0] * 16 + [1])
    assert result.max_conflict == 2


def test_single_layer_codes_use_empty_prefix_text():
    # L = 1: the prefix is (), written "()"; zlib.adler32(b"()") = 8061010, % 256 = 82.
    result = assign_codes(np.array([[5], [5], [0]]), 256)
    np.testing.assert_array_equal(result.codes, [[82, 0], [83, 0], [84, 0]])


def test_prefix_offsets_match_zlib_for_any_digit_count():
    rows = np.random.default_rng(2).integers(0, 10 ** 9, size=(200, 3))
    rows[:5] = [0, 9, 10]
    expected = [zlib.adler32(str(tuple(int(c) for c in row)).encode()) % 1_000_003 for row in rows]
    np.testing.assert_array_equal(prefix_offsets(rows, 1_000_003), expected)


def test_codes_do_not_depend_on_python_hash_seed():
    # Loads assign.py and its checks alone (numpy only, not the package's torch) so that the two
    # interpreters start fast.
    program = ("import hashlib, importlib.util, sys, types, numpy as np; "
               "package = sys.modules['forge'] = types.ModuleType('forge'); "
               f"package.__path__ = [{str(Path(ASSIGN_PATH).parent)!r}]; "
               f"spec = importlib.util.spec_from_file_location('forge.assign', {ASSIGN_PATH!r}); "
               "module = sys.modules['forge.assign'] = importlib.util.module_from_spec(spec); "
               "spec.loader.exec_module(module); "
               "rq = np.random.default_rng(5).integers(0, 16, size=(2000, 3)); "
               "print(hashlib.sha256(module.assign_codes(rq, 16).codes.tobytes()).hexdigest())")
    runs = [subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2024")]
    outputs = [run.communicate(timeout=60)[0].strip() for run in runs]
    here = assign_codes(np.random.default_rng(5).integers(0, 16, size=(2000, 3)), 16).codes
    assert outputs == [hashlib.sha256(here.tobytes()).hexdigest()] * 2


# ------------------------------------------------------------------------ assign_codes: overflow

def test_overflow_names_shared_codes_size_and_code_num():
    # L = 1, offset of "()" is 8061010 % 4 = 2: 20 items go round 4 codes, 5 on code 2 first.
    message = r"5 items share the codes \(2,\).*max_conflict 5 exceeds code_num=4.*collapse"
    with pytest.raises(CodeOverflowError, match=message):
        assign_codes(np.zeros((20, 1), np.int64), 4)


def test_overflow_without_forge_suggests_turning_it_on():
    message = r"3 items share the codes \(1, 1\).*code_num=2.*use_forge=True"
    with pytest.raises(CodeOverflowError, match=message):
        assign_codes(np.ones((3, 2), np.int64), 2, use_forge=False)


def test_conflict_equal_to_code_num_is_allowed():
    assert assign_codes(np.zeros((16, 1), np.int64), 4).max_conflict == 4


def test_overflow_error_is_a_value_error():
    assert issubclass(CodeOverflowError, ValueError)


# ------------------------------------------------------------------------ assign_codes: nearest_free

def test_nearest_free_moves_duplicates_to_nearest_free_code():
    rq = np.array([[0, 1], [0, 1], [0, 2], [0, 1]])
    distances = np.array([[9, 9, 9, 9], [0.5, 0.0, 0.1, 0.2], [9, 9, 9, 9], [0.3, 0.0, 0.0, 0.1]])
    # item 2 (row 1) may not take 1 or 2 (held), so 3 (0.2 < 0.5); item 4 then only has 0 left.
    result = assign_codes(rq, 4, policy="nearest_free", distances=distances)
    np.testing.assert_array_equal(result.codes, [[0, 1, 0], [0, 3, 0], [0, 2, 0], [0, 0, 0]])


def test_nearest_free_keeps_unique_codes():
    rq = random_codes(500, 3, 16, alphabet=4, seed=3)
    distances = np.random.default_rng(3).random((500, 16))
    result = assign_codes(rq, 16, policy="nearest_free", distances=distances)
    first_holders = np.unique(rq, axis=0, return_index=True)[1]
    np.testing.assert_array_equal(result.codes[first_holders, :-1], rq[first_holders])


@pytest.mark.parametrize("n, length, code_num, alphabet",
                         [(3000, 3, 64, 8), (1000, 3, 16, 7), (3000, 2, 256, 4), (300, 1, 512, None)])
def test_nearest_free_matches_reference(n, length, code_num, alphabet):
    rq = random_codes(n, length, code_num, alphabet, seed=4)
    distances = np.random.default_rng(4).integers(0, 5, size=(n, code_num)).astype(float)  # many ties
    result = assign_codes(rq, code_num, policy="nearest_free", distances=distances)
    np.testing.assert_array_equal(result.codes, reference_nearest_free(rq, code_num, distances))


def test_nearest_free_without_free_code_keeps_code_and_separates_by_suffix():
    rq = np.array([[0, 0], [0, 0], [0, 1]])  # prefix (0,) already holds both codes
    result = assign_codes(rq, 2, policy="nearest_free", distances=np.zeros((3, 2)))
    np.testing.assert_array_equal(result.codes, [[0, 0, 0], [0, 0, 1], [0, 1, 0]])


def test_nearest_free_is_deterministic():
    rq = random_codes(2000, 3, 32, alphabet=6, seed=6)
    distances = np.random.default_rng(6).random((2000, 32))
    first = assign_codes(rq, 32, policy="nearest_free", distances=distances)
    second = assign_codes(rq, 32, policy="nearest_free", distances=distances.copy())
    np.testing.assert_array_equal(first.codes, second.codes)


def test_nearest_free_requires_distances():
    with pytest.raises(ValueError, match="distances=None.*nearest_free"):
        assign_codes(np.zeros((2, 2), np.int64), 4, policy="nearest_free")


# ------------------------------------------------------------------------ assign_codes: bookkeeping

def test_changed_counts_items_whose_full_code_differs():
    rq = random_codes(100, 3, 256, seed=7)
    previous = assign_codes(rq, 256).codes.copy()
    previous[[3, 50], -1] += 1
    assert assign_codes(rq, 256, previous=previous).changed == 2


def test_changed_is_every_item_without_previous():
    assert assign_codes(random_codes(10, 3, 256), 256).changed == 10


def test_codes_are_read_only_int64():
    codes = assign_codes(random_codes(10, 3, 256), 256).codes
    assert codes.dtype == np.int64 and not codes.flags.writeable


@pytest.mark.parametrize("rq, code_num, kwargs, message", [
    (np.zeros(3, np.int64), 4, {}, r"shape \(3,\).*\[n_items, L\]"),
    (np.zeros((3, 2)), 4, {}, "dtype.*integer"),
    (np.array([[0, 4]]), 4, {}, r"contains 4, outside \[0, 4\)"),
    (np.array([[0, -1]]), 4, {}, r"contains -1"),
    (np.zeros((3, 2), np.int64), 4, {"policy": "greedy"}, "policy='greedy'.*round_robin"),
    (np.zeros((3, 2), np.int64), 4, {"previous": np.zeros((3, 2))}, r"previous has shape \(3, 2\).*\(3, 3\)"),
    (np.zeros((3, 2), np.int64), 0, {}, r"code_num=0 is not a codebook size"),
])
def test_bad_input_is_rejected_with_the_offending_value(rq, code_num, kwargs, message):
    with pytest.raises(ValueError, match=message):
        assign_codes(rq, code_num, **kwargs)


# ------------------------------------------------------------------------ get_code

class StandInTokenizer(nn.Module):
    """A residual quantiser with fixed random codebooks and the RQ-VAE's output interface."""

    def __init__(self, dim: int = 4, layers: int = 2, codebook_size: int = 8):
        super().__init__()
        self.codebook_size = codebook_size
        generator = torch.Generator().manual_seed(0)
        self.codebooks = nn.Parameter(torch.randn(layers, codebook_size, dim, generator=generator))
        self.dropout = nn.Dropout(0.5)
        self.modes_seen: list[bool] = []

    def forward(self, x):
        self.modes_seen.append(self.training)
        residual, codes, logits = x, [], []
        for book in self.codebooks:
            negative_distance = -((residual[:, None, :] - book[None]) ** 2).sum(-1)  # (batch, K)
            code = negative_distance.argmax(-1)
            codes.append(code)
            logits.append(negative_distance)
            residual = residual - book[code]
        return SimpleNamespace(codes=torch.stack(codes, 1), logits=logits)


def item_table(n_items: int = 60, dim: int = 4) -> torch.Tensor:
    return torch.randn(n_items + 1, dim, generator=torch.Generator().manual_seed(1))  # row 0: padding


def test_get_code_pads_row_zero_and_matches_assign_codes():
    tokenizer, items = StandInTokenizer(), item_table()
    result = get_code(tokenizer, items, epoch=0, batch_size=7)
    rq = tokenizer(items[1:]).codes.numpy()
    assert isinstance(result, ItemCodes) and isinstance(result.assignment, CodeAssignment)
    assert result.codes.dtype == torch.int64 and result.codes.shape == (61, 3)
    assert result.codes[0].eq(0).all()
    np.testing.assert_array_equal(result.codes[1:].numpy(), reference_codes(rq, 8))


def test_get_code_emits_codes_assigned_payload():
    items = item_table()
    with signals.recording(signals.codes_assigned) as events:
        result = get_code(StandInTokenizer(), items, epoch=3, sender="trainer")
    (event,) = events
    assert event.sender == "trainer"
    assert set(event.payload) == {"stage", "epoch", "codes", "use_forge", "policy", "max_conflict",
                                  "max_conflict_before", "collision_rate", "changed", "seconds"}
    payload = event.payload
    np.testing.assert_array_equal(payload["codes"], result.codes[1:].numpy())
    assert payload["max_conflict"] == payload["codes"][:, -1].max() + 1
    assert (payload["stage"], payload["epoch"], payload["use_forge"], payload["policy"]) == (
        "joint", 3, True, "round_robin")
    assert payload["changed"] == 60
    distinct = {tuple(row) for row in payload["codes"][:, :-1].tolist()}
    assert payload["collision_rate"] == (60 - len(distinct)) / 60
    assert payload["seconds"] >= 0


def test_get_code_without_forge_reports_raw_conflict():
    with signals.recording(signals.codes_assigned) as events:
        result = get_code(StandInTokenizer(), item_table(), epoch=0, use_forge=False)
    payload = events[0].payload
    assert payload["use_forge"] is False
    assert payload["max_conflict"] == payload["max_conflict_before"] == result.codes[:, -1].max() + 1


def test_get_code_counts_changes_against_previous_tensor_or_array():
    tokenizer, items = StandInTokenizer(), item_table()
    first = get_code(tokenizer, items, epoch=0)
    moved = items.clone()
    moved[5] += 100.0  # item 5 lands elsewhere
    previous_array = first.assignment.codes
    for previous in (first.codes, previous_array, first):
        result = get_code(tokenizer, moved, epoch=1, previous=previous)
        assert result.assignment.changed == int((result.codes != first.codes).any(1).sum()) >= 1


def test_get_code_restores_each_module_mode():
    tokenizer = StandInTokenizer()
    tokenizer.train()
    tokenizer.dropout.eval()
    get_code(tokenizer, item_table(), epoch=0, batch_size=16)
    assert tokenizer.modes_seen == [False] * 4
    assert tokenizer.training and not tokenizer.dropout.training


def test_get_code_nearest_free_uses_last_layer_distances():
    tokenizer, items = StandInTokenizer(codebook_size=8), item_table(n_items=40)
    out = tokenizer(items[1:])
    expected = reference_nearest_free(out.codes.numpy(), 8, (-out.logits[-1]).detach().numpy())
    result = get_code(tokenizer, items, epoch=0, policy="nearest_free", batch_size=9)
    np.testing.assert_array_equal(result.assignment.codes, expected)


def test_get_code_rejects_previous_tensor_without_padding_row():
    tokenizer, items = StandInTokenizer(), item_table()
    first = get_code(tokenizer, items, epoch=0)
    with pytest.raises(ValueError, match=r"previous is a tensor of shape \(60, 3\).*padding row 0"):
        get_code(tokenizer, items, epoch=1, previous=first.codes[1:])


def test_get_code_with_a_margin_keeps_previous_codes_that_are_nearly_as_near():
    from etegrec.models import RQVAE

    torch.manual_seed(0)
    tokenizer = RQVAE(in_dim=4, hidden_dims=[8], e_dim=4, num_layers=2, codebook_size=8)
    items = item_table(n_items=50)
    tokenizer.kmeans_init_from(items[1:])
    first = get_code(tokenizer, items, epoch=0, use_forge=False)
    with torch.no_grad():  # move the tokenizer a little: some items change their nearest codes
        for p in tokenizer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    nearest = get_code(tokenizer, items, epoch=1, use_forge=False, previous=first)
    kept = get_code(tokenizer, items, epoch=1, use_forge=False, previous=first, margin=0.3)
    assert get_code(tokenizer, items, epoch=1, use_forge=False, previous=first, margin=0.0).assignment.changed \
        == nearest.assignment.changed > 0
    assert kept.assignment.changed < nearest.assignment.changed
    sticky, _ = tokenizer.sticky_codes(items[1:], first.codes[1:, :2], 0.3)
    np.testing.assert_array_equal(kept.assignment.codes[:, :2], sticky.numpy())
    huge = get_code(tokenizer, items, epoch=1, use_forge=False, previous=first, margin=1e9)
    np.testing.assert_array_equal(huge.assignment.codes[:, :2], first.assignment.codes[:, :2])
    without_previous = get_code(tokenizer, items, epoch=1, use_forge=False, margin=0.3)  # nothing to keep
    np.testing.assert_array_equal(without_previous.codes, nearest.codes)
    with pytest.raises(ValueError, match=r"margin=-0.1 must be 0"):
        get_code(tokenizer, items, epoch=1, margin=-0.1)
