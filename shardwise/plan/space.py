"""Every layout a world size allows: the planner's search space.

A layout is a `ParallelConfig` that `ParallelDims.resolve` accepts for the world size and
whose global batch the layout can split (`check_batch_layout`): the degrees of tensor,
pipeline, spatial and vertical parallelism (data parallelism takes the ranks left), the
shard mode (where there are data-parallel replicas to shard over), and for a pipeline
its schedule (GPipe or 1F1B; not yet those of several stages a rank) and micro-batches
(one, two or four per stage); or a synchronous parameter
server with 1 to world - 1 servers (colocated servers are not searched yet: their model
underpredicts them, README). Only the strategies the model's structure takes are
tried (`ModelShape`). Asynchronous parameter servers are left out: they do not compute
what one process computes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch
from torch import nn

from shardwise.config import ParallelConfig
from shardwise.data.sampler import check_batch_layout
from shardwise.errors import ShardwiseError
from shardwise.parallel.pipeline import layer_units
from shardwise.topology import ParallelDims

SHARDS = ("none", "optimizer", "full")
# the schedules of several stages a rank (interleaved, zero-bubble, zbv) are not searched: the
# model predicts them 1-2% faster than 1F1B where they measured 11-23% slower on this machine
# (the small micro-batches' compute and the backward in two passes; README, Pipeline)
SCHEDULES = ("gpipe", "1f1b")
MICROBATCHES_PER_STAGE = (1, 2, 4)


@dataclass(frozen=True)
class ModelShape:
    """Which strategies a model's structure takes (README, "Your own model")."""

    tp: bool = True  # a `head` of Linear layers that pair up
    pp: int = 1 << 30  # the most stages: a `features` then a `head` nn.Sequential, cut between layers with weights
    spatial: int = 1 << 30  # the most bands its convolutions and poolings can be cut into
    vertical: bool = True  # a first Linear to split by input columns (a convolution needs whole channels)

    @classmethod
    def of(cls, model: nn.Module, sample: torch.Tensor | None = None) -> ModelShape:
        """What `model` takes; with a `sample`, how many bands its feature maps allow (each
        band at least one output row, and as many input rows as a window reaches into a
        neighbour: an estimate of the check the spatial layout makes when it cuts)."""
        stacks = all(isinstance(getattr(model, s, None), nn.Sequential) for s in ("features", "head"))
        head = [m for m in getattr(model, "head", []) if isinstance(m, nn.Linear)] if stacks else []
        windows = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
        convs = [m for m in model.features.modules() if isinstance(m, windows)] if stacks else []
        first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
        bands = 1
        if convs:
            bands = _most_bands(model.features, convs, sample) if sample is not None else 1 << 30
        stages = len(layer_units(model)) if stacks else 1
        return cls(tp=len(head) >= 2, pp=stages, spatial=bands, vertical=isinstance(first, nn.Linear))


def _most_bands(features: nn.Module, windows: list[nn.Module], sample: torch.Tensor) -> int:
    limits = []

    def seen(module, args, out):
        kernel = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
        reach = max(1, kernel // 2)  # rows a window takes from a neighbour's band
        limits.append(min(out.shape[-2], args[0].shape[-2] // reach))

    hooks = [m.register_forward_hook(seen) for m in windows]
    try:
        with torch.no_grad():
            features(sample.unsqueeze(0))
    finally:
        for hook in hooks:
            hook.remove()
    return max(1, min(limits))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _valid(cfg: ParallelConfig, world: int, batch: int, grad_accum: int) -> bool:
    try:
        dims = ParallelDims.resolve(cfg, world)
        check_batch_layout(
            global_batch=batch, grad_accum=grad_accum, dp=dims.dp, shards=None, microbatches=dims.microbatches
        )
    except ShardwiseError:
        return False
    return True


def layouts(world: int, *, batch: int, shape: ModelShape = ModelShape(), grad_accum: int = 1) -> list[ParallelConfig]:
    """Every valid layout of `world` ranks for a global batch of `batch` samples, each rank's
    share taken in `grad_accum` micro-batches."""
    found = []
    degrees = _divisors(world)
    for tp, pp, spatial, vertical in itertools.product(degrees, repeat=4):
        if world % (tp * pp * spatial * vertical):
            continue
        wanted = {"tp": tp, "vertical": vertical}
        if any(value > 1 and not getattr(shape, axis) for axis, value in wanted.items()):
            continue
        if spatial > shape.spatial or (pp > 1 and pp > shape.pp):
            continue
        base = ParallelConfig(tp=tp, pp=pp, spatial=spatial, vertical=vertical)
        pipeline = [
            replace(base, schedule=s, microbatches=k * pp)
            for s in SCHEDULES
            for k in MICROBATCHES_PER_STAGE
        ] if pp > 1 else [base]  # fmt: skip
        dp = world // (tp * pp * spatial * vertical)
        for cfg in pipeline:
            for shard in SHARDS if dp > 1 else ("none",):  # one replica: nothing to shard over
                candidate = replace(cfg, shard=shard)
                if _valid(candidate, world, batch, grad_accum):
                    found.append(candidate)
    # colocated servers (parallel.colocate) are not searched: on 4 ranks of 2 cores their
    # model predicted 172 ms a step where 258 were measured, and the planner chose them (README)
    for servers in range(1, world):
        candidate = ParallelConfig(mode="ps", servers=servers)
        if _valid(candidate, world, batch, grad_accum):
            found.append(candidate)
    return found
