"""Item attributes beside a dataset (``tokenizer.attributes``): read through the dataset's id map, turned
into the tokenizer's attribute block, keyed by content in the stage cache, and read back by ``load_run``."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

import etegrec
from conftest import tiny_command, write_structured_inter
from etegrec.config import load_config
from etegrec.data import DataError, read_item_attributes
from etegrec.data.sequences import IdMap
from etegrec.training.rqvae import RQVAE
from etegrec.training.rqvae.tokenizer import attribute_features, tokenizer_inputs
from etegrec.training.run.cache import load_stage_data, stage_dir

from test_datasets import ASINS, mirror, small_beauty  # noqa: F401 (mirror: a fixture)


def dense_reference(attributes: list[list[str]], dims: int) -> np.ndarray:
    """The same block the slow way: a dense TF-IDF matrix, centred over the items with attributes, and its SVD."""
    vocab = sorted({a for attrs in attributes for a in attrs})
    x = np.zeros((len(attributes), len(vocab)))
    for i, attrs in enumerate(attributes):
        x[i, [vocab.index(a) for a in attrs]] = 1.0
    has = x.sum(axis=1) > 0
    x *= np.log((1 + has.sum()) / (1 + x.sum(axis=0))) + 1.0
    x[has] /= np.linalg.norm(x[has], axis=1, keepdims=True)
    centred = x[has] - x[has].mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    out = np.zeros((len(attributes), dims))
    out[has, : min(dims, len(vt))] = centred @ vt[:dims].T
    return out


def test_attribute_block_is_the_centred_tfidf_on_its_principal_directions():
    rng = np.random.default_rng(0)
    attributes = [[f"a{j}" for j in rng.choice(12, size=rng.integers(1, 4), replace=False)] for _ in range(60)]
    attributes[5] = []  # an item without attributes

    block = attribute_features(attributes, dims=4)
    reference = dense_reference(attributes, dims=4)

    assert block.shape == (60, 4)
    for j in range(4):  # each direction up to its sign
        assert min(np.abs(block[:, j] - reference[:, j]).max(), np.abs(block[:, j] + reference[:, j]).max()) < 1e-5
    assert not block[5].any()
    same = [i for i in range(60) if sorted(attributes[i]) == sorted(attributes[0])]
    assert all(np.allclose(block[i], block[0]) for i in same)  # the same attributes, the same vector


def test_dimensions_past_the_attributes_rank_are_zero_so_the_width_is_the_configs():
    block = attribute_features([["red"], ["blue"], ["red"], ["green"]], dims=8)
    assert block.shape == (4, 8)
    assert np.abs(block[:, :2]).sum() > 0 and not block[:, 2:].any()  # three attributes, centred: rank 2


def test_tokenizer_inputs_append_the_block_weighted_like_the_embeddings():
    rng = np.random.default_rng(1)
    embeddings = rng.normal(0, 0.02, size=(11, 6))
    block = attribute_features([[f"a{i % 3}", f"b{i % 4}"] for i in range(9)] + [[]], dims=3)
    config = load_config("tiny")

    inputs = tokenizer_inputs(config.tokenizer, embeddings, block)

    assert inputs.shape == (11, 9) and not inputs[0].any()
    assert np.allclose(inputs[:, :6], tokenizer_inputs(config.tokenizer, embeddings))
    with_attributes = inputs[1:10]
    assert (with_attributes[:, 6:] ** 2).sum(axis=1).mean() == pytest.approx(
        (inputs[1:, :6] ** 2).sum(axis=1).mean(), rel=1e-5)
    assert not inputs[10, 6:].any()  # the item without attributes


def test_keys_go_through_the_datasets_id_map_and_dropped_items_are_ignored(tmp_path):
    path = tmp_path / "Beauty_item2attributes.json"
    path.write_text(json.dumps({"1": [3, 4], "2": ["x"], "7": [1]}))  # item 7: not in the prepared data
    id_map = IdMap(tmp_path / "datamaps.json", "item", {**ASINS, "7": "B000000007"})

    got = read_item_attributes(path, ["B000000002", "B000000001", "B000000003"], id_map)

    assert got == [["x"], ["3", "4"], []]


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "a JSON list; expected an object"),
    ('{"1": 3}', "item '1': expected a list of attribute ids"),
    ('{"1": [', "not JSON"),
    ('{"9": [1]}', "item id '9' is not in the id map"),
])
def test_a_bad_attributes_file_names_the_file_and_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "attrs.json"
    path.write_text(content)
    with pytest.raises(DataError, match=f"{path}.*{message}"):
        read_item_attributes(path, ["B000000001"], IdMap(tmp_path / "datamaps.json", "item", ASINS))


def test_a_file_of_other_ids_than_the_datas_is_refused(tmp_path):
    path = tmp_path / "attrs.json"
    path.write_text(json.dumps({"B000000001": [1]}))  # ASINs, where the data's items are i0, i1 ...
    with pytest.raises(DataError, match="none of its 1 items is an item of the dataset"):
        read_item_attributes(path, ["i0", "i1"])


def test_the_named_datasets_attributes_are_downloaded_verified_and_mapped(tmp_path, monkeypatch, mirror,
                                                                         etegrec_home):
    from etegrec.data import registry
    from etegrec.data.registry import RemoteFile
    from etegrec.training.rqvae import attribute_block

    dataset = small_beauty(tmp_path, monkeypatch, served=mirror)
    content = json.dumps({str(i): [i % 2, 10 + i % 2] for i in range(1, 7)}).encode()
    served = mirror / "aHuiWang/CIKM2020-S3Rec/c0ffee/data/Beauty_item2attributes.json"
    served.parent.mkdir(parents=True)
    served.write_bytes(content)
    attributes = RemoteFile("Beauty_item2attributes.json", "aHuiWang/CIKM2020-S3Rec", "c0ffee",
                            "data/Beauty_item2attributes.json", hashlib.sha256(content).hexdigest())
    monkeypatch.setitem(registry.DATASETS, "amazon-beauty",
                        registry.NamedDataset(files=dataset.files, config="amazon", attributes=attributes))
    config = load_config("amazon", ["data.dataset=amazon-beauty", "tokenizer.attributes=dataset",
                                    "tokenizer.attribute_dims=3"])
    data = load_stage_data(config)

    block = attribute_block(config, data)

    assert (etegrec_home / "raw" / "amazon-beauty" / "Beauty_item2attributes.json").read_bytes() == content
    index = {asin: row for row, asin in enumerate(data.item_map)}
    assert np.allclose(block[index["B000000002"]], block[index["B000000004"]])  # ids 2 and 4: both [0, 10]
    assert not np.allclose(block[index["B000000002"]], block[index["B000000003"]])

    served.write_bytes(b'{"1": [0]}')  # a changed file on the server is never used
    (etegrec_home / "raw" / "amazon-beauty" / "Beauty_item2attributes.json").unlink()
    with pytest.raises(DataError, match="Beauty_item2attributes.json downloaded from .* has sha256"):
        attribute_block(config, data)


def test_a_dataset_without_published_attributes_says_so(etegrec_home):
    from etegrec.data import attributes_path

    with pytest.raises(DataError, match="'amazon-instruments' has no published item attributes file"):
        attributes_path("dataset", "amazon-instruments")


# ----------------------------------------------------------------------------- a tiny run with attributes

def write_walk_attributes(path, shift: int = 0):
    path.write_text(json.dumps({f"i{k}": [f"group{(k + shift) % 4}", f"brand{k % 3}"] for k in range(48)}))
    return path


@pytest.fixture(scope="module")
def attribute_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("attributes")
    attributes = write_walk_attributes(root / "walk_attributes.json")
    tiny_command(root, "joint", "--wandb-mode", "disabled", "--set", "embed.epochs=1", "--set", "rqvae.epochs=2",
                 "--set", "joint.epochs=2", "--set", f"tokenizer.attributes={attributes}",
                 "--set", "tokenizer.attribute_dims=5", "--output-dir", str(root / "run"))
    return root


def test_the_tokenizer_reads_the_embedding_and_the_attribute_block_and_load_run_rebuilds_it(attribute_run):
    run = etegrec.load_run(attribute_run / "run")
    assert run.tokenizer.in_dim == run.config.embed.hidden + 5
    recommended = run.recommend([[run.item_ids[0], run.item_ids[1]]], k=3)
    assert len(recommended[0]) == 3


def test_the_tokenizer_stage_is_keyed_by_the_attribute_files_content_not_its_path(attribute_run, monkeypatch):
    monkeypatch.setenv("ETEGREC_HOME", str(attribute_run / "home"))
    config = load_config(str(attribute_run / "run" / "config.yaml"))
    data = load_stage_data(config)
    trained = stage_dir(config, RQVAE, data)
    assert (trained / "checkpoints" / "best.pt").exists()

    copy = shutil.copy(config.tokenizer.attributes, attribute_run / "elsewhere.json")
    config.tokenizer.attributes = str(copy)
    assert stage_dir(config, RQVAE, data) == trained
    write_walk_attributes(attribute_run / "elsewhere.json", shift=1)  # other attributes: another tokenizer
    assert stage_dir(config, RQVAE, data) != trained
    config.tokenizer.attributes = None
    assert stage_dir(config, RQVAE, data) != trained


def test_a_missing_attributes_file_is_one_line_before_any_training(tmp_path, capsys, etegrec_home):
    from etegrec.training import joint

    inter = write_structured_inter(tmp_path / "walk.inter")
    absent = tmp_path / "absent.json"
    code = joint.main(["--config", "tiny", "--data-path", str(inter), "--wandb-mode", "disabled",
                       "--set", f"tokenizer.attributes={absent}", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"item attributes file '{absent}' (tokenizer.attributes) does not exist" in err
    assert len(err.strip().splitlines()) == 1
    assert not (etegrec_home / "stages").exists()  # no stage trained
