"""Your own model, as shardwise takes it: a function that returns a plain nn.Module.

    shardwise train --model.name examples.digits_model:build --model.options '{"width": 96}'

The function gets the shape of one sample, the number of classes and `model.options`
as keywords. Any nn.Module trains data parallel, with FSDP2 (`parallel.shard full`) or
ZeRO-1. The layouts that cut the model need its layers where they look for them: a
`features` nn.Sequential (spatial bands cut its convolutions; a pipeline cuts it and
the head into stages) followed by a `head` nn.Sequential of Linear layers (tensor
parallelism pairs them, column then row). This one has both.
"""

from __future__ import annotations

import math

from torch import nn


class DigitsNet(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int, depth: int):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), width), nn.Tanh())
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.Tanh()]
        self.head = nn.Sequential(*layers, nn.Linear(width, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def build(in_shape: tuple[int, ...], num_classes: int, *, width: int = 64, depth: int = 2) -> nn.Module:
    return DigitsNet(in_shape, num_classes, width, depth)
