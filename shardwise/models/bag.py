"""A bag-of-words model: an `nn.EmbeddingBag` over the words a document holds, weighted by
their TF-IDF values, then fully-connected layers (fastText's shape).

The input is the same dense TF-IDF row every text layout uses; the bag reads only its nonzero
entries (a document holds a few dozen of the vocabulary's words), so the first layer costs
the document's length, not the vocabulary's, and its gradient touches only those rows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from shardwise.models.mlp import fc_stack


class WeightedBag(nn.Module):
    """The sum of the embeddings of a row's nonzero columns, each times its value: what
    `x @ weight` gives, from the nonzero entries alone."""

    def __init__(self, words: int, dim: int):
        super().__init__()
        self.bag = nn.EmbeddingBag(words, dim, mode="sum")
        nn.init.uniform_(self.bag.weight, -1.0 / math.sqrt(dim), 1.0 / math.sqrt(dim))

    def forward(self, x: Tensor) -> Tensor:
        rows, cols = x.nonzero(as_tuple=True)  # row-major: each row's words together
        offsets = torch.zeros(len(x), dtype=torch.long, device=x.device)
        offsets[1:] = torch.bincount(rows, minlength=len(x)).cumsum(0)[:-1]
        return self.bag(cols, offsets, per_sample_weights=x[rows, cols])


class Bag(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], num_classes: int, *, hidden: list[int]):
        super().__init__()
        if len(in_shape) != 1 or not hidden:
            raise ValueError("a bag needs flat word features and an embedding width (model.hidden's first)")
        self.features = nn.Sequential(WeightedBag(in_shape[0], hidden[0]), nn.ReLU())
        self.head = fc_stack(hidden[0], hidden[1:], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
