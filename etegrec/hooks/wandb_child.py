"""The W&B process of :mod:`etegrec.hooks.wandb_process`: ``python -m etegrec.hooks.wandb_child FD``.

It owns one W&B run and carries out the calls that arrive on the socket ``FD``: ``("init",
kwargs)`` first, then ``log``, ``config``, ``summary``, ``define_metric`` and ``finish``. It imports
neither torch nor Accelerate, so it starts in well under a second.
"""
from __future__ import annotations

import os
import sys
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

MAX_HISTOGRAM_BINS = 512  # wandb.Histogram's limit


def usage_histogram(counts: Any, max_bins: int = MAX_HISTOGRAM_BINS) -> tuple[np.ndarray, np.ndarray]:
    """``(values, bin_edges)`` of a per-code usage histogram with at most ``max_bins`` bins.

    Code c is the bin ``[c, c + 1)``; when K > ``max_bins``, runs of ``ceil(K / max_bins)``
    adjacent codes are merged into one bin (the last one may be narrower). Totals are preserved.
    """
    c = np.asarray(counts).reshape(-1)
    k = c.size
    width = max(1, -(-k // max_bins))
    n_bins = -(-k // width)
    padded = np.zeros(n_bins * width, dtype=c.dtype)
    padded[:k] = c
    values = padded.reshape(n_bins, width).sum(axis=1)  # (n_bins,)
    edges = np.minimum(np.arange(n_bins + 1) * width, k)  # (n_bins + 1,)
    return values, edges


def _serve(conn: Connection) -> None:
    """Own one W&B run: start it, then carry out the parent's calls until ``finish`` or EOF."""
    import wandb

    try:
        _, kwargs = conn.recv()
    except (EOFError, OSError):  # the training process died before it asked for a run
        return
    command = kwargs.pop("command", None)
    if command:  # W&B reads the program and args of the process that calls init: make them the user's
        os.environ["WANDB_PROGRAM"] = command["program"]
        sys.argv = command["argv"]
    try:
        settings = wandb.Settings(**kwargs.pop("settings"))
        run = wandb.init(settings=settings, **kwargs)
    except Exception as exc:
        _send_quietly(conn, ("error", f"{type(exc).__name__}: {exc}"))
        return
    if not _send_quietly(conn, ("started", run.id)):  # killed during start-up: end the run, no traceback
        run.finish(exit_code=1)
        return
    while True:
        try:
            op, *payload = conn.recv()
        except (EOFError, OSError):  # the training process is gone without finishing the run
            run.finish(exit_code=1)
            return
        if op == "finish":
            run.finish(exit_code=payload[0])
            conn.send(("finished",))
            return
        try:
            if op == "log":
                row, step, histograms = payload
                media = {k: wandb.Histogram(np_histogram=usage_histogram(c)) for k, c in histograms.items()}
                run.log({**row, **media}, step=step)
            elif op == "config":
                run.config.update(payload[0], allow_val_change=True)
            elif op == "summary":
                run.summary.update(payload[0])
            elif op == "define_metric":
                run.define_metric(*payload[0], **payload[1])
            elif op == "artifact":
                log_file_artifact(run, *payload)
        except Exception as exc:
            _send_quietly(conn, ("error", f"{type(exc).__name__}: {exc}"))


def log_file_artifact(run: Any, path: str, name: str, kind: str) -> None:
    """Log one file as a W&B artifact of ``run`` (offline, it stays in the run's files until a sync)."""
    import wandb

    artifact = wandb.Artifact(name, type=kind)
    artifact.add_file(path)
    run.log_artifact(artifact)


def _send_quietly(conn: Connection, message: tuple) -> bool:
    """Send to the training process; False (instead of a BrokenPipeError traceback) when it is gone."""
    try:
        conn.send(message)
        return True
    except OSError:
        return False


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
