"""Data parallelism: every rank holds the model (or a shard of it) and averages gradients.

`shard="none"` and `"optimizer"` use torch's DistributedDataParallel (bucketed
all-reduce overlapped with the backward pass; Li et al., "PyTorch
Distributed", VLDB 2020); `"optimizer"` adds ZeRO-1's sharded optimizer state
(parallel/zero.py, applied next). `shard="full"` uses FSDP2 `fully_shard` (Zhao et al., "PyTorch
FSDP", VLDB 2023; ZeRO-3 of Rajbhandari et al., 2020): each rank keeps 1/N of
every parameter, gradient and optimizer state, all-gathers a layer's
parameters just before using it and reduce-scatters its gradient. With the
loss averaged over each rank's equal share of the global batch, the averaged
gradient is exactly the gradient of the mean loss over the global batch, so
one optimizer step matches one process with the whole batch.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shardwise.comm.compress import CompressionSettings, Compressor, entries_of
from shardwise.comm.cost import Link, all_gather, all_reduce, beside, between_compute, per_call, transfer
from shardwise.comm.methods import in_hook
from shardwise.parallel.part import Part
from shardwise.topology import RankMesh

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule


def apply_data_parallel(
    part: Part, mesh: RankMesh, *, device: torch.device, compression: CompressionSettings | None = None
) -> Part:
    """Wrap the part for data parallelism over the mesh's dp axis (dp=1 leaves it as is):
    DDP, or FSDP2 where the mesh's layout shards everything (its shards then join the
    groups a gradient norm adds up over). A pipeline stage is left unwrapped: it averages
    its gradients once the pipeline drained (comm.flat.average_gradients, from its runner),
    since DDP around a stage trips over its own bucket rebuild when the first step runs
    every forward before any backward, as GPipe does.

    `compression` (comm/compress.py): DDP averages its buckets through a communication hook
    that compresses them, and a stage's average goes through the same compressor."""
    group, model = mesh.groups["dp"], part.model
    methods = (compression.method, *compression.candidates) if compression is not None else ()
    compressing = group is not None and any(m != "none" for m in methods)
    compressor = Compressor(compression, group) if compressing else None
    if group is None or part.stage is not None:
        return part.but(compressor=compressor)
    if mesh.dims.shard == "full":
        # imported here: FSDP2 and DTensor are a second of start-up the other layouts skip
        from torch.distributed.fsdp import fully_shard

        dp_mesh = mesh.device_mesh("dp")
        # one FSDP unit per layer of the feature stack and the head: a layer's
        # parameters are gathered just before it runs and freed after
        stacks = [getattr(model, name, None) for name in ("features", "head")]
        for stack in (s for s in stacks if isinstance(s, nn.Sequential)):  # else the model is one unit
            for layer in stack.children():
                if any(True for _ in layer.parameters()):
                    fully_shard(layer, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        return part.but(sum_groups=[*part.sum_groups, group])
    device_ids = [device.index] if device.type == "cuda" else None
    # DDP broadcasts rank 0's parameters and buffers at construction, so ranks start equal
    # gradients as views into the buckets: one copy of the gradient, not two (torch DDP notes)
    caps = bucket_caps(compressor.methods if compressor is not None else (), mesh.dims.bucket_bytes)
    ddp = DistributedDataParallel(
        model,
        device_ids=device_ids,
        process_group=group,
        gradient_as_bucket_view=True,
        bucket_cap_mb=caps["cap"] / 2**20 if caps else None,  # named: the first bucket's size too
    )
    if compressor is not None:
        ddp.register_comm_hook(None, ddp_hook(compressor, {id(p): n for n, p in model.named_parameters()}))
    return part.but(model=ddp, compressor=compressor)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside any data-parallel wrapper: its own parameter names."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def _fsdp_no_sync(model: FSDPModule):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def maybe_no_sync(model: nn.Module, skip_sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient reduction for all but the last micro-batch of a step."""
    if skip_sync and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if skip_sync and is_fully_sharded(model):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


def is_fully_sharded(model: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # none was made before it was imported
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP's default bucket_cap_mb


def ddp_buckets(
    items: list,
    size: Callable[[object], float],
    *,
    first: int = torch.distributed._DEFAULT_FIRST_BUCKET_BYTES,  # what DDP itself takes for its first bucket
    cap: int = DDP_BUCKET_BYTES,
) -> list[list]:
    """`items` (a model's parameters or layers in its order, `size(item)` bytes of gradient
    each) in DDP's buckets, in the order DDP launches them: filled in reverse order, as the
    backward produces the gradients, the first closed once it holds `first` bytes, the
    others at `cap` (DDP's defaults; a bucket_cap_mb named sets both)."""
    out: list[list] = [[]]
    held = 0.0
    for item in reversed(items):
        out[-1].append(item)
        held += size(item)
        if held >= (first if len(out) == 1 else cap):
            out.append([])
            held = 0.0
    return [b for b in out if b]


def bucket_caps(methods, named: int | None) -> dict[str, int]:
    """The `ddp_buckets` sizes of a run that averages through `methods` (`named`:
    parallel.bucket_mb's bytes, which set both): DDP's own ({}), but where every method
    averages in the hook (comm/methods.py `in_hook`), whose first bucket is as large as the
    rest. On the MLP 64-2048-2048-10 (17 MB of gradients: one bucket instead of two),
    PowerSGD's step at 4 ranks on 2 cores took 57-61 ms against 73-74 (loopback, 3 runs
    each, 2026-12-05), top-k's and int8's 3-12% less; a bucket is no larger than before."""
    if named is not None:
        return {"first": named, "cap": named}
    return {"first": DDP_BUCKET_BYTES, "cap": DDP_BUCKET_BYTES} if in_hook(methods) else {}


def sync_seconds(
    link: Link,
    dp: int,
    grad_bytes: float,
    backward_s: float,
    shard: str,
    copy_s_per_byte: float = 0.0,
    units: int = 1,
    passes: int = 1,
    averaged_s: float | None = None,
    buckets: list[float] | None = None,
) -> float:
    """The communication a step of data parallelism leaves exposed (the planner's cost model).
    `averaged_s`: where a compressor averages the gradients (comm/compress.py), its time,
    which replaces DDP's overlapped all-reduce (the hook runs beside nothing).

    none (DDP): a ring all-reduce of the gradient in DDP's buckets (`buckets`: their bytes in
    the order DDP launches them, `ddp_buckets`, scaled to `grad_bytes`; else equal buckets
    of 25 MiB), each launched when its gradients are ready, so all but the last run beside
    what is left of the backward after the first is launched (its share of the bytes not
    in the first), hidden as far as the link's measured overlap says: on a CPU whose cores
    the ranks fill, they slow each other down. optimizer (ZeRO-1, parallel/zero.py): the same
    all-reduce, then an all-gather of the updated slices after the step, which nothing
    overlaps. full (FSDP2): each unit's parameters are all-gathered before its forward and
    again before its backward, its gradient reduce-scattered after: three passes over the
    parameters' bytes, in three collectives per unit (`units`: one per layer that holds
    parameters). Their bytes move beside the compute, as FSDP2 prefetches and reduces
    asynchronously, as far as the link's overlap says; each call's own cost does not: issued
    between a unit's compute and the next, a call pays at least what a small exchange costs
    ranks that compute between exchanges (the link's `sync_s`), as a spatial band's
    exchanges do (the convnet of the planner's bench, 13 units on 2 loopback ranks: 69.6 ms
    predicted with every call's cost beside the backward, 86.0 measured). Over `passes` accumulated micro-batches FSDP2
    gathers for every forward and backward and reduce-scatters after the last
    (`set_requires_gradient_sync`), its collectives beside all the passes' compute
    (`backward_s` is one pass's backward); DDP and ZeRO-1 reduce once, beside the last
    pass's backward.

    The sharded modes also copy around their collectives, each a pass over fresh memory at
    `copy_s_per_byte`: ZeRO-1 joins its slice (1/dp), takes the gathered parameters into a
    new buffer and copies them into the model (2); FSDP2, per all-gather, copies its shard
    in (1/dp), the whole into fresh memory and out into the parameters (2), and per
    reduce-scatter the gradient in (1) and its shard out and into the sharded gradient
    (2/dp)."""
    if dp <= 1 or grad_bytes <= 0:  # (a model without weights: nothing to average)
        return 0.0
    if shard == "full":
        each = grad_bytes / units
        gather, scatter = (between_compute(link, per_call(link, k, dp)) for k in ("all_gather", "reduce_scatter"))
        moved = 2 * passes * transfer(link, "all_gather", dp, each) + transfer(link, "reduce_scatter", dp, each)
        copies = (2 * passes * (2 + 1 / dp) + 1 + 2 / dp) * grad_bytes * copy_s_per_byte
        return units * (2 * passes * gather + scatter) + beside(link, units * moved, 1.5 * passes * backward_s) + copies
    if buckets:
        sizes = [grad_bytes * b / sum(buckets) for b in buckets]
    else:
        n = max(1, math.ceil(grad_bytes / DDP_BUCKET_BYTES))
        sizes = [grad_bytes / n] * n
    before_last = sum(all_reduce(link, dp, b) for b in sizes[:-1])
    after_first = 1 - sizes[0] / grad_bytes if grad_bytes > 0 else 0.0  # the backward still to go
    reduced = all_reduce(link, dp, sizes[-1]) + beside(link, before_last, backward_s * after_first)
    reduced = reduced if averaged_s is None else averaged_s
    if shard == "optimizer":
        return reduced + zero_gather_seconds(link, dp, grad_bytes, copy_s_per_byte)
    return reduced


def zero_gather_seconds(link: Link, dp: int, param_bytes: float, copy_s_per_byte: float) -> float:
    """ZeRO-1 after its step (parallel/zero.py): the updated slices all-gathered, with its
    copies (its slice joined, 1/dp; the gathered parameters taken into a new buffer and
    copied into the model, 2)."""
    return all_gather(link, dp, param_bytes) + (2 + 1 / dp) * param_bytes * copy_s_per_byte


def ddp_hook(compressor: Compressor, names: dict[int, str]):
    """A DDP communication hook that averages each bucket through `compressor` (`names`:
    id of each parameter -> its name). bf16 and fp16 outside the warm-up are torch's own
    hooks; the rest run here, in the autograd thread, when DDP hands over a bucket."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    torch_hooks = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}

    def entries(bucket) -> list:
        out = entries_of([(names[id(p)], p) for p in bucket.parameters()])
        assert sum(e.numel for e in out) == bucket.buffer().numel(), "a DDP bucket is its parameters back to back"
        return out

    def hook(_state, bucket):  # unannotated: DDP checks annotations as objects, and these are strings here
        flat, method = bucket.buffer(), compressor.method
        if compressor.unsettled(flat):  # after auto's trial keeps a method without error feedback, say
            compressor.settle(flat, entries(bucket))
        if compressor.whole(flat):  # the warm-up, a small bucket: DDP's own all-reduce, as without a hook
            compressor.tally(flat, flat.numel() * flat.element_size())
            compressor.vouch(None)
            fut = default_hooks.allreduce_hook(compressor.group, bucket)
        elif method in torch_hooks:
            compressor.tally(flat, flat.numel() * 2)
            compressor.vouch(None)
            fut = torch_hooks[method](compressor.group, bucket)
        else:  # Compressor.average tallies it
            fut = torch.futures.Future()
            fut.set_result(compressor.average(flat, entries(bucket)))
        if bucket.is_last():
            compressor.end_step()
        return fut

    return hook
