"""Vertical (feature-wise) partitioning: each rank holds some input features.

The first layer is linear in its input, so it splits exactly over input
features: rank k computes the partial product of its columns with the matching
columns of the weight, one all-reduce over the vertical group sums the parts,
and the bias is added once after the sum (vertical federated learning's
split first layer, e.g. Liu et al., "Vertical Federated Learning", 2022).
Everything after the first layer runs as usual on every rank of the group.

A fully-connected first layer accepts any choice of features. A convolution
accepts whole channels only: a convolution mixes neighbouring pixels, so a
split over pixels needs halo exchange (spatial partitioning), not a sum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from shardwise.comm.collectives import reduce_from_group
from shardwise.comm.cost import Link, all_reduce
from shardwise.data.sources import local_shape
from shardwise.errors import ShardwiseError
from shardwise.parallel.part import Part
from shardwise.parallel.splits import Split

if TYPE_CHECKING:
    from shardwise.topology import RankMesh


class VerticalLinear(nn.Module):
    """y = sum over ranks of x_own W[:, own]^T, then + b."""

    def __init__(self, full: nn.Linear, split: Split):
        super().__init__()
        self.group, self.split = split.group, split
        self.weight = nn.Parameter(split.local(full.weight.detach()))
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        y = reduce_from_group(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


class VerticalConv2d(nn.Module):
    """y = sum over ranks of conv(x_own channels, W[:, own channels]), then + b."""

    def __init__(self, full: nn.Conv2d, split: Split):
        super().__init__()
        self.group, self.split = split.group, split
        self.stride, self.padding, self.dilation = full.stride, full.padding, full.dilation
        self.weight = nn.Parameter(split.local(full.weight.detach()))
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        y = F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation)
        y = reduce_from_group(y, self.group)
        return y + self.bias[:, None, None] if self.bias is not None else y


def _first_layer(model: nn.Module) -> tuple[str, nn.Module]:
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            return name, m
    raise ShardwiseError("parallel.vertical", f"{type(model).__name__} has no linear or convolutional layer to split")


def apply_vertical(part: Part, mesh: RankMesh, *, features: list[np.ndarray], in_shape: tuple[int, ...]) -> Part:
    """Split the model's first layer over input features: rank k of the mesh's vertical
    axis keeps the weight columns of `features[k]` (flat indices); the part gains the split."""
    group = mesh.groups["vertical"]
    if group is None or dist.get_world_size(group) == 1:
        return part
    model = part.model
    name, layer = _first_layer(model)
    if isinstance(layer, nn.Linear):
        split, kind = Split(group, 1, tuple(features)), VerticalLinear
    else:
        plane = int(np.prod(in_shape[1:]))
        if layer.groups != 1 or any(len(local_shape(f, in_shape)) != 3 for f in features):
            raise ShardwiseError(
                "parallel.vertical_unit",
                f"the first layer {name} is a convolution, which needs whole channels: use "
                "parallel.vertical_unit=channel (a split over pixels is spatial partitioning)",
            )
        split, kind = Split(group, 1, tuple(f[::plane] // plane for f in features)), VerticalConv2d
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, kind(layer, split))
    return part.but(splits=part.splits | {f"{name}.weight": split})


def vertical_seconds(link: Link, vertical: int, first_out_bytes: float) -> float:
    """The all-reduce of the first layer's partial products (the planner's cost model): each
    vertical rank multiplies its own input columns, the sum of all is the layer's output
    (`first_out_bytes` for this rank's samples). The backward needs none: every rank holds
    the output's whole gradient."""
    return all_reduce(link, vertical, first_out_bytes)
