"""The RQ-VAE's quantizer: k-means, one nearest-code layer, and the residual stack of them.

Every :class:`VectorQuantizer` carries ``is_quantizer = True`` so that forward hooks (in
``etegrec.hooks``) can find the layers and read the codes from their outputs. Whatever goes through
the stack layer by layer (forward, k-means init, code logits, dead-code restarts) goes through
:meth:`ResidualQuantizer.walk`, the one place that carries the residual from a layer to the next.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "QuantizerOutput",
    "ResidualQuantizer",
    "ResidualQuantizerOutput",
    "VectorQuantizer",
    "kmeans",
]

T = TypeVar("T")

CHUNK_ROWS = 65536  # rows per distance block: a catalogue's (N, K) distance matrix is never held whole


def _nearest(rows: torch.Tensor, distance: Callable[[torch.Tensor], torch.Tensor], chunk: int) -> torch.Tensor:
    """Index (N,) of the nearest code of every row of ``rows`` (N, D), ``chunk`` rows at a time:
    at 1e6 items and 256 codes a whole distance matrix is 1 GiB, a block of 65,536 rows 64 MiB."""
    return torch.cat([distance(block).argmin(dim=1) for block in rows.split(chunk)])


def kmeans(data: torch.Tensor, num_clusters: int, *, iters: int = 10, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Lloyd's k-means on ``data`` (N, D); returns centers (num_clusters, D).

    Initial centers are data points drawn with the default torch generator (without replacement
    when N >= num_clusters, with replacement otherwise), so the result is deterministic given the
    torch seed. A center that loses all its points keeps its previous position, hence every
    center is always a data point or a mean of data points.
    """
    if data.dim() != 2 or data.shape[0] == 0:
        raise ValueError(
            f"kmeans needs a non-empty (N, D) tensor, got shape {tuple(data.shape)!r}; "
            "pass at least one data point."
        )
    data = data.detach().float()
    n = data.shape[0]
    if n >= num_clusters:
        index = torch.randperm(n, device=data.device)[:num_clusters]
    else:
        index = torch.randint(n, (num_clusters,), device=data.device)
    centers = data[index].clone()  # (K, D)
    for _ in range(iters):
        assign = _nearest(data, lambda block: torch.cdist(block, centers), chunk)  # (N,)
        sums = torch.zeros_like(centers).index_add_(0, assign, data)
        counts = torch.bincount(assign, minlength=num_clusters)  # (K,)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled, None]
    return centers


class QuantizerOutput(NamedTuple):
    """Output of one :class:`VectorQuantizer`."""

    quantized: torch.Tensor  # (batch, dim), straight-through: value = code vector, grad -> input
    codes: torch.Tensor  # (batch,) long, index of the nearest code
    distances: torch.Tensor  # (batch, K) squared L2 to every code; differentiable
    loss: torch.Tensor  # () codebook loss + beta * commitment loss


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with an optional k-means initialised codebook.

    Args:
        codebook_size: number of codes K.
        dim: code vector width.
        beta: weight of the commitment loss ``MSE(input, code.detach())``.
        kmeans_init: if True, the codebook starts uninitialised (buffer ``initted`` False) and is
            set by :meth:`init_from`, called explicitly or on the first training forward.
        kmeans_iters: Lloyd iterations used by :meth:`init_from`.
    """

    is_quantizer = True

    def __init__(
        self,
        *,
        codebook_size: int = 256,
        dim: int = 128,
        beta: float = 0.25,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
    ) -> None:
        super().__init__()
        if codebook_size < 1 or dim < 1:
            raise ValueError(
                f"VectorQuantizer needs codebook_size >= 1 and dim >= 1, got "
                f"codebook_size={codebook_size!r}, dim={dim!r}; pass positive sizes."
            )
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = beta
        self.kmeans_iters = kmeans_iters
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.register_buffer("initted", torch.tensor(not kmeans_init))

    @property
    def codebook(self) -> torch.Tensor:
        """The code vectors (K, dim)."""
        return self.embedding.weight

    @torch.no_grad()
    def init_from(self, data: torch.Tensor) -> None:
        """Set the codebook to k-means centers of ``data`` (N, dim) and mark it initialised."""
        self._check_dim(data, "init_from")
        centers = kmeans(data, self.codebook_size, iters=self.kmeans_iters)
        self.embedding.weight.copy_(centers.to(self.embedding.weight.dtype))
        self.initted.fill_(True)

    @torch.no_grad()
    def restart_dead_codes(
        self, residual: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[int, torch.Tensor]:
        """Move every code that no row of ``residual`` (N, dim) picks onto a random row of it.

        A code nobody uses gets no gradient and would stay dead for good. The rows are drawn with
        ``generator`` (the default torch generator when None), one draw per dead code, none when
        every code is used. Returns the number of codes restarted and the codes (N,) of the rows
        after the restart.
        """
        codes = self.nearest(residual)  # (N,)
        dead = (torch.bincount(codes, minlength=self.codebook_size) == 0).nonzero().flatten()
        if len(dead):
            pick = torch.randint(len(residual), (len(dead),), generator=generator, device=residual.device)
            self.embedding.weight[dead] = residual[pick]
            codes = self.nearest(residual)
        return len(dead), codes

    def _check_dim(self, x: torch.Tensor, where: str) -> None:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"VectorQuantizer.{where} expects shape (batch, {self.dim}), got "
                f"{tuple(x.shape)!r}; pass residuals of width dim={self.dim}."
            )

    def nearest(self, residual: torch.Tensor, *, chunk: int = CHUNK_ROWS) -> torch.Tensor:
        """Index (N,) of the nearest code of every row of ``residual`` (N, dim), without its gradient."""
        return _nearest(residual.detach(), self.distances, chunk)

    def distances(self, residual: torch.Tensor) -> torch.Tensor:
        """Squared L2 distance (batch, K) of every row of ``residual`` to every code."""
        codebook = self.embedding.weight  # (K, dim)
        dist = (
            residual.pow(2).sum(dim=1, keepdim=True)
            + codebook.pow(2).sum(dim=1)[None, :]
            - 2.0 * residual @ codebook.T
        )
        return dist.clamp_min(0.0)  # (batch, K)

    def forward(self, residual: torch.Tensor) -> QuantizerOutput:
        """Quantize ``residual`` (batch, dim) to its nearest code."""
        self._check_dim(residual, "forward")
        # host sync: every training forward; a Python copy of the flag would miss checkpoint loads
        if self.training and not bool(self.initted):
            self.init_from(residual)
        distances = self.distances(residual)  # (batch, K)
        codes = distances.detach().argmin(dim=1)  # (batch,)
        code_vectors = self.embedding(codes)  # (batch, dim)
        loss = F.mse_loss(code_vectors, residual.detach()) + self.beta * F.mse_loss(
            code_vectors.detach(), residual
        )
        quantized = residual + (code_vectors - residual).detach()
        return QuantizerOutput(quantized, codes, distances, loss)


class ResidualQuantizerOutput(NamedTuple):
    """Output of a :class:`ResidualQuantizer`."""

    quantized: torch.Tensor  # (batch, dim), sum of code vectors, straight-through to the input
    codes: torch.Tensor  # (batch, num_layers) long
    distances: list[torch.Tensor]  # num_layers x (batch, K_l)
    loss: torch.Tensor  # () sum of the layers' losses


def _layer_sizes(codebook_size: int | Sequence[int], num_layers: int | None) -> list[int]:
    if isinstance(codebook_size, int):
        if num_layers is None or num_layers < 1:
            raise ValueError(
                f"num_layers={num_layers!r} must be a positive integer when codebook_size is "
                f"an int ({codebook_size!r}); pass num_layers or a list of sizes."
            )
        return [codebook_size] * num_layers
    sizes = [int(k) for k in codebook_size]
    if not sizes or (num_layers is not None and num_layers != len(sizes)):
        raise ValueError(
            f"codebook_size={list(codebook_size)!r} gives {len(sizes)} layers but "
            f"num_layers={num_layers!r}; pass one size per layer."
        )
    return sizes


class ResidualQuantizer(nn.Module):
    """A stack of :class:`VectorQuantizer`; layer l quantizes what layers < l left over.

    Args:
        num_layers: number of quantizer layers; may be None when ``codebook_size`` is a list.
        codebook_size: codes per layer, one int for all layers or one per layer.
        dim: code vector width.
        beta, kmeans_init, kmeans_iters: passed to every layer.
    """

    def __init__(
        self,
        *,
        num_layers: int | None = 3,
        codebook_size: int | Sequence[int] = 256,
        dim: int = 128,
        beta: float = 0.25,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
    ) -> None:
        super().__init__()
        self.codebook_sizes = _layer_sizes(codebook_size, num_layers)
        self.dim = dim
        self.layers = nn.ModuleList(
            VectorQuantizer(codebook_size=k, dim=dim, beta=beta, kmeans_init=kmeans_init, kmeans_iters=kmeans_iters)
            for k in self.codebook_sizes
        )

    def walk(self, x: torch.Tensor, step: Callable[[VectorQuantizer, torch.Tensor], tuple[T, torch.Tensor]]) -> list[T]:
        """Run ``step(layer, residual)`` on every layer in turn, starting from ``x`` (batch, dim).

        ``step`` returns ``(result, code_vectors)``; the next layer sees ``residual - code_vectors``
        (batch, dim), so ``step`` decides whether gradients flow along the residual. Returns the results.
        """
        residual, results = x, []
        for layer in self.layers:
            result, code_vectors = step(layer, residual)
            results.append(result)
            residual = residual - code_vectors
        return results

    def forward(self, x: torch.Tensor) -> ResidualQuantizerOutput:
        """Quantize ``x`` (batch, dim) with every layer in turn."""

        def step(layer: VectorQuantizer, residual: torch.Tensor) -> tuple[QuantizerOutput, torch.Tensor]:
            out = layer(residual)
            # The chosen codes' value without their gradient: the residual keeps its gradient path
            # to x, so every layer's commitment loss reaches the encoder.
            return out, out.quantized.detach()

        outs = self.walk(x, step)
        code_sum = torch.zeros_like(x)
        for out in outs:
            code_sum = code_sum + out.quantized.detach()
        quantized = x + (code_sum - x).detach()  # (batch, dim)
        return ResidualQuantizerOutput(
            quantized,
            torch.stack([out.codes for out in outs], dim=1),
            [out.distances for out in outs],
            torch.stack([out.loss for out in outs]).sum(),
        )

    def codes_to_quantized(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum (batch, dim) of the code vectors named by ``codes`` (batch, num_layers)."""
        if codes.dim() != 2 or codes.shape[1] != len(self.layers):
            raise ValueError(
                f"codes must have shape (batch, {len(self.layers)}), got {tuple(codes.shape)!r}; "
                "pass one code per quantizer layer."
            )
        return sum(layer.embedding(codes[:, i]) for i, layer in enumerate(self.layers))

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """K-means initialise every layer, layer by layer, on the residuals of ``x`` (N, dim)."""

        def step(layer: VectorQuantizer, residual: torch.Tensor) -> tuple[None, torch.Tensor]:
            layer.init_from(residual)
            return None, layer.embedding(layer.nearest(residual))

        self.walk(x.detach(), step)

    def code_logits(self, latent: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer negative squared distances (batch, K_l) of the residuals of ``latent`` (batch, dim).

        No layer's forward runs (no initialisation, no loss, nothing for forward hooks); gradients
        reach ``latent`` and the codebooks through the distances only.
        """

        def step(layer: VectorQuantizer, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            distances = layer.distances(residual)  # (batch, K)
            return -distances, layer.codebook[distances.detach().argmin(dim=1)].detach()

        return self.walk(latent, step)

    @torch.no_grad()
    def restart_dead_codes(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> list[int]:
        """Restart the dead codes of every layer on the residuals of ``x`` (N, dim), after the previous
        layers' restarts; returns the number of codes restarted per layer."""

        def step(layer: VectorQuantizer, residual: torch.Tensor) -> tuple[int, torch.Tensor]:
            restarted, codes = layer.restart_dead_codes(residual, generator=generator)
            return restarted, layer.embedding(codes)

        return self.walk(x, step)
