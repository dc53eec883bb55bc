"""Subscribers (console, event log, W&B) and the codebook forward hooks.

Everything here watches from outside: it listens to :mod:`etegrec.signals` or hooks into a model's
quantizer layers, and never changes what a model computes.
"""
from __future__ import annotations

from .base import FunctionSubscriber, Subscriber, SubscriberError, resolve_subscriber
from .console import ConsoleSubscriber
from .eventlog import EventLog, read_events, to_jsonable

__all__ = [
    "CodebookHooks",
    "ConsoleSubscriber",
    "EventLog",
    "FunctionSubscriber",
    "Subscriber",
    "SubscriberError",
    "WandbSubscriber",
    "read_events",
    "resolve_subscriber",
    "to_jsonable",
]


def __getattr__(name: str):
    # imported on first use: the W&B subscriber and the hooks pull in heavier modules
    if name == "CodebookHooks":
        from .codebook import CodebookHooks
        return CodebookHooks
    if name == "WandbSubscriber":
        from .wandb import WandbSubscriber
        return WandbSubscriber
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
