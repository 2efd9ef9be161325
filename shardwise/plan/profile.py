"""A model's measured cost, layer by layer: forward + backward time as a line in the
number of samples (fixed + per_sample x samples, fitted over a few batch sizes), the bytes
of its parameters and of the activation it hands on per sample. Measured on this process
(one thread, as a rank runs), once per model, shape, dtype, device and thread count, and
cached as JSON: profiling is cheap, and the planner never runs it twice for one model.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from shardwise.files import write_atomic
from shardwise.parallel.pipeline import profile_layers

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
    kind: str  # linear, conv or other
    fixed_s: float  # forward + backward seconds = fixed_s + per_sample_s x samples
    per_sample_s: float
    param_bytes: int
    out_bytes_per_sample: int  # the activation it hands to the next layer, one sample
    in_bytes_per_sample: int = 0  # what it takes in, one sample
    halo_bytes_per_sample: int = 0  # a convolution: the (kernel - 1) input rows a band needs from its neighbours
    norm_bytes: int = 0  # a group norm: the per-channel sums a spatial cut all-reduces

    def seconds(self, samples: float) -> float:
        return self.fixed_s + self.per_sample_s * samples


@dataclass(frozen=True)
class ModelProfile:
    key: dict  # what the measurement depends on: model, shape, dtype, device, threads
    layers: tuple[LayerProfile, ...]

    def seconds(self, samples: float) -> float:
        """Forward + backward of the whole model on `samples` samples, one process."""
        return sum(layer.seconds(samples) for layer in self.layers)

    @property
    def param_bytes(self) -> int:
        return sum(layer.param_bytes for layer in self.layers)

    def to_json(self) -> str:
        return json.dumps({"key": self.key, "layers": [asdict(layer) for layer in self.layers]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ModelProfile:
        data = json.loads(text)
        return cls(data["key"], tuple(LayerProfile(**layer) for layer in data["layers"]))


def fit_line(samples: list[float], seconds: list[float]) -> tuple[float, float]:
    """Least-squares (fixed, per_sample), neither below zero (a layer never gets faster
    with more samples; noise can tilt a line through a few points that way)."""
    mx, my = sum(samples) / len(samples), sum(seconds) / len(seconds)
    spread = sum((x - mx) ** 2 for x in samples)
    slope = sum((x - mx) * (y - my) for x, y in zip(samples, seconds, strict=True)) / spread if spread else 0.0
    slope = max(slope, 0.0)
    return max(my - slope * mx, 0.0), slope


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    return "other"


def profile_model(
    model: nn.Module, sample: torch.Tensor, key: dict, *, repeats: int = 5, sizes: tuple[int, ...] = BATCH_SIZES
) -> ModelProfile:
    """Time every layer of `model` (a `features` then a `head` nn.Sequential) on batches of
    `sizes` copies of `sample` (one sample, without the batch dimension)."""
    from shardwise.parallel.pipeline import model_layers

    runs = [profile_layers(model, sample.expand(n, *sample.shape).contiguous(), repeats) for n in sizes]
    modules = dict(model_layers(model))
    layers, in_shape, size = [], tuple(sample.shape), sample.element_size()
    for i, cost in enumerate(runs[0]):
        fixed, per_sample = fit_line(list(sizes), [run[i].time_s for run in runs])
        module = modules[cost.name]
        halo = norm = 0
        if isinstance(module, nn.Conv2d) and len(in_shape) == 3:
            halo = (module.kernel_size[0] - 1) * in_shape[0] * in_shape[2] * size
        if isinstance(module, nn.GroupNorm):
            norm = 2 * module.num_channels * 8  # sum and sum of squares per channel, float64
        layers.append(
            LayerProfile(
                cost.name, _kind(module), fixed, per_sample, cost.param_bytes,
                cost.activation_bytes // sizes[0], math.prod(in_shape) * size, halo, norm,
            )
        )  # fmt: skip
        in_shape = tuple(cost.out_shape[1:])
    return ModelProfile(key, tuple(layers))


def profile_key(
    model_cfg: dict,
    in_shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    sizes: tuple[int, ...] = BATCH_SIZES,
) -> dict:
    """What a profile depends on: the model's settings, the sample shape, the precision, the
    device, the threads a rank computes with and the batch sizes timed."""
    return {
        "sizes": list(sizes),
        "model": model_cfg,
        "shape": list(in_shape),
        "dtype": str(dtype),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def cached(folder: Path, key: dict, measure: Callable[[], ModelProfile]) -> ModelProfile:
    """The profile for `key` from `folder` (a JSON file named by the key's hash), measured
    and written there the first time."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = folder / f"profile-{digest}.json"
    if path.is_file():
        found = ModelProfile.from_json(path.read_text())
        if found.key == key:
            return found
    profile = measure()
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(path, profile.to_json())
    return profile
