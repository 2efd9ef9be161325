"""A model's measured cost, layer by layer: forward + backward time as a line in the
number of samples (fixed + per_sample x samples, fitted over a few batch sizes), the bytes
of its parameters and of the activation it hands on per sample; the memory a training and
an evaluation pass take per sample (`plan/activations.py`); and the optimizer's update
with the step's other work on gradients, in seconds per parameter byte (memory-bound passes
over parameters, gradients and state); and a copy of the parameters into fresh memory,
per byte (what the sharded layouts and the parameter server pay around their messages).
Measured on this process (one thread, as a rank runs), once per model, shape, dtype,
device, optimizer and thread count, and cached as JSON: profiling is cheap, and the planner
never runs it twice for one model.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from shardwise.files import write_atomic
from shardwise.parallel.pipeline import model_layers, profile_layers
from shardwise.parallel.recompute import is_norm
from shardwise.parallel.tensor import tp_roles

if TYPE_CHECKING:
    from shardwise.topology import ParallelDims

VERSION = 14  # of what a profile measures: a profile of another version is measured again
BATCH_SIZES = (8, 32, 64)  # samples per profiled pass by default: a line through these times


def batch_sizes(batch: int) -> tuple[int, ...]:
    """The profiled passes for a global batch: from an eighth of it to all of it (at most 64),
    the samples a rank or a micro-batch takes, so a large-image model is never timed on
    more samples than it will run (profiling stays as cheap as a few steps)."""
    top = max(2, min(batch, 64))
    return tuple(sorted({max(1, top // 8), max(1, top // 2), top}))


@dataclass(frozen=True)
class LayerProfile:
    name: str  # `features.3`, `head.0`: the model's own name
    kind: str  # linear, conv, norm, block (a module of layers, a residual block) or other
    fixed_s: float  # forward + backward seconds = fixed_s + per_sample_s x samples
    per_sample_s: float
    param_bytes: int
    out_bytes_per_sample: int  # the activation it hands to the next layer, one sample
    in_bytes_per_sample: int = 0  # what it takes in, one sample
    halo_bytes_per_sample: int = 0  # its windows: the input rows a band needs from its neighbours
    norm_bytes: int = 0  # its norms: the per-channel sums a spatial cut adds up over the bands
    forward_fixed_s: float = 0.0  # the forward alone (what activation checkpointing runs again)
    forward_per_sample_s: float = 0.0
    exchanges: int = 0  # a spatial cut: the windows inside it that take rows from a neighbour
    norms: int = 0  # and the norms whose statistics it sums over the bands
    # an evaluation forward's peak while it runs, per sample, the model's input alive (plan/activations.py)
    eval_bytes_per_sample: float = 0.0

    def seconds(self, samples: float) -> float:
        return self.fixed_s + self.per_sample_s * samples

    def forward_seconds(self, samples: float) -> float:
        return self.forward_fixed_s + self.forward_per_sample_s * samples


@dataclass(frozen=True)
class ModelProfile:
    key: dict  # what the measurement depends on: model, shape, dtype, device, threads
    layers: tuple[LayerProfile, ...]
    update_s_per_byte: float = 0.0  # the optimizer's step and the gradients' upkeep, per parameter byte
    copy_s_per_byte: float = 0.0  # a copy of the parameters into fresh memory (a flat buffer), per byte
    train_fixed_bytes: float = 0.0  # a forward + backward's memory beyond weights and gradients: fixed
    train_bytes_per_sample: float = 0.0  # and per sample (0: unmeasured)
    eval_bytes_per_sample: float = 0.0  # an evaluation forward's, under no_grad (plan/activations.py)
    # a forward + backward's per sample with every unit checkpointed (parallel/recompute.py; 0: unmeasured)
    checkpointed_bytes_per_sample: float = 0.0
    accumulate_s_per_byte: float = 0.0  # a micro-batch's gradient added into the step's, per parameter byte
    memory_unmeasured: str = ""  # why the passes' memory could not be measured: such a profile is not kept

    def seconds(self, samples: float) -> float:
        """Forward + backward of the whole model on `samples` samples, one process."""
        return sum(layer.seconds(samples) for layer in self.layers)

    @property
    def param_bytes(self) -> int:
        return sum(layer.param_bytes for layer in self.layers)

    def to_json(self) -> str:
        figures = {k: v for k, v in asdict(self).items() if k not in ("key", "layers")}
        layers = [asdict(layer) for layer in self.layers]
        return json.dumps({"key": self.key, "layers": layers, **figures}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ModelProfile:
        data = json.loads(text)
        layers = tuple(LayerProfile(**layer) for layer in data["layers"])
        figures = {k: v for k, v in data.items() if k not in ("key", "layers")}
        return cls(data["key"], layers, **figures)


def fit_line(samples: list[float], seconds: list[float]) -> tuple[float, float]:
    """Least-squares (fixed, per_sample), neither below zero (a layer never gets faster
    with more samples; noise can tilt a line through a few points that way)."""
    mx, my = sum(samples) / len(samples), sum(seconds) / len(seconds)
    spread = sum((x - mx) ** 2 for x in samples)
    slope = sum((x - mx) * (y - my) for x, y in zip(samples, seconds, strict=True)) / spread if spread else 0.0
    slope = max(slope, 0.0)
    return max(my - slope * mx, 0.0), slope


def loading_fit(dataset, sizes: tuple[int, ...], dtype: torch.dtype, rounds: int = 7) -> tuple[float, float]:
    """T_load: (fixed, per-sample) seconds a rank takes to load a step's samples from the
    data source, as the loop does (`data.loader.RankData.micro_batches`: the step's indices,
    then `take`), the least of `rounds` steps of each size, each after other work has
    filled the CPU's caches, as a step's compute does (the slower ones are the allocator
    growing its heap to the batch, 5-8 times as slow for 16 MiB, for a varying number of
    steps, or the machine's other work); measured on each call, as the data may have
    changed."""
    from shardwise.data.loader import take
    from shardwise.data.sampler import BatchPlan

    times, other_work = [], torch.empty(8 * 2**20)  # 32 MiB: a step's compute evicts the data from the caches
    for size in sizes:
        plan, taken = BatchPlan(num_samples=len(dataset.y_train), global_batch=size, seed=0), []
        for step in range(rounds + 1):
            other_work.fill_(step)
            started = time.perf_counter()
            take(dataset, plan.local_indices(step, 0, 1), torch.device("cpu"), dtype)
            taken.append(time.perf_counter() - started)
        times.append(min(taken[1:]))
    return fit_line(list(sizes), times)


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if is_norm(module):
        return "norm"
    return "block" if any(True for _ in module.children()) else "other"  # a block: layers of its own


WINDOWS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
NORMS = (nn.GroupNorm, nn.BatchNorm2d)


def band_exchanges(model: nn.Module, sample: torch.Tensor) -> dict[str, tuple[int, int, int, int]]:
    """Per layer of the `features` stack, what a spatial cut exchanges inside it, counted over
    every window and norm it holds (a residual block's too), from one forward of `sample`:
    (halo bytes a sample, windows that take rows from a neighbour, norm bytes, norms). A
    window takes kernel - 1 rows (a pooling window kernel - stride: none for 2 x 2 by 2); a
    norm sums two numbers a channel. A centred convolution takes its rows while it
    computes (`parallel/spatial_conv.py`) and still counts as a wait: on small maps
    (128 x 128) its band's convolution is too short to cover the exchange."""
    found: dict[str, list[int]] = {}
    hooks = []

    def seen(name: str):
        def hook(module: nn.Module, args, _out) -> None:
            counts, (c, w) = found.setdefault(name, [0, 0, 0, 0]), (args[0].shape[1], args[0].shape[-1])
            if isinstance(module, NORMS):
                counts[2] += 2 * c * 8
                counts[3] += 1
                return
            kernel, stride = (v if isinstance(v, int) else v[0] for v in (module.kernel_size, module.stride or 1))
            rows = kernel - 1 if isinstance(module, nn.Conv2d) else max(0, kernel - stride)
            if rows > 0:
                counts[0] += rows * c * w * args[0].element_size()
                counts[1] += 1

        return hook

    for name, layer in model_layers(model):
        if name.startswith("features."):
            hooks += [m.register_forward_hook(seen(name)) for m in layer.modules() if isinstance(m, WINDOWS + NORMS)]
    was_training = model.training
    model.eval()  # one sample: a batch norm would refuse to train on it
    try:
        with torch.no_grad():
            model(sample.unsqueeze(0))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return {name: tuple(counts) for name, counts in found.items()}


def update_seconds(model: nn.Module, optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer]) -> float:
    """Seconds of what a training step does once per parameter besides the forward and
    backward (whose layer times include making the gradients anew), on a copy of
    `model`'s parameters: the one-pass check that every gradient is finite, and a step of
    the optimizer `optimizer(params)` builds. The median of five, after two that allocate
    its state."""
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    opt, times, found, one = optimizer(params), [], torch.zeros(()), torch.ones(())
    for p in params:
        p.grad = torch.empty_like(p).fill_(1e-3)
    for i in range(7):
        started = time.perf_counter()
        torch._amp_foreach_non_finite_check_and_unscale_([p.grad for p in params], found, one)
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def accumulate_seconds(model: nn.Module) -> float:
    """Seconds to add a fresh gradient into every parameter's kept one, as each micro-batch
    after a step's first does (the median of five)."""
    kept = [torch.zeros_like(p) for p in model.parameters()]
    fresh = [torch.ones_like(p) for p in model.parameters()]
    times = []
    for _ in range(5):
        started = time.perf_counter()
        torch._foreach_add_(kept, fresh)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def copy_seconds(model: nn.Module) -> float:
    """Seconds to copy `model`'s parameters into one fresh flat buffer, as the sharded
    layouts and the parameter server do around their collectives (the median of five)."""
    params, times = [p.detach().reshape(-1) for p in model.parameters()], []
    for _ in range(5):
        started = time.perf_counter()
        flat = torch.cat(params)
        times.append(time.perf_counter() - started)
        del flat
    return statistics.median(times)


def profile_model(
    model: nn.Module,
    sample: torch.Tensor,
    key: dict,
    *,
    repeats: int = 5,
    sizes: tuple[int, ...] = BATCH_SIZES,
    optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
    passes: Callable[[], dict[str, float]] | None = None,
) -> ModelProfile:
    """Time every layer of `model` (a `features` then a `head` nn.Sequential) on batches of
    `sizes` copies of `sample` (one sample, without the batch dimension), a step of
    `optimizer` (built over a list of parameters) where one is given, and the training
    and evaluation passes' bytes per sample that `passes` measures (`plan/activations.py`)."""
    runs = [profile_layers(model, sample.expand(n, *sample.shape).contiguous(), repeats) for n in sizes]
    found = passes() if passes is not None else {}
    evaluated = found.get("eval_layers", {})
    modules = dict(model_layers(model))
    exchanges = band_exchanges(model, sample) if len(sample.shape) == 3 else {}
    layers, in_shape, size = [], tuple(sample.shape), sample.element_size()
    for i, cost in enumerate(runs[0]):
        fixed, per_sample = fit_line(list(sizes), [run[i].time_s for run in runs])
        forward = fit_line(list(sizes), [run[i].forward_s for run in runs])
        halo, windows, norm, norms = exchanges.get(cost.name, (0, 0, 0, 0))
        layers.append(
            LayerProfile(
                cost.name, _kind(modules[cost.name]), fixed, per_sample, cost.param_bytes,
                cost.activation_bytes // sizes[0], math.prod(in_shape) * size, halo, norm, *forward, windows, norms,
                evaluated.get(cost.name, 0.0),
            )
        )  # fmt: skip
        in_shape = tuple(cost.out_shape[1:])
    param_bytes = sum(layer.param_bytes for layer in layers)
    update = update_seconds(model, optimizer) / param_bytes if optimizer is not None and param_bytes else 0.0
    copy = copy_seconds(model) / param_bytes if param_bytes else 0.0
    accumulate = accumulate_seconds(model) / param_bytes if param_bytes else 0.0
    memory = (found.get("train_fixed", 0.0), found.get("train", 0.0), found.get("eval", 0.0))
    checkpointed = found.get("checkpointed", 0.0)
    return ModelProfile(key, tuple(layers), update, copy, *memory, checkpointed, accumulate, found.get("failed", ""))


def profile_key(
    model_cfg: dict,
    in_shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    sizes: tuple[int, ...] = BATCH_SIZES,
    optimizer: dict | None = None,
) -> dict:
    """What a profile depends on: the model's settings, the sample shape, the precision, the
    device, the threads a rank computes with, the batch sizes timed and the optimizer."""
    return {
        "version": VERSION,
        "sizes": list(sizes),
        "optimizer": optimizer,
        "model": model_cfg,
        "shape": list(in_shape),
        "dtype": str(dtype),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def cached(folder: Path, key: dict, measure: Callable[[], ModelProfile]) -> ModelProfile:
    """The profile for `key` from `folder` (a JSON file named by the key's hash), measured
    and written there the first time (not where a part could not be measured: it is
    measured again, and the failure shown, each time)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = folder / f"profile-{digest}.json"
    if path.is_file():
        found = ModelProfile.from_json(path.read_text())
        if found.key == key:
            return found
    profile = measure()
    if profile.memory_unmeasured:
        print(f"shardwise: {profile.memory_unmeasured}; memory counted from the layers' outputs", file=sys.stderr)
        return profile
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(path, profile.to_json())
    return profile


def tp_parts(profile: ModelProfile, dims: ParallelDims) -> dict[int, str]:
    """The head's Linear layers tensor parallelism takes, by index, each with its part
    (`parallel/tensor.py` `tp_roles`: column, row, column+gather or whole); none when
    tp = 1. The model's first layer stays with vertical partitioning when that splits it."""
    if dims.tp <= 1:
        return {}
    elem = getattr(torch, str(profile.key.get("dtype", "torch.float32")).removeprefix("torch.")).itemsize
    first = next((i for i, x in enumerate(profile.layers) if x.kind in ("linear", "conv")), -1)
    idx = [
        i
        for i, x in enumerate(profile.layers)
        if x.name.startswith("head.") and x.kind == "linear" and not (dims.vertical > 1 and i == first)
    ]
    layers = [profile.layers[i] for i in idx]
    roles = tp_roles([(x.in_bytes_per_sample // elem, x.out_bytes_per_sample // elem) for x in layers])
    return dict(zip(idx, roles, strict=True))
