"""The shape every subscriber shares, and how a user's subscriber is found from the command line.

A subscriber is an object with ``on_<signal>`` methods (``on_epoch_end``, ``on_codes_assigned``,
...), each a blinker receiver ``(sender, **payload)``. :meth:`Subscriber.connect` connects those
methods strongly, so the subscriber lives as long as it is connected; ``start``/``finish`` bracket
a run; ``main_process_only`` tells the trainer to attach it on the main rank only.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from etegrec import signals

__all__ = ["FunctionSubscriber", "Subscriber", "SubscriberError", "resolve_subscriber"]


class SubscriberError(ValueError):
    """A ``--subscriber`` spec that cannot be turned into a subscriber."""


class Subscriber:
    """Base class: connects every ``on_<signal name>`` method to its signal."""

    main_process_only = False

    def __init__(self) -> None:
        self._connected: list[tuple[signals.BusSignal, Callable]] = []

    def handlers(self) -> list[tuple[signals.BusSignal, Callable]]:
        """(signal, receiver) pairs this subscriber listens to."""
        return [(sig, getattr(self, f"on_{sig.name}")) for sig in signals.ALL_SIGNALS
                if callable(getattr(self, f"on_{sig.name}", None))]

    def connect(self) -> Subscriber:
        if not getattr(self, "_connected", None):
            self._connected = self.handlers()
            for sig, receiver in self._connected:
                sig.connect(receiver, weak=False)
        return self

    def disconnect(self) -> None:
        for sig, receiver in getattr(self, "_connected", []):
            sig.disconnect(receiver)
        self._connected = []

    def start(self) -> None:
        """Called once before the run's first signal."""

    def finish(self, status: str = "completed") -> None:
        """Called once when the run ends (also on failure); must not raise."""

    def __enter__(self) -> Subscriber:
        self.start()
        return self.connect()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.disconnect()
        self.finish("completed" if exc_type is None else "failed")


class FunctionSubscriber(Subscriber):
    """Wraps a plain function ``fn(sender, *, signal, **payload)``: it receives every signal,
    with the signal's name as the ``signal`` keyword."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def handlers(self):
        def bind(name):
            return lambda sender, **payload: self.fn(sender, signal=name, **payload)
        return [(sig, bind(sig.name)) for sig in signals.ALL_SIGNALS]


def _import(module_spec: str, spec: str):
    if module_spec.endswith(".py"):
        path = Path(module_spec)
        if not path.exists():
            raise SubscriberError(f"--subscriber {spec!r}: file {module_spec!r} does not exist")
        loader_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules.setdefault(path.stem, module)
        try:
            loader_spec.loader.exec_module(module)
        except SyntaxError as exc:
            raise SubscriberError(f"--subscriber {spec!r}: {module_spec!r} line {exc.lineno}: syntax error "
                                  f"({exc.msg}); fix the file") from None
        except Exception as exc:
            raise SubscriberError(f"--subscriber {spec!r}: running {module_spec!r} raised "
                                  f"{type(exc).__name__}: {exc}") from None
        return module
    try:
        return importlib.import_module(module_spec)
    except ModuleNotFoundError as exc:
        raise SubscriberError(f"--subscriber {spec!r}: cannot import module {module_spec!r} ({exc}); "
                              "is it on PYTHONPATH?") from None
    except SyntaxError as exc:
        raise SubscriberError(f"--subscriber {spec!r}: {exc.filename!r} line {exc.lineno}: syntax error "
                              f"({exc.msg}); fix the module") from None


def resolve_subscriber(spec: Any) -> Subscriber:
    """Turn ``MODULE:NAME`` (or ``path/to/file.py:NAME``), or an object, into a connected-ready subscriber.

    ``NAME`` may be a class or zero-argument factory (called once), an object with
    ``on_<signal>`` methods, or a plain function ``fn(sender, *, signal, **payload)`` that
    receives every signal. From Python, such an object (or a :class:`Subscriber`) can be passed
    instead of a string. The result is held strongly by the run.

    Raises:
        SubscriberError: malformed spec, missing module or attribute, or nothing callable.
    """
    if not isinstance(spec, str):
        return _as_subscriber(spec, repr(spec), type(spec).__name__)
    module_spec, sep, attr = spec.rpartition(":")
    if not sep or not module_spec or not attr:
        raise SubscriberError(f"--subscriber {spec!r} is not of the form MODULE:CALLABLE "
                              "(for example mypkg.probes:ConflictWatch)")
    module = _import(module_spec, spec)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SubscriberError(f"--subscriber {spec!r}: module {module_spec!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if inspect.isclass(obj) or (callable(obj) and not _has_handlers(obj) and _takes_no_arguments(obj)):
        try:
            obj = obj()  # a class or factory
        except Exception as exc:
            raise SubscriberError(f"--subscriber {spec!r}: calling {attr!r} raised {type(exc).__name__}: {exc}") from None
    return _as_subscriber(obj, spec, attr)


def _as_subscriber(obj: Any, spec: str, attr: str) -> Subscriber:
    if isinstance(obj, Subscriber):
        return obj
    if _has_handlers(obj):
        return _Adapted(obj)
    if callable(obj):
        return FunctionSubscriber(obj)
    raise SubscriberError(f"--subscriber {spec!r}: {attr!r} gives a {type(obj).__name__}, which is neither "
                          "callable nor has on_<signal> methods")


def _has_handlers(obj: Any) -> bool:
    return any(callable(getattr(obj, f"on_{s.name}", None)) for s in signals.ALL_SIGNALS)


def _takes_no_arguments(fn: Callable) -> bool:
    try:
        return not inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class _Adapted(Subscriber):
    """A user object with ``on_<signal>`` methods (and maybe start/finish) that does not subclass Subscriber."""

    def __init__(self, obj: Any) -> None:
        super().__init__()
        self.obj = obj
        self.main_process_only = bool(getattr(obj, "main_process_only", False))

    def handlers(self):
        return Subscriber.handlers(self.obj)

    def start(self) -> None:
        if callable(getattr(self.obj, "start", None)):
            self.obj.start()

    def finish(self, status: str = "completed") -> None:
        if callable(getattr(self.obj, "finish", None)):
            self.obj.finish(status)
