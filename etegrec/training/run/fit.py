"""The one ``fit`` loop of every stage: resume, the evaluation schedule, checkpoints, stopping, Ctrl-C.

A trainer (:class:`StageTrainer`) supplies its phases, ``train_one_epoch``, ``validate`` and its
``state_dict``; :func:`fit_stage` does the rest, the same way for the SASRec, RQ-VAE and joint
stages. Training is a list of *segments* (the joint stage has two: alternating epochs, then
fine-tuning), each a list of phase names, one per epoch. Early stopping ends a segment; the best
score carries over into the next one.

Checkpoints: ``best.pt`` at every new best; ``last.pt`` after every epoch (or, with
``save_last = "evaluation"``, after every evaluation) with the :class:`LoopPosition` of the next
epoch, and on Ctrl-C with the interrupted epoch's progress, so that ``--resume`` continues exactly
where the run stopped. A checkpoint holds the trainer's own keys at its top level (``model``,
``recommender``, ...), ``epoch``, ``position``, ``early_stopping`` and ``progress``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from tqdm import tqdm

from etegrec import signals

from .loop import EpochProgress, TrainingInterrupted, interactive
from .resume import set_rng_state
from .stopping import EarlyStopping

__all__ = ["LoopPosition", "StageTrainer", "fit_stage"]


@dataclass
class LoopPosition:
    """Where the loop goes on: the next epoch (counted over the whole stage), its segment and its
    index within the segment."""

    epoch: int = 0
    segment: int = 0
    index: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)


class StageTrainer:
    """What :func:`fit_stage` asks of a stage's trainer; subclasses override what they need."""

    run: Any  # the Run it trains in
    stopping: EarlyStopping
    eval_every: int = 1  # validate after every eval_every-th epoch, and after each segment's last
    save_last = "epoch"  # or "evaluation": last.pt only after an evaluation (cheap stages, many epochs)
    epoch_bar = False  # a progress bar over the epochs (stages of many short epochs)
    hooks = None  # a CodebookHooks: removed at the end, its counts travel in mid-epoch checkpoints

    @property
    def stage(self) -> str:
        """The name of the stage it trains (its run's): what its signals and checkpoints say."""
        return self.run.stage

    def segments(self) -> list[list[str]]:
        raise NotImplementedError

    def begin(self, resumed: bool) -> None:
        """Before the first epoch of this process (after a resume's state is loaded)."""

    def start_segment(self, segment: int) -> None:
        """Before the first epoch of ``segment`` (not when resuming into its middle)."""

    def check_lengthened(self, position: LoopPosition) -> None:
        """Refuse a resume with more epochs where this stage cannot add them (ConfigError)."""

    def train_one_epoch(self, epoch: int, phase: str, progress: EpochProgress | None) -> None:
        raise NotImplementedError

    def validate(self, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any], *, resume: bool = False) -> None:
        """Load a checkpoint's models (``resume``: and the optimisers, schedulers and the rest)."""
        raise NotImplementedError

    def finish(self, best: dict[str, Any]) -> dict[str, Any]:
        """After training, with the best checkpoint loaded: test and write outputs; returns the
        content of ``metrics.json``."""
        raise NotImplementedError

    def fit(self) -> dict[str, dict[str, float]]:
        """Train in its run to the end (:func:`fit_stage`); returns the ``valid`` (and ``test``) metrics."""
        return fit_stage(self, self.run)


def fit_stage(trainer: StageTrainer, run) -> dict[str, dict[str, float]]:
    """Train ``trainer`` in ``run`` to the end; returns its ``valid`` (and ``test``) metrics."""
    start = time.perf_counter()
    position, progress = LoopPosition(), None
    try:
        if run.resumed:
            position, progress = _restore(trainer, run.resume_state, run.accelerator.device)
            if run.lengthened:  # more epochs asked for: they all train, whatever stopped the run before
                trainer.check_lengthened(position)
                trainer.stopping.reset_wait()
        signals.run_started.send(trainer, **run.started_payload(position.epoch),
                                 phases=[phase for segment in trainer.segments() for phase in segment])
        trainer.begin(resumed=run.resumed)
        _train(trainer, run, position, progress)
        run.accelerator.wait_for_everyone()
        best_path = run.checkpoint_dir / "best.pt"
        best = run.files.load_best()
        trainer.load_state_dict(best)
        metrics = trainer.finish(best)
        run.write_metrics(metrics)
        signals.run_finished.send(trainer, stage=trainer.stage, status="completed",
                                  best_metrics=trainer.stopping.best_metrics, best_checkpoint=str(best_path),
                                  seconds=time.perf_counter() - start)
    except BaseException as exc:
        best = run.checkpoint_dir / "best.pt"
        signals.run_finished.send(trainer, stage=trainer.stage,
                                  status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                                  best_metrics={}, best_checkpoint=str(best) if best.exists() else None,
                                  seconds=time.perf_counter() - start)
        raise
    finally:
        if trainer.hooks is not None:
            trainer.hooks.remove()
    return {split: metrics[split] for split in ("valid", "test") if split in metrics}


def _train(trainer: StageTrainer, run, position: LoopPosition, progress: EpochProgress | None) -> None:
    segments = trainer.segments()
    total = sum(map(len, segments))
    bar = tqdm(total=total, initial=position.epoch, desc=f"{trainer.stage} epochs", leave=False,
               dynamic_ncols=True, disable=not (trainer.epoch_bar and run.is_main and interactive()))
    epoch = position.epoch
    with bar:
        for segment in range(position.segment, len(segments)):
            phases = segments[segment]
            index = position.index if segment == position.segment else 0
            if segment != position.segment:
                trainer.stopping.reset_wait()  # patience counts within a segment; the best carries over
            if index == 0 and progress is None and phases:
                trainer.start_segment(segment)
            while index < len(phases):
                here = LoopPosition(epoch, segment, index)
                try:
                    trainer.train_one_epoch(epoch, phases[index], progress)
                except TrainingInterrupted as stop:
                    _save(trainer, run, "last", epoch, here, stop.progress)
                    raise
                progress = None
                evaluate = (epoch + 1) % trainer.eval_every == 0 or index == len(phases) - 1
                if evaluate and trainer.stopping.update(trainer.validate(epoch), epoch):
                    _save(trainer, run, "best", epoch)
                index = len(phases) if trainer.stopping.should_stop else index + 1
                if evaluate or trainer.save_last == "epoch":
                    _save(trainer, run, "last", epoch, LoopPosition(epoch + 1, segment, index))
                elif run.should_stop():  # Ctrl-C after an epoch that wrote nothing: write it now
                    _save(trainer, run, "last", epoch, LoopPosition(epoch + 1, segment, index))
                    raise KeyboardInterrupt
                epoch += 1
                bar.update()
                run.check_stop()


def _save(trainer: StageTrainer, run, name: str, epoch: int, position: LoopPosition | None = None,
          progress: EpochProgress | None = None) -> None:
    state = {**trainer.state_dict(), "epoch": epoch, "position": position.state_dict() if position else None,
             "early_stopping": trainer.stopping.state_dict(),
             "progress": progress.state_dict() if progress else None,
             "hook_counts": [c.cpu() for c in trainer.hooks.counts] if progress and trainer.hooks else None}
    path = run.save_checkpoint(state, name)
    if path is not None:
        signals.checkpoint_saved.send(trainer, stage=trainer.stage, epoch=epoch, path=str(path), is_best=name == "best")


def _restore(trainer: StageTrainer, state: dict[str, Any], device) -> tuple[LoopPosition, EpochProgress | None]:
    trainer.load_state_dict(state, resume=True)
    trainer.stopping.load_state_dict(state["early_stopping"])
    progress = EpochProgress.from_state(state.get("progress"), device)
    if state.get("hook_counts") is not None and trainer.hooks is not None:
        trainer.hooks.load_counts(state["hook_counts"])
    set_rng_state(state["rng"])
    return LoopPosition(**state["position"]), progress

