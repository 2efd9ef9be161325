"""Tensor parallelism: the fully-connected layers split across the ranks of a group.

Applied from outside to the model's `head` (every model has one): its Linear
layers are paired, column-parallel then row-parallel (Shoeybi et al.,
"Megatron-LM", 2019). The column layer keeps its slice of the output
features, the elementwise activation between runs on that slice, and the row
layer turns its slice of the input into a partial sum that one all-reduce
completes: one all-reduce forward and one backward per pair. An odd last layer
is column-parallel and gathers its outputs. Widths that do not divide the group
size are split unevenly (the first ranks get one more), like `torch.chunk`'s
balanced cousin `numpy.array_split`.

Every rank builds the whole model from the same seed and keeps its slices, so
the split model starts from exactly the one-process weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from shardwise.comm.collectives import copy_to_group, gather_from_group, reduce_from_group
from shardwise.comm.cost import Link, all_reduce
from shardwise.errors import ShardwiseError
from shardwise.parallel.part import Part
from shardwise.parallel.splits import Split
from shardwise.ranges import even_sizes

if TYPE_CHECKING:
    from shardwise.topology import RankMesh


class ColumnParallelLinear(nn.Module):
    """y[:, own outputs] = x W[own outputs]^T + b[own outputs]; optionally gathered."""

    def __init__(self, full: nn.Linear, group: dist.ProcessGroup, *, gather_output: bool):
        super().__init__()
        self.group, self.gather_output = group, gather_output
        self.sizes = even_sizes(full.out_features, dist.get_world_size(group))
        self.split = Split.contiguous(group, 0, self.sizes)
        self.weight = nn.Parameter(self.split.local(full.weight.detach()))
        self.bias = nn.Parameter(self.split.local(full.bias.detach())) if full.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(copy_to_group(x, self.group), self.weight, self.bias)
        return gather_from_group(y, self.sizes, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x[:, own inputs] W[:, own inputs]^T, then + b (b on every rank)."""

    def __init__(self, full: nn.Linear, group: dist.ProcessGroup):
        super().__init__()
        self.group = group
        self.split = Split.contiguous(group, 1, even_sizes(full.in_features, dist.get_world_size(group)))
        self.weight = nn.Parameter(self.split.local(full.weight.detach()))
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        y = reduce_from_group(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


def plan_tensor_parallel(head: nn.Sequential, degree: int, *, skip: set[str] = frozenset()) -> dict[str, str]:
    """Which head layers become which kind: {index: "column" | "column+gather" | "row"}.

    Only Linear layers separated by elementwise layers can pair; `skip` names
    head indices already taken by another strategy. Refuses a layer narrower
    than the degree, naming it."""
    linear = [name for name, m in head.named_children() if isinstance(m, nn.Linear) and name not in skip]
    plan: dict[str, str] = {}
    for k in range(0, len(linear) - 1, 2):
        plan[linear[k]], plan[linear[k + 1]] = "column", "row"
    if len(linear) % 2:
        plan[linear[-1]] = "column+gather"
    for name, kind in plan.items():
        layer = head.get_submodule(name)
        width = layer.in_features if kind == "row" else layer.out_features
        side = "input" if kind == "row" else "output"
        if width < degree:
            raise ShardwiseError(
                "parallel.tp",
                f"layer head.{name} (Linear {layer.in_features}->{layer.out_features}) has {width} {side} "
                f"features, fewer than tp={degree}; use a smaller parallel.tp or wider model.hidden",
            )
    return plan


def apply_tensor_parallel(part: Part, mesh: RankMesh) -> Part:
    """Split the head's Linear layers across the mesh's tp axis (layers replaced in
    place); the part gains their splits. A layer another strategy already split (the
    vertical first layer) is left alone."""
    group = mesh.groups["tp"]
    if group is None or dist.get_world_size(group) == 1:
        return part
    head = getattr(part.model, "head", None)
    if not isinstance(head, nn.Sequential):
        raise ShardwiseError(
            "parallel.tp",
            f"{type(part.model).__name__} has no `head`, an nn.Sequential of Linear layers, for tensor parallelism "
            "to split (see README, Your own model)",
        )
    taken = {name for name, _ in head.named_children() if any(s.startswith(f"head.{name}.") for s in part.splits)}
    splits: dict[str, Split] = {}
    for name, kind in plan_tensor_parallel(head, dist.get_world_size(group), skip=taken).items():
        full = head.get_submodule(name)
        if kind == "row":
            layer = RowParallelLinear(full, group)
            splits[f"head.{name}.weight"] = layer.split
        else:
            layer = ColumnParallelLinear(full, group, gather_output=kind == "column+gather")
            splits[f"head.{name}.weight"] = layer.split
            if layer.bias is not None:
                splits[f"head.{name}.bias"] = layer.split
        setattr(head, name, layer)
    return part.but(splits=part.splits | splits)


def tp_seconds(link: Link, tp: int, pairs: list[tuple[float, float]]) -> float:
    """The all-reduces of a tensor-parallel step (the planner's cost model): for each
    column-then-row pair of Linear layers, one of the row layer's output in the forward
    and one of the column layer's input gradient in the backward. `pairs`: each pair's
    (input bytes, output bytes) for this rank's samples. Nothing overlaps: the next layer
    waits for them."""
    return sum(all_reduce(link, tp, into) + all_reduce(link, tp, out) for into, out in pairs)
