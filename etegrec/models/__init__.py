"""Models: the SASRec baseline and the RQ-VAE item tokenizer (quantizer layers marked for hooks).

Models never import ``etegrec.training``, ``etegrec.hooks`` or ``etegrec.signals``: a model does
not know it is observed.
"""
from __future__ import annotations

from etegrec.models.rqvae import (
    RQVAE,
    QuantizerOutput,
    ResidualQuantizer,
    ResidualQuantizerOutput,
    RQVAEOutput,
    VectorQuantizer,
    kmeans,
)
from etegrec.models.sasrec import SASRec
from etegrec.models.recommender import DecoderCache, RecommenderOutput, T5Recommender, code_loss
from etegrec.models.beam import BeamSearchOutput, CodeTrie, beam_search

__all__ = [
    "QuantizerOutput",
    "RQVAE",
    "RQVAEOutput",
    "ResidualQuantizer",
    "ResidualQuantizerOutput",
    "SASRec",
    "VectorQuantizer",
    "kmeans",
    "BeamSearchOutput",
    "CodeTrie",
    "DecoderCache",
    "RecommenderOutput",
    "T5Recommender",
    "beam_search",
    "code_loss",
]
