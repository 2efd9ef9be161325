"""The invariant for pipeline parallelism: P stages and M micro-batches under
GPipe or 1F1B end with the same weights as one process (see parity.py)."""

from __future__ import annotations

import pytest
from parity import LR, check_layout, train_summary, with_data

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


# torch's schedules of several stages a rank: interleaved 1F1B, and the zero-bubble ones, whose
# backward is split into the input's gradient and the weights' (run apart, in another order)
MULTI = [("interleaved", 2, 4, "2"), ("interleaved", 2, 2, "3"), ("zero-bubble", 2, 4, "2"), ("zbv", 2, 4, "2")]


@pytest.mark.parametrize("schedule, pp, microbatches, virtual", MULTI)
def test_pipeline_of_several_stages_a_rank(pool, schedule, pp, microbatches, virtual):
    overrides = {
        "model.name": "mlp",
        "model.hidden": "128,64,64,64,32",  # six layers with weights: up to 2 ranks x 3 stages
        "parallel.pp": str(pp),
        "parallel.microbatches": str(microbatches),
        "parallel.schedule": schedule,
        "parallel.virtual_stages": virtual,
    }
    check_layout(pool, overrides, nproc=pp)


def test_zero_bubble_by_data_parallel_with_adamw_and_clipping(pool):
    overrides = {
        "model.name": "mlp",
        "model.hidden": "128,64,64",
        "parallel.pp": "2",
        "parallel.dp": "2",
        "parallel.microbatches": "4",
        "parallel.schedule": "zero-bubble",
        "train.optimizer": "adamw",
        "train.lr": LR["adamw"],
        "train.clip_norm": "0.5",
    }
    check_layout(pool, overrides, nproc=4)


def test_zbv_scores_the_validation_set_as_one_process_does(pool):
    """Under zbv the first and the last stage are on rank 0 and the activations go out to
    rank 1 and back: its evaluation passes them through all four stages, and the validation
    loss and accuracy are one process's (whose weights it has, as above)."""
    base = with_data({"model.name": "mlp", "model.hidden": "128,64,64", "train.steps": "6"})
    layout = {"parallel.pp": "2", "parallel.microbatches": "2", "parallel.schedule": "zbv"}
    one = pool.run(train_summary, base, ranks=[0])[0]
    cut = pool.run(train_summary, {**base, **layout}, ranks=[0, 1])
    for summary in cut:
        assert summary["val_accuracy"] == one["val_accuracy"]
        assert abs(summary["val_loss"] - one["val_loss"]) < 1e-5 * one["val_loss"]
        assert summary["pipeline"]["stages_per_rank"] == 2 and len(summary["pipeline"]["cut"]) == 4
