import numpy as np
import pytest

from shardwise.data.partition import partition
from shardwise.data.sampler import BatchPlan, check_batch_layout
from shardwise.errors import ShardwiseError


def test_shuffle_global_batch_does_not_depend_on_dp():
    plan = BatchPlan(num_samples=100, global_batch=12, seed=1)
    for step in range(20):
        whole = plan.global_batch_indices(step)
        for dp in (1, 2, 3, 4):
            got = np.concatenate([plan.local_indices(step, r, dp) for r in range(dp)])
            assert np.array_equal(got, whole)


def test_shuffle_epoch_has_no_repeats_and_epochs_differ():
    plan = BatchPlan(num_samples=100, global_batch=12, seed=1)
    epoch0 = np.concatenate([plan.global_batch_indices(s) for s in range(8)])
    epoch1 = np.concatenate([plan.global_batch_indices(s) for s in range(8, 16)])
    assert len(np.unique(epoch0)) == 96 and len(np.unique(epoch1)) == 96
    assert set(range(100)) - set(epoch0) != set(range(100)) - set(epoch1)


def test_fixed_shards_same_batches_for_any_dp_dividing_shards():
    y = np.arange(90) % 3
    shards = partition("kmeans", labels=y, features=np.random.default_rng(0).normal(size=(90, 4)), num_parts=6, seed=0)
    plan = BatchPlan(num_samples=90, global_batch=24, seed=4, shards=shards)
    for step in range(30):  # many passes over the small shards
        whole = plan.global_batch_indices(step)
        for dp in (1, 2, 3, 6):
            got = np.concatenate([plan.local_indices(step, r, dp) for r in range(dp)])
            assert np.array_equal(got, whole)


def test_uneven_shards_never_run_short_and_stay_in_their_shard():
    shards = [np.arange(0, 3), np.arange(3, 50)]  # 3 samples vs 47
    plan = BatchPlan(num_samples=50, global_batch=8, seed=0, shards=shards)
    for step in range(40):
        small, large = plan.local_indices(step, 0, 2), plan.local_indices(step, 1, 2)
        assert len(small) == 4 and len(large) == 4
        assert set(small) <= set(shards[0]) and set(large) <= set(shards[1])
    # each pass over a shard visits every sample once
    stream = np.concatenate([plan.local_indices(s, 1, 2) for s in range(47)])  # 4 passes of 47
    for p in range(4):
        assert np.array_equal(np.sort(stream[47 * p : 47 * (p + 1)]), shards[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"global_batch": 10, "grad_accum": 1, "dp": 3, "shards": None}, "train.batch_size: 10 is not divisible by"),
        ({"global_batch": 12, "grad_accum": 4, "dp": 2, "shards": None}, "parallel.dp=2 x train.grad_accum=4"),
        ({"global_batch": 12, "grad_accum": 1, "dp": 2, "shards": 3}, "data.shards: 3 is not divisible by"),
        ({"global_batch": 12, "grad_accum": 1, "dp": 2, "shards": 8}, "not divisible by data.shards=8"),
    ],
)
def test_batch_layout_refused_with_numbers(kwargs, message):
    with pytest.raises(ShardwiseError, match=message.replace(".", r"\.")):
        check_batch_layout(**kwargs)


def test_batch_larger_than_data():
    with pytest.raises(ShardwiseError, match="train.batch_size: 200 is larger than the 100 training samples"):
        BatchPlan(num_samples=100, global_batch=200, seed=0)
