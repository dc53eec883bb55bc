"""Which W&B mode a run logs in: ``online`` only where there are credentials, else ``offline``.

The command line resolves the mode once (:func:`resolve_mode`) and hands it to the run; the W&B
tracker checks :func:`has_api_key` again before it goes online, since an explicit ``online``
(``--wandb-mode online``, ``WANDB_MODE=online``) says nothing about credentials.
"""
from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["MODES", "check_mode", "has_api_key", "resolve_mode"]

MODES = ("online", "offline", "disabled")


def check_mode(mode: str) -> str:
    """``mode``, once it is one of :data:`MODES`.

    Raises:
        ValueError: ``mode`` is not one of online, offline, disabled.
    """
    if mode not in MODES:
        raise ValueError(f"wandb mode {mode!r} is not one of {', '.join(MODES)}; pass one of them or None.")
    return mode


def resolve_mode(mode: str | None = None, *, environ: Mapping[str, str] = os.environ) -> str:
    """The W&B mode to run in.

    An explicit ``mode`` wins; then ``WANDB_MODE`` from the environment; then ``"online"`` when an
    API key is available (``WANDB_API_KEY`` or a netrc entry for the W&B host), else ``"offline"``
    so that a machine without credentials or network never tries to reach W&B.

    Raises:
        ValueError: ``mode`` or ``WANDB_MODE`` is not one of online, offline, disabled.
    """
    env = environ.get("WANDB_MODE")
    if env and env not in MODES:  # checked even when ``mode`` wins: W&B itself reads the variable too
        raise ValueError(f"WANDB_MODE={env!r} in the environment is not one of {', '.join(MODES)}; set it to one "
                         "of them (offline for dryrun) or unset it")
    if mode is not None:
        return check_mode(mode)
    if env:
        return env
    return "online" if has_api_key(environ) else "offline"


def has_api_key(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether W&B has an API key: ``WANDB_API_KEY``, or a netrc entry (``wandb login``) for its host."""
    return bool(environ.get("WANDB_API_KEY")) or _netrc_has_key(environ)


def _netrc_has_key(environ: Mapping[str, str]) -> bool:
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = environ.get("NETRC") or Path.home() / ".netrc"
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])
