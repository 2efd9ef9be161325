"""Each rank's peak memory under a layout: what it holds for the whole run, and the largest
of the passing buffers its strategies allocate on top.

Held: the parameters of the layers it holds (a pipeline stage's own layers; the head's
Linear layers divided by tp; the first layer by vertical), their gradients and the
optimizer's state (`optimizer_slots` tensors of a parameter's size), divided by dp where
the layout shards them (ZeRO-1: the state; FSDP2: all three, but the gradients whole when
it accumulates micro-batches, as it sums them unsharded until the last); what the model's first
pass sets up once and keeps (the autograd engine, the kernels' primitives: measured,
`plan/activations.py`); the engine's own bytes per rank, measured with a tiny model
(`plan/overhead.py`); and, where gradients are averaged through a compressor, its
residuals and buffers (`comm/compress.py` `compressor_bytes`).

Passing, the largest of:
- the backward: the activations kept for it and what it allocates as it runs, for the
  samples in flight (a pipeline keeps P micro-batches under 1F1B, all M under GPipe):
  measured per sample on the whole model (`plan/activations.py`; with every unit
  checkpointed where the run checkpoints its activations), a stage's share in
  proportion to its layers' outputs; counted as every layer's output where it could not
  be measured; plus, where
  gradients accumulate over micro-batches, the largest parameter's fresh gradient before it
  joins the sum, plus, under DDP, a second copy of the gradients once (DDP rebuilds its
  buckets, in the order the first backward produced them, while the old ones still hold
  the gradients);
- ZeRO-1's step: this rank's slice joined (1/dp), the gathered parameters (1) and the
  collective's own copy of them (1), as `sync_seconds` counts their copy passes;
- FSDP2's backward: the largest unit regathered (its all-gather buffer and the unsharded
  parameters, 2), its unsharded gradient and the reduce-scatter's input (2), and the next
  unit prefetched (2), on top of the activations;
- the evaluation at the end of the run (the gradients still held): one validation batch,
  at the largest of the measured peaks of the rank's layers, per sample (`evaluated`;
  counted: its input and two layer outputs at a time, as no autograd keeps the rest).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from shardwise.data.loader import largest_val_batch
from shardwise.plan.profile import LayerProfile, ModelProfile, tp_parts
from shardwise.topology import ParallelDims

# a layout fits a budget when its predicted peak and this share more do: the allocator's
# blocks and what the model leaves out (`shardwise bench planner`'s 4-rank run measured
# peaks up to 4.7% over the predicted)
HEADROOM = 0.10


def fits(peak_bytes: float, budget: float | None) -> bool:
    """Whether a rank predicted to peak at `peak_bytes` fits `budget` (None: no budget), headroom kept."""
    return budget is None or peak_bytes * (1 + HEADROOM) <= budget


def _first(layers: tuple[LayerProfile, ...]) -> int:
    return next((i for i, x in enumerate(layers) if x.kind in ("linear", "conv")), 0)


def _held(layer: LayerProfile, dims: ParallelDims, first: bool, part: str | None) -> float:
    """The bytes of `layer`'s parameters a rank holds (`part`: its part in tensor parallelism)."""
    if part is not None and part != "whole":
        return layer.param_bytes / dims.tp
    return layer.param_bytes / dims.vertical if first else float(layer.param_bytes)


def held_params(profile: ModelProfile, dims: ParallelDims, stage: Sequence[int] | None = None) -> float:
    """The parameter bytes a rank holds, before any sharding of data-parallel replicas (of
    the layers in `stage`, a pipeline's)."""
    first, parts = _first(profile.layers), tp_parts(profile, dims)
    idx = stage if stage is not None else range(len(profile.layers))
    return sum(_held(profile.layers[i], dims, i == first, parts.get(i)) for i in idx)


def output_share(profile: ModelProfile, idx: Sequence[int]) -> float:
    """The layers `idx`'s share of the whole model's layer outputs, a sample."""
    counted = sum(profile.layers[i].out_bytes_per_sample for i in idx)
    return counted / max(1, sum(layer.out_bytes_per_sample for layer in profile.layers))


def evaluated(profile: ModelProfile, idx: Sequence[int], spread: int) -> float:
    """The bytes per sample of a rank's evaluation forward over the layers `idx`, each of
    `spread` bands: the largest of its layers' measured peaks (the model's input alive: a
    stage holds its own input instead), a band's share, plus where a layer takes rows from
    a neighbour the window it assembles (the band with its halo, a copy of its input); where
    unmeasured, the whole model's measured peak in proportion to the layers' outputs, else
    the stage's input and its two largest outputs."""
    layers = [profile.layers[i] for i in idx]
    if not layers:
        return 0.0
    if all(layer.eval_bytes_per_sample for layer in layers):
        held = layers[0].in_bytes_per_sample - profile.layers[0].in_bytes_per_sample
        return held / spread + max(
            (layer.eval_bytes_per_sample + (layer.in_bytes_per_sample if spread > 1 and layer.exchanges else 0))
            / spread
            for layer in layers
        )
    share = output_share(profile, idx)
    outputs = sorted((layer.out_bytes_per_sample for layer in layers), reverse=True) + [0, 0]
    return (profile.eval_bytes_per_sample * share or layers[0].in_bytes_per_sample + outputs[0] + outputs[1]) / spread


def rank_peak(
    profile: ModelProfile,
    dims: ParallelDims,
    *,
    slots: int,
    samples_held: float,
    stage: Sequence[int] | None = None,
    accumulate: bool = False,
    full_grads: bool = False,
    val_samples: int = 0,
    overhead_bytes: float = 0.0,
    compressor: Callable[[float], float] | None = None,
    checkpointing: bool = False,
) -> float:
    """The peak bytes of a rank holding the layers in `stage` (all, outside a pipeline)
    with `samples_held` samples' activations kept for the backward."""
    idx = stage if stage is not None else range(len(profile.layers))
    first, parts = _first(profile.layers), tp_parts(profile, dims)
    units = sorted((_held(profile.layers[i], dims, i == first, parts.get(i)) for i in idx), reverse=True) + [0.0, 0.0]
    params = held_params(profile, dims, stage)
    grads, state = params, slots * params
    if dims.shard == "full":  # sharded, but accumulated gradients whole until the last micro-batch
        params, grads, state = params / dims.dp, grads / (1 if full_grads else dims.dp), state / dims.dp
    elif dims.shard == "optimizer":
        state /= dims.dp
    spread = dims.spatial
    counted = sum(profile.layers[i].out_bytes_per_sample for i in idx)  # this rank's layers' outputs
    share = output_share(profile, idx)
    measured = profile.train_bytes_per_sample
    if checkpointing and profile.checkpointed_bytes_per_sample:  # else: the unchecked figure, an upper bound
        measured = profile.checkpointed_bytes_per_sample
    per_sample = measured * share if measured else counted
    activations = per_sample * samples_held / spread
    backward = activations + (units[0] if accumulate else 0.0)
    if dims.dp > 1 and dims.shard in ("none", "optimizer"):
        backward += grads  # DDP's bucket rebuild
    passing = [backward]
    if dims.dp > 1 and dims.shard == "optimizer":
        passing.append((2 + 1 / dims.dp) * params)
    if dims.dp > 1 and dims.shard == "full":
        passing.append(activations + 4 * units[0] + 2 * units[1])
    if val_samples:
        passing.append(largest_val_batch(val_samples, dims.dp) * evaluated(profile, idx, spread))
    # the gradient compressor's residuals and buffers, by the gradient bytes it averages
    kept = compressor(grads) if compressor is not None and dims.dp > 1 and dims.shard != "full" else 0.0
    # what the first pass sets up once stays (the autograd engine, the kernels' primitives)
    return params + grads + state + kept + profile.train_fixed_bytes + max(passing) + overhead_bytes
