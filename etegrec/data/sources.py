"""Where data comes from (the ml-100k and named-dataset downloads) and the on-disk cache of prepared data.

Everything lives under ``$ETEGREC_HOME`` (default ``~/.cache/etegrec``): raw files under
``raw/<dataset>/`` and prepared datasets under ``prepared/<dataset>-<key>/``, where the key hashes
the source file's content and the preparation parameters, so a changed source or parameter
rebuilds and an unchanged one is reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .prepare import SequenceData, first_users, prepare_interactions, prepare_splits
from .sequences import map_files
from .readers import DataError, prepared_prefix, detect_format, read_interactions, read_prepared
from .registry import DATASETS, fetch_named

__all__ = ["CACHE_VERSION", "data_home", "dataset_name_of", "fetch_ml100k", "load_dataset", "resolve_source"]

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: seq_times
RECBOLE_WHEEL = "recbole==1.2.1"
ML100K_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"


def dataset_name_of(path: str | Path) -> str:
    """The dataset name a data file implies: its file name without the data suffixes
    (``reviews/Beauty.jsonl.gz`` -> ``Beauty``), used when no ``--dataset`` is given."""
    stem = Path(path).name
    for suffix in (".train.jsonl", ".gz", ".jsonl", ".json", ".inter"):
        stem = stem.removesuffix(suffix)
    return stem or "data"


def data_home() -> Path:
    """Root of etegrec's data cache (``$ETEGREC_HOME`` or ``~/.cache/etegrec``)."""
    return Path(os.environ.get("ETEGREC_HOME") or Path.home() / ".cache" / "etegrec")


def fetch_ml100k(dest: Path) -> Path:
    """Download the RecBole 1.2.1 wheel (no dependencies, not installed) and extract ml-100k.inter."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"ml-100k: no local copy; fetching ml-100k.inter from the {RECBOLE_WHEEL} wheel "
          f"(pip download --no-deps) into {dest.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, RECBOLE_WHEEL]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
            wheel = next(Path(tmp).glob("recbole-*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(ML100K_MEMBER)
        except (subprocess.SubprocessError, StopIteration, KeyError, zipfile.BadZipFile, OSError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            raise DataError(
                f"could not fetch ml-100k from the {RECBOLE_WHEEL} wheel ({str(detail).strip()[:200]}); "
                "download ml-100k.inter (RecBole) or u.data (GroupLens) yourself and pass "
                "--data-path PATH") from None
    tmp_dest = dest.with_suffix(".partial")
    tmp_dest.write_bytes(data)
    tmp_dest.replace(dest)
    return dest


def resolve_source(dataset: str, data_path: str | Path | None) -> Path:
    """The file (or prepared-split prefix directory) to read for ``dataset``."""
    if data_path is not None:
        path = Path(data_path)
        if not path.exists():
            raise DataError(f"data path {str(path)!r} does not exist; check --data-path")
        return path
    raw_dir = data_home() / "raw" / dataset
    if dataset == "ml-100k":
        path = raw_dir / "ml-100k.inter"
        return path if path.exists() else fetch_ml100k(path)
    if dataset in DATASETS:
        return fetch_named(dataset, raw_dir)
    candidates = sorted(raw_dir.glob("*")) if raw_dir.is_dir() else []
    if not candidates:
        raise DataError(f"no data for dataset {dataset!r} in {raw_dir}; put its interaction file there "
                        "or pass --data-path PATH")
    return raw_dir if prepared_prefix(raw_dir) else candidates[0]


def _source_digest(path: Path, fmt: str) -> str:
    prefix = prepared_prefix(path)
    files = [path, *map_files(path, fmt)]  # an id map changes the tokens, so it is part of the source
    if prefix:  # the item map changes the item ids and tokens too, so it is part of the source
        files = [Path(f"{prefix}.{s}.jsonl") for s in ("train", "valid", "test")]
        files += [m for m in (Path(f"{prefix}.emb_map.json"), Path(f"{prefix}.item2id.json")) if m.exists()][:1]
    digest = hashlib.sha256()
    for file in files:
        if not file.exists():  # a missing split: read_prepared reports it with a clear message
            continue
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _save(data: SequenceData, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    # one temporary folder per process: every rank of a multi-process run may prepare at once
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".partial-", dir=folder.parent))
    arrays = {k: v for k, v in data.__dict__.items() if isinstance(v, np.ndarray)}
    np.savez(tmp / "data.npz", **arrays)
    (tmp / "item_map.json").write_text(json.dumps({"name": data.name, "items": list(data.item_map)}))
    (tmp / "stats.json").write_text(json.dumps(data.stats(), indent=2))
    try:
        tmp.replace(folder)  # a crash before this line leaves no half-written cache behind
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "data.npz").exists():
            raise
        # another process saved the same preparation first; keep its copy


def _load(folder: Path) -> SequenceData:
    meta = json.loads((folder / "item_map.json").read_text())
    with np.load(folder / "data.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return SequenceData(name=meta["name"], item_map=tuple(meta["items"]), **arrays)


def load_dataset(dataset: str = "ml-100k", *, data_path: str | Path | None = None, fmt: str | None = None,
                 min_count: int = 5, max_his_len: int = 20, max_users: int | None = None,
                 use_cache: bool = True) -> SequenceData:
    """Load a prepared dataset, preparing and caching it on first use.

    Args:
        dataset: dataset name (``ml-100k`` and the names in ``DATASETS`` are fetched when missing).
        data_path: an interaction file or prepared split; overrides the name lookup.
        fmt: force a reader (see ``etegrec.data.FORMATS``); detected from the file otherwise.
        min_count: k of the iterative k-core filter.
        max_his_len: history length kept (most recent items).
        max_users: keep only the first ``max_users`` users of the file before filtering (a small
            slice for smoke runs); ``None`` keeps all.

    Raises:
        DataError: missing or malformed data, or nothing left after filtering.
    """
    source = resolve_source(dataset, data_path)
    fmt = fmt or detect_format(source)
    params = {"version": CACHE_VERSION, "format": fmt, "min_count": min_count, "max_his_len": max_his_len,
              "max_users": max_users, "source": _source_digest(source, fmt)}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    folder = data_home() / "prepared" / f"{dataset}-{key}"
    if use_cache and (folder / "data.npz").exists():
        log.info("using cached %s from %s", dataset, folder)
        return _load(folder)
    if fmt == "prepared":
        data = prepare_splits(read_prepared(source), name=dataset, max_his_len=max_his_len)
    else:
        inter = read_interactions(source, fmt)
        if max_users is not None:
            inter = first_users(inter, max_users)
        data = prepare_interactions(inter, name=dataset, min_count=min_count,
                                    max_his_len=max_his_len, source=str(source))
    if use_cache:
        if folder.exists() and not (folder / "data.npz").exists():  # an unusable leftover; replace it
            shutil.rmtree(folder, ignore_errors=True)
        _save(data, folder)
    return data
