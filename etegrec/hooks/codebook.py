"""Forward hooks that count which codes every quantizer layer picks, reported once per epoch.

A quantizer layer is any module whose class sets ``is_quantizer = True``, has an int attribute
``codebook_size`` and returns a NamedTuple with a ``.codes`` LongTensor. The hooks find such layers
by duck typing, so this module never imports ``etegrec.models``; the model never knows it is
observed and its outputs are untouched.

Counting is cheap on the training path and stays on the device. A hook only keeps a reference to
the codes its layer returned (no tensor operation: a handful of operations per layer and step,
after the training step has pushed the interpreter's code out of the CPU's caches, measurably
slowed small RQ-VAE epochs). The kept codes are added into a ``[K]`` tensor per layer with
``scatter_add_`` every :data:`FOLD_EVERY` steps and at the end of the epoch (not ``torch.bincount``:
on CUDA, bincount reads the input's min and max back to the host to size its output, a
synchronisation). Once per epoch, :meth:`epoch_end` reduces the counts across processes, moves them
to the host once and reports them.

A quantizer must therefore not overwrite a codes tensor it has returned (none of etegrec's do).
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from etegrec import metrics, signals

__all__ = ["CodebookHooks", "FOLD_EVERY", "find_quantizers"]

FOLD_EVERY = 64  # forward passes per layer whose codes are kept before they are added into the counts


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
        ends = list(itertools.accumulate(self.codebook_sizes))
        self._bounds = list(zip([0, *ends[:-1]], ends))  # each layer's slice of the flat counts
        self._counts = [torch.zeros(k, dtype=torch.long, device=_device_of(layer))
                        for k, layer in zip(self.codebook_sizes, layers)]
        self._pending: list[list[torch.Tensor]] = [[] for _ in layers]  # codes not yet counted, per layer
        self._paused = 0
        self._ones = torch.ones(0, dtype=torch.long)
        self._layers = layers
        self._handles: list = []
        self.attach()

    def attach(self) -> CodebookHooks:
        """Hook every quantizer layer again after :meth:`remove` (done by the constructor); the
        running counts carry on. Does nothing when attached."""
        if not self._handles:
            self._handles = [layer.register_forward_hook(self._make_hook(i)) for i, layer in enumerate(self._layers)]
        return self

    def _make_hook(self, index: int):
        pending = self._pending[index]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._paused:
                return
            pending.append(output.codes)  # integer codes carry no autograd graph: nothing to detach
            if len(pending) >= FOLD_EVERY:
                self._fold(index)
        return hook

    def _fold(self, index: int) -> None:
        """Add the kept codes of layer ``index`` into its counts (on the codes' device)."""
        pending = self._pending[index]
        if not pending:
            return
        device = pending[-1].device
        # each torch call here is slow when cold (once per epoch), so none is made that is not needed
        codes = [c if c.device == device else c.to(device) for c in pending]
        pending.clear()
        codes = torch.cat(codes) if len(codes) > 1 else codes[0]
        if codes.dim() != 1:
            codes = codes.reshape(-1)
        if codes.dtype != torch.long:
            codes = codes.long()
        counts, ones, n = self._counts[index], self._ones, codes.numel()
        if counts.device != device or ones.device != device or ones.numel() < n:
            with torch.inference_mode(False):  # made here, they must stay updatable outside inference mode
                if counts.device != device:  # the model moved after attaching
                    counts = self._counts[index] = counts.to(device)
                if ones.device != device or ones.numel() < n:  # grown, then reused
                    ones = self._ones = torch.ones(n, dtype=torch.long, device=device)
        counts.scatter_add_(0, codes, ones[:n])

    def _fold_all(self) -> None:
        for index in range(len(self._pending)):
            self._fold(index)

    @property
    def counts(self) -> list[torch.Tensor]:
        """Copies of the running per-layer counts ``[K_l]`` (on the device; not reduced)."""
        self._fold_all()
        return [c.clone() for c in self._counts]

    def load_counts(self, counts: list[torch.Tensor]) -> None:
        """Put back running counts saved with :meth:`counts` (a run resumed in the middle of an epoch)."""
        if [len(c) for c in counts] != list(self.codebook_sizes):
            raise ValueError(f"saved codebook counts have sizes {[len(c) for c in counts]}, "
                             f"the hooked layers {list(self.codebook_sizes)}")
        for pending in self._pending:
            pending.clear()
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
            One dict per layer that saw codes this epoch, with exactly the ``codebook_usage``
            payload: stage, epoch, layer, counts (np.ndarray [K]), utilization, perplexity, gini,
            dead_codes. Layers that counted nothing are left out (and send nothing).
        """
        stage = self.stage if stage is None else stage
        self._fold_all()
        device = self._counts[0].device
        flat = torch.cat([c if c.device == device else c.to(device) for c in self._counts])  # (sum K_l,)
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl" and flat.device.type != "cuda":
                flat = flat.cuda()
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        host = flat.cpu().numpy()  # the epoch's one host transfer
        for c in self._counts:
            c.zero_()

        per_layer = [host[start:end] for start, end in self._bounds]  # views, one per layer
        usage = metrics.usage_stats_rows(per_layer, check=False)  # counts are >= 0 by construction
        # A layer that quantized nothing this epoch (fine-tuning, a frozen tokenizer) is not reported:
        # its all-zero histogram would read as a collapsed codebook.
        stats = [dict(stage=stage, epoch=epoch, layer=layer, counts=counts, **u)
                 for layer, (counts, u) in enumerate(zip(per_layer, usage)) if u["dead_codes"] < len(counts)]
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
