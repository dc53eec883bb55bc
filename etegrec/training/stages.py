"""How stages find the output of earlier ones: a cache of finished runs keyed by their config.

``python -m etegrec.training.rqvae`` needs item embeddings; when none are given it looks under
``$ETEGREC_HOME/stages/`` for an embed run made with the same data (its prepared content, by
digest), embed config and seed, and trains one there (a complete run directory of its own) when
there is none.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from etegrec.config import Config
from etegrec.data import DataError, SequenceData, data_home, load_dataset

__all__ = ["ensure_embeddings", "ensure_tokenizer", "load_embeddings", "load_stage_data", "stage_dir"]


def load_stage_data(config: Config) -> SequenceData:
    d = config.data
    return load_dataset(d.dataset, data_path=d.data_path, fmt=d.format, min_count=d.min_count,
                        max_his_len=d.max_his_len, max_users=d.max_users)


# Keys added after stage caches existed, with the value that means "as before": left out of the
# cache key at that value, so that adding them does not orphan every cached stage.
ADDED_LATER = {"embed.repeat_bias": False}


# Digests of prepared data that stage caches were made from before the digest joined the key (the
# default ml-100k preparation): left out of the key, so those caches are still found.
KNOWN_DATA = {"ml-100k": "e917804b1aec9c3a"}


def stage_dir(config: Config, stage: str, sections: tuple[str, ...], data: SequenceData | str) -> Path:
    """``$ETEGREC_HOME/stages/<stage>-<dataset>-<key>``; the key hashes the given config sections and
    the digest of the prepared ``data`` (a :class:`SequenceData` or its ``digest``) the stage trains on,
    so an edited data file never reuses a stage trained on the old content."""
    digest = data if isinstance(data, str) else data.digest
    payload = {s: dataclasses.asdict(getattr(config, s)) for s in ("data", *sections)}
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


def _rebuild(folder: Path, accelerator) -> None:
    """``--rebuild``: move a cached stage out of the way (to ``<folder>.replaced``) so that it is trained again."""
    if accelerator.is_main_process and folder.exists():
        old = folder.with_name(folder.name + ".replaced")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        print(f"[{folder.name.split('-')[0]}] --rebuild: moved the cached stage to {old}; training it again")
    accelerator.wait_for_everyone()


def ensure_embeddings(config: Config, data: SequenceData, accelerator, *, rebuild: bool = False
                      ) -> tuple[np.ndarray, Path]:
    """The cached embed run's embeddings for this config and data, training them first when missing
    (or always, with ``rebuild``).

    A cached run that was stopped before the end (killed, Ctrl-C) is resumed from its checkpoint.
    """
    folder = stage_dir(config, "embed", ("embed",), data)
    if rebuild:
        _rebuild(folder, accelerator)
    if not (folder / "embeddings.npy").exists():
        from .embed import EmbedTrainer
        from .run import Run
        resume = (folder / "checkpoints" / "last.pt").exists()
        if accelerator.is_main_process:
            verb = "resuming the stopped SASRec run" if resume else "training SASRec"
            print(f"[embed] no cached item embeddings for this config; {verb} in {folder}")
        with Run(config, stage="embed", output_dir=folder, accelerator=accelerator, resume=resume) as run:
            EmbedTrainer(config, run, data).fit()
        accelerator.wait_for_everyone()
    return load_embeddings(folder, data), folder


def ensure_tokenizer(config: Config, embeddings: np.ndarray, accelerator, data: SequenceData, *,
                     rebuild: bool = False) -> tuple[dict, Path]:
    """The cached pretrained tokenizer (best-collision checkpoint) for this config and data, pretraining it
    when missing (or always, with ``rebuild``).

    The pretraining is complete when its ``metrics.json`` exists; a cached run stopped before that
    is resumed from its checkpoint.

    Raises:
        DataError: a cached checkpoint whose shapes do not fit the tokenizer config.
    """
    import torch

    folder = stage_dir(config, "rqvae", ("embed", "tokenizer", "rqvae"), data)
    if rebuild:
        _rebuild(folder, accelerator)
    best = folder / "checkpoints" / "best.pt"
    if not (folder / "metrics.json").exists():
        from .rqvae import RQVAETrainer
        from .run import Run
        resume = (folder / "checkpoints" / "last.pt").exists()
        if accelerator.is_main_process:
            verb = "resuming the stopped pretraining" if resume else "pretraining the RQ-VAE"
            print(f"[rqvae] no cached tokenizer for this config; {verb} in {folder}")
        with Run(config, stage="rqvae", output_dir=folder, accelerator=accelerator, resume=resume) as run:
            RQVAETrainer(config, run, embeddings, data.item_map).fit()
        accelerator.wait_for_everyone()
    state = torch.load(best, map_location="cpu", weights_only=False)
    check_tokenizer_state(state["model"], config, embeddings.shape[1], best)
    return state["model"], folder


def check_tokenizer_state(state: dict, config: Config, in_dim: int, path: Path) -> None:
    """Check a tokenizer checkpoint's tensors against the tokenizer the config builds.

    Raises:
        DataError: a tensor missing or of another shape, named with both shapes.
    """
    from .rqvae import build_tokenizer

    for name, tensor in build_tokenizer(config, in_dim).state_dict().items():
        found = state.get(name)
        if found is None or tuple(found.shape) != tuple(tensor.shape):
            shape = "missing" if found is None else f"of shape {list(found.shape)}"
            raise DataError(f"tokenizer checkpoint {str(path)!r} does not fit the tokenizer config: {name} is "
                            f"{shape}, the config needs {list(tensor.shape)}; delete {str(path.parent.parent)!r} "
                            "to pretrain again, or use the config it was made with")
