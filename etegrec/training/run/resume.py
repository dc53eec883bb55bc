"""What a resumed run checks and restores: the config it may change, the epochs it may add, the
random generators."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from etegrec.config import Config, ConfigError, current_keys

__all__ = ["LENGTHENING_KEYS", "RESUMABLE_CHANGES", "absolute_data_path", "check_resume_config", "lengthened_keys",
           "resume_checkpoint", "rng_state", "set_rng_state"]

# config sections a resumed run may change: how it runs, not what it trains
RESUMABLE_CHANGES = ("run.name", "run.num_threads", "run.log_every")
# keys a resumed run may raise (never lower): they only lengthen training, so a finished run goes on
LENGTHENING_KEYS = ("joint.epochs", "joint.finetune_epochs")


def rng_state() -> dict[str, Any]:
    """Every random generator's state (Python, NumPy's global, torch CPU and CUDA), for a checkpoint:
    plain data and tensors only (NumPy's key as an int64 tensor), so that it loads with ``weights_only``."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back the generators saved by :func:`rng_state` (NumPy's key a tensor, or an array in format 1)."""
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def absolute_data_path(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict whose ``data.data_path`` is absolute (relative paths are read from the working
    directory): a run's ``config.yaml`` then names its data wherever a resume starts from."""
    path = (config.get("data") or {}).get("data_path")
    if not path:
        return config
    return {**config, "data": {**config["data"], "data_path": os.path.abspath(path)}}


def _saved_config(path: Path) -> dict[str, Any]:
    """A run's ``config.yaml`` as a dict, its keys under their current names (a run written before
    a key moved compares with today's config)."""
    return current_keys(yaml.safe_load(path.read_text(encoding="utf-8")) or {})


def _config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config dicts (ignoring :data:`RESUMABLE_CHANGES`).

    A key the saved config lacks (a run from before the key existed) counts as unchanged when the
    current value is the key's default: that is what the old run trained with.
    """
    defaults = Config().to_dict()
    saved, current = absolute_data_path(saved), absolute_data_path(current)  # a path as typed or as stored
    changed = []
    for section in sorted(set(saved) | set(current)):
        old, new = saved.get(section) or {}, current.get(section) or {}
        for name in sorted(set(old) | set(new)):
            key = f"{section}.{name}"
            if name not in old and new.get(name) == (defaults.get(section) or {}).get(name):
                continue
            if key in RESUMABLE_CHANGES or old.get(name) == new.get(name):
                continue
            if key in LENGTHENING_KEYS and isinstance(old.get(name), int) and new.get(name) > old[name]:
                continue  # see lengthened_keys
            changed.append(f"{key} ({old.get(name)!r} -> {new.get(name)!r})")
    return changed


def lengthened_keys(run_dir: str | Path, config: Config) -> list[str]:
    """The :data:`LENGTHENING_KEYS` that ``config`` raises above the run's ``config.yaml``."""
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.exists():
        return []
    saved = _saved_config(saved_path)
    current = config.to_dict()
    out = []
    for key in LENGTHENING_KEYS:
        section, name = key.split(".")
        old, new = (saved.get(section) or {}).get(name), current[section][name]
        if isinstance(old, int) and new > old:
            out.append(key)
    return out


def resume_checkpoint(run_dir: str | Path) -> Path:
    """``run_dir/checkpoints/last.pt``, the checkpoint ``--resume`` continues from.

    Raises:
        ConfigError: it does not exist.
    """
    path = Path(run_dir) / "checkpoints" / "last.pt"
    if not path.exists():
        raise ConfigError(f"--resume: {str(path)!r} does not exist, so there is nothing to resume; "
                          "start without --resume")
    return path


def check_resume_config(run_dir: str | Path, config: Config) -> None:
    """Refuse to resume the run in ``run_dir`` with a config that changes what it trains.

    Raises:
        ConfigError: the keys that differ from the run's ``config.yaml``, with both values.
    """
    saved_path = Path(run_dir) / "config.yaml"
    if saved_path.exists():
        changes = _config_changes(_saved_config(saved_path), config.to_dict())
        if changes:
            raise ConfigError(f"--resume: the config differs from the run's {str(saved_path)!r} in "
                              f"{', '.join(changes)}; resume with the same config or start a new run")


