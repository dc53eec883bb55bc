"""The RQ-VAE tokenizer a config describes, and the item vectors it reads: where the rqvae and
joint stages (and a loaded run) build it.

The tokenizer reads each item's SASRec embedding and, with ``tokenizer.attributes``, a block
summarising the item's attributes (categories, brand: :mod:`etegrec.data.attributes`), something the
recommender does not see in the interactions: TF-IDF weights of the item's attributes, centred over
the items that have any and projected on their ``tokenizer.attribute_dims`` principal directions,
then scaled so that the block weighs as much as the embedding (the same mean squared norm).
"""
from __future__ import annotations

import numpy as np

from etegrec.config import Config, TokenizerConfig
from etegrec.data import SequenceData, load_item_attributes
from etegrec.models import RQVAE

__all__ = ["attribute_block", "attribute_features", "build_tokenizer", "input_width", "tokenizer_inputs"]


def build_tokenizer(t: TokenizerConfig, in_dim: int) -> RQVAE:
    """The RQ-VAE of the ``tokenizer`` section ``t`` for item vectors of width ``in_dim``."""
    return RQVAE(in_dim=in_dim, hidden_dims=t.hidden_dims, e_dim=t.e_dim, num_layers=t.num_layers,
                 codebook_size=t.codebook_size, beta=t.beta, dropout=t.dropout, kmeans_init=t.kmeans_init)


def input_width(config: Config, embedding_width: int | None = None) -> int:
    """The width of the item vectors the tokenizer reads: the embeddings' (``embed.hidden`` unless given), plus the
    attribute block's."""
    width = config.embed.hidden if embedding_width is None else embedding_width
    return width + (config.tokenizer.attribute_dims if config.tokenizer.attributes else 0)


def attribute_features(attributes: list[list[str]], dims: int) -> np.ndarray:
    """``[n_items, dims]``: each item's TF-IDF attribute weights (an L2-normalised row, smoothed idf), centred
    over the items with attributes and projected on their first ``dims`` principal directions; zero for an
    item without attributes, and zero columns past the rank of the items' attributes.

    Exact and deterministic (eigenvectors of the attributes' Gram matrix, each signed so its largest entry
    is positive); its cost grows with the items times their attributes, and the square of the distinct ones.
    """
    vocab = {a: j for j, a in enumerate(sorted({a for attrs in attributes for a in attrs}))}
    lengths = np.array([len(attrs) for attrs in attributes])
    rows = np.repeat(np.arange(len(attributes)), lengths)  # one entry per (item, attribute), grouped by item
    cols = np.fromiter((vocab[a] for attrs in attributes for a in attrs), dtype=np.int64, count=len(rows))
    has, n_vocab = lengths > 0, len(vocab)
    idf = np.log((1 + has.sum()) / (1 + np.bincount(cols, minlength=n_vocab))) + 1.0
    weights = idf[cols] / np.sqrt(np.bincount(rows, weights=idf[cols] ** 2))[rows]
    mean = np.bincount(cols, weights=weights, minlength=n_vocab) / has.sum()
    # the Gram matrix of the centred rows, from every pair of entries of one item
    pairs = lengths[rows]  # entry e pairs with every entry of its item: the item's first entry, then on
    left = np.repeat(np.arange(len(rows)), pairs)
    offset = np.arange(len(left)) - np.repeat(np.cumsum(pairs) - pairs, pairs)  # 0, 1, ... within each entry's run
    right = np.repeat(np.cumsum(lengths)[rows] - pairs, pairs) + offset
    gram = np.bincount(cols[left] * n_vocab + cols[right], weights=weights[left] * weights[right],
                       minlength=n_vocab * n_vocab).reshape(n_vocab, n_vocab) - has.sum() * np.outer(mean, mean)
    values, vectors = np.linalg.eigh(gram)  # ascending
    keep = min(dims, int((values > values.max() * 1e-9).sum()))
    vectors = vectors[:, ::-1][:, :keep]
    vectors *= np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(keep)])
    projected = np.zeros((len(attributes), keep))
    np.add.at(projected, rows, weights[:, None] * vectors[cols])
    out = np.zeros((len(attributes), dims), dtype=np.float32)
    out[has, :keep] = (projected - mean @ vectors)[has]
    return out


def attribute_block(config: Config, data: SequenceData) -> np.ndarray | None:
    """The attribute block of items 1..n of ``data`` (:func:`attribute_features`, not yet scaled), None without
    ``tokenizer.attributes``.

    Raises:
        DataError: the attributes file is missing or malformed (:func:`etegrec.data.load_item_attributes`).
    """
    t, d = config.tokenizer, config.data
    if not t.attributes:
        return None
    attributes = load_item_attributes(t.attributes, dataset=d.dataset, data_path=d.data_path, fmt=d.format,
                                      items=data.item_map)
    return attribute_features(attributes, t.attribute_dims)


def tokenizer_inputs(t: TokenizerConfig, embeddings: np.ndarray, attributes: np.ndarray | None = None) -> np.ndarray:
    """The item vectors the tokenizer sees, ``[n_items + 1, d]`` with row 0 (padding) zero.

    With ``tokenizer.standardize`` each dimension of the embeddings is z-scored over the items: SASRec
    embeddings are small (init std 0.02), and an RQ-VAE fed them raw can reconstruct them from almost
    nothing and collapse onto a few codes. ``attributes`` (items 1..n, :func:`attribute_block`) is appended,
    scaled so that its items with attributes have the embeddings' mean squared norm.
    """
    out = np.asarray(embeddings, dtype=np.float32).copy()
    if t.standardize:
        items = out[1:]
        out[1:] = (items - items.mean(axis=0)) / (items.std(axis=0) + 1e-8)
    out[0] = 0.0
    if attributes is None:
        return out
    block = np.zeros((len(out), attributes.shape[1]), dtype=np.float32)
    norms = (attributes ** 2).sum(axis=1)
    scale = np.sqrt((out[1:] ** 2).sum(axis=1).mean() / norms[norms > 0].mean()) if (norms > 0).any() else 0.0
    block[1:] = attributes * scale
    return np.concatenate([out, block], axis=1)
