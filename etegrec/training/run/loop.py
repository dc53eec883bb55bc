"""The one training-epoch loop every stage uses, plus batching helpers.

Loss parts are accumulated on the device and reduced over processes once per epoch, so the loop
adds no host synchronisation per step for instrumentation.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from etegrec import signals

__all__ = ["EpochProgress", "EpochResult", "NonFiniteLossError", "TrainingInterrupted", "interactive", "shuffled_batches",
           "average_gradients", "train_epoch"]

CHECK_EVERY = 20  # steps between host checks for a non-finite loss (found on the device every step)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names stage, phase, epoch, step and the loss parts."""


@dataclass
class EpochProgress:
    """How far an interrupted epoch got: what a resumed run needs to finish it exactly."""

    step: int  # batches done
    sums: dict[str, torch.Tensor]  # loss part -> sum over the samples done (weighted by batch size)
    samples: torch.Tensor  # samples done (0-d)
    seconds: float  # time spent so far

    def state_dict(self) -> dict:
        return {"step": self.step, "sums": {k: v.cpu() for k, v in self.sums.items()},
                "samples": self.samples.cpu(), "seconds": self.seconds}

    @classmethod
    def from_state(cls, state: dict | None, device) -> EpochProgress | None:
        if not state:
            return None
        return cls(step=state["step"], sums={k: v.to(device) for k, v in state["sums"].items()},
                   samples=state["samples"].to(device), seconds=state["seconds"])


@dataclass
class EpochResult:
    losses: dict[str, float]  # epoch means, averaged over processes; the optimised "loss" as "loss_total"
    seconds: float
    samples_per_second: float  # summed over processes
    steps: int


class TrainingInterrupted(KeyboardInterrupt):
    """A stop was requested (Ctrl-C) between two steps; ``progress`` says where the epoch stood."""

    def __init__(self, progress: EpochProgress) -> None:
        super().__init__(f"interrupted after step {progress.step}")
        self.progress = progress


def interactive() -> bool:
    """Whether progress bars are drawn: only on a terminal. Redirected to a file, the log holds the
    console's lines only (every epoch line says where the stage stands), no bar fragments."""
    return sys.stderr.isatty()


def shuffled_batches(n: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0,
                     world_size: int = 1, shuffle: bool = True) -> list[np.ndarray]:
    """Index batches of this process's shard of ``range(n)``, reshuffled every epoch.

    Every process gets the same number of batches (the permutation is cut to a multiple of the
    world size), so collective operations stay in step.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    order = order[: len(order) - len(order) % world_size][rank::world_size]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def train_epoch(*, sender, stage: str, phase: str, epoch: int, batches: list, loss_fn: Callable[[object], dict],
                optimizers: list[torch.optim.Optimizer], schedulers: list = (), accelerator,
                parameters: list | None = None, max_grad_norm: float = 0.0,
                log_every: int = 0, lr_fn: Callable[[], dict[str, float]] | None = None,
                global_step: int = 0, show_progress: bool = True, progress: EpochProgress | None = None,
                should_stop: Callable[[], bool] | None = None,
                after_step: Callable[[], None] | None = None) -> EpochResult:
    """Run one epoch: ``loss_fn(batch)`` returns loss parts; the part ``"loss"`` is optimised.

    Returns the epoch means of every part, reduced over processes. ``progress`` (from an
    interrupted run) skips the batches already done and starts from their loss sums.
    ``should_stop`` is asked after every step; when it says yes, :class:`TrainingInterrupted`
    carries the epoch's progress out. ``after_step`` is called after every optimiser step (a weight
    average's update). ``parameters`` are clipped to ``max_grad_norm``: a list of
    parameters, or a list of such lists (one per model), each clipped on its own.

    Raises:
        NonFiniteLossError: a step's loss was NaN or infinite. It is seen on the device at every step
            and checked on the host every ``CHECK_EVERY`` steps and at the epoch's end, so the error
            names the first bad step and its loss parts without a host synchronisation per step.
        TrainingInterrupted: ``should_stop()`` returned True.
    """
    start = time.perf_counter()
    device = accelerator.device
    done = progress.step if progress else 0
    sums: dict[str, torch.Tensor] = dict(progress.sums) if progress else {}
    samples = progress.samples.clone() if progress else torch.zeros((), device=device)
    before = progress.seconds if progress else 0.0
    first_bad = torch.full((), -1, device=device)  # first step whose loss was not finite
    bad_parts: torch.Tensor | None = None  # that step's loss parts
    iterator: Iterator = iter(batches[done:])
    if show_progress and accelerator.is_main_process and interactive():
        name = stage if phase == stage else f"{stage} {phase}"  # "embed epoch 3", not "embed embed epoch 3"
        iterator = tqdm(iterator, desc=f"{name} epoch {epoch}", leave=False, dynamic_ncols=True,
                        initial=done, total=len(batches))
    trained = [p for opt in optimizers for group in opt.param_groups for p in group["params"] if p.requires_grad]
    for step, batch in enumerate(iterator, start=done):
        parts = loss_fn(batch)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        accelerator.backward(parts["loss"])
        if accelerator.num_processes > 1:
            average_gradients(trained, accelerator.num_processes)
        if max_grad_norm and parameters:
            for group in (parameters if isinstance(parameters[0], (list, tuple)) else [parameters]):
                accelerator.clip_grad_norm_(group, max_grad_norm)
        for opt in optimizers:
            opt.step()
        for sched in schedulers:
            sched.step()
        if after_step is not None:
            after_step()
        size = len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)
        samples += size
        for name, value in parts.items():
            sums[name] = sums.get(name, 0) + value.detach() * size
        names = sorted(parts)
        values = torch.stack([parts[k].detach().float() for k in names])
        newly = (first_bad < 0) & ~torch.isfinite(values[names.index("loss")])
        first_bad = torch.where(newly, step, first_bad)
        bad_parts = values if bad_parts is None else torch.where(newly, values, bad_parts)
        if (step + 1) % CHECK_EVERY == 0 or step + 1 == len(batches):
            _check_finite(first_bad, bad_parts, names, stage=stage, phase=phase, epoch=epoch)
        if log_every and (global_step + step + 1) % log_every == 0 and signals.step_end.receivers:
            signals.step_end.send(sender, stage=stage, phase=phase, epoch=epoch, step=global_step + step + 1,
                                  losses={k: float(v.detach()) for k, v in parts.items()},
                                  lr=lr_fn() if lr_fn else {})
        if should_stop is not None and should_stop() and step + 1 < len(batches):
            raise TrainingInterrupted(EpochProgress(step=step + 1, sums=sums, samples=samples,
                                                    seconds=before + time.perf_counter() - start))
    names = sorted(sums)
    stacked = torch.stack([sums[k] for k in names] + [samples]) if names else samples[None]
    stacked = accelerator.reduce(stacked, reduction="sum")  # one collective per epoch
    total = float(stacked[-1])
    # the name every epoch_end payload (and W&B's train/..._loss_total) uses for the optimised sum
    losses = {("loss_total" if k == "loss" else k): float(stacked[i]) / max(total, 1.0) for i, k in enumerate(names)}
    seconds = before + time.perf_counter() - start
    return EpochResult(losses=losses, seconds=seconds, samples_per_second=total / max(seconds, 1e-9),
                       steps=len(batches))


def average_gradients(parameters: list[torch.nn.Parameter], world_size: int) -> None:
    """Average the gradients of ``parameters`` over processes: one flat ``all_reduce`` per step.

    What DistributedDataParallel does, without wrapping the model: the joint stage freezes and
    unfreezes its two models every cycle, which a DDP wrapper does not allow. Parameters without
    a gradient are left alone (as on one process); every rank runs the same code, so every rank
    has gradients for the same parameters.
    """
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _check_finite(first_bad: torch.Tensor, parts: torch.Tensor | None, names: list[str], *, stage: str,
                  phase: str, epoch: int) -> None:
    step = int(first_bad)
    if step < 0:
        return
    values = ", ".join(f"{k}={float(v):.6g}" for k, v in zip(names, parts.tolist()))
    raise NonFiniteLossError(f"{stage} {phase} epoch {epoch} step {step}: non-finite loss ({values}); the last "
                             "good checkpoint is kept; lower the learning rate or check the inputs")
