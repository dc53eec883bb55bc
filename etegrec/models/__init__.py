"""Models: the SASRec baseline, the RQ-VAE item tokenizer (quantizer layers marked for hooks), the T5
generative recommender with its beam search, and their losses.

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
from etegrec.models.sasrec import SASRec, window_targets
from etegrec.models.losses import catalogue_nce, code_loss, info_nce, symmetric_kl, usage_deficit
from etegrec.models.recommender import DecoderCache, RecommenderOutput, T5Recommender
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
    "catalogue_nce",
    "info_nce",
    "symmetric_kl",
    "usage_deficit",
    "window_targets",
]
