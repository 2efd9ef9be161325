"""Which samples make each step's global batch: a pure function of the step.

Two regimes, both deterministic for a seed and both free of deadlock (every
rank always has exactly its share of every step, so all ranks run the same
number of steps):

* `shuffle`: each epoch draws a new permutation of the whole training set;
  step t takes the t-th block of `global_batch` samples and rank r takes the
  r-th slice of it (the DistributedSampler contract). The global batch does not
  depend on the data-parallel degree, so any layout matches one process. The
  last `n mod global_batch` samples of each permutation are left out of that
  epoch; the next permutation is different, so no sample is left out for good.
* fixed shards (`contiguous`, `random`, `stratified`, `kmeans`): the training
  set is split once into S shards; every step takes `global_batch / S` samples
  from each shard, walking a fresh seeded permutation of the shard on each
  pass. Shards of different sizes are therefore revisited at different rates:
  a small shard starts its next pass sooner, nothing is dropped and no rank
  waits. Rank r owns the r-th run of S/dp shards, so its slice of the global
  batch is contiguous; the same S gives the same global batches for any dp
  that divides S, one process included.
"""

from __future__ import annotations

import numpy as np

from shardwise.errors import ShardwiseError


class BatchPlan:
    def __init__(self, *, num_samples: int, global_batch: int, seed: int, shards: list[np.ndarray] | None = None):
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.seed = seed
        self.shards = shards
        if shards is None:
            if global_batch > num_samples:
                raise ShardwiseError(
                    "train.batch_size", f"{global_batch} is larger than the {num_samples} training samples"
                )
            self.steps_per_epoch = num_samples // global_batch
        elif global_batch % len(shards):
            raise ShardwiseError(
                "train.batch_size", f"{global_batch} is not divisible by the {len(shards)} data shards (data.shards)"
            )
        self._perm_cache: dict[tuple[int, ...], np.ndarray] = {}

    def _perm(self, key: tuple[int, ...], n: int) -> np.ndarray:
        if key not in self._perm_cache:
            if len(self._perm_cache) > 64:
                self._perm_cache.clear()
            self._perm_cache[key] = np.random.default_rng([self.seed, *key]).permutation(n)
        return self._perm_cache[key]

    def _from_shard(self, k: int, step: int) -> np.ndarray:
        shard = self.shards[k]
        per_step = self.global_batch // len(self.shards)
        out, pos, end = [], step * per_step, (step + 1) * per_step
        while pos < end:
            passno, offset = divmod(pos, len(shard))
            take = min(end - pos, len(shard) - offset)
            out.append(shard[self._perm((k, passno), len(shard))[offset : offset + take]])
            pos += take
        return np.concatenate(out)

    def global_batch_indices(self, step: int) -> np.ndarray:
        if self.shards is None:
            epoch, pos = divmod(step, self.steps_per_epoch)
            return self._perm((epoch,), self.num_samples)[pos * self.global_batch : (pos + 1) * self.global_batch]
        return np.concatenate([self._from_shard(k, step) for k in range(len(self.shards))])

    def local_indices(self, step: int, dp_rank: int, dp: int) -> np.ndarray:
        """This rank's slice of the step's global batch (only its own shards are read)."""
        b = self.global_batch // dp
        if self.shards is None:
            return self.global_batch_indices(step)[dp_rank * b : (dp_rank + 1) * b]
        per_rank = len(self.shards) // dp
        own = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        return np.concatenate([self._from_shard(k, step) for k in own])


def _nearest(batch: int, multiple: int) -> str:
    """The global batches nearest `batch` that `multiple` divides, for the message."""
    below, above = batch - batch % multiple, batch - batch % multiple + multiple
    return f"nearest that work: {below} or {above}" if below > 0 else f"the smallest that works: {above}"


def check_batch_layout(
    *, global_batch: int, grad_accum: int, dp: int, shards: int | None, microbatches: int = 1
) -> None:
    """Refuse a global batch that the layout cannot split evenly (no torch needed)."""
    if microbatches > 1:
        if grad_accum > 1:
            raise ShardwiseError(
                "train.grad_accum",
                f"={grad_accum} with a pipeline: its micro-batches take the place of accumulation "
                "(set parallel.microbatches)",
            )
        if global_batch % (dp * microbatches):
            raise ShardwiseError(
                "train.batch_size",
                f"{global_batch} is not divisible by parallel.dp={dp} x parallel.microbatches={microbatches} "
                f"({_nearest(global_batch, dp * microbatches)})",
            )
    if global_batch % (dp * grad_accum):
        raise ShardwiseError(
            "train.batch_size",
            f"{global_batch} is not divisible by parallel.dp={dp} x train.grad_accum={grad_accum} "
            f"({_nearest(global_batch, dp * grad_accum)})",
        )
    if shards is not None:
        if shards % dp:
            raise ShardwiseError("data.shards", f"{shards} is not divisible by parallel.dp={dp}")
        if global_batch % shards:
            raise ShardwiseError(
                "train.batch_size",
                f"{global_batch} is not divisible by data.shards={shards} ({_nearest(global_batch, shards)})",
            )
