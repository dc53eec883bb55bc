"""Readers, the iterative k-core filter, the leave-one-out split, the cache and the data CLI."""
from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from etegrec.data import (
    DataError,
    detect_format,
    k_core,
    load_dataset,
    prepare_interactions,
    read_interactions,
    read_prepared,
    sources,
)

INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"


def write_inter(path: Path, rows, header: str = INTER_HEADER) -> Path:
    path.write_text("\n".join([header, *("\t".join(map(str, r)) for r in rows)]) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, records) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def prepare(path: Path, **kwargs):
    kwargs.setdefault("min_count", 5)
    return prepare_interactions(read_interactions(path), name=path.stem, **kwargs)


def user_sequence(data, user: int) -> list[int]:
    return data.seq_items[data.seq_offsets[user]:data.seq_offsets[user + 1]].tolist()


def padded(items: list[int], length: int) -> list[int]:
    return [0] * (length - len(items)) + items


# The hand case: items first appear in the file as z9, a1, m5, b2, y8, c3 (ids 1..6). u1's rows are
# out of chronological order; u2..u5 see every item in file order, so everything is 5-core.
HAND_ITEMS = ("z9", "a1", "m5", "b2", "y8", "c3")


def write_hand_case(path: Path, u1_times: list[int]) -> Path:
    rows = [("u1", item, t) for item, t in zip(HAND_ITEMS, u1_times)]
    rows += [(f"u{u}", item, t) for u in range(2, 6) for t, item in enumerate(HAND_ITEMS, start=1)]
    return write_inter(path, rows)


@pytest.fixture
def hand_case(tmp_path: Path) -> Path:
    # u1 chronologically: a1(10) b2(20) c3(30) m5(40) z9(50) y8(60) -> ids [2, 4, 6, 3, 1, 5]
    return write_hand_case(tmp_path / "hand.inter", [50, 10, 40, 20, 60, 30])


# ----------------------------------------------------------------------------------------- readers

def test_inter_reader_finds_columns_by_name_in_any_order(tmp_path):
    path = write_inter(tmp_path / "reordered.inter", [
        (300, "web", "i7", 4.0, "u2"),
        (100, "app", "i3", 5.0, "u1"),
    ], header="timestamp:float\tsource:token\titem_id:token\trating:float\tuser_id:token")

    inter = read_interactions(path)

    assert inter.users.tolist() == ["u2", "u1"]
    assert inter.items.tolist() == ["i7", "i3"]
    assert inter.timestamps.tolist() == [300.0, 100.0]


def test_movielens_reader_reads_grouplens_u_data(tmp_path):
    path = tmp_path / "u.data"
    path.write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n")

    inter = read_interactions(path)

    assert inter.users.tolist() == ["196", "186"]
    assert inter.items.tolist() == ["242", "302"]
    assert inter.timestamps.tolist() == [881250949.0, 891717742.0]


AMAZON_2023 = [
    {"rating": 5.0, "title": "Great", "asin": "B01", "parent_asin": "P01", "user_id": "AE1",
     "timestamp": 1588687728923, "verified_purchase": True},
    {"rating": 3.0, "title": "Meh", "asin": "B02", "parent_asin": "P02", "user_id": "AE2",
     "timestamp": 1588687728924, "verified_purchase": False},
]


@pytest.mark.parametrize("name", ["Musical_Instruments.jsonl", "Musical_Instruments.jsonl.gz"])
def test_amazon2023_reader_reads_parent_asin_and_millisecond_timestamps(tmp_path, name):
    path = write_jsonl(tmp_path / name, AMAZON_2023)

    inter = read_interactions(path)

    assert inter.users.tolist() == ["AE1", "AE2"]
    assert inter.items.tolist() == ["P01", "P02"]  # parent_asin, not the variant's asin
    assert inter.timestamps.tolist() == [1588687728923.0, 1588687728924.0]  # 1 ms apart stays ordered


def test_amazon2014_reader_reads_reviewer_asin_and_unix_review_time(tmp_path):
    path = write_jsonl(tmp_path / "reviews_Musical_Instruments_5.json", [
        {"reviewerID": "A2S", "asin": "0000013714", "reviewerName": "J.", "overall": 5.0,
         "unixReviewTime": 1252800000, "reviewTime": "09 13, 2009"},
        {"reviewerID": "A3T", "asin": "0000031852", "overall": 4.0, "unixReviewTime": 1253000000},
    ])

    inter = read_interactions(path)

    assert inter.users.tolist() == ["A2S", "A3T"]
    assert inter.items.tolist() == ["0000013714", "0000031852"]
    assert inter.timestamps.tolist() == [1252800000.0, 1253000000.0]


def write_prepared(folder: Path, name: str = "Instruments", emb_map: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / f"{name}.train.jsonl", [
        {"inter_history": [10], "target_id": 20},
        {"inter_history": [10, 20], "target_id": 30},
    ])
    write_jsonl(folder / f"{name}.valid.jsonl", [{"inter_history": [10, 20, 30], "target_id": 40}])
    write_jsonl(folder / f"{name}.test.jsonl", [{"inter_history": [10, 20, 30, 40], "target_id": 50}])
    emb_map = {"a": 10, "b": 20, "c": 30, "d": 40, "e": 50} if emb_map is None else emb_map
    (folder / f"{name}.emb_map.json").write_text(json.dumps(emb_map))
    return folder / f"{name}.train.jsonl"


def test_read_prepared_reads_the_three_splits_and_the_item_map(tmp_path):
    splits = read_prepared(write_prepared(tmp_path))

    assert splits.train == ([[10], [10, 20]], [20, 30])
    assert splits.valid == ([[10, 20, 30]], [40])
    assert splits.test == ([[10, 20, 30, 40]], [50])
    assert splits.item_map == {"a": 10, "b": 20, "c": 30, "d": 40, "e": 50}


def test_prepared_splits_are_renumbered_and_padded(tmp_path):
    data = load_dataset("Instruments", data_path=write_prepared(tmp_path), max_his_len=3)

    assert data.item_map == ("a", "b", "c", "d", "e")  # file ids 10..50 -> 1..5
    assert data.train_history.tolist() == [[0, 0, 1], [0, 1, 2]]
    assert data.train_target.tolist() == [2, 3]
    assert data.valid_history.tolist() == [[1, 2, 3]]
    assert data.test_history.tolist() == [[2, 3, 4]]
    assert data.test_target.tolist() == [5]


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("ml.inter", INTER_HEADER + "\n", "inter"),
    ("ml.txt", INTER_HEADER + "\n", "inter"),  # a RecBole header is recognised without the suffix
    ("u.data", "196\t242\t3\t881250949\n", "movielens"),
    ("reviews.jsonl", json.dumps(AMAZON_2023[0]) + "\n", "amazon2023"),
    ("reviews.json", json.dumps({"reviewerID": "A", "asin": "B", "unixReviewTime": 1}) + "\n", "amazon2014"),
])
def test_detect_format_recognises_each_format(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)

    assert detect_format(path) == expected


def test_detect_format_recognises_gzipped_json_lines(tmp_path):
    assert detect_format(write_jsonl(tmp_path / "reviews.jsonl.gz", AMAZON_2023)) == "amazon2023"


@pytest.mark.parametrize("target", ["train_file", "folder"])
def test_detect_format_recognises_prepared_splits_by_file_or_folder(tmp_path, target):
    train_file = write_prepared(tmp_path / "splits")

    assert detect_format(train_file if target == "train_file" else train_file.parent) == "prepared"


def test_forced_format_overrides_detection(tmp_path):
    path = tmp_path / "grouplens.inter"  # the suffix says RecBole, the content is u.data
    path.write_text("196\t242\t3\t881250949\n")

    inter = read_interactions(path, fmt="movielens")

    assert inter.users.tolist() == ["196"]
    assert inter.items.tolist() == ["242"]


def test_unknown_forced_format_is_an_error_listing_the_formats(tmp_path):
    path = write_inter(tmp_path / "x.inter", [("u", "i", 1)])

    with pytest.raises(DataError, match=r"unknown data format 'csv'; expected one of inter, movielens"):
        read_interactions(path, fmt="csv")


# ---------------------------------------------------------------------------- filtering and splits

def test_k_core_repeats_passes_until_nothing_changes():
    # A..E x items 1..5 is a 5-core. X has 4 rows (dropped in pass 1), which leaves item 6 with 4
    # (pass 2), which leaves Y with 4 (pass 3), which leaves item 7 with 4 (pass 4).
    rows = [(u, i) for u in "ABC" for i in "1234567"] + [("D", i) for i in "123457"]
    rows += [("E", i) for i in "12345"] + [("X", i) for i in "6123"] + [("Y", i) for i in "61237"]
    users = np.array(["ABCDEXY".index(u) for u, _ in rows])
    items = np.array([int(i) for _, i in rows])

    keep = k_core(users, items, 5)

    expected = [u in "ABCDE" and i in "12345" for u, i in rows]
    assert keep.tolist() == expected
    assert keep.sum() == 25


def test_prepare_keeps_only_the_iterative_five_core(tmp_path):
    rows = [(u, i) for u in "ABC" for i in "1234567"] + [("D", i) for i in "123457"]
    rows += [("E", i) for i in "12345"] + [("X", i) for i in "6123"] + [("Y", i) for i in "61237"]
    path = write_inter(tmp_path / "chain.inter", [(u, i, t) for t, (u, i) in enumerate(rows)])

    data = prepare(path)

    assert data.stats()["users"] == 5
    assert data.stats()["interactions"] == 25
    assert data.item_map == ("1", "2", "3", "4", "5")


def test_equal_timestamps_keep_file_order(tmp_path):
    # u1: z9@5 a1@1 m5@5 b2@1 y8@5 c3@1 -> a1 b2 c3 (t=1, file order) then z9 m5 y8 (t=5, file order)
    data = prepare(write_hand_case(tmp_path / "ties.inter", [5, 1, 5, 1, 5, 1]))

    assert user_sequence(data, 0) == [2, 4, 6, 1, 3, 5]


def test_items_are_numbered_from_one_in_order_of_first_appearance(hand_case):
    data = prepare(hand_case)

    assert data.item_map == HAND_ITEMS  # id i is item_map[i - 1]; 0 stays padding
    assert data.n_items == 6
    assert sorted(set(data.seq_items.tolist())) == [1, 2, 3, 4, 5, 6]


def test_leave_one_out_split_of_a_hand_case(hand_case):
    data = prepare(hand_case, max_his_len=10)

    assert user_sequence(data, 0) == [2, 4, 6, 3, 1, 5]
    u1_train = data.train_user == 0
    # every prefix i >= 1 before the validation position is a training sample
    assert data.train_history[u1_train].tolist() == [padded([2], 10), padded([2, 4], 10), padded([2, 4, 6], 10)]
    assert data.train_target[u1_train].tolist() == [4, 6, 3]
    assert data.valid_history[0].tolist() == padded([2, 4, 6, 3], 10)
    assert data.valid_target[0] == 1  # second last
    assert data.test_history[0].tolist() == padded([2, 4, 6, 3, 1], 10)
    assert data.test_target[0] == 5  # last


def test_leave_one_out_sample_counts(hand_case):
    stats = prepare(hand_case).stats()

    assert stats["train_samples"] == 5 * (6 - 3)
    assert stats["valid_samples"] == stats["test_samples"] == stats["users"] == 5


def test_histories_keep_the_most_recent_items_left_padded(hand_case):
    data = prepare(hand_case, max_his_len=2)

    assert data.train_history[data.train_user == 0].tolist() == [[0, 2], [2, 4], [4, 6]]
    assert data.valid_history[0].tolist() == [6, 3]
    assert data.test_history[0].tolist() == [3, 1]


# ------------------------------------------------------------------------------------------ cache

def test_second_load_reuses_the_cache_without_preparing_again(inter_file, etegrec_home, monkeypatch):
    load_dataset("synthetic", data_path=inter_file)
    folders = list((etegrec_home / "prepared").iterdir())
    mtimes = {p: p.stat().st_mtime_ns for p in folders[0].iterdir()}

    def must_not_prepare(*args, **kwargs):
        raise AssertionError("prepared again although the cache is valid")
    monkeypatch.setattr(sources, "prepare_interactions", must_not_prepare)
    load_dataset("synthetic", data_path=inter_file)

    assert list((etegrec_home / "prepared").iterdir()) == folders
    assert {p: p.stat().st_mtime_ns for p in folders[0].iterdir()} == mtimes


def test_cached_load_gives_identical_arrays(inter_file):
    fresh = load_dataset("synthetic", data_path=inter_file)
    cached = load_dataset("synthetic", data_path=inter_file)

    assert cached.item_map == fresh.item_map
    assert cached.name == fresh.name
    for field, value in vars(fresh).items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(getattr(cached, field), value, err_msg=field)
            assert getattr(cached, field).dtype == value.dtype, field


@pytest.mark.parametrize("change", [{"max_his_len": 10}, {"min_count": 6}])
def test_changed_parameter_prepares_a_new_cache_folder(inter_file, etegrec_home, change):
    load_dataset("synthetic", data_path=inter_file)

    data = load_dataset("synthetic", data_path=inter_file, **change)

    assert len(list((etegrec_home / "prepared").iterdir())) == 2
    if "max_his_len" in change:
        assert data.max_his_len == 10


def test_changed_source_content_prepares_a_new_cache_folder(inter_file, etegrec_home):
    first = load_dataset("synthetic", data_path=inter_file)
    lines = inter_file.read_text().splitlines()
    inter_file.write_text("\n".join([lines[0], *lines[2:], lines[1]]) + "\n")  # u0's first item moves last

    second = load_dataset("synthetic", data_path=inter_file)

    assert len(list((etegrec_home / "prepared").iterdir())) == 2
    assert first.seq_items.tolist() != second.seq_items.tolist()


def test_changed_prepared_item_map_prepares_a_new_cache_folder(tmp_path, etegrec_home):
    train_file = write_prepared(tmp_path / "splits")
    load_dataset("Instruments", data_path=train_file)
    write_prepared(tmp_path / "splits", emb_map={"a": 10, "b": 20, "c": 30, "d": 40, "e": 50, "f": 60})

    data = load_dataset("Instruments", data_path=train_file)

    assert data.item_map == ("a", "b", "c", "d", "e", "f")
    assert len(list((etegrec_home / "prepared").iterdir())) == 2


def test_saving_a_cache_another_process_already_saved_keeps_the_first_copy(inter_file, etegrec_home):
    # every rank of a multi-process run prepares on first use; the last to finish loses the rename
    data = prepare(inter_file)
    folder = etegrec_home / "prepared" / "synthetic-key"
    sources._save(data, folder)
    first = (folder / "data.npz").stat().st_mtime_ns

    sources._save(data, folder)

    assert (folder / "data.npz").stat().st_mtime_ns == first
    assert [p.name for p in folder.parent.iterdir()] == ["synthetic-key"]  # no temporary folder left


# ------------------------------------------------------------------------------------ bad input

def test_malformed_line_names_file_and_line(tmp_path):
    path = write_inter(tmp_path / "bad.inter", [("u1", "i1", 1), ("u1", "i2")])

    with pytest.raises(DataError, match=re.escape(f"{path}: line 3: expected 3 tab-separated fields") + ".*found 2"):
        read_interactions(path)


def test_missing_column_names_it_and_lists_the_columns_found(tmp_path):
    path = write_inter(tmp_path / "x.inter", [("u1", "i1", 5)], header="user_id:token\titem_id:token\trating:float")

    with pytest.raises(DataError, match=r"no 'timestamp' column in the header; found \['user_id', 'item_id', 'rating'\]"):
        read_interactions(path)


def test_missing_json_field_names_it_and_the_line(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [AMAZON_2023[0], {"user_id": "AE3", "parent_asin": "P03"}])

    with pytest.raises(DataError, match=r"line 2 has no 'timestamp' field; found \['parent_asin', 'user_id'\]"):
        read_interactions(path)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("t.inter", INTER_HEADER + "\nu1\ti1\tyesterday\n", r"line 2: timestamp 'yesterday' is not a number"),
    ("u.data", "1\t2\t3\t4\n1\t2\t3\tnoon\n", r"line 2: timestamp 'noon' is not a number"),
    ("r.jsonl", json.dumps(AMAZON_2023[0]) + "\n" + json.dumps({**AMAZON_2023[1], "timestamp": "May"}) + "\n",
     r"line 2: timestamp 'May' is not a number"),
])
def test_non_numeric_timestamp_names_file_line_and_value(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)

    with pytest.raises(DataError, match=re.escape(str(path)) + ": " + message):
        read_interactions(path)


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(AMAZON_2023[0]) + '\n{"user_id": "AE2", \n')

    with pytest.raises(DataError, match=re.escape(f"{path}: line 2 is not valid JSON")):
        read_interactions(path)


def test_truncated_gzip_is_a_data_error_naming_the_file(tmp_path):
    whole = write_jsonl(tmp_path / "whole.jsonl.gz", AMAZON_2023)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole.read_bytes()[:30])

    with pytest.raises(DataError, match=re.escape(f"{path}: cannot be read (EOFError")):
        read_interactions(path, fmt="amazon2023")


def test_empty_after_filtering_says_so_with_the_counts_before(tmp_path):
    path = write_inter(tmp_path / "tiny.inter", [("u1", "i1", 1), ("u1", "i2", 2), ("u2", "i1", 3), ("u2", "i3", 4)])

    with pytest.raises(DataError, match=r"no interactions left after the 5-core filter \(before filtering: "
                                        r"2 users, 3 items, 4 interactions\)"):
        prepare(path)


def test_min_count_below_three_is_rejected(inter_file):
    # a user with fewer than 3 items has no history before its validation target
    with pytest.raises(DataError, match=r"min_count must be at least 3 .*got 1"):
        prepare(inter_file, min_count=1)


def test_missing_data_path_says_check_data_path(tmp_path):
    missing = tmp_path / "nope.inter"

    with pytest.raises(DataError, match=re.escape(f"data path {str(missing)!r} does not exist; check --data-path")):
        load_dataset("nope", data_path=missing)


def test_missing_file_to_read_is_a_data_error(tmp_path):
    missing = tmp_path / "nope.inter"

    with pytest.raises(DataError, match=re.escape(f"data file {str(missing)!r} does not exist")):
        read_interactions(missing)


def test_missing_prepared_split_names_the_file(tmp_path):
    train_file = write_prepared(tmp_path)
    (tmp_path / "Instruments.valid.jsonl").unlink()

    with pytest.raises(DataError, match=r"prepared split '.*Instruments\.valid\.jsonl' is missing"):
        load_dataset("Instruments", data_path=train_file)


def test_ml100k_fetch_failure_says_how_to_use_data_path(monkeypatch, etegrec_home):
    def no_network(cmd, **kwargs):
        raise subprocess.CalledProcessError(1, cmd, stderr="ERROR: Could not find a version (network unreachable)")
    monkeypatch.setattr(sources.subprocess, "run", no_network)

    with pytest.raises(DataError, match=r"could not fetch ml-100k .*network unreachable.*pass --data-path PATH"):
        load_dataset("ml-100k")
    assert not (etegrec_home / "raw" / "ml-100k" / "ml-100k.inter").exists()


# -------------------------------------------------------------------------------------------- CLI

def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "etegrec.data", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_cli_reports_bad_input_in_one_line_without_traceback(tmp_path):
    write_inter(tmp_path / "bad.inter", [("u1", "i1", 1), ("u1", "i2")])

    result = run_cli("--data-path", "bad.inter", cwd=tmp_path)

    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "bad.inter" in result.stderr
    assert "line 3" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_prints_dataset_statistics(inter_file):
    result = run_cli("--data-path", str(inter_file), cwd=inter_file.parent)

    assert result.returncode == 0, result.stderr
    stats = dict(re.findall(r"^(\w+(?: \w+)?)\s+(\d+)$", result.stdout, flags=re.M))
    assert stats["users"] == "30"
    assert stats["items"] == "12"
    assert stats["interactions"] == "240"
    assert stats["train samples"] == "150"


def test_tie_shuffled_training_sequences_permute_only_items_sharing_a_timestamp(tmp_path):
    from etegrec.data import prepare_interactions, read_interactions
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    # u1: a b c share t=1, d e f share t=2 (e, f are the held-out valid/test targets), g at t=0
    for user in ("u1", "u2", "u3"):  # three alike users so that every item survives the 3-core filter
        for item, t in [("g", 0), ("a", 1), ("b", 1), ("c", 1), ("d", 2), ("e", 2), ("f", 2)]:
            lines.append(f"{user}\t{item}\t1\t{t}")
    path = tmp_path / "ties.inter"
    path.write_text("\n".join(lines) + "\n")
    data = prepare_interactions(read_interactions(path), name="ties", min_count=1 + 2)
    token = dict(enumerate(data.item_map, start=1))
    plain = ["".join(token[i] for i in s) for s in data.train_sequences()]
    assert plain == ["gabcd"] * 3
    seen = set()
    for seed in range(40):
        seq = data.train_sequences(np.random.default_rng(seed))[0]
        text = "".join(token[i] for i in seq)
        assert text[0] == "g" and sorted(text[1:4]) == ["a", "b", "c"] and text[4] == "d"
        seen.add(text)
    assert len(seen) == 6  # every order of the tied a, b, c occurs; d never leaves its place
    assert "".join(token[i] for i in data.seq_items[-2:]) == "ef"


def test_tie_shuffled_training_samples_are_the_prefixes_of_the_shuffled_sequences(tmp_path):
    from etegrec.data import prepare_interactions, read_interactions
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for user in ("u1", "u2", "u3"):
        for item, t in [("g", 0), ("a", 1), ("b", 1), ("c", 1), ("d", 2), ("e", 2), ("f", 2)]:
            lines.append(f"{user}\t{item}\t1\t{t}")
    path = tmp_path / "ties.inter"
    path.write_text("\n".join(lines) + "\n")
    data = prepare_interactions(read_interactions(path), name="ties", min_count=3, max_his_len=3)
    history, target = data.train_samples(None)
    assert history is data.train_history and target is data.train_target
    rng_seed = 7
    history, target = data.train_samples(np.random.default_rng(rng_seed))
    sequences = data.train_sequences(np.random.default_rng(rng_seed))
    expected_h, expected_t = [], []
    for seq in sequences:  # every position >= 1 of the (shuffled) training sequence, left-padded
        for i in range(1, len(seq)):
            h = list(seq[max(0, i - 3):i])
            expected_h.append([0] * (3 - len(h)) + h)
            expected_t.append(seq[i])
    assert history.tolist() == expected_h and target.tolist() == expected_t
    assert not np.array_equal(target, data.train_target)  # seed 7 moves at least one tied item
    assert np.array_equal(data.split("test")[1], data.test_target)  # held-out targets untouched
