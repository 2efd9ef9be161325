"""Cutting a model into pipeline stages by measured cost.

The layers are the children of the model's `features` and `head`, in order.
A short profiling pass times each layer's forward and backward on one
micro-batch and notes its parameter and activation bytes; the cut into P
consecutive stages then minimises the slowest stage's time (the classic
linear-partition dynamic program), since the slowest stage sets the pipeline's
pace. Every rank profiles, but all take rank 0's cut, so they agree.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from shardwise.errors import ShardwiseError
from shardwise.parallel.part import Part

if TYPE_CHECKING:
    from shardwise.topology import RankMesh

STACKS = ("features", "head")


@dataclass
class LayerCost:
    name: str
    time_s: float
    param_bytes: int
    activation_bytes: int
    out_shape: tuple[int, ...]  # of its output, for one micro-batch
    forward_s: float = 0.0  # the forward's share of time_s


def model_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's layers in order, under their own names (`features.3`, `head.0`, ...)."""
    if not all(isinstance(getattr(model, stack, None), nn.Sequential) for stack in STACKS):
        raise ShardwiseError(
            "parallel.pp",
            f"{type(model).__name__} is not a `features` then a `head` nn.Sequential, the layers a pipeline "
            "cuts into stages (see README, Your own model)",
        )
    return [(f"{stack}.{name}", m) for stack in STACKS for name, m in getattr(model, stack).named_children()]


class StageModule(nn.Module):
    """A run of consecutive layers, kept under the model's own names so that the
    stage's state dict is a piece of the whole model's. `own_output`: an output that is a
    view (a flatten at the cut) is handed on as a copy, which the schedules that split the
    backward need: they detach each stage's output in place after its input's gradient, and
    torch refuses that on a view."""

    def __init__(self, layers: list[tuple[str, nn.Module]], own_output: bool = False):
        super().__init__()
        self.own_output = own_output
        for stack in STACKS:
            own = [(name.split(".", 1)[1], m) for name, m in layers if name.startswith(f"{stack}.")]
            self.add_module(stack, nn.Sequential(OrderedDict(own)))

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(self.features(x))
        return out.clone() if self.own_output and out._base is not None else out


@torch.no_grad()
def _clear_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def profile_layers(model: nn.Module, x: Tensor, repeats: int = 3) -> list[LayerCost]:
    """Forward + backward time of each layer on `x` (median of `repeats` passes), each
    backward making its parameters' gradients anew, as a training step does after
    `zero_grad(set_to_none=True)` (not adding into the last pass's); and the forward's alone
    (what activation checkpointing runs again). One untimed pass first: a process's first
    pass of a size pays for memory it maps afresh (the C allocator's first blocks of that
    size, the kernel's first touch of each page), which a training step, after its first,
    does not; timed, it read a 1024 x 1024 Linear's fixed cost 2.1 ms against 0.7-0.8."""
    layers = model_layers(model)
    times: list[list[float]] = [[] for _ in layers]
    forwards: list[list[float]] = [[] for _ in layers]
    sizes: list[int] = [0] * len(layers)
    shapes: list[tuple[int, ...]] = [()] * len(layers)
    for repeat in range(repeats + 1):
        h = x
        for i, (_, layer) in enumerate(layers):
            inp = h.detach().requires_grad_(h.is_floating_point())
            _clear_grads(layer)
            started = time.perf_counter()
            with torch.enable_grad():
                out = layer(inp)
                forward = time.perf_counter() - started
                out.backward(torch.ones_like(out))
            if repeat:  # the first pass warms (above)
                times[i].append(time.perf_counter() - started)
                forwards[i].append(forward)
            sizes[i], shapes[i] = out.numel() * out.element_size(), tuple(out.shape)
            h = out.detach()
    _clear_grads(model)
    return [
        LayerCost(
            name,
            statistics.median(t),
            sum(p.numel() * p.element_size() for p in m.parameters()),
            size,
            shape,
            statistics.median(f),
        )  # fmt: skip
        for (name, m), t, f, size, shape in zip(layers, times, forwards, sizes, shapes, strict=True)
    ]


def choose_cut(costs: list[float], stages: int) -> list[int]:
    """Start index of each stage (the first is 0) so that the costliest stage is as cheap
    as possible; every stage gets at least one layer."""
    n = len(costs)
    if stages > n:
        raise ShardwiseError("parallel.pp", f"{stages} stages, but the model has only {n} layers")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the cheapest max-stage cost of the first i layers in k stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    start = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], start[k][i] = cost, j
    cut, i = [], n
    for k in range(stages, 0, -1):
        i = start[k][i]
        cut.append(i)
    return cut[::-1]


def agree_on_cut(cut: list[int], group: dist.ProcessGroup) -> list[int]:
    """Rank 0's cut, on every rank of `group` (profiles differ a little from rank to rank)."""
    t = torch.tensor(cut, dtype=torch.int64)
    dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    return t.tolist()


SCHEDULES = {  # parallel.schedule: torch's class (torch.distributed.pipelining.schedules)
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved": "ScheduleInterleaved1F1B",
    "zero-bubble": "ScheduleInterleavedZeroBubble",
    "zbv": "ScheduleZBVZeroBubble",
}
SPLIT_BACKWARD = ("zero-bubble", "zbv")  # a backward in two passes: the input's gradient, then the weights'


def stage_ranks(schedule: str, ranks: int, virtual: int) -> list[int]:
    """The pipeline rank of each of the `ranks` x `virtual` stages: looped (stage s on rank
    s mod ranks), or zbv's V (rank r holds stages r and 2 x ranks - 1 - r), as torch places them."""
    stages = ranks * virtual
    if schedule == "zbv":
        return [s if s < ranks else stages - 1 - s for s in range(stages)]
    return [s % ranks for s in range(stages)]


def stage_layers(model: nn.Module, cut: list[int], stage: int) -> list[tuple[str, nn.Module]]:
    layers = model_layers(model)
    end = cut[stage + 1] if stage + 1 < len(cut) else len(layers)
    return layers[cut[stage] : end]


def describe_cut(costs: list[LayerCost], cut: list[int]) -> list[dict]:
    """Per stage: its layers and its share of time, parameters and activations."""
    total_time = sum(c.time_s for c in costs) or 1.0
    total_params = sum(c.param_bytes for c in costs) or 1
    rows = []
    for k, lo in enumerate(cut):
        hi = cut[k + 1] if k + 1 < len(cut) else len(costs)
        part = costs[lo:hi]
        rows.append(
            {
                "stage": k,
                "first_layer": lo,
                "layers": f"{part[0].name} .. {part[-1].name}" if len(part) > 1 else part[0].name,
                "num_layers": len(part),
                "time_share": sum(c.time_s for c in part) / total_time,
                "param_share": sum(c.param_bytes for c in part) / total_params,
                "activation_bytes": sum(c.activation_bytes for c in part),
            }
        )
    return rows


def layer_units(model: nn.Module) -> list[list[int]]:
    """Layers grouped so that every unit has parameters (`units_of`)."""
    return units_of([any(True for _ in layer.parameters()) for _, layer in model_layers(model)])


def units_of(has_params: list[bool]) -> list[list[int]]:
    """Layers grouped so that every unit has parameters: each layer with parameters
    takes the parameter-free layers after it (activations, pooling); leading ones
    join the first unit. Stages are cut between units, so none is without weights."""
    units: list[list[int]] = []
    pending: list[int] = []
    for i, weighted in enumerate(has_params):
        if weighted:
            units.append(pending + [i])
            pending = []
        elif units:
            units[-1].append(i)
        else:
            pending.append(i)
    if pending:  # no layer has parameters
        units.append(pending)
    return units


def cut_units(costs: list[float], units: list[list[int]], stages: int) -> list[int]:
    """The first layer of each stage when `units` (of `units_of`) are cut into `stages`
    balancing the layers' `costs`: the cut `plan_pipeline` makes, for the cost model too."""
    if stages > len(units):
        raise ShardwiseError(
            "parallel.pp", f"{stages} stages, but the model has only {len(units)} layers with parameters"
        )
    return [units[k][0] for k in choose_cut([sum(costs[i] for i in u) for u in units], stages)]


def plan_pipeline(
    model: nn.Module, example: Tensor, *, stages: int, group: dist.ProcessGroup, by_size: bool = False
) -> tuple[list[int], list[LayerCost], str]:
    """Profile the layers on `example` (one micro-batch) and agree on the cut that
    balances the stages' time; returns each stage's first layer, the costs and what the
    cut balanced. `by_size` (train.deterministic) balances the layers' multiply-adds
    instead: a cut by the clock can differ between a run and its resume, and a bucket-wise
    gradient compression (int8's blocks and top-k's selection run over a stage's gradient) then
    gives other numbers."""
    costs = profile_layers(model, example)
    if by_size:
        basis, weights = "multiply-adds", [multiply_adds(c) for c in costs]
    else:
        basis, weights = "measured cost", [c.time_s for c in costs]
    return agree_on_cut(cut_units(weights, layer_units(model), stages), group), costs, basis


def multiply_adds(c: LayerCost) -> float:
    """A layer's work on one micro-batch from its sizes alone (in bytes of weights x uses):
    each weight is used once per output position (a linear layer's once per sample, a
    convolution's once per pixel of its output); a layer without weights touches its
    output once."""
    positions = math.prod(c.out_shape) / c.out_shape[1] if len(c.out_shape) > 1 else 1
    return c.param_bytes * positions if c.param_bytes else float(c.activation_bytes)


def stage_shapes(
    costs: list[LayerCost], cut: list[int], stage: int, input_shape: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of one micro-batch entering and leaving `stage`. Handed to torch's
    PipelineStage, they spare it the shape exchange it would otherwise make with
    send/recv_object_list, which unpickles what a peer sends."""
    end = cut[stage + 1] if stage + 1 < len(cut) else len(costs)
    first = input_shape if stage == 0 else costs[cut[stage] - 1].out_shape
    return first, costs[end - 1].out_shape


@dataclass
class StageCut:
    """This rank's stages of a pipeline and how the model was cut."""

    index: int  # this rank's place in the pipeline
    stages: int  # the pipeline's ranks (parallel.pp)
    group: dist.ProcessGroup  # the ranks of this pipeline
    owner: dict[str, int]  # the pipeline rank holding each entry of the whole model's state dict
    rows: list[dict]  # the cut, for the report (describe_cut)
    # this rank's stages: (stage index, its layers (the part's own modules), one micro-batch
    # entering and leaving it)
    chunks: list[tuple[int, StageModule, tuple[tuple[int, ...], tuple[int, ...]]]]
    ranks: list[int]  # the pipeline rank of every stage (stage_ranks)
    cut_by: str = "measured cost"  # what the cut balanced (plan_pipeline)


def apply_pipeline(part: Part, mesh: RankMesh, *, example: Tensor, by_size: bool = False) -> Part:
    """Keep this rank's stages of the model, each a run of consecutive layers under the model's
    own names, cut where the measured cost of `example` (one micro-batch) balances the
    stages: one stage a rank, or parallel.virtual_stages of them under the interleaved
    schedules. The rank's part is all its stages' layers in one module (its state dict a piece
    of the whole model's). The pipeline's group joins the groups a gradient norm adds up over."""
    group = mesh.groups["pp"]
    if group is None:
        return part
    dims, model, index = mesh.dims, part.model, mesh.coords["pp"]
    # every rank of the layout takes the same cut (its first rank's), so that the stages of
    # different data-parallel replicas hold the same layers and average the same gradients
    count, units = dims.pp * dims.virtual, len(layer_units(model))
    if dims.virtual > 1 and count > units:
        raise ShardwiseError(
            "parallel.virtual_stages",
            f"={dims.virtual}: parallel.pp={dims.pp} x {dims.virtual} = {count} stages, but the model has only "
            f"{units} layers with parameters",
        )
    cut, costs, basis = plan_pipeline(model, example, stages=count, group=mesh.parent, by_size=by_size)
    ranks = stage_ranks(dims.schedule, dims.pp, dims.virtual)
    mine = [s for s in range(count) if ranks[s] == index]
    shape, own = tuple(example.shape), dims.schedule in SPLIT_BACKWARD
    chunks = [(s, StageModule(stage_layers(model, cut, s), own), stage_shapes(costs, cut, s, shape)) for s in mine]
    rows = describe_cut(costs, cut)
    for row in rows:
        row["rank"] = ranks[row["stage"]]
    stage = StageCut(
        index=index,
        stages=dims.pp,
        group=group,
        owner={name: ranks[s] for name, s in owners(model, cut).items()},
        rows=rows,
        chunks=chunks,
        ranks=ranks,
        cut_by=basis,
    )
    names = {name for s in mine for name, _ in stage_layers(model, cut, s)}
    held = [(name, layer) for name, layer in model_layers(model) if name in names]
    return part.but(model=StageModule(held, own), stage=stage, sum_groups=[*part.sum_groups, group])


def gather_stages(
    state: dict[str, Tensor], whole: dict[str, Tensor], owner: dict[str, int], *, group: dist.ProcessGroup
) -> dict[str, Tensor]:
    """The whole model's weights on every stage: each tensor is broadcast by the stage
    that owns it (`whole` gives every name's shape and dtype, in the model's order;
    meta tensors will do)."""
    device = next(iter(state.values())).device
    out: dict[str, Tensor] = {}
    for name, like in whole.items():
        t = state[name].contiguous() if name in state else torch.empty(like.shape, dtype=like.dtype, device=device)
        dist.broadcast(t, src=dist.get_global_rank(group, owner[name]), group=group)
        out[name] = t
    return out


def owners(model: nn.Module, cut: list[int]) -> dict[str, int]:
    """The stage holding each entry of the model's state dict."""
    out: dict[str, int] = {}
    for stage in range(len(cut)):
        for layer_name, layer in stage_layers(model, cut, stage):
            for name in layer.state_dict():
                out[f"{layer_name}.{name}"] = stage
    return out
