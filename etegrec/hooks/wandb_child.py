"""The W&B process of :mod:`etegrec.hooks.wandb_process`: ``python -m etegrec.hooks.wandb_child FD``.

It owns one W&B run and carries out the calls that arrive on the socket ``FD``: ``("init",
kwargs)`` first, then ``log``, ``config``, ``summary``, ``define_metric`` and ``finish``. It imports
neither torch nor Accelerate, so it starts in well under a second.
"""
from __future__ import annotations

import sys
from multiprocessing.connection import Connection


def _serve(conn: Connection) -> None:
    """Own one W&B run: start it, then carry out the parent's calls until ``finish`` or EOF."""
    import wandb

    from etegrec.hooks.wandb import usage_histogram

    _, kwargs = conn.recv()
    try:
        settings = wandb.Settings(**kwargs.pop("settings"))
        run = wandb.init(settings=settings, **kwargs)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("started", run.id))
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
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
