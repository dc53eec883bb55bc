"""The pipeline: a stage trained after the stages it needs, those reused from the stage cache.

:func:`run_stage` builds (or reuses) what a stage's declaration ``needs``, in order, then trains it in
its run directory. A needed stage is a complete run directory of its own under
``$ETEGREC_HOME/stages/`` (see :mod:`etegrec.training.run.cache`); it logs to no tracker. Nothing here
names a stage: it reads the :class:`~etegrec.training.stage.Stage` it is given. No stage imports this
module (only the command line does).
"""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from etegrec.config import Config
from etegrec.data import SequenceData

from .cache import load_stage_data, stage_dir
from .options import RunOptions
from .run import Run, prepare_process
from .rundir import wait_while_held
from ..stage import Stage

__all__ = ["ensure", "print_summary", "run_stage"]


def _rebuild(folder: Path, accelerator) -> None:
    """``--rebuild``: move a cached stage out of the way (to ``<folder>.replaced``) so that it is trained again."""
    if accelerator.is_main_process and folder.exists():
        old = folder.with_name(folder.name + ".replaced")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        print(f"[{folder.name.split('-')[0]}] --rebuild: moved the cached stage to {old}; training it again")
    accelerator.wait_for_everyone()


def ensure(stage: Stage, config: Config, data: SequenceData, accelerator, *, rebuild: bool = False,
           pipeline: Sequence[Stage] = (), products: dict[Stage, Any] | None = None) -> Any:
    """The product of ``stage`` for this config and data, from its cached run, training that run first
    when it has not finished (or always, with ``rebuild``); the stages it needs are ensured first.

    A cached run that was stopped before the end (killed, Ctrl-C) is resumed from its checkpoint; one that
    another live command is training is waited for, then reused (or resumed, if that command stopped first).
    ``pipeline``: the stages of the command being run (the console numbers the stage within them);
    ``products``: what this command has ensured so far, by stage (each stage is ensured once).

    Raises:
        DataError: a cached product that does not fit this config or data (see the stage's ``load``).
    """
    products = {} if products is None else products
    if stage in products:
        return products[stage]
    inputs = [ensure(need, config, data, accelerator, rebuild=rebuild, pipeline=pipeline, products=products)
              for need in stage.needs]
    folder = stage_dir(config, stage, data)
    if rebuild:
        _rebuild(folder, accelerator)
    if not (folder / stage.produces).exists():  # another command may be training it (a sweep's twin): wait
        def say_waiting(pid: str) -> None:
            if accelerator.is_main_process:
                print(f"[{stage.name}] another run (pid {pid}) is training the cached {stage.label} for this "
                      f"config in {folder}; waiting for it to end", flush=True)
        wait_while_held(folder, say_waiting)  # every rank: a collective could time out during a long wait
    # no rank of this run takes the stage's lock (the main rank, training it below) before every rank has
    # looked: a rank that looked later would find its own run's lock and wait for it forever
    accelerator.wait_for_everyone()
    if not (folder / stage.produces).exists():
        resume = (folder / "checkpoints" / "last.pt").exists()
        if accelerator.is_main_process:
            how = "resuming its stopped run" if resume else "training it"
            print(f"[{stage.name}] no cached {stage.label} for this config; {how} in {folder}")
        with Run(config, RunOptions(output_dir=folder, resume=resume), stage=stage, tracked=False,
                 accelerator=accelerator, pipeline=pipeline) as run:
            stage.trainer(config, run, data, *inputs).fit()
        accelerator.wait_for_everyone()
    products[stage] = stage.read(folder, config, data, *inputs)
    return products[stage]


def run_stage(stage: Stage, config: Config, options: RunOptions | None = None, *, accelerator=None,
              **option_args) -> dict[str, dict[str, float]]:
    """Train ``stage`` in its own run directory after building (or reusing) what it needs; ``options``
    (or the arguments of :meth:`RunOptions.resolve`) say how (``rebuild``: train the cached stages it
    needs again). Returns its ``valid`` (and ``test``) metrics; those with a test split are printed."""
    options = options or RunOptions.resolve(config, **option_args)
    prepare_process(config)
    data = load_stage_data(config)
    for checked in stage.chain:
        if checked.check is not None:
            checked.check(config, data)
    run = Run(config, options, stage=stage, accelerator=accelerator, data_digest=data.digest)
    products: dict[Stage, Any] = {}
    inputs = [ensure(need, config, data, run.accelerator, rebuild=options.rebuild, pipeline=stage.chain,
                     products=products) for need in stage.needs]
    set_seed(config.run.seed)
    with run:
        result = stage.trainer(config, run, data, *inputs).fit()
    if run.is_main and "test" in result:
        print_summary(result, run.run_dir)
    return result


def print_summary(result: dict, run_dir) -> None:
    """The valid and test metrics of a finished run, as a table, and its directory."""
    names = ["recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10"]
    print("\n" + " " * 8 + "".join(f"{n:>11}" for n in names))
    for split in ("valid", "test"):
        print(f"{split:<8}" + "".join(f"{result[split].get(n, float('nan')):>11.4f}" for n in names))
    print(f"\nrun directory: {run_dir}")
