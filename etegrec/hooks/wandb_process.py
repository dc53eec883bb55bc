"""W&B in a process of its own: the training process only pickles rows into a socket.

In the training process, W&B's client (building its records, JSON-encoding every value, its own
threads) takes about 0.7 ms of CPU per logged row once a training epoch has pushed its code out of
the CPU's caches, and that time is taken from training through the GIL. With RQ-VAE epochs of about
60 ms, that alone was over 1% of every epoch. Here a child process owns the W&B run; the parent
sends ``(op, ...)`` tuples over a socket pair and never imports ``wandb``.

* :class:`WandbProcessTracker` is an Accelerate tracker named ``"wandb"``, so ``accelerator.log``,
  ``get_tracker("wandb")`` and ``end_training`` work as with Accelerate's own W&B tracker.
  Its ``tracker`` is a :class:`RemoteRun`: ``log``, ``define_metric``, ``config.update``,
  ``summary.update`` and ``finish`` of a W&B run, forwarded.
* The child (``python -m etegrec.hooks.wandb_child FD``) starts in a session of its own, so a
  Ctrl-C in the terminal reaches the training process only, which then finishes the run. If the
  training process dies without finishing, the child sees the socket close and finishes the run as
  failed (exit code 1).
* W&B records the training process's system metrics (``x_stats_pid``). Its console capture is
  off: it would capture the child's console, which holds nothing of the training.
* An error in the child (a failed ``wandb.init``, a ``log`` that raised) comes back as a message;
  the next call in the parent raises it as :class:`WandbProcessError`.
* Mode ``disabled`` starts no process: the run drops everything, as W&B's disabled run does.
* W&B never stops the training: ``online`` without an API key, or a W&B that cannot start online
  within its ``init_timeout`` (no network, server down), starts offline instead, with one warning.
* :func:`wandb_in_its_own_process` makes Accelerate build ``"wandb"`` in ``log_with`` as this
  tracker; :func:`log_row` and :func:`log_artifact_file` take this run or a W&B run of this process
  (a ``WandBTracker`` the user built) alike.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from accelerate import tracking
from accelerate.tracking import GeneralTracker

from .wandb_child import usage_histogram
from .wandb_mode import has_api_key

__all__ = ["RemoteRun", "WandbProcessError", "WandbProcessTracker", "log_artifact_file", "log_row",
           "wandb_in_its_own_process"]

log = logging.getLogger(__name__)

START_GRACE = 30.0  # seconds a child may take beyond W&B's init_timeout to answer the start


class WandbProcessError(RuntimeError):
    """W&B failed in its process (the message is the child's ``TypeName: message``)."""


class _Forward:
    """``run.config`` / ``run.summary``: ``update`` forwarded to the child."""

    def __init__(self, run: RemoteRun, op: str) -> None:
        self._run, self._op = run, op

    def update(self, values: Mapping[str, Any], **kwargs: Any) -> None:
        self._run._send(self._op, dict(values))


class RemoteRun:
    """The parent's handle on the W&B run in the child; ``conn`` None is a disabled run."""

    def __init__(self, conn: Connection | None, process: subprocess.Popen | None, run_id: str | None,
                 finish_timeout: float) -> None:
        self._conn, self._process, self.id = conn, process, run_id
        self.finish_timeout = finish_timeout
        self.config = _Forward(self, "config")
        self.summary = _Forward(self, "summary")

    def log(self, values: Mapping[str, Any], step: int | None = None,
            histograms: Mapping[str, Any] | None = None) -> None:
        """Log one row; ``histograms`` maps keys to usage counts, turned into W&B histograms
        (see :func:`etegrec.hooks.wandb_child.usage_histogram`) in the child."""
        self._send(*_log_message(values, step, histograms))

    def define_metric(self, *args: Any, **kwargs: Any) -> None:
        self._send("define_metric", args, kwargs)

    def log_file_artifact(self, path: str, name: str, kind: str) -> None:
        """Log the file ``path`` as a W&B artifact ``name`` of type ``kind`` (built in the child)."""
        self._send("artifact", str(path), name, kind)

    def finish(self, exit_code: int = 0) -> None:
        """Finish the run (failed unless ``exit_code`` is 0) and wait for the child, at most
        ``finish_timeout`` seconds plus a grace; never raises. Calling it again does nothing."""
        conn, process, self._conn, self._process = self._conn, self._process, None, None
        if conn is None:
            return
        try:
            conn.send(("finish", exit_code))
            deadline = time.monotonic() + self.finish_timeout + START_GRACE
            while (left := deadline - time.monotonic()) > 0:  # an error message may come first
                if conn.poll(left) and conn.recv()[0] == "finished":
                    break
        except (OSError, EOFError):
            pass  # the child is gone: nothing left to finish
        finally:
            conn.close()
            _reap(process, timeout=5.0)

    def _send(self, op: str, *payload: Any) -> None:
        if self._conn is None:
            return
        self._raise_reported()
        self._conn.send((op, *payload))

    def _raise_reported(self) -> None:
        while self._conn.poll():
            message = self._conn.recv()
            if message[0] == "error":
                raise WandbProcessError(message[1])


class WandbProcessTracker(GeneralTracker):
    """An Accelerate tracker for W&B whose run lives in a child process.

    Args:
        run_name: the W&B project (Accelerate passes the project name first, as to its own tracker).
        **init_kwargs: ``wandb.init`` arguments (``name``, ``dir``, ``mode``, ``id``, ``resume``)
            plus ``settings``: a dict of ``wandb.Settings`` fields (plain values, built in the child).
    """

    name = "wandb"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, run_name: str, **init_kwargs: Any) -> None:
        super().__init__()
        self.project = run_name
        self.init_kwargs = init_kwargs
        self.run: RemoteRun | None = None

    @property
    def tracker(self) -> RemoteRun | None:
        return self.run

    def start(self) -> None:
        """Start the child and the W&B run in it; wait for it to answer.

        In mode ``online``, starts offline instead (one warning, a fresh run id: W&B holds the
        failed online one as in use) when there is no API key or the online start failed.

        Raises:
            WandbProcessError: ``wandb.init`` failed in the child, or the child did not answer in
                time (W&B's ``init_timeout`` plus :data:`START_GRACE` seconds).
        """
        kwargs, where = self.init_kwargs, Path(self.init_kwargs.get("dir") or ".") / "wandb"
        if kwargs.get("mode") == "online" and not has_api_key():
            log.warning("W&B mode is online but no API key is configured (WANDB_API_KEY or `wandb login`); "
                        "logging offline under %s instead", where)
            kwargs["mode"] = "offline"
        try:
            self._start()
        except Exception as exc:
            if kwargs.get("mode") != "online":
                raise
            log.warning("W&B could not start online (%s: %s); logging offline under %s instead",
                        type(exc).__name__, exc, where)
            kwargs.update(mode="offline", id=uuid.uuid4().hex[:12])
            self._start()

    def _start(self) -> None:
        settings = dict(self.init_kwargs.get("settings") or {})
        finish_timeout = float(settings.get("finish_timeout", 60.0))
        if self.init_kwargs.get("mode") == "disabled":
            self.run = RemoteRun(None, None, self.init_kwargs.get("id"), finish_timeout)
            return
        settings.setdefault("x_stats_pid", os.getpid())
        settings.setdefault("console", "off")
        kwargs = {**self.init_kwargs, "project": self.project, "settings": settings,
                  "command": _command_line()}  # W&B records the user's command, not the child's
        ours, theirs = socket.socketpair()
        with ours, theirs:
            process = subprocess.Popen([sys.executable, "-m", "etegrec.hooks.wandb_child", str(theirs.fileno())],
                                       pass_fds=[theirs.fileno()], start_new_session=True)
            conn = Connection(ours.detach())
        try:
            conn.send(("init", kwargs))
            wait = float(settings.get("init_timeout", 90.0)) + START_GRACE
            if not conn.poll(wait):
                raise WandbProcessError(f"W&B's process did not start its run within {wait:.0f} s")
            answer = conn.recv()
            if answer[0] != "started":
                raise WandbProcessError(answer[1])
        except BaseException as exc:
            conn.close()
            _reap(process, timeout=5.0)
            if isinstance(exc, EOFError):
                raise WandbProcessError(f"W&B's process exited while starting (exit code {process.returncode})") from None
            raise
        self.run = RemoteRun(conn, process, answer[1], finish_timeout)

    def store_init_configuration(self, values: dict) -> None:
        if self.run is not None:
            self.run.config.update(values)

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0)


@contextmanager
def wandb_in_its_own_process() -> Iterator[None]:
    """While open, Accelerate builds a ``"wandb"`` named in ``log_with`` as a :class:`WandbProcessTracker`.

    Accelerate looks tracker names up in its ``LOGGER_TYPE_TO_CLASS`` when ``init_trackers`` runs:
    pointing ``"wandb"`` there for that call leaves the accelerator's ``log_with`` as it was given.
    """
    previous = tracking.LOGGER_TYPE_TO_CLASS["wandb"]
    tracking.LOGGER_TYPE_TO_CLASS["wandb"] = WandbProcessTracker
    try:
        yield
    finally:
        tracking.LOGGER_TYPE_TO_CLASS["wandb"] = previous


def log_row(run: Any, row: Mapping[str, Any], usage: Mapping[str, Any]) -> None:
    """Log ``row`` plus one usage histogram per ``usage`` entry (key -> codebook counts) to ``run``."""
    if isinstance(run, RemoteRun):  # the histograms are made in W&B's process
        run.log(row, histograms=usage)
        return
    import wandb

    run.log({**row, **{k: wandb.Histogram(np_histogram=usage_histogram(c)) for k, c in usage.items()}})


def log_artifact_file(run: Any, path: str | os.PathLike, name: str, kind: str) -> None:
    """Log the file ``path`` as the W&B artifact ``name`` of type ``kind`` to ``run``."""
    if isinstance(run, RemoteRun):
        run.log_file_artifact(str(path), name, kind)
    else:
        from .wandb_child import log_file_artifact

        log_file_artifact(run, str(path), name, kind)


def _log_message(values: Mapping[str, Any], step: int | None, histograms: Mapping[str, Any] | None) -> tuple:
    # counts as lists: a list of ints pickles in a fraction of an array's time
    counts = {k: c.tolist() if hasattr(c, "tolist") else c for k, c in (histograms or {}).items()}
    return ("log", dict(values), step, counts)


def _reap(process: subprocess.Popen | None, timeout: float) -> None:
    """Wait for the child to exit; kill it if it does not."""
    if process is None:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _command_line() -> dict[str, Any]:
    """This (training) process's program as W&B names it (``-m etegrec.training.joint`` or a script) and
    its arguments, for the child to record as the run's program and args."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    program = f"-m {spec.name}" if spec is not None else getattr(__main__, "__file__", sys.argv[0])
    return {"program": program, "argv": list(sys.argv)}
