"""Forward hooks that count which codes every quantizer layer picks, reported once per epoch.

A quantizer layer is any module whose class sets ``is_quantizer = True``, has an int attribute
``codebook_size`` and returns a NamedTuple with a ``.codes`` LongTensor. The hooks find such layers
by duck typing, so this module never imports ``etegrec.models``; the model never knows it is
observed and its outputs are untouched.

Counting stays on the device: each forward adds its codes into a ``[K]`` tensor with
``scatter_add_`` (not ``torch.bincount``: on CUDA, bincount reads the input's min and max back to the
host to size its output, a synchronisation on every step). Once per epoch, :meth:`epoch_end`
reduces the counts across processes, moves them to the host once and reports them.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from etegrec import metrics, signals

__all__ = ["CodebookHooks", "find_quantizers"]


def find_quantizers(model: nn.Module) -> list[nn.Module]:
    """The quantizer layers of ``model`` in registration order (that order is the layer index)."""
    return [m for m in model.modules() if getattr(type(m), "is_quantizer", False) is True]


class CodebookHooks:
    """Counts the codes of every quantizer layer of ``model`` and reports them per epoch.

    Counting happens in every forward while the hooks are attached (training, evaluation and code
    refresh alike); wrap passes that should not count in :meth:`pause`. Use as a context manager
    or call :meth:`remove`; once removed, the model runs exactly as if never hooked.

    Args:
        model: the module to watch; every submodule with ``is_quantizer = True`` gets a hook.
        stage: the ``stage`` keyword of the ``codebook_usage`` payloads.
        sender: the sender of those signals (the trainer); defaults to this object.

    Raises:
        ValueError: when ``model`` has no quantizer layer or one lacks a positive ``codebook_size``.
    """

    def __init__(self, model: nn.Module, *, stage: str, sender: Any = None) -> None:
        layers = find_quantizers(model)
        if not layers:
            raise ValueError(
                f"CodebookHooks found no quantizer layer in {type(model).__name__!r}; a quantizer "
                "module must set the class attribute is_quantizer = True."
            )
        for i, layer in enumerate(layers):
            k = getattr(layer, "codebook_size", None)
            if not isinstance(k, int) or k < 1:
                raise ValueError(
                    f"quantizer layer {i} ({type(layer).__name__}) has codebook_size={k!r}; "
                    "it must be a positive int."
                )
        self.stage = stage
        self.sender = self if sender is None else sender
        self.codebook_sizes = [layer.codebook_size for layer in layers]
        self._counts = [torch.zeros(k, dtype=torch.long, device=_device_of(layer))
                        for k, layer in zip(self.codebook_sizes, layers)]
        self._paused = 0
        self._ones = torch.ones(0, dtype=torch.long)
        self._handles = [layer.register_forward_hook(self._make_hook(i)) for i, layer in enumerate(layers)]

    def _make_hook(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._paused:
                return
            codes = output.codes.detach().reshape(-1)  # (batch,)
            counts = self._counts[index]
            if counts.device != codes.device:  # the model moved after attaching (metadata only)
                with torch.inference_mode(False):  # a normal tensor, updatable outside inference mode
                    counts = self._counts[index] = counts.to(codes.device)
            ones = self._ones
            if ones.numel() < codes.numel() or ones.device != codes.device:  # grown once, reused every step
                with torch.inference_mode(False):
                    ones = self._ones = torch.ones(codes.numel(), dtype=torch.long, device=codes.device)
            counts.scatter_add_(0, codes.long(), ones[:codes.numel()])
        return hook

    @property
    def counts(self) -> list[torch.Tensor]:
        """Copies of the running per-layer counts ``[K_l]`` (on the device; not reduced)."""
        return [c.clone() for c in self._counts]

    def load_counts(self, counts: list[torch.Tensor]) -> None:
        """Put back running counts saved with :meth:`counts` (a run resumed in the middle of an epoch)."""
        if [len(c) for c in counts] != list(self.codebook_sizes):
            raise ValueError(f"saved codebook counts have sizes {[len(c) for c in counts]}, "
                             f"the hooked layers {list(self.codebook_sizes)}")
        for mine, saved in zip(self._counts, counts):
            mine.copy_(saved.to(mine.device))

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Do not count inside this block (e.g. while ``get_code`` re-encodes every item)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def epoch_end(self, epoch: int, stage: str | None = None) -> list[dict[str, Any]]:
        """Reduce, report and reset the counts of the epoch that just ended.

        Under ``torch.distributed`` this is a collective (one ``all_reduce``): call it on every
        rank. ``codebook_usage`` is sent once per layer when it has receivers; the counts are
        reset either way.

        Returns:
            One dict per layer with exactly the ``codebook_usage`` payload: stage, epoch, layer,
            counts (np.ndarray [K]), utilization, perplexity, gini, dead_codes.
        """
        stage = self.stage if stage is None else stage
        device = self._counts[0].device
        flat = torch.cat([c.to(device) for c in self._counts])  # (sum K_l,)
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl" and flat.device.type != "cuda":
                flat = flat.cuda()
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        host = flat.cpu().numpy()  # the epoch's one host transfer
        for c in self._counts:
            c.zero_()

        stats, start = [], 0
        for layer, k in enumerate(self.codebook_sizes):
            counts = host[start:start + k].copy()
            start += k
            stats.append(dict(stage=stage, epoch=epoch, layer=layer, counts=counts, **metrics.usage_stats(counts)))
        if signals.codebook_usage.receivers:
            for payload in stats:
                signals.codebook_usage.send(self.sender, **payload)
        return stats

    def remove(self) -> None:
        """Detach every hook; safe to call more than once."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> CodebookHooks:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")
