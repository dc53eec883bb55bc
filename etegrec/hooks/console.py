"""The console subscriber: one readable line per event (step lines throttled), on the main rank only."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

from tqdm import tqdm

from .base import Subscriber

__all__ = ["ConsoleSubscriber"]


def _phase(stage: str, phase: str) -> str:
    return "" if phase == stage else f" {phase}"  # "[embed] epoch 3", not "[embed] epoch 3 embed"


def _lr_text(lr: dict | None) -> str:
    if not lr:
        return ""
    if list(lr) == ["lr"]:  # one optimiser: "lr=0.001", not "lr lr=0.001"
        return f" | lr={lr['lr']:.3g}"
    return f" | lr {_fmt(lr, 3)}"


def _fmt(values: dict, digits: int = 4) -> str:
    return " ".join(f"{k}={v:.{digits}g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


class ConsoleSubscriber(Subscriber):
    """Prints through ``tqdm.write`` so that lines do not tear progress bars.

    ``pipeline``: the stages of the command being run, in order (a run's console gets them from the
    stages' declarations); an epoch line of one of them says ``stage N/M``.
    """

    main_process_only = True

    def __init__(self, *, file=None, codebooks: bool = True, min_interval: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, pipeline: Sequence[str] = ()) -> None:
        super().__init__()
        self.file = file
        self.pipeline = tuple(pipeline)
        self.codebooks = codebooks
        # step lines (step_end, many per epoch) at most every min_interval seconds; every epoch,
        # evaluation and checkpoint line is printed
        self.min_interval = min_interval
        self._last_step_line = float("-inf")
        self._clock = clock
        self._stage: tuple | None = None  # (stage, the phase of every planned epoch) of the running stage
        self._last_end = 0.0  # when the running stage last started or ended an epoch (clock)
        self._durations: dict[str, list[float]] = {}  # phase -> seconds of its epochs so far, evaluation included
        self._codebook_lines: list[tuple] = []

    def _print(self, text: str) -> None:
        tqdm.write(text, file=self.file or sys.stderr)

    def on_run_started(self, sender, *, stage, run_dir, world_size=1, resumed=False, phases=(), config=None,
                       **extra):
        self._stage, self._last_end, self._durations = (stage, list(phases)), self._clock(), {}
        how = "resumed" if resumed else "started"
        codes = ((config or {}).get("codes") or {}).get("file") if stage == "joint" else None
        fixed = f", on the codes of {codes} (codes.file, fixed)" if codes else ""
        self._print(f"[{stage}] run {how} in {run_dir} ({world_size} process{'es' if world_size > 1 else ''}){fixed}")

    def on_epoch_end(self, sender, *, stage, phase, epoch, losses, lr=None, seconds=0.0,
                     samples_per_second=0.0, **extra):
        self._time_epoch(stage, phase)
        codebook_lines, self._codebook_lines = self._codebook_lines, []
        for stage_, epoch_, layer, utilization, perplexity, gini, dead in codebook_lines:
            self._print(f"[{stage_}] epoch {epoch_} codebook layer {layer}: utilization {utilization:.1%}, "
                        f"perplexity {perplexity:.1f}, gini {gini:.3f}, {dead} dead")
        self._print(f"[{stage}] epoch {epoch}{_phase(stage, phase)}: {_fmt(losses)}{_lr_text(lr)} | "
                    f"{seconds:.1f} s, {samples_per_second:.0f} samples/s{self._where(stage, epoch)}")

    def _time_epoch(self, stage: str, phase: str) -> None:
        """Time the epoch that just ended by its phase, from the end of the one before (or the start),
        evaluation included: a tokenizer epoch takes a fraction of a recommender epoch."""
        now, since = self._clock(), self._last_end
        self._last_end = now
        if self._stage is not None and self._stage[0] == stage:
            self._durations.setdefault(phase, []).append(now - since)

    def _where(self, stage: str, epoch: int) -> str:
        """`` | stage 3/3, epoch 5/12, about 6 min left``: the pipeline's stage and an estimate of the
        stage's time left if it runs every planned epoch (early stopping may end it sooner): each
        epoch left at its phase's mean so far, a phase not seen yet at the slowest phase seen."""
        if self._stage is None or self._stage[0] != stage or not self._stage[1] or not self._durations:
            return ""
        means = {phase: sum(seconds) / len(seconds) for phase, seconds in self._durations.items()}
        planned = self._stage[1]
        left = sum(means.get(later, max(means.values())) for later in planned[epoch + 1:])
        number = f"stage {self.pipeline.index(stage) + 1}/{len(self.pipeline)}, " if stage in self.pipeline else ""
        eta = f"about {left / 60:.0f} min left" if left >= 90 else f"about {left:.0f} s left"
        return f" | {number}epoch {epoch + 1}/{len(planned)}, {eta}"

    def on_step_end(self, sender, *, stage, phase, epoch, step, losses, lr=None, **extra):
        now = time.monotonic()
        if now - self._last_step_line < self.min_interval:
            return
        self._last_step_line = now
        self._print(f"[{stage}] epoch {epoch}{_phase(stage, phase)} step {step}: {_fmt(losses)}{_lr_text(lr)}")

    def on_codes_assigned(self, sender, *, stage, epoch, max_conflict, max_conflict_before, collision_rate,
                          changed, codes=None, seconds=0.0, **extra):
        n = len(codes) if codes is not None else 0
        self._print(f"[{stage}] codes for epoch {epoch}: max_conflict {max_conflict} "
                    f"(before FORGE {max_conflict_before}), collision rate {collision_rate:.2%}, {changed}/{n} changed, {seconds:.2f} s")

    def on_evaluated(self, sender, *, stage, split, epoch, metrics, **extra):
        # the test split is evaluated once, with the best checkpoint, whose epoch the payload carries
        where = f"(best checkpoint, epoch {epoch})" if split == "test" else f"@ epoch {epoch}"
        self._print(f"[{stage}] {split} {where}: {_fmt(metrics)}")

    def on_probed(self, sender, *, stage, split, epoch, users, probes, **extra):
        ce = " ".join(f"{probes[f'code_ce_{p}']:.2f}/{probes[f'code_floor_{p}']:.2f}"
                      for p in range(sum(k.startswith("code_ce_") for k in probes)))
        self._print(f"[{stage}] probes @ epoch {epoch} ({users} {split} users): item NLL "
                    f"{probes['item_nll']:.2f} (popularity {probes['popularity_nll']:.2f}), code CE/floor {ce}, "
                    f"overlap shuffled {probes['shuffle_overlap']:.2f}, last dropped {probes['drop_last_overlap']:.2f}, "
                    f"repeats {probes['repeat_share']:.1%} (data {probes['data_repeat_rate']:.1%}), "
                    f"codes changed {probes['codes_changed']:.1%}")

    def on_codebook_usage(self, sender, *, stage, epoch, layer, utilization, perplexity, gini,
                          dead_codes, **extra):
        if self.codebooks:  # printed with the epoch's epoch_end line, if that one is printed (formatted then)
            self._codebook_lines.append((stage, epoch, layer, utilization, perplexity, gini, dead_codes))

    def on_checkpoint_saved(self, sender, *, stage, epoch, path, is_best=False, **extra):
        self._print(f"[{stage}] checkpoint {'(best) ' if is_best else ''}epoch {epoch}: {path}")

    def on_run_finished(self, sender, *, stage, status="completed", best_metrics=None, seconds=0.0, **extra):
        best = f"; best {_fmt(best_metrics)}" if best_metrics else ""
        self._print(f"[{stage}] run {status} in {seconds:.1f} s{best}")
