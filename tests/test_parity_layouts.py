"""The invariant for tensor parallelism, vertical partitioning and sharding, alone
and composed on a 2-D layout: the same weights as one process (see parity.py)."""

from __future__ import annotations

import pytest
from parity import LR, check_layout, dataset

OPTIMIZERS = ["sgd", "adamw"]


def _opt(optimizer: str) -> dict[str, str]:
    return {"train.optimizer": optimizer, "train.lr": LR[optimizer]}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_tensor_parallel_mlp(pool, optimizer):
    check_layout(pool, {"model.name": "mlp", "parallel.tp": "2", **_opt(optimizer)}, nproc=2)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_tensor_parallel_by_data_parallel(pool, optimizer):
    overrides = {"model.name": "mlp", "parallel.tp": "2", "parallel.dp": "2", **_opt(optimizer)}
    check_layout(pool, overrides, nproc=4)


def test_tensor_parallel_uneven_widths_and_clipping(pool):
    """Widths 31, 7 and 82 classes over 3 and 4 ranks: every split is uneven, and the last
    layer (too wide to compute whole) is split and gathered; clipping needs the norm of
    the whole gradient, pieces counted once."""
    overrides = {"model.name": "mlp", "model.hidden": "31,7", "train.clip_norm": "0.5"}
    overrides |= {"data.name": "npz", "data.path": dataset("classes82")}
    check_layout(pool, {**overrides, "parallel.tp": "3"}, nproc=3)
    check_layout(pool, {**overrides, "parallel.tp": "4"}, nproc=4)


def test_tensor_parallel_convnet_head(pool):
    """The conv stack runs whole on each rank; its input gradient comes back summed from the split head."""
    check_layout(pool, {"model.name": "convnet", "model.channels": "8,16", "parallel.tp": "2"}, nproc=2)


@pytest.mark.parametrize("vertical", [2, 3])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_vertical_mlp(pool, vertical, optimizer):
    check_layout(pool, {"model.name": "mlp", "parallel.vertical": str(vertical), **_opt(optimizer)}, nproc=vertical)


def test_vertical_rows_balanced_by_cost(pool):
    """Image rows as units, assigned by a per-feature cost (row r costs r + 1 per pixel)."""
    cost = ",".join(str(1 + i // 8) for i in range(64))
    overrides = {
        "model.name": "mlp",
        "parallel.vertical": "3",
        "parallel.vertical_unit": "row",
        "parallel.vertical_split": "balanced",
        "parallel.feature_cost": cost,
    }
    check_layout(pool, overrides, nproc=3)


def test_vertical_channels_convnet(pool):
    """Three-channel images, one channel per rank, into a convolutional first layer."""
    overrides = {
        "model.name": "convnet",
        "model.channels": "8,8",
        "data.name": "npz",
        "data.path": dataset("images3"),
        "parallel.vertical": "3",
        "parallel.vertical_unit": "channel",
    }
    check_layout(pool, overrides, nproc=3)


@pytest.mark.parametrize("shard", ["optimizer", "full"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_sharded(pool, shard, optimizer):
    check_layout(pool, {"model.name": "mlp", "parallel.shard": shard, **_opt(optimizer)}, nproc=2)


def test_fully_sharded_convnet_with_accumulation_and_clipping(pool):
    overrides = {
        "model.name": "convnet",
        "model.channels": "8,16",
        "parallel.shard": "full",
        "train.grad_accum": "2",
        "train.clip_norm": "0.5",
    }
    check_layout(pool, overrides, nproc=2)


def test_everything_composed(pool):
    """vertical 2 x tp 2 on the MLP, and tp 2 x fully sharded dp 2."""
    check_layout(pool, {"model.name": "mlp", "parallel.vertical": "2", "parallel.tp": "2"}, nproc=4)
    check_layout(pool, {"model.name": "mlp", "parallel.tp": "2", "parallel.dp": "2", "parallel.shard": "full"}, nproc=4)
