import numpy as np
import pytest
from sklearn.datasets import make_blobs

from shardwise.data.partition import partition
from shardwise.data.report import balance_report

METHODS = ["contiguous", "random", "stratified", "kmeans"]


def _data(n=503, classes=7, seed=0):
    x, y = make_blobs(n_samples=n, centers=classes, n_features=6, random_state=seed)
    return x.astype(np.float32), y.astype(np.int64)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_every_sample_exactly_once(method, parts):
    x, y = _data()
    shards = partition(method, labels=y, features=x, num_parts=parts, seed=3)
    assert len(shards) == parts
    together = np.concatenate(shards)
    assert len(together) == len(y)
    assert np.array_equal(np.sort(together), np.arange(len(y)))


@pytest.mark.parametrize("method", ["contiguous", "random", "stratified"])
def test_sizes_even(method):
    x, y = _data()
    sizes = [len(s) for s in partition(method, labels=y, features=x, num_parts=4, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_stratified_keeps_label_proportions():
    x, y = _data(n=1000, classes=5)
    whole = np.bincount(y) / len(y)
    for shard in partition("stratified", labels=y, features=x, num_parts=4, seed=1):
        share = np.bincount(y[shard], minlength=5) / len(shard)
        assert np.abs(share - whole).max() < 0.01


def test_random_is_seeded():
    x, y = _data()
    a = partition("random", labels=y, features=x, num_parts=3, seed=5)
    b = partition("random", labels=y, features=x, num_parts=3, seed=5)
    c = partition("random", labels=y, features=x, num_parts=3, seed=6)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_kmeans_deterministic_and_groups_by_features():
    x, y = _data(n=600, classes=3, seed=2)  # three well separated blobs
    a = partition("kmeans", labels=y, features=x, num_parts=3, seed=7)
    b = partition("kmeans", labels=y, features=x, num_parts=3, seed=7)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    for shard in a:  # each cluster is one blob: a single label
        assert len(np.unique(y[shard])) == 1
    report = balance_report(a, y, 3)
    assert report["max_label_skew"] > 0.6  # and the report shows the skew


def test_balance_report_numbers():
    y = np.array([0, 0, 1, 1, 1, 1])
    report = balance_report([np.array([0, 1]), np.array([2, 3, 4, 5])], y, 2)
    assert [r["samples"] for r in report["ranks"]] == [2, 4]
    assert report["size_imbalance"] == pytest.approx(4 / 3)
    assert report["ranks"][0]["label_skew"] == pytest.approx(2 / 3)  # all 0s vs 1/3 zeros
    assert report["ranks"][1]["top_share"] == 1.0
