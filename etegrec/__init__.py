"""etegrec: ETEGRec and FORGE, observable through an event bus (``etegrec.signals``).

``etegrec.load_run(run_dir)`` rebuilds a finished joint run for use (imported on first access, so
``import etegrec`` stays light).
"""
from __future__ import annotations

__all__ = ["load_run"]


def __getattr__(name: str):
    if name == "load_run":
        from etegrec.training.trained import load_run

        return load_run
    raise AttributeError(f"module 'etegrec' has no attribute {name!r}")
