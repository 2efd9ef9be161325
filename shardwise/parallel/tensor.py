"""Tensor parallelism: the fully-connected layers split across the ranks of a group.

Applied from outside to the model's `head` (every model has one): its Linear
layers are paired, column-parallel then row-parallel (Shoeybi et al.,
"Megatron-LM", 2019). The column layer keeps its slice of the output
features, the elementwise activation between runs on that slice, and the row
layer turns its slice of the input into a partial sum that one all-reduce
completes: one all-reduce forward and one backward per pair. The backward's
all-reduce runs beside the column layer's weight-gradient product
(`comm.collectives.column_linear`). An odd last
layer is column-parallel and gathers its outputs, unless it is narrow (at most
`NARROW` outputs, a classifier): then every rank computes it whole, which costs
less than the all-reduce of its input gradient and the gather it saves. Widths that do not divide the group
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

from shardwise.comm.collectives import column_linear, gather_from_group, reduce_from_group
from shardwise.comm.cost import Link, all_gather, all_reduce
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
        y = column_linear(x, self.weight, self.bias, self.group)
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


NARROW = 64  # an odd last layer with at most this many outputs is computed whole on every rank


def tp_roles(widths: list[tuple[int, int]]) -> list[str]:
    """Each of a head's Linear layers' part in tensor parallelism, from their (in, out)
    features in order: "column" and "row" in pairs, an odd last layer "column+gather",
    or "whole" when it has at most NARROW outputs."""
    roles = ["column", "row"] * (len(widths) // 2)
    if len(widths) % 2:
        roles.append("whole" if widths[-1][1] <= NARROW else "column+gather")
    return roles


def plan_tensor_parallel(head: nn.Sequential, degree: int, *, skip: set[str] = frozenset()) -> dict[str, str]:
    """Which head layers become which kind: {index: "column" | "column+gather" | "row"}
    (a "whole" layer is left out: it stays as it is).

    Only Linear layers separated by elementwise layers can pair; `skip` names
    head indices already taken by another strategy. Refuses a layer narrower
    than the degree, naming it."""
    linear = [name for name, m in head.named_children() if isinstance(m, nn.Linear) and name not in skip]
    layers = [head.get_submodule(name) for name in linear]
    roles = tp_roles([(x.in_features, x.out_features) for x in layers])
    plan = {name: role for name, role in zip(linear, roles, strict=True) if role != "whole"}
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


def tp_seconds(link: Link, tp: int, layers: list[tuple[str, float, float, float]]) -> float:
    """The collectives of a tensor-parallel forward and backward that the step waits for
    (the planner's cost model). `layers`: each split Linear layer's part (`tp_roles`),
    the bytes of its input gradient (0: its input needs none), of its output (this rank's
    samples), and the seconds of its weight gradient's product. A row layer all-reduces
    its output in the forward, and the next layer waits for it. A column layer
    all-reduces its input gradient in the backward beside its weight gradient's
    product, so only what the product does not cover waits; gathered, it also
    all-gathers its output in the forward. A layer computed whole has none."""
    total = 0.0
    for part, grad_in, out, beside in layers:
        if part == "row":
            total += all_reduce(link, tp, out)
        elif part in ("column", "column+gather"):
            total += max(0.0, all_reduce(link, tp, grad_in) - beside) if grad_in else 0.0
            total += all_gather(link, tp, out) if part == "column+gather" else 0.0
    return total
