from __future__ import annotations

import math

from torch import Tensor, nn


def fc_stack(in_features: int, hidden: list[int], num_classes: int) -> nn.Sequential:
    """Linear + ReLU for each hidden width, then the classifier layer."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """Flattened input through fully-connected layers."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, *, hidden: list[int]):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten())
        self.head = fc_stack(math.prod(in_shape), hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
