"""The one training-epoch loop every stage uses, plus batching helpers.

Loss parts are accumulated on the device and reduced over processes once per epoch, so the loop
adds no host synchronisation per step for instrumentation.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from etegrec import signals

__all__ = ["EpochResult", "NonFiniteLossError", "shuffled_batches", "train_epoch"]


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names where and the loss parts."""


@dataclass
class EpochResult:
    losses: dict[str, float]  # epoch means, averaged over processes
    seconds: float
    samples_per_second: float  # summed over processes
    steps: int


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
                parameters: list[torch.nn.Parameter] | None = None, max_grad_norm: float = 0.0,
                log_every: int = 0, lr_fn: Callable[[], dict[str, float]] | None = None,
                global_step: int = 0, show_progress: bool = True) -> EpochResult:
    """Run one epoch: ``loss_fn(batch)`` returns loss parts; the part ``"loss"`` is optimised.

    Returns the epoch means of every part, reduced over processes.

    Raises:
        NonFiniteLossError: when an epoch's loss is NaN or infinite (checked once per epoch).
    """
    start = time.perf_counter()
    sums: dict[str, torch.Tensor] = {}
    samples = torch.zeros((), device=accelerator.device)
    iterator: Iterator = iter(batches)
    if show_progress and accelerator.is_main_process:
        iterator = tqdm(batches, desc=f"{stage} {phase} epoch {epoch}", leave=False, dynamic_ncols=True)
    for step, batch in enumerate(iterator):
        parts = loss_fn(batch)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        accelerator.backward(parts["loss"])
        if max_grad_norm and parameters:
            accelerator.clip_grad_norm_(parameters, max_grad_norm)
        for opt in optimizers:
            opt.step()
        for sched in schedulers:
            sched.step()
        size = len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)
        samples += size
        for name, value in parts.items():
            sums[name] = sums.get(name, 0) + value.detach() * size
        if log_every and (global_step + step + 1) % log_every == 0 and signals.step_end.receivers:
            signals.step_end.send(sender, stage=stage, phase=phase, epoch=epoch, step=global_step + step + 1,
                                  losses={k: float(v.detach()) for k, v in parts.items()},
                                  lr=lr_fn() if lr_fn else {})
    names = sorted(sums)
    stacked = torch.stack([sums[k] for k in names] + [samples]) if names else samples[None]
    stacked = accelerator.reduce(stacked, reduction="sum")  # one collective per epoch
    total = float(stacked[-1])
    losses = {k: float(stacked[i]) / max(total, 1.0) for i, k in enumerate(names)}
    seconds = time.perf_counter() - start
    if any(not np.isfinite(v) for v in losses.values()):
        raise NonFiniteLossError(f"{stage} {phase} epoch {epoch}: non-finite loss "
                                 f"({', '.join(f'{k}={v}' for k, v in losses.items())}); lower the learning rate "
                                 "or check the input embeddings")
    return EpochResult(losses=losses, seconds=seconds, samples_per_second=total / max(seconds, 1e-9),
                       steps=len(batches))
