"""The console subscriber: one readable line per event (step lines throttled), on the main rank only."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

from .base import Subscriber

__all__ = ["ConsoleSubscriber", "PIPELINE"]

PIPELINE = ("embed", "rqvae", "joint")  # the stages of `python -m etegrec.training.joint`, in order


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
    """Prints through ``tqdm.write`` so that lines do not tear progress bars."""

    main_process_only = True

    def __init__(self, *, file=None, codebooks: bool = True, min_interval: float = 2.0) -> None:
        super().__init__()
        self.file = file
        self.codebooks = codebooks
        # step lines (step_end, many per epoch) at most every min_interval seconds; every epoch,
        # evaluation and checkpoint line is printed
        self.min_interval = min_interval
        self._last_step_line = float("-inf")
        self._stage: tuple | None = None  # (stage, start time, first epoch, epochs in all) of the running stage
        self._codebook_lines: list[tuple] = []

    def _print(self, text: str) -> None:
        tqdm.write(text, file=self.file or sys.stderr)

    def on_run_started(self, sender, *, stage, run_dir, world_size=1, resumed=False, config=None, start_epoch=0,
                       **extra):
        section = (config or {}).get(stage) or {}
        total = section.get("epochs", 0) + (section.get("finetune_epochs") or 0)
        self._stage = (stage, time.monotonic(), start_epoch, total)
        how = "resumed" if resumed else "started"
        self._print(f"[{stage}] run {how} in {run_dir} ({world_size} process{'es' if world_size > 1 else ''})")

    def on_epoch_end(self, sender, *, stage, phase, epoch, losses, lr=None, seconds=0.0,
                     samples_per_second=0.0, **extra):
        codebook_lines, self._codebook_lines = self._codebook_lines, []
        for stage_, epoch_, layer, utilization, perplexity, gini, dead in codebook_lines:
            self._print(f"[{stage_}] epoch {epoch_} codebook layer {layer}: utilization {utilization:.1%}, "
                        f"perplexity {perplexity:.1f}, gini {gini:.3f}, {dead} dead")
        self._print(f"[{stage}] epoch {epoch}{_phase(stage, phase)}: {_fmt(losses)}{_lr_text(lr)} | "
                    f"{seconds:.1f} s, {samples_per_second:.0f} samples/s{self._where(stage, epoch)}")

    def _where(self, stage: str, epoch: int) -> str:
        """`` | stage 3/3, epoch 5/12, at most 6 min left``: the pipeline's stage and the stage's ETA
        (an upper bound: early stopping may end it sooner)."""
        if self._stage is None or self._stage[0] != stage or not self._stage[3]:
            return ""
        _, started, first, total = self._stage
        done = epoch + 1 - first
        left = (time.monotonic() - started) / max(done, 1) * max(total - epoch - 1, 0)
        number = f"stage {PIPELINE.index(stage) + 1}/{len(PIPELINE)}, " if stage in PIPELINE else ""
        eta = f"at most {left / 60:.0f} min left" if left >= 90 else f"at most {left:.0f} s left"
        return f" | {number}epoch {epoch + 1}/{total}, {eta}"

    def on_step_end(self, sender, *, stage, phase, epoch, step, losses, lr=None, **extra):
        now = time.monotonic()
        if now - self._last_step_line < self.min_interval:
            return
        self._last_step_line = now
        self._print(f"[{stage}] epoch {epoch}{_phase(stage, phase)} step {step}: {_fmt(losses)}{_lr_text(lr)}")

    def on_codes_assigned(self, sender, *, stage, epoch, max_conflict, max_conflict_before, collision_rate,
                          changed, codes=None, seconds=0.0, **extra):
        n = len(codes) if codes is not None else 0
        self._print(f"[{stage}] codes for epoch {epoch}: max_conflict {max_conflict} (before FORGE {max_conflict_before}), "
                    f"collision rate {collision_rate:.2%}, {changed}/{n} changed, {seconds:.2f} s")

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
