"""The cost model: one layout's step time, split into compute, communication and bubble,
and each rank's peak memory, from a measured profile and a link.

Compute is the profile's layer times, on the samples a rank takes and the part of each
layer it holds: tensor parallelism divides the `head`'s Linear layers by tp, spatial
bands the `features`' convolutions by spatial, vertical partitioning the first layer by
vertical, a pipeline runs its stages on micro-batches; then the optimizer's step on the
parameters a rank updates (the profile's seconds per byte; a parameter server's step is
its servers'); then the engine's own cost per step, measured (`plan/overhead.py`); with activation
checkpointing, the checkpointed layers' forward once more, with their forward's
communication. Each
strategy's communication is its own module's formula (parallel/*: `sync_seconds`, `tp_seconds`,
`halo_seconds` and `band_sum_seconds`, `vertical_seconds`, `ps_seconds`); a pipeline's whole step is
played out in time in `parallel/pipeline_cost.py`, its stages' averaging over dp here. When there are
more ranks than cores, the ranks computing at once share them: compute stretches by ranks / cores,
but a pipeline's stages share them only while they compute (its fill and drain go faster), and
separate parameter servers and their workers take turns. Loading (T_load) is each rank's
data-parallel share of the batch at the source's measured seconds per sample (`plan/profile.py` `loading_fit`).

Memory per rank: what it holds and the largest passing buffer its strategies allocate
(`plan/memory.py`), for the pipeline stage that holds the most.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shardwise.comm.compress import CompressionSettings, compressor_bytes
from shardwise.comm.cost import Link, all_gather, all_reduce, small_exchange
from shardwise.comm.methods import HALF
from shardwise.config import ParallelConfig
from shardwise.parallel.data import DDP_BUCKET_BYTES, ddp_buckets, sync_seconds, zero_gather_seconds
from shardwise.parallel.pipeline import cut_units, stage_ranks, units_of
from shardwise.parallel.pipeline_cost import held_peak, pipeline_seconds, rank_orders
from shardwise.parallel.ps_protocol import ps_seconds
from shardwise.parallel.recompute import checkpointed_units
from shardwise.parallel.spatial import band_sum_seconds, halo_seconds
from shardwise.parallel.tensor import tp_seconds
from shardwise.parallel.vertical import vertical_seconds
from shardwise.plan.memory import held_params, rank_peak
from shardwise.plan.profile import LayerProfile, ModelProfile, tp_parts
from shardwise.topology import ParallelDims


@dataclass(frozen=True)
class Setting:
    """What a prediction needs besides the layout."""

    profile: ModelProfile
    link: Link
    batch: int  # the global batch
    cores: int
    optimizer_slots: int = 1
    step_overhead_s: float = 0.0  # the engine's loop, every step, beyond the model and its collectives
    rank_overhead_bytes: float = 0.0  # the engine's own memory per rank, beyond the model's
    val_samples: int = 0  # the validation set, evaluated at the end of the run
    grad_accum: int = 1  # micro-batches per step on each rank
    # the run's gradient compression (plan/compression.py `averaging`): a layout's seconds
    # to average a step's gradients through it, its compute x the cores' sharing
    # (`core_stretch`); None: DDP's all-reduce
    averaging: Callable[[ParallelDims, float], float] | None = None
    # the run's named method (None: none or auto): its buffers (comm/compress.py
    # `compressor_bytes`) and, on a parameter server, half-precision pushes
    compression: CompressionSettings | None = None
    # T_load: a rank loads its data-parallel share of the batch, fixed + per sample seconds
    load_fixed_s: float = 0.0
    load_s_per_sample: float = 0.0
    # train.activation_checkpointing = layers: each unit's forward runs again in the backward,
    # and the backward keeps only the units' inputs
    checkpointing: bool = False
    # a pipeline's cost per forward or backward of a rank beyond its arithmetic (`plan/overhead.py
    # pipeline_action`), asked for only where a pipeline is predicted
    pipeline_action_s: Callable[[], float] = field(default=lambda: 0.0, compare=False)


@dataclass(frozen=True)
class Prediction:
    layout: str
    compute_s: float
    comm_s: float
    bubble_s: float
    memory_bytes: float  # the largest rank's
    load_s: float = 0.0  # taking the step's samples from the data source

    @property
    def step_s(self) -> float:
        return self.load_s + self.compute_s + self.comm_s + self.bubble_s


def core_stretch(world: int, cores: int) -> float:
    """How much longer compute takes when `world` ranks share `cores` cores, each computing
    at once (1: a core each)."""
    return max(1.0, world / cores)


def _share(layer: LayerProfile, dims: ParallelDims, first: bool, part: str | None) -> int:
    """How many ranks split this layer's work (`part`: its part in tensor parallelism)."""
    if part is not None:
        return 1 if part == "whole" else dims.tp
    if layer.name.startswith("features.") and layer.kind != "linear":
        return dims.spatial
    return dims.vertical if first else 1


def _compute(profile: ModelProfile, dims: ParallelDims, samples: float) -> float:
    first = next((i for i, layer in enumerate(profile.layers) if layer.kind in ("linear", "conv")), 0)
    parts = tp_parts(profile, dims)
    return sum(x.seconds(samples) / _share(x, dims, i == first, parts.get(i)) for i, x in enumerate(profile.layers))


def checkpointed(profile: ModelProfile, cut: list[int] | None = None) -> list[bool]:
    """Which layers activation checkpointing runs again: those of the checkpointed units, cut
    per stack (`features`, `head`) of each pipeline stage (`cut`: each stage's first layer,
    and the end) as parallel/recompute.py cuts a stage's stacks."""
    flags = []
    bounds = cut or [0, len(profile.layers)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        for stack in ("features.", "head."):
            layers = [layer for layer in profile.layers[a:b] if layer.name.startswith(stack)]
            starts = [x.param_bytes > 0 and x.kind != "norm" for x in layers]
            for unit, on in checkpointed_units(starts, [x.kind == "block" for x in layers]):
                flags += [on] * len(unit)
    return flags


def _recompute(profile: ModelProfile, dims: ParallelDims, link: Link, samples: float) -> tuple[float, float]:
    """What checkpointing adds to a pass of `samples`, (compute, communication): the
    checkpointed layers' forward again (`forward_pass`)."""
    return forward_pass(profile, dims, link, samples, checkpointed(profile))


def forward_pass(
    profile: ModelProfile, dims: ParallelDims, link: Link, samples: float, on: list[bool] | None = None
) -> tuple[float, float]:
    """A forward of `samples` through the layers `on` flags (None: all), split as the layout
    splits them, (compute, communication): the forward's communication of those layers (a
    tensor-parallel pair's row layer all-reduces its output, a wide odd last layer gathers it;
    the first layer's partial sums under vertical; the halos a band's convolution takes; a
    norm's sums). What activation checkpointing runs again, and what serving runs."""
    layers = profile.layers
    on = on if on is not None else [True] * len(layers)
    first = next((i for i, layer in enumerate(layers) if layer.kind in ("linear", "conv")), 0)
    parts = tp_parts(profile, dims)
    compute = sum(
        x.forward_seconds(samples) / _share(x, dims, i == first, parts.get(i)) for i, x in enumerate(layers) if on[i]
    )
    comm = 0.0
    for i, part in parts.items():
        if on[i] and part == "row":
            comm += all_reduce(link, dims.tp, layers[i].out_bytes_per_sample * samples)
        elif on[i] and part == "column+gather":
            comm += all_gather(link, dims.tp, layers[i].out_bytes_per_sample * samples)
    if dims.vertical > 1 and on[first]:
        comm += vertical_seconds(link, dims.vertical, layers[first].out_bytes_per_sample * samples)
    again = [x for i, x in enumerate(layers) if on[i]]
    return compute, comm + _band_comm(again, dims, link, samples) / 2  # halos, norms: forward and backward


def _tp_layers(profile: ModelProfile, dims: ParallelDims, samples: float) -> list[tuple[str, float, float, float]]:
    """What `tp_seconds` takes of each head Linear layer tensor parallelism splits: its part,
    the bytes of its input gradient (0 where nothing before it learns: the input needs
    none), of its output, and its weight gradient's seconds (a third of its forward and
    backward, on its slice)."""
    learns = [False]
    for x in profile.layers:
        learns.append(learns[-1] or x.param_bytes > 0)
    out = []
    for i, part in tp_parts(profile, dims).items():
        x = profile.layers[i]
        grad_in = x.in_bytes_per_sample * samples if learns[i] else 0.0
        out.append((part, grad_in, x.out_bytes_per_sample * samples, x.seconds(samples) / (3 * dims.tp)))
    return out


def _split_comm(profile: ModelProfile, dims: ParallelDims, link: Link, samples: float) -> float:
    """The communication of one pass of `samples` samples inside the layers: tensor
    parallelism's all-reduces, vertical partitioning's partial sums, spatial halos and norms."""
    comm = 0.0
    if dims.tp > 1:
        comm += tp_seconds(link, dims.tp, _tp_layers(profile, dims, samples))
    first = next((layer for layer in profile.layers if layer.kind in ("linear", "conv")), None)
    if dims.vertical > 1 and first is not None:
        comm += vertical_seconds(link, dims.vertical, first.out_bytes_per_sample * samples)
    return comm + _band_comm(profile.layers, dims, link, samples)


def _band_comm(layers, dims: ParallelDims, link: Link, samples: float) -> float:
    """A spatial cut's exchanges in `layers`, forward and backward, for `samples` samples."""
    halos = sum(x.halo_bytes_per_sample for x in layers) * samples
    norm_bytes = sum(x.norm_bytes for x in layers)
    windows, norms = sum(x.exchanges for x in layers), sum(x.norms for x in layers)
    return halo_seconds(link, dims.spatial, halos, windows, norm_bytes, norms)


def _update(profile: ModelProfile, dims: ParallelDims, stage: Sequence[int] | None) -> float:
    """The optimizer's step on the parameters a rank updates (its 1/dp slice when sharded)."""
    held = held_params(profile, dims, stage) / (dims.dp if dims.shard in ("optimizer", "full") else 1)
    return profile.update_s_per_byte * held


def _ddp_bucket_bytes(profile: ModelProfile, cap: int | None = None) -> list[float]:
    """The gradient bytes of DDP's buckets over the profile's layers (a layer's parameters
    taken together), in the order DDP launches them (`cap`: parallel.bucket_mb's, the first
    bucket's too; None: DDP's own); the layout scales them."""
    held = [layer for layer in profile.layers if layer.param_bytes]
    caps = {} if cap is None else {"first": cap, "cap": cap}
    return [sum(layer.param_bytes for layer in b) for b in ddp_buckets(held, lambda layer: layer.param_bytes, **caps)]


def _compressor_bytes(settings: CompressionSettings, dims: ParallelDims, grad_bytes: float) -> float:
    """What the compressor holds for a rank averaging `grad_bytes`: in DDP's buckets, or a
    pipeline stage's whole gradient in one."""
    return compressor_bytes(settings, grad_bytes, grad_bytes if dims.pp > 1 else DDP_BUCKET_BYTES, dims.dp)


def _peak(setting: Setting, dims: ParallelDims, stages: list[tuple[Sequence[int] | None, float]]) -> float:
    """The largest rank's peak bytes (`plan/memory.py`), over the pipeline's stages, each
    given with the samples whose activations it keeps for the backward."""
    accumulate = dims.microbatches > 1 or setting.grad_accum > 1
    return max(
        rank_peak(
            setting.profile,
            dims,
            slots=setting.optimizer_slots,
            samples_held=held,
            stage=stage,
            accumulate=accumulate,
            full_grads=setting.grad_accum > 1 and dims.pp == 1,  # FSDP2 keeps them whole until the last
            val_samples=setting.val_samples,
            overhead_bytes=setting.rank_overhead_bytes,
            compressor=functools.partial(_compressor_bytes, setting.compression, dims) if setting.compression else None,
            checkpointing=setting.checkpointing,
        )  # fmt: skip
        for stage, held in stages
    )


def _pipeline(setting: Setting, dims: ParallelDims, micro: float, world: int) -> tuple[float, ...]:
    """(compute, comm, bubble) of a pipeline's step, and its ranks with what each keeps: the
    layers of its stages (pp x virtual of them, placed as the schedule places them) and the
    samples whose activations it keeps at most (its schedule's order played out)."""
    profile, link = setting.profile, setting.link
    # each micro-batch after the first adds its gradients into the step's: on average
    # (M - 1) / M of a pass over the layer's parameters, a micro-batch
    adds = profile.accumulate_s_per_byte * (dims.microbatches - 1) / dims.microbatches
    passes = [layer.seconds(micro) for layer in profile.layers]
    count = dims.pp * dims.virtual
    # cut on the passes' times, as the engine cuts on the layers it profiles
    cut = cut_units(passes, units_of([layer.param_bytes > 0 for layer in profile.layers]), count) + [len(passes)]
    forward = [layer.forward_seconds(micro) for layer in profile.layers]
    backward = [max(0.0, t - f) + adds * x.param_bytes for t, f, x in zip(passes, forward, profile.layers, strict=True)]
    if setting.checkpointing:  # the cut is made before, on the layers' own passes; the forwards run again
        on = checkpointed(profile, cut)
        backward = [b + f * again for b, f, again in zip(backward, forward, on, strict=True)]
    bounds = list(zip(cut, cut[1:], strict=False))
    boundary = [profile.layers[b - 1].out_bytes_per_sample * micro for b in cut[1:-1]]
    step = pipeline_seconds(
        [sum(forward[a:b]) for a, b in bounds], [sum(backward[a:b]) for a, b in bounds], dims.microbatches,
        link, boundary, dims.schedule, ranks_per_stage=world // dims.pp, cores=setting.cores, virtual=dims.virtual,
        action_s=setting.pipeline_action_s(),
    )  # fmt: skip
    placed = stage_ranks(dims.schedule, dims.pp, dims.virtual)
    orders = rank_orders(dims.schedule, dims.pp, dims.virtual, dims.microbatches)
    stages = []
    for r in range(dims.pp):
        mine = [k for k in range(count) if placed[k] == r]
        layers = [i for k in mine for i in range(*bounds[k])]
        outputs = {k: sum(profile.layers[i].out_bytes_per_sample for i in range(*bounds[k])) for k in mine}
        whole = sum(outputs.values()) or 1.0  # a stage's activations in proportion to its layers' outputs
        stages.append((layers, micro * held_peak(orders[r], {k: v / whole for k, v in outputs.items()})))
    stretch = core_stretch(world, setting.cores)  # (the ranks' copies when all of them copy at once)
    averaging = _stages_averaging(setting, dims, [stage for stage, _ in stages], step.ends_s, stretch)
    return step.compute_s, step.comm_s + averaging, step.bubble_s, stages


def _stages_averaging(
    setting: Setting, dims: ParallelDims, stages: list[list[int]], ends: tuple, stretch: float
) -> float:
    """What averaging over dp adds to a pipeline's step (train/pipeline.py): each stage
    averages its own gradients once its last backward ends, in one flat all-reduce (a copy in
    and a copy out; or through the run's compressor), beside no compute; the stage holding
    the most may end after stage 0, which ends the schedule. ZeRO-1 then gathers the
    updated slices of the largest stage."""
    if dims.dp <= 1:
        return 0.0
    profile, link = setting.profile, setting.link
    copy = profile.copy_s_per_byte * stretch
    held = [held_params(profile, dims, stage) for stage in stages]
    if setting.averaging is not None:  # the method's time for the whole model, a stage its share
        whole_s = setting.averaging(dims, stretch)
        took = [whole_s * b / (profile.param_bytes / dims.tp) for b in held]
    else:
        took = [all_reduce(link, dims.dp, b) + 2 * b * copy for b in held]
    extra = max(end + t for end, t in zip(ends, took, strict=True)) - max(ends)
    if dims.shard == "optimizer":
        extra += zero_gather_seconds(link, dims.dp, max(held), copy)
    return extra


def predict(cfg: ParallelConfig, world: int, setting: Setting) -> Prediction:
    """The predicted step of layout `cfg` on `world` ranks."""
    dims = ParallelDims.resolve(cfg, world)
    profile, link = setting.profile, setting.link
    stretch = core_stretch(world, setting.cores)
    samples = setting.batch / dims.dp
    load = setting.load_fixed_s + setting.load_s_per_sample * samples  # every rank loads its share: stretched below
    if dims.servers:
        passes = setting.grad_accum * profile.seconds(samples / setting.grad_accum)
        if setting.checkpointing:  # the workers run their checkpointed forwards again
            passes += setting.grad_accum * _recompute(profile, dims, link, samples / setting.grad_accum)[0]
        # separate servers wait while their workers compute, and the workers while the servers sum
        # and update: each phase shares the cores among its own ranks (colocated: every rank is both)
        on_workers = stretch if dims.colocated else max(1.0, dims.dp / setting.cores)
        on_servers = stretch if dims.colocated else max(1.0, dims.servers / setting.cores)
        load *= on_workers  # the workers load their shares
        compute = passes * on_workers + profile.update_s_per_byte * profile.param_bytes / dims.servers * on_servers
        comm = ps_seconds(
            link,
            dims.servers,
            dims.dp,
            profile.param_bytes,
            profile.copy_s_per_byte * max(on_workers, on_servers),
            push_half=setting.compression is not None and setting.compression.method in HALF,
            colocated=dims.colocated,
        )
        held = profile.param_bytes * (2 + setting.optimizer_slots) / dims.servers
        compute += setting.step_overhead_s
        worker = _peak(setting, dims, [(None, samples / setting.grad_accum)])
        # colocated: a rank holds its worker's whole model and its server's slice at once
        peak = worker + held if dims.colocated else max(held + setting.rank_overhead_bytes, worker)
        return Prediction(dims.layout, compute, comm, 0.0, peak, load)
    bubble = 0.0
    if dims.pp > 1:  # with each stage's averaging over dp
        compute, comm, bubble, stages = _pipeline(setting, dims, samples / dims.microbatches, world)
    else:
        accum = setting.grad_accum  # micro-batches of samples / accum, their gradients summed
        again, again_comm = _recompute(profile, dims, link, samples / accum) if setting.checkpointing else (0, 0)
        overlapped = (_compute(profile, dims, samples / accum) + again) * stretch  # the one backward that syncs
        compute = accum * overlapped
        compute += (accum - 1) * profile.accumulate_s_per_byte * held_params(profile, dims) * stretch
        comm = accum * (_split_comm(profile, dims, link, samples / accum) + again_comm)
        stages = [(None, samples / accum)]
        # compressed: the method's collectives and compute, in place of DDP's all-reduce
        compressed = setting.averaging is not None and dims.dp > 1 and dims.shard != "full"
        comm += sync_seconds(
            link, dims.dp, profile.param_bytes / dims.tp, backward_s=overlapped * 2 / 3, shard=dims.shard,
            copy_s_per_byte=profile.copy_s_per_byte * stretch,
            units=max(1, sum(1 for layer in profile.layers if layer.param_bytes)),
            passes=setting.grad_accum, averaged_s=setting.averaging(dims, stretch) if compressed else None,
            buckets=_ddp_bucket_bytes(profile, dims.bucket_bytes),
        )  # fmt: skip
    if not dims.replicated_gradients:  # the loop's agreement on finite gradients (train/loop.py all_finite)
        comm += small_exchange(link, world)
    banded = sum(layer.param_bytes for layer in profile.layers if layer.name.startswith("features."))
    comm += band_sum_seconds(link, dims.spatial, banded)  # the bands' shares of the features' gradients
    compute += max(_update(profile, dims, stage) for stage, _ in stages) * stretch + setting.step_overhead_s
    return Prediction(dims.layout, compute, comm, bubble, _peak(setting, dims, stages), load * stretch)
