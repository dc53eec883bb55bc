"""Where stages find the output of earlier ones: a cache of finished runs keyed by their config.

A stage that needs item embeddings (or a pretrained tokenizer) looks under
``$ETEGREC_HOME/stages/`` for a run made with the same data (its prepared content, by digest),
config sections and seed; :mod:`etegrec.training.pipeline` trains one there (a complete run
directory of its own) when there is none.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from etegrec.config import Config
from etegrec.data import DataError, SequenceData, data_home, load_dataset

from .factories import build_tokenizer

__all__ = ["check_tokenizer_state", "load_embeddings", "load_stage_data", "stage_dir"]


def load_stage_data(config: Config) -> SequenceData:
    d = config.data
    return load_dataset(d.dataset, data_path=d.data_path, fmt=d.format, min_count=d.min_count,
                        max_his_len=d.max_his_len, max_users=d.max_users)


# Keys added after stage caches existed, with the value that means "as before": left out of the
# cache key at that value, so that adding them does not orphan every cached stage.
ADDED_LATER = {"embed.repeat_bias": False, "embed.loss": "full", "embed.negatives": 1024}


# Digests of prepared data that stage caches were made from before the digest joined the key (the
# default ml-100k preparation): left out of the key, so those caches are still found.
KNOWN_DATA = {"ml-100k": "e917804b1aec9c3a"}


def stage_dir(config: Config, stage: str, sections: tuple[str, ...], data: SequenceData | str) -> Path:
    """``$ETEGREC_HOME/stages/<stage>-<dataset>-<key>``; the key hashes the given config sections and
    the digest of the prepared ``data`` (a :class:`SequenceData` or its ``digest``) the stage trains on,
    so an edited data file never reuses a stage trained on the old content, and the same content under
    another ``--data-path`` reuses it (the path itself is not in the key)."""
    digest = data if isinstance(data, str) else data.digest
    payload = {s: dataclasses.asdict(getattr(config, s)) for s in ("data", *sections)}
    if payload["data"]["data_path"] is not None:  # the digest stands for the file: a copy elsewhere is the same data
        del payload["data"]["data_path"]
    for key, neutral in ADDED_LATER.items():
        section, name = key.split(".")
        if section in payload and payload[section][name] == neutral:
            del payload[section][name]
    payload["seed"] = config.run.seed
    if KNOWN_DATA.get(config.data.dataset) != digest:
        payload["data_digest"] = digest
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    return data_home() / "stages" / f"{stage}-{config.data.dataset}-{key}"


def load_embeddings(run_dir: Path, data: SequenceData) -> np.ndarray:
    """Read ``embeddings.npy`` of an embed run and check it matches ``data``'s items.

    Raises:
        DataError: missing file or a row count that does not match the item map.
    """
    path = Path(run_dir) / "embeddings.npy"
    if not path.exists():
        raise DataError(f"item embeddings {str(path)!r} do not exist; run python -m etegrec.training.embed first")
    emb = np.load(path)
    if emb.ndim != 2 or emb.shape[0] != data.n_items + 1:
        raise DataError(f"item embeddings {str(path)!r} have shape {emb.shape}, expected "
                        f"[{data.n_items + 1}, d] for {data.n_items} items plus the padding row; "
                        "they were made for other data: delete them to rebuild")
    return emb


def check_tokenizer_state(state: dict, config: Config, in_dim: int, path: Path) -> None:
    """Check a tokenizer checkpoint's tensors against the tokenizer the config builds.

    Raises:
        DataError: a tensor missing or of another shape, named with both shapes.
    """
    for name, tensor in build_tokenizer(config, in_dim).state_dict().items():
        found = state.get(name)
        if found is None or tuple(found.shape) != tuple(tensor.shape):
            shape = "missing" if found is None else f"of shape {list(found.shape)}"
            raise DataError(f"tokenizer checkpoint {str(path)!r} does not fit the tokenizer config: {name} is "
                            f"{shape}, the config needs {list(tensor.shape)}; delete {str(path.parent.parent)!r} "
                            "to pretrain again, or use the config it was made with")
