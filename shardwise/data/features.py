"""Vertical partitioning: which input features each rank of the vertical group owns.

Features are the elements of one sample, flattened channels-first (index
c*H*W + h*W + w). They move between ranks in units: one feature, one channel
(all its pixels) or one image row (across channels). Units are assigned in
contiguous runs of equal count, or balanced by a per-feature cost with the
greedy largest-first rule (Graham, 1969), which is within 4/3 of the best
balance. Every rank computes the same assignment from the config alone.
"""

from __future__ import annotations

import math

import numpy as np

from shardwise.config import DataConfig, ParallelConfig
from shardwise.data.sources import source_shape
from shardwise.errors import ShardwiseError


def feature_units(in_shape: tuple[int, ...], unit: str) -> list[np.ndarray]:
    """The flat feature indices of each unit, in order."""
    flat = np.arange(math.prod(in_shape)).reshape(in_shape)
    if unit == "feature":
        return list(flat.reshape(-1, 1))
    if len(in_shape) != 3:
        raise ShardwiseError("parallel.vertical_unit", f"{unit} needs images (C, H, W), the data has shape {in_shape}")
    if unit == "channel":
        return [flat[c].reshape(-1) for c in range(in_shape[0])]
    return [flat[:, h, :].reshape(-1) for h in range(in_shape[1])]  # row


def split_features(
    in_shape: tuple[int, ...], parts: int, *, unit: str, split: str, cost: list[float] | None = None
) -> list[np.ndarray]:
    """Sorted flat feature indices owned by each of `parts` ranks."""
    units = feature_units(in_shape, unit)
    if len(units) < parts:
        raise ShardwiseError(
            "parallel.vertical", f"{parts} ranks, but samples shaped {in_shape} have only {len(units)} {unit}(s)"
        )
    if split == "contiguous":
        groups = np.array_split(np.arange(len(units)), parts)
    else:
        per_feature = np.ones(math.prod(in_shape)) if not cost else np.asarray(cost, dtype=np.float64)
        if len(per_feature) != math.prod(in_shape):
            raise ShardwiseError(
                "parallel.feature_cost",
                f"has {len(per_feature)} entries, the samples have {math.prod(in_shape)} features (shape {in_shape})",
            )
        unit_cost = np.array([per_feature[u].sum() for u in units])
        load, owned = np.zeros(parts), [[] for _ in range(parts)]
        for u in np.argsort(-unit_cost, kind="stable"):
            k = int(np.argmin(load))  # ties go to the lowest rank: deterministic
            owned[k].append(u)
            load[k] += unit_cost[u]
        groups = [np.array(sorted(o), dtype=np.int64) for o in owned]
        if any(len(g) == 0 for g in groups):
            raise ShardwiseError("parallel.feature_cost", f"leaves a vertical rank without features ({parts} ranks)")
    return [np.sort(np.concatenate([units[u] for u in g])) for g in groups]


def vertical_parts(data: DataConfig, parallel: ParallelConfig) -> list[np.ndarray] | None:
    """The configured split of the input features (None without vertical partitioning)."""
    p = parallel
    if p.vertical == 1:
        return None
    cost = p.feature_cost or None
    return split_features(source_shape(data), p.vertical, unit=p.vertical_unit, split=p.vertical_split, cost=cost)
