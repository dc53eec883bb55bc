"""What a stage is, declared once: a :class:`Stage` names everything the package needs to know about it.

The pipeline trains a stage after the stages it ``needs`` (their products become its trainer's
arguments), the stage cache keys it by its config sections, the console numbers it within its
pipeline, the tracking subscriber logs it under its project, run name and key map, and
``python -m etegrec`` lists its command: all of them read the declaration, none spells the name.
Every stage is registered in :mod:`etegrec.training.stages`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from etegrec.hooks.wandb_rows import KeyMap

if TYPE_CHECKING:
    from etegrec.config import Config
    from etegrec.data import SequenceData

    from .run.fit import StageTrainer

__all__ = ["Stage"]


def _run_name(config: Config) -> str | None:
    return config.run.name


@dataclass(frozen=True, eq=False)
class Stage:
    """One stage of training, declared once (compared by identity: each is one object).

    Args:
        name: the stage in signals, checkpoints, run and cache directories (``runs/<name>-...``).
        command: the module ``python -m`` runs for it.
        label: what it makes, in words (``item embeddings``): the command listing and the pipeline's lines.
        summary: one line: the command's ``--help`` and ``python -m etegrec``.
        sections: the config sections its trainer reads besides ``data`` and ``run``; with those of
            the stages it needs, they key its cache (:func:`etegrec.training.run.cache.stage_dir`).
        trainer: ``trainer(config, run, data, *products)``, the products of ``needs`` in their order.
        needs: the earlier stages whose products it trains on (built, or taken from the cache, first).
        produces: the file of its run directory that exists once it has finished (its product is read then).
        load: ``load(run_dir, config, data, *products)``: its product, read from a finished run directory
            (what a later stage's trainer receives); None for a stage no other needs.
        project: its tracking project (W&B, TensorBoard's folder).
        key_map: how its ``epoch_end`` losses and ``evaluated`` splits are keyed on the trackers.
        run_name: its tracked run's name from the config (None: the run directory's name).
        recommends: a finished run serves recommendations (``python -m etegrec.recommend``).
        check: ``check(config, data)`` reads the input files its config names and raises ConfigError (or
            DataError) on a bad one: run once the data is loaded, before any stage of its chain trains, so an
            error costs no training.
    """

    name: str
    command: str
    label: str
    summary: str
    sections: tuple[str, ...]
    trainer: Callable[..., StageTrainer]
    project: str
    key_map: KeyMap
    needs: tuple[Stage, ...] = ()
    produces: str = "metrics.json"
    load: Callable[..., Any] | None = None
    run_name: Callable[[Config], str | None] = _run_name
    recommends: bool = False
    check: Callable[[Config, SequenceData], Any] | None = None

    @property
    def chain(self) -> tuple[Stage, ...]:
        """The stages its command trains, in order: what it needs (and they need), then itself."""
        out: list[Stage] = []
        for need in self.needs:
            out += [s for s in need.chain if s not in out]
        return (*out, self)

    @property
    def key_sections(self) -> tuple[str, ...]:
        """The config sections its product depends on: its own and those of every stage it needs."""
        return tuple(dict.fromkeys(section for stage in self.chain for section in stage.sections))

    def read(self, run_dir: Path, config: Config, data: SequenceData, *products: Any) -> Any:
        """Its product in the finished run directory ``run_dir`` (see ``load``)."""
        if self.load is None:
            raise ValueError(f"stage {self.name!r} declares no product (load=None); no stage can need it")
        return self.load(run_dir, config, data, *products)
