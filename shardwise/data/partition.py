"""Horizontal partitioners: which training samples each shard holds.

Each returns `num_parts` sorted index arrays that together hold every sample
exactly once. The split is a pure function of the data and the seed, so every
rank computes the same one without talking to the others.
"""

from __future__ import annotations

import numpy as np

from shardwise.errors import ShardwiseError

PARTITIONS = ("contiguous", "random", "stratified", "kmeans")


def contiguous(n: int, num_parts: int) -> list[np.ndarray]:
    return np.array_split(np.arange(n), num_parts)


def random(n: int, num_parts: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng([seed, 1]).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, num_parts)]


def stratified(labels: np.ndarray, num_parts: int, seed: int) -> list[np.ndarray]:
    """Deal the samples of each class round-robin: every part keeps the label
    proportions of the whole, and part sizes differ by at most one."""
    rng = np.random.default_rng([seed, 2])
    order = np.lexsort((rng.random(len(labels)), labels))  # by label, random within a label
    return [np.sort(order[i::num_parts]) for i in range(num_parts)]


def kmeans(features: np.ndarray, num_parts: int, seed: int) -> list[np.ndarray]:
    """Group samples by feature similarity (Lloyd's k-means on at most 32 principal
    components). Parts are as uneven as the clusters: the balance report shows it."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    flat = features.reshape(len(features), -1)
    if flat.shape[1] > 32:
        flat = PCA(n_components=32, random_state=seed).fit_transform(flat)
    assign = KMeans(n_clusters=num_parts, n_init=4, random_state=seed).fit_predict(flat)
    parts = [np.flatnonzero(assign == k) for k in range(num_parts)]
    empty = [k for k, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ShardwiseError("data.partition", f"kmeans left shard {empty[0]} of {num_parts} empty")
    return parts


def partition(method: str, *, labels: np.ndarray, features: np.ndarray, num_parts: int, seed: int) -> list[np.ndarray]:
    n = len(labels)
    if num_parts > n:
        raise ShardwiseError("data.shards", f"{num_parts} shards for {n} training samples")
    if method == "contiguous":
        return contiguous(n, num_parts)
    if method == "random":
        return random(n, num_parts, seed)
    if method == "stratified":
        return stratified(labels, num_parts, seed)
    if method == "kmeans":
        return kmeans(features, num_parts, seed)
    raise ShardwiseError("data.partition", f"unknown partition {method!r}; known: shuffle, {', '.join(PARTITIONS)}")
