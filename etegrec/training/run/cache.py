"""Where stages find the output of earlier ones: a cache of finished runs keyed by their config.

A stage that needs another's product (item embeddings, a pretrained tokenizer) looks under
``$ETEGREC_HOME/stages/`` for a run of that stage made with the same data (its prepared content, by
digest), config sections (the stage's :attr:`~etegrec.training.stage.Stage.key_sections`) and seed;
:mod:`etegrec.training.run.pipeline` trains one there (a complete run directory of its own) when there is none.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from etegrec.config import Config
from etegrec.data import SequenceData, attributes_path, data_home, file_sha256, load_dataset

from ..stage import Stage

__all__ = ["ADDED_LATER", "KNOWN_DATA", "load_stage_data", "stage_dir"]


def load_stage_data(config: Config) -> SequenceData:
    """The prepared data of ``config.data`` (prepared and cached under ``$ETEGREC_HOME`` the first time)."""
    d = config.data
    return load_dataset(d.dataset, data_path=d.data_path, fmt=d.format, min_count=d.min_count,
                        max_his_len=d.max_his_len, max_users=d.max_users)


# Keys added after stage caches existed, with the value that means "as before": left out of the
# cache key at that value, so that adding them does not orphan every cached stage.
ADDED_LATER = {"embed.repeat_bias": False, "embed.loss": "full", "embed.negatives": 1024,
               "tokenizer.attributes": None, "tokenizer.attribute_dims": 128}


# Digests of prepared data that stage caches were made from before the digest joined the key (the
# default ml-100k preparation): left out of the key, so those caches are still found.
KNOWN_DATA = {"ml-100k": "e917804b1aec9c3a"}


def stage_dir(config: Config, stage: Stage, data: SequenceData | str) -> Path:
    """``$ETEGREC_HOME/stages/<stage>-<dataset>-<key>``; the key hashes the stage's config sections
    (:attr:`~etegrec.training.stage.Stage.key_sections`), the seed and the digest of the prepared
    ``data`` (a :class:`SequenceData` or its ``digest``) the stage trains on, so an edited data file
    never reuses a stage trained on the old content, and the same content under another
    ``--data-path`` reuses it (the path itself is not in the key); ``tokenizer.attributes`` is
    keyed the same way, by its file's sha256."""
    digest = data if isinstance(data, str) else data.digest
    payload = {s: dataclasses.asdict(getattr(config, s)) for s in ("data", *stage.key_sections)}
    if payload["data"]["data_path"] is not None:  # the digest stands for the file: a copy elsewhere is the same data
        del payload["data"]["data_path"]
    for key, neutral in ADDED_LATER.items():
        section, name = key.split(".")
        if section in payload and payload[section][name] == neutral:
            del payload[section][name]
    if payload.get("tokenizer", {}).get("attributes"):  # the file's content, not its name, decides the tokenizer
        path = attributes_path(config.tokenizer.attributes, config.data.dataset)
        payload["tokenizer"]["attributes"] = "sha256:" + file_sha256(path)
    payload["seed"] = config.run.seed
    if KNOWN_DATA.get(config.data.dataset) != digest:
        payload["data_digest"] = digest
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    return data_home() / "stages" / f"{stage.name}-{config.data.dataset}-{key}"

