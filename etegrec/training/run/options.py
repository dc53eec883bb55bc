"""How a stage runs, resolved once: the frozen :class:`RunOptions` a :class:`~etegrec.training.run.Run` receives.

The command line (or a caller from Python) hands what the user asked for to
:meth:`RunOptions.resolve`, which checks everything that can be checked before training (the
trackers, the subscribers, the W&B mode, the run to resume) and settles it. Two things are settled
later: an unset ``output_dir`` becomes the default run directory when the :class:`Run` starts (the
command line names it sooner, for its Ctrl-C hint), and W&B falls back to offline when it cannot
reach its server.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from etegrec.config import Config, ConfigError
from etegrec.hooks import Subscriber, resolve_subscriber
from etegrec.hooks.wandb_mode import resolve_mode

from .resume import check_resume_config, lengthened_keys, resume_checkpoint

if TYPE_CHECKING:
    from accelerate.tracking import GeneralTracker

__all__ = ["RunOptions", "check_trackers"]


@dataclass(frozen=True)
class RunOptions:
    """A stage's run options, resolved. Build with :meth:`resolve`, or directly for a run of the
    package's own (the cached stages) whose options need no checking."""

    output_dir: Path | None = None  # None: a new runs/<stage>-<dataset>-<time>
    wandb_mode: str = "disabled"  # online | offline | disabled, settled
    # Accelerate trackers: names, checked, and tracker objects; "wandb" only when the mode is not disabled
    log_with: tuple[str | GeneralTracker, ...] = ()
    subscribers: tuple[Subscriber, ...] = ()  # the user's, resolved
    resume: bool = False
    lengthened: tuple[str, ...] = ()  # LENGTHENING_KEYS a resume raises
    rebuild: bool = False  # train the cached earlier stages again
    console: bool = True

    @classmethod
    def resolve(cls, config: Config, *, output_dir: str | Path | None = None, wandb_mode: str | None = None,
                log_with: Sequence[str | GeneralTracker] = ("wandb",), subscribers: Sequence[Any] = (),
                resume: bool = False, rebuild: bool = False, console: bool = True) -> RunOptions:
        """Check and settle what was asked for.

        Raises:
            ValueError: an unknown or uninstalled tracker (see :func:`check_trackers`).
            SubscriberError: a subscriber that cannot be loaded.
            ConfigError: an unknown W&B mode (``wandb_mode`` or ``WANDB_MODE``); ``resume`` without
                ``output_dir``, without a checkpoint, or with a config that changes what the run trains;
                ``output_dir`` holding a run, without ``resume``.
        """
        try:
            mode = resolve_mode(wandb_mode)
        except ValueError as exc:  # a bad WANDB_MODE in the environment is the user's input too
            raise ConfigError(str(exc)) from None
        trackers = tuple(name for name in check_trackers(log_with) if name != "wandb" or mode != "disabled")
        path = Path(output_dir) if output_dir else None
        lengthened: list[str] = []
        if resume:
            if path is None:
                raise ConfigError("--resume needs --output-dir: the run directory to continue")
            resume_checkpoint(path)
            check_resume_config(path, config)
            lengthened = lengthened_keys(path, config)
        elif path is not None and (path / "checkpoints" / "last.pt").exists():
            raise ConfigError(f"run directory {str(path)!r} already holds a run (last.pt in checkpoints/); pass "
                              "--resume to continue it or choose another --output-dir")
        return cls(output_dir=path, wandb_mode=mode, log_with=trackers,
                   subscribers=tuple(resolve_subscriber(s) for s in subscribers), resume=resume,
                   lengthened=tuple(lengthened), rebuild=rebuild, console=console)


def check_trackers(names: Sequence[str | GeneralTracker]) -> tuple[str | GeneralTracker, ...]:
    """``names`` as a tuple, once each, after checking each is an Accelerate tracker that is installed;
    a tracker object (an Accelerate ``GeneralTracker``, built by the caller) is taken as it is.

    Raises:
        ValueError: a name Accelerate does not know, or a tracker whose package is missing.
    """
    from accelerate.tracking import GeneralTracker, get_available_trackers
    from accelerate.utils import LoggerType

    known = [t for t in LoggerType.list() if t != "all"]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if isinstance(name, GeneralTracker):
            continue
        if name not in known:
            raise ValueError(f"unknown tracker {name!r} in log_with; use some of {', '.join(known)} (or none).")
        if name not in available:
            extra = " (pip install 'etegrec[tensorboard]')" if name == "tensorboard" else ""
            raise ValueError(f"tracker {name!r} in log_with is not installed; install its package{extra} "
                             f"or log with another one.")
    return tuple(dict.fromkeys(names))
