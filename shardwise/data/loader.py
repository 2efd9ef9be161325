"""One rank's view of the data: its micro-batches per step and its slice of the validation set."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from shardwise.config import DataConfig
from shardwise.data.partition import partition
from shardwise.data.report import balance_report
from shardwise.data.sampler import BatchPlan, check_batch_layout
from shardwise.data.sources import Dataset

VAL_BATCH = 512  # samples of one validation forward


@dataclass
class RankData:
    dataset: Dataset
    plan: BatchPlan
    dp_rank: int
    dp: int
    grad_accum: int
    device: torch.device
    report: dict
    dtype: torch.dtype = torch.float32  # of the samples, as the model computes

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of step `step`, cut into `grad_accum` equal micro-batches."""
        idx = self.plan.local_indices(step, self.dp_rank, self.dp)
        x, y = take(self.dataset, idx, self.device, self.dtype)
        return list(zip(x.chunk(self.grad_accum), y.chunk(self.grad_accum), strict=True))

    def example(self) -> torch.Tensor:
        """A micro-batch of this rank's first step (what a pipeline profiles its layers on)."""
        return self.micro_batches(0)[0][0]

    @property
    def preprocess(self) -> dict:
        return self.dataset.preprocess

    def val_sizes(self) -> list[int]:
        """Every data-parallel rank's validation rows (`val_batches`), in rank order."""
        return val_sizes(len(self.dataset.y_val), self.dp)

    def position_tensors(self) -> dict[str, torch.Tensor]:
        """Where this rank reads: nothing to keep (a step's samples follow from the step)."""
        return {}

    def close(self) -> None:
        pass

    def val_batches(self, batch: int = VAL_BATCH) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's contiguous slice of the validation set (slices may differ by one),
        in the same number of batches on every rank: sharded layouts run a collective
        per forward, so every rank must run as many."""
        size = len(self.dataset.y_val)
        own = np.array_split(np.arange(size), self.dp)[self.dp_rank]
        num_batches = _val_batch_count(size, self.dp, batch)
        for idx in np.array_split(own, num_batches):
            yield (
                torch.from_numpy(self.dataset.x_val[idx]).to(self.device, self.dtype),
                torch.from_numpy(self.dataset.y_val[idx]).to(self.device),
            )


def take(dataset: Dataset, idx: np.ndarray, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The training samples `idx` and their labels, on `device`: a step's loading (the
    cost model times this very function, plan/profile.py `loading_fit`)."""
    x = torch.from_numpy(dataset.x_train[idx]).to(device, dtype, non_blocking=True)
    y = torch.from_numpy(dataset.y_train[idx]).to(device, non_blocking=True)
    return x, y


def val_sizes(size: int, parts: int) -> list[int]:
    """`size` rows cut into `parts` contiguous parts, the larger first (as np.array_split,
    and the database's NTILE, cut them)."""
    return [size // parts + (i < size % parts) for i in range(parts)]


def _val_batch_count(size: int, dp: int, batch: int) -> int:
    return max(1, math.ceil(math.ceil(size / dp) / batch))


def largest_val_batch(size: int, dp: int, batch: int = VAL_BATCH) -> int:
    """The most samples one validation forward of `val_batches` takes on any of `dp` ranks."""
    return math.ceil(math.ceil(size / dp) / _val_batch_count(size, dp, batch))


def build_rank_data(
    cfg: DataConfig,
    dataset: Dataset,
    *,
    global_batch: int,
    grad_accum: int,
    dp_rank: int,
    dp: int,
    seed: int,
    device: torch.device,
    microbatches: int = 1,
    dtype: torch.dtype = torch.float32,
) -> RankData:
    check_batch_layout(
        global_batch=global_batch, grad_accum=grad_accum, dp=dp, shards=cfg.shards, microbatches=microbatches
    )
    n = len(dataset.y_train)
    if cfg.partition == "shuffle":
        plan = BatchPlan(num_samples=n, global_batch=global_batch, seed=seed)
        # what each rank sees in the first epoch
        per_rank = [
            np.concatenate([plan.local_indices(s, r, dp) for s in range(plan.steps_per_epoch)]) for r in range(dp)
        ]
    else:
        num_shards = cfg.shards or dp
        shards = partition(
            cfg.partition, labels=dataset.y_train, features=dataset.x_train, num_parts=num_shards, seed=seed
        )
        plan = BatchPlan(num_samples=n, global_batch=global_batch, seed=seed, shards=shards)
        k = num_shards // dp
        per_rank = [np.concatenate(shards[r * k : (r + 1) * k]) for r in range(dp)]
    report = balance_report(per_rank, dataset.y_train, dataset.num_classes)
    return RankData(dataset, plan, dp_rank, dp, grad_accum, device, report, dtype)
