"""An exponential moving average of the recommender's weights (``joint.ema_decay``).

On Beauty the recommender's validation score moves by about 0.003 from epoch to epoch at the learning
rates that train it fastest, and it overfits from the middle of the schedule on (docs/results.md). The
average of the recent weights is a smoother model than the last step's: with ``joint.ema_decay`` set,
validation, the best checkpoint and the test score the averaged weights, while training goes on from
the live ones.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["WeightAverage"]


class WeightAverage:
    """``average = decay * average + (1 - decay) * weights`` after every optimiser step of ``model``.

    Covers ``model``'s parameters (its buffers are not trained and stay the live ones). ``decay`` 0.999
    averages over about the last 1,000 steps.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay must lie in (0, 1), got {decay!r}")
        self.model, self.decay = model, decay
        self.average = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the model's current weights (call after each optimiser step)."""
        for name, p in self.model.named_parameters():
            self.average[name].lerp_(p, 1 - self.decay)

    def restart(self) -> None:
        """Start the average afresh from the model's current weights (after loading other weights)."""
        self.load_average(dict(self.model.named_parameters()))

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its live ones again after it."""
        live = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        self._copy_into_model(self.average)
        try:
            yield
        finally:
            self._copy_into_model(live)

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict`` with the averaged weights in place of the live ones (under every name
        a shared parameter has)."""
        canonical = {id(p): name for name, p in self.model.named_parameters()}
        state = self.model.state_dict()
        for name, p in self.model.named_parameters(remove_duplicate=False):
            state[name] = self.average[canonical[id(p)]].clone()
        return state

    @torch.no_grad()
    def load_average(self, state: dict[str, torch.Tensor]) -> None:
        """Take the average from a state dict written by :meth:`averaged_state_dict` (or the model's own)."""
        for name, a in self.average.items():
            a.copy_(state[name])

    @torch.no_grad()
    def _copy_into_model(self, weights: dict[str, torch.Tensor]) -> None:
        for name, p in self.model.named_parameters():
            p.copy_(weights[name])
