"""RQ-VAE item tokenizer: an MLP autoencoder with a residual vector quantizer in the middle.

The quantizer layers live in :mod:`etegrec.models.quantizer` (re-exported here); they carry
``is_quantizer = True`` so that forward hooks (in ``etegrec.hooks``) can find them and read the codes
from their outputs; the model itself knows nothing about being observed.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from etegrec.models.quantizer import (
    QuantizerOutput,
    ResidualQuantizer,
    ResidualQuantizerOutput,
    VectorQuantizer,
    kmeans,
)

__all__ = [
    "QuantizerOutput",
    "RQVAE",
    "RQVAEOutput",
    "ResidualQuantizer",
    "ResidualQuantizerOutput",
    "VectorQuantizer",
    "kmeans",
]


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

    def code_logits(self, latent: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer code logits (negative squared distances) of latents (batch, e_dim).

        Residual quantization of an arbitrary latent, e.g. a recommender's projected sequence
        state (ETEGRec's sequence-item alignment), without the quantizer layers' forward: no
        codebook initialisation, no loss, and forward hooks do not count it as code usage.
        Gradients reach ``latent`` and the codebooks through the distances.
        """
        return self.quantizer.code_logits(latent)

    @torch.no_grad()
    def sticky_codes(self, x: torch.Tensor, previous: torch.Tensor, margin: float
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Codes (batch, num_layers) of ``x`` (batch, in_dim) that keep ``previous`` where it is nearly as near,
        and each layer's squared distances (batch, K_l) along that path.

        Layer by layer, a row keeps its code of ``previous`` (batch, num_layers) unless the nearest code
        is closer by more than the relative ``margin``: it moves when ``d_prev > (1 + margin) * d_nearest``
        (squared distances to the layer's residual); the next layer quantizes what the kept code leaves.
        ``margin=0`` gives the nearest codes, as :meth:`forward`. Runs in eval mode (dropout off).
        """
        if previous.shape != (x.shape[0], self.code_length):
            raise ValueError(f"previous has shape {tuple(previous.shape)!r}; pass one code per layer "
                             f"for every row of x: ({x.shape[0]}, {self.code_length}).")
        columns = iter(previous.unbind(dim=1))

        def step(layer, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            distances = layer.distances(residual)  # (batch, K)
            nearest = distances.argmin(dim=1)
            kept = next(columns)
            d_kept, d_nearest = distances.gather(1, kept[:, None])[:, 0], distances.gather(1, nearest[:, None])[:, 0]
            moved = d_kept > (1.0 + margin) * d_nearest
            codes = torch.where(moved, nearest, kept)
            return (codes, distances), layer.embedding(codes)

        was_training = self.training
        self.eval()
        try:
            codes, distances = zip(*self.quantizer.walk(self.encode(x), step))
            return torch.stack(codes, dim=1), list(distances)
        finally:
            self.train(was_training)

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
            return self.quantizer.restart_dead_codes(self.encode(x), generator=generator)
        finally:
            self.train(was_training)

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
