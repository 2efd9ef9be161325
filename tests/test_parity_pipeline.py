"""The invariant for pipeline parallelism: P stages and M micro-batches under
GPipe or 1F1B end with the same weights as one process (see parity.py)."""

from __future__ import annotations

import pytest
from parity import LR, check_layout

GRID = [(p, m, s) for p in (2, 3) for m in (1, 4, 8) for s in ("gpipe", "1f1b") if not (s == "1f1b" and m < p)]


@pytest.mark.parametrize("pp, microbatches, schedule", GRID)
def test_pipeline_mlp(pool, pp, microbatches, schedule):
    overrides = {
        "model.name": "mlp",
        "parallel.pp": str(pp),
        "parallel.microbatches": str(microbatches),
        "parallel.schedule": schedule,
    }
    check_layout(pool, overrides, nproc=pp)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_by_data_parallel(pool, optimizer, schedule):
    overrides = {
        "model.name": "mlp",
        "parallel.pp": "2",
        "parallel.dp": "2",
        "parallel.microbatches": "4",
        "parallel.schedule": schedule,
        "train.optimizer": optimizer,
        "train.lr": LR[optimizer],
        "train.clip_norm": "0.5",
    }
    check_layout(pool, overrides, nproc=4)


def test_pipeline_convnet_with_sharded_optimizer(pool):
    overrides = {
        "model.name": "convnet",
        "model.channels": "8,16",
        "parallel.pp": "2",
        "parallel.dp": "2",
        "parallel.shard": "optimizer",
        "parallel.microbatches": "2",
    }
    check_layout(pool, overrides, nproc=4)
