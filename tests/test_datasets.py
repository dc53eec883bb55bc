"""The field's sequence formats with their id maps, MovieLens' larger files, and the named Amazon
datasets: downloaded from a local HTTP server, checked by sha256, or placed by hand. No test here
reaches the internet: the mirror points at 127.0.0.1 throughout."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from etegrec.data import DATASETS, DataError, detect_format, load_dataset, prepare_interactions, read_interactions
from etegrec.data import registry
from etegrec.data.registry import MIRROR_ENV, NamedDataset, RemoteFile

# S3-Rec/P5 text of a 5-core set (ids from 1, items in time order): user u sees every item but u,
# so each of the 6 users and each of the 6 items has exactly 5 interactions.
S3REC_LINES = ["1 2 3 4 5 6", "2 3 4 5 6 1", "3 4 5 6 1 2", "4 5 6 1 2 3", "5 6 1 2 3 4", "6 5 3 1 4 2"]
ASINS = {str(i): f"B00000000{i}" for i in range(1, 7)}
REVIEWERS = {str(u): f"A{u}REVIEWER" for u in range(1, 7)}


def write_s3rec(folder: Path, lines=S3REC_LINES, newline: str = "\n", datamaps: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "Beauty.txt"
    path.write_bytes((newline.join(lines) + newline).encode())
    if datamaps is not None:
        (folder / "datamaps.json").write_text(json.dumps(datamaps))
    return path


def p5_datamaps(items=ASINS, users=REVIEWERS) -> dict:
    return {"user2id": {v: k for k, v in users.items()}, "item2id": {v: k for k, v in items.items()},
            "id2user": users, "id2item": items, "attribute2id": {}}


def write_lcrec(folder: Path, sequences: dict, item2id: dict | None = None, user2id: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "Instruments.inter.json"
    path.write_text(json.dumps(sequences, indent=4))  # pretty-printed, as LC-Rec writes it
    for kind, table in (("item", item2id), ("user", user2id)):
        if table is not None:
            (folder / f"Instruments.{kind}2id").write_text("".join(f"{t}\t{i}\n" for t, i in table.items()))
    return path


LCREC = {"0": [0, 1, 2], "1": [3, 0]}


# ----------------------------------------------------------------------------- S3-Rec / P5 text

def test_s3rec_reader_gives_each_line_as_a_user_in_file_order_without_timestamps(tmp_path):
    path = write_s3rec(tmp_path, ["1 1 2 3", "2 4 1"])

    inter = read_interactions(path)

    assert inter.users.tolist() == ["1", "1", "1", "2", "2"]
    assert inter.items.tolist() == ["1", "2", "3", "4", "1"]
    assert inter.timestamps is None  # no time is invented for a file that has none


def test_s3rec_reader_reads_p5s_crlf_copy_like_the_lf_one(tmp_path):
    lf = read_interactions(write_s3rec(tmp_path / "lf", ["1 1 2 3", "2 4 1"]))
    crlf = read_interactions(write_s3rec(tmp_path / "crlf", ["1 1 2 3", "2 4 1"], newline="\r\n"))

    assert crlf.users.tolist() == lf.users.tolist()
    assert crlf.items.tolist() == lf.items.tolist()


def test_p5_datamaps_beside_the_file_make_reviewer_ids_and_asins_the_tokens(tmp_path):
    path = write_s3rec(tmp_path, ["1 1 2 3", "2 4 1"], datamaps=p5_datamaps())

    inter = read_interactions(path)

    assert inter.users.tolist() == ["A1REVIEWER"] * 3 + ["A2REVIEWER"] * 2
    assert inter.items.tolist() == ["B000000001", "B000000002", "B000000003", "B000000004", "B000000001"]


def test_an_item_id_the_datamaps_lack_names_the_file_line_and_id(tmp_path):
    path = write_s3rec(tmp_path, ["1 1 2", "2 3 9"], datamaps=p5_datamaps())

    with pytest.raises(DataError, match=re.escape(f"{path}: line 2: item id '9' is not in the id map "
                                                  f"{tmp_path / 'datamaps.json'}")):
        read_interactions(path)


@pytest.mark.parametrize(("line", "found"), [("3 4 x5", "'x5' is not an integer id"), ("3", "only a user id")])
def test_s3rec_bad_line_names_file_and_line(tmp_path, line, found):
    path = write_s3rec(tmp_path, ["1 1 2", "2 3 1", line])

    with pytest.raises(DataError, match=re.escape(f"{path}: line 3: expected 'user item1 item2 ...'") + ".*" + found):
        read_interactions(path, fmt="s3rec")


# ----------------------------------------------------------------------------- LC-Rec .inter.json

def test_lcrec_reader_gives_each_user_in_file_order_without_timestamps(tmp_path):
    inter = read_interactions(write_lcrec(tmp_path, LCREC))

    assert inter.users.tolist() == ["0", "0", "0", "1", "1"]
    assert inter.items.tolist() == ["0", "1", "2", "3", "0"]
    assert inter.timestamps is None


def test_lcrec_item2id_and_user2id_beside_the_file_make_the_raw_tokens(tmp_path):
    items = {"B0ITEM0": 0, "B0ITEM1": 1, "B0ITEM2": 2, "B0ITEM3": 3}
    path = write_lcrec(tmp_path, LCREC, item2id=items, user2id={"AUSER0": 0, "AUSER1": 1})

    inter = read_interactions(path)

    assert inter.users.tolist() == ["AUSER0"] * 3 + ["AUSER1"] * 2
    assert inter.items.tolist() == ["B0ITEM0", "B0ITEM1", "B0ITEM2", "B0ITEM3", "B0ITEM0"]


def test_an_item_id_the_item2id_lacks_names_the_file_the_users_line_and_the_id(tmp_path):
    path = write_lcrec(tmp_path, LCREC, item2id={"B0ITEM0": 0, "B0ITEM1": 1, "B0ITEM2": 2})

    # json.dumps(indent=4): line 1 "{", user "0" on line 2, its 3 ids on lines 3-5, "]," on 6, user "1" on 7
    with pytest.raises(DataError, match=re.escape(f"{path}: line 7 (user '1'): item id '3' is not in the id map "
                                                  f"{tmp_path / 'Instruments.item2id'}")):
        read_interactions(path)


@pytest.mark.parametrize(("content", "message"), [
    ('{\n    "0": [0, 1],\n    "1": [2, "x"]\n}\n', r"line 3 \(user '1'\): expected a non-empty list of integer item ids"),
    ('{\n    "0": [0, 1],\n    "1": [2, 3\n}\n', r"line 4 is not valid JSON"),
])
def test_lcrec_bad_entry_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "Instruments.inter.json"
    path.write_text(content)

    with pytest.raises(DataError, match=re.escape(str(path)) + ": " + message):
        read_interactions(path)


def test_bad_item2id_line_names_file_and_line(tmp_path):
    path = write_lcrec(tmp_path, LCREC)
    (tmp_path / "Instruments.item2id").write_text("B0ITEM0\t0\nB0ITEM1 1\n")

    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'Instruments.item2id'}: line 2: expected "
                                                  "'item token<TAB>integer id'")):
        read_interactions(path)


# ----------------------------------------------------------------------------- MovieLens' own files

@pytest.mark.parametrize(("name", "content"), [
    ("ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n"),  # ml-1m, no header
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,1193,5.0,978300760\n1,661,3.5,978302109\n"),  # ml-20m/25m
])
def test_movielens_ratings_files_are_read_with_their_timestamps(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)

    inter = read_interactions(path)

    assert inter.users.tolist() == ["1", "1"]
    assert inter.items.tolist() == ["1193", "661"]
    assert inter.timestamps.tolist() == [978300760.0, 978302109.0]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("ratings.dat", "1::1193::5::978300760\n1::661::3\n", r"line 2: expected 4 '::'-separated fields"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,296,5.0,1147880044\n1,306,3.5\n",
     r"line 3: expected 4 comma-separated fields"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,296,5.0,noon\n", r"line 2: timestamp 'noon' is not a number"),
])
def test_movielens_bad_line_names_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)

    with pytest.raises(DataError, match=re.escape(str(path)) + ": " + message):
        read_interactions(path)


# ----------------------------------------------------------------------------- detection

@pytest.mark.parametrize(("name", "content", "expected"), [
    ("Beauty.txt", "1 1 2 3 4 5\n", "s3rec"),
    ("short.txt", "1 2 3 4\n", "s3rec"),  # four small ids: a sequence, not a u.data row
    ("u.txt", "196 242 3 881250949\n", "movielens"),  # a unix time last: a u.data row with spaces
    ("Instruments.inter.json", "{\n", "lcrec"),
    ("sequences.json", '{\n    "0": [\n', "lcrec"),
    ("compact.json", '{"0": [0, 1, 2], "1": [3, 0]}\n', "lcrec"),
    ("ratings.dat", "1::1193::5::978300760\n", "movielens-dat"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n", "movielens-csv"),
])
def test_detect_format_recognises_the_sequence_and_movielens_formats(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)

    assert detect_format(path) == expected


# ----------------------------------------------------------------------------- preparation

def test_a_five_core_sequence_file_is_kept_whole_in_file_order(tmp_path):
    path = write_s3rec(tmp_path, datamaps=p5_datamaps())

    data = load_dataset("Beauty", data_path=path)

    assert data.stats()["interactions"] == 30 and data.stats()["users"] == 6 and data.n_items == 6
    user6 = data.seq_items[data.seq_offsets[5]:data.seq_offsets[6]]
    assert [data.item_map[i - 1] for i in user6] == [ASINS[i] for i in "53142"]


def test_sequence_formats_have_no_ties_for_shuffle_ties_to_reorder(tmp_path):
    path = write_s3rec(tmp_path)
    data = prepare_interactions(read_interactions(path), name="Beauty", min_count=5)

    shuffled = data.train_sequences(np.random.default_rng(0))

    assert [s.tolist() for s in shuffled] == [s.tolist() for s in data.train_sequences()]
    assert np.unique(data.seq_times).size == data.seq_times.size  # positions, distinct; never times


def test_a_slice_of_the_first_users_works_without_timestamps(tmp_path):
    data = load_dataset("Beauty", data_path=write_s3rec(tmp_path), max_users=5, min_count=3)

    assert data.stats()["users"] == 5


def test_an_edited_id_map_prepares_a_new_cache_folder(tmp_path, etegrec_home):
    path = write_s3rec(tmp_path, datamaps=p5_datamaps())
    before = load_dataset("Beauty", data_path=path)
    (tmp_path / "datamaps.json").write_text(json.dumps(p5_datamaps(items={k: f"X{v}" for k, v in ASINS.items()})))

    after = load_dataset("Beauty", data_path=path)

    assert after.item_map == tuple("X" + token for token in before.item_map)
    assert len(list((etegrec_home / "prepared").iterdir())) == 2


# ----------------------------------------------------------------------------- named datasets

def test_named_amazon_sets_come_from_pinned_commits_and_want_the_amazon_config():
    beauty = DATASETS["amazon-beauty"].files[0]

    assert beauty.url() == ("https://raw.githubusercontent.com/salesforce/ICLRec/"
                            "2890e6c3ff6a22c6699fc19cb863b66786c1cde4/data/Beauty.txt")
    assert {name: d.config for name, d in DATASETS.items()} == {
        "amazon-beauty": "amazon", "amazon-sports": "amazon", "amazon-instruments": "amazon"}


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local HTTP server on 127.0.0.1 serving ``tmp_path/served`` as the download mirror."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{server.server_address[1]}")
    yield root
    server.shutdown()
    server.server_close()


@pytest.fixture
def no_network(monkeypatch):
    """A mirror on a 127.0.0.1 port where nothing listens: every download is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{port}")


def small_beauty(tmp_path: Path, monkeypatch, served: Path | None = None) -> NamedDataset:
    """Register a small ``amazon-beauty`` (the test's files and their sha256); serve them from ``served``."""
    source = write_s3rec(tmp_path / "source", datamaps=p5_datamaps())
    files = []
    for file, repo in ((source, "salesforce/ICLRec"), (source.parent / "datamaps.json", "Wenyueh/LLM-RecSys-ID")):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        files.append(RemoteFile(file.name, repo, "c0ffee", f"data/{file.name}", digest))
        if served is not None:
            target = served / repo / "c0ffee" / "data" / file.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
    dataset = NamedDataset(files=tuple(files), config="amazon")
    monkeypatch.setitem(registry.DATASETS, "amazon-beauty", dataset)
    return dataset


def test_a_named_dataset_is_downloaded_verified_and_read_with_its_asins(tmp_path, monkeypatch, mirror,
                                                                       etegrec_home):
    small_beauty(tmp_path, monkeypatch, served=mirror)

    data = load_dataset("amazon-beauty")

    raw = etegrec_home / "raw" / "amazon-beauty"
    assert sorted(p.name for p in raw.iterdir()) == ["Beauty.txt", "datamaps.json"]
    assert set(data.item_map) == set(ASINS.values())
    assert data.stats()["interactions"] == 30


def test_a_download_with_the_wrong_checksum_is_an_error_and_is_not_kept(tmp_path, monkeypatch, mirror,
                                                                      etegrec_home):
    expected = small_beauty(tmp_path, monkeypatch, served=mirror).files[0].sha256
    served = mirror / "salesforce/ICLRec/c0ffee/data/Beauty.txt"
    served.write_text("1 1 2 3 4 9\n")  # the mirror now serves other bytes
    got = hashlib.sha256(served.read_bytes()).hexdigest()

    with pytest.raises(DataError, match=f"Beauty.txt downloaded from .* has sha256 {got}, expected {expected}"):
        load_dataset("amazon-beauty")
    assert not any((etegrec_home / "raw" / "amazon-beauty").iterdir())  # neither the file nor a partial one


def test_files_placed_by_hand_are_used_without_the_network(tmp_path, monkeypatch, no_network, etegrec_home):
    dataset = small_beauty(tmp_path, monkeypatch)
    raw = etegrec_home / "raw" / "amazon-beauty"
    raw.mkdir(parents=True)
    for file in dataset.files:
        (raw / file.name).write_bytes((tmp_path / "source" / file.name).read_bytes())

    assert set(load_dataset("amazon-beauty").item_map) == set(ASINS.values())


def test_a_file_placed_by_hand_with_the_wrong_checksum_names_it_and_both_digests(tmp_path, monkeypatch, no_network,
                                                                                etegrec_home):
    expected = small_beauty(tmp_path, monkeypatch).files[0].sha256
    placed = etegrec_home / "raw" / "amazon-beauty" / "Beauty.txt"
    placed.parent.mkdir(parents=True)
    placed.write_text("1 1 2 3 4 9\n")
    got = hashlib.sha256(placed.read_bytes()).hexdigest()

    with pytest.raises(DataError, match=re.escape(f"{placed}: sha256 {got} is not the expected {expected}")):
        load_dataset("amazon-beauty")


def test_without_network_one_line_says_where_to_put_each_file_and_from_which_url(tmp_path, monkeypatch, no_network,
                                                                                etegrec_home):
    dataset = small_beauty(tmp_path, monkeypatch)
    raw = etegrec_home / "raw" / "amazon-beauty"

    with pytest.raises(DataError) as info:
        load_dataset("amazon-beauty")

    message = str(info.value)
    assert "\n" not in message
    for file in dataset.files:
        assert f"{raw / file.name} from {file.url()}" in message
    assert not any(raw.iterdir())  # no partial file left behind


def test_cli_without_network_exits_2_with_one_line(tmp_path, no_network):
    result = subprocess.run([sys.executable, "-m", "etegrec.data", "amazon-instruments"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "raw/amazon-instruments/Instruments.inter.json from http://127.0.0.1:" in error[0]
