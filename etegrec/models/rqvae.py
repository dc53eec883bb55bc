"""RQ-VAE item tokenizer: an MLP autoencoder with a residual vector quantizer in the middle.

Every :class:`VectorQuantizer` carries ``is_quantizer = True`` so that forward hooks (in
``etegrec.hooks``) can find the quantizer layers and read the codes from their outputs; the model
itself knows nothing about being observed.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "QuantizerOutput",
    "RQVAE",
    "RQVAEOutput",
    "ResidualQuantizer",
    "ResidualQuantizerOutput",
    "VectorQuantizer",
    "kmeans",
]


def kmeans(data: torch.Tensor, num_clusters: int, *, iters: int = 10) -> torch.Tensor:
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
        assign = torch.cdist(data, centers).argmin(dim=1)  # (N,)
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

    def _check_dim(self, x: torch.Tensor, where: str) -> None:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"VectorQuantizer.{where} expects shape (batch, {self.dim}), got "
                f"{tuple(x.shape)!r}; pass residuals of width dim={self.dim}."
            )

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
            VectorQuantizer(
                codebook_size=k, dim=dim, beta=beta, kmeans_init=kmeans_init,
                kmeans_iters=kmeans_iters,
            )
            for k in self.codebook_sizes
        )

    def forward(self, x: torch.Tensor) -> ResidualQuantizerOutput:
        """Quantize ``x`` (batch, dim) with every layer in turn."""
        residual = x
        code_sum = torch.zeros_like(x)
        codes, distances, losses = [], [], []
        for layer in self.layers:
            out = layer(residual)
            code_vector = out.quantized.detach()  # value of the chosen code, no gradient
            # Keep the gradient path residual -> x so every layer's commitment reaches the encoder.
            residual = residual - code_vector
            code_sum = code_sum + code_vector
            codes.append(out.codes)
            distances.append(out.distances)
            losses.append(out.loss)
        quantized = x + (code_sum - x).detach()  # (batch, dim)
        return ResidualQuantizerOutput(
            quantized, torch.stack(codes, dim=1), distances, torch.stack(losses).sum()
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
        residual = x.detach()
        for layer in self.layers:
            layer.init_from(residual)
            codes = layer.distances(residual).argmin(dim=1)
            residual = residual - layer.embedding(codes)


@dataclass
class RQVAEOutput:
    """Output of :class:`RQVAE`; ``quant_loss`` is the codebook + commitment part of ``loss``."""

    recon: torch.Tensor  # (batch, in_dim)
    loss: torch.Tensor  # () recon_loss + quant_loss
    recon_loss: torch.Tensor  # () MSE(recon, x)
    quant_loss: torch.Tensor  # () summed codebook + beta * commitment losses
    codes: torch.Tensor  # (batch, num_layers) long
    logits: list[torch.Tensor]  # num_layers x (batch, K_l): negative squared distances
    latent: torch.Tensor  # (batch, e_dim) encoder output z
    quantized: torch.Tensor  # (batch, e_dim) straight-through sum of code vectors

    @property
    def commit_loss(self) -> torch.Tensor:
        """Alias of ``quant_loss``."""
        return self.quant_loss


def _mlp(dims: Sequence[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """MLP encoder -> residual quantizer -> mirrored MLP decoder.

    Args:
        in_dim: width of the item embeddings it tokenizes.
        hidden_dims: encoder hidden widths; the decoder uses them reversed.
        e_dim: latent and code vector width.
        num_layers: quantizer layers (the code length); may be None when ``codebook_size`` is a list.
        codebook_size: codes per layer, one int or one per layer.
        beta: commitment weight.
        dropout: dropout before every linear layer of encoder and decoder.
        kmeans_init: start with uninitialised codebooks, set by :meth:`kmeans_init_from` or by the
            first training forward.
        kmeans_iters: Lloyd iterations of the k-means initialisation.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        hidden_dims: Sequence[int] = (512, 256),
        e_dim: int = 128,
        num_layers: int | None = 3,
        codebook_size: int | Sequence[int] = 256,
        beta: float = 0.25,
        dropout: float = 0.0,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
    ) -> None:
        super().__init__()
        if in_dim < 1 or e_dim < 1:
            raise ValueError(
                f"RQVAE needs in_dim >= 1 and e_dim >= 1, got in_dim={in_dim!r}, e_dim={e_dim!r}; "
                "pass positive sizes."
            )
        self.in_dim = in_dim
        self.e_dim = e_dim
        dims = [in_dim, *hidden_dims, e_dim]
        self.encoder = _mlp(dims, dropout)
        self.quantizer = ResidualQuantizer(
            num_layers=num_layers, codebook_size=codebook_size, dim=e_dim, beta=beta,
            kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
        )
        self.decoder = _mlp(dims[::-1], dropout)
        self.codebook_sizes = list(self.quantizer.codebook_sizes)
        self.codebook_size = self.codebook_sizes[-1]
        self.code_length = len(self.codebook_sizes)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(
                f"RQVAE expects input of shape (batch, {self.in_dim}), got {tuple(x.shape)!r}; "
                f"build the model with in_dim={x.shape[-1]!r} or pass {self.in_dim}-d embeddings."
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent z (batch, e_dim) of item embeddings ``x`` (batch, in_dim)."""
        self._check_input(x)
        return self.encoder(x)

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """Reconstruction (batch, in_dim) of quantized latents (batch, e_dim)."""
        return self.decoder(quantized)

    def codes_to_quantized(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of the chosen code vectors (batch, e_dim) for ``codes`` (batch, num_layers)."""
        return self.quantizer.codes_to_quantized(codes)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruction (batch, in_dim) from codes (batch, num_layers)."""
        return self.decode(self.codes_to_quantized(codes))

    def code_logits(self, latent: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer code logits (negative squared distances) of latents (batch, e_dim).

        Residual quantization of an arbitrary latent, e.g. a recommender's projected sequence
        state (ETEGRec's sequence-item alignment), without the quantizer layers' forward: no
        codebook initialisation, no loss, and forward hooks do not count it as code usage.
        Gradients reach ``latent`` and the codebooks through the distances.
        """
        logits, residual = [], latent
        for layer in self.quantizer.layers:
            distances = layer.distances(residual)  # (batch, K)
            logits.append(-distances)
            residual = residual - layer.codebook[distances.detach().argmin(dim=1)].detach()
        return logits

    @torch.no_grad()
    def restart_dead_codes(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> list[int]:
        """Move every code that no row of ``x`` (N, in_dim) picks onto the residual of a random row.

        Layer by layer on the residuals of ``x`` (dropout off), as :meth:`kmeans_init_from` does;
        a code nobody uses gets no gradient and would stay dead for good. Returns the number of
        codes restarted per layer.
        """
        was_training = self.training
        self.eval()
        try:
            residual = self.encode(x)  # (N, e_dim)
            restarted = []
            for layer in self.quantizer.layers:
                codes = layer.distances(residual).argmin(dim=1)  # (N,)
                dead = (torch.bincount(codes, minlength=layer.codebook_size) == 0).nonzero().flatten()
                if len(dead):
                    pick = torch.randint(len(residual), (len(dead),), generator=generator, device=residual.device)
                    layer.embedding.weight[dead] = residual[pick]
                    codes = layer.distances(residual).argmin(dim=1)
                residual = residual - layer.embedding(codes)
                restarted.append(len(dead))
        finally:
            self.train(was_training)
        return restarted

    @torch.no_grad()
    def kmeans_init_from(self, x: torch.Tensor) -> None:
        """Encode all of ``x`` (N, in_dim) once (dropout off) and k-means initialise the codebooks."""
        was_training = self.training
        self.eval()
        try:
            self.quantizer.init_from(self.encode(x))
        finally:
            self.train(was_training)

    def forward(self, x: torch.Tensor) -> RQVAEOutput:
        """Encode, quantize and reconstruct ``x`` (batch, in_dim)."""
        latent = self.encode(x)  # (batch, e_dim)
        q = self.quantizer(latent)
        recon = self.decode(q.quantized)  # (batch, in_dim)
        recon_loss = F.mse_loss(recon, x)
        return RQVAEOutput(
            recon=recon,
            loss=recon_loss + q.loss,
            recon_loss=recon_loss,
            quant_loss=q.loss,
            codes=q.codes,
            logits=[-d for d in q.distances],
            latent=latent,
            quantized=q.quantized,
        )
