"""The training loop: read top to bottom, no callbacks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shardwise.data.loader import RankData
from shardwise.parallel.data import maybe_no_sync, unwrap
from shardwise.parallel.splits import Split, clip_grad_norm
from shardwise.train.evaluate import evaluate
from shardwise.train.faults import FaultPlan


class Reporter(Protocol):
    """Where the loop's progress goes: rank 0 writes and draws, other ranks drop it."""

    def step_done(self, step: int) -> None: ...
    def log(self, record: dict) -> None: ...


@dataclass
class LoopResult:
    records: list[dict] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    final_eval: dict[str, float] = field(default_factory=dict)
    train_s: float = 0.0


@dataclass
class LoopSettings:
    steps: int
    global_batch: int
    clip_norm: float = 0.0
    log_every: int = 10
    eval_every: int = 0


def mean_over(group: dist.ProcessGroup | None, value: torch.Tensor) -> float:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(value, group=group)
        value = value / dist.get_world_size(group)
    return value.item()


class Runner(Protocol):
    """How one step's forward and backward run on this rank's part of the model."""

    def forward_backward(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Accumulate the gradient of the step's mean loss; return that loss as far as this rank knows it."""
        ...

    def mean_loss(self, value: torch.Tensor) -> float:
        """A loss summed on this rank, as the mean over the whole layout (a collective)."""
        ...

    def evaluate(self, data: RankData) -> dict[str, float]: ...


class ModelRunner:
    """The model (whole, or tensor/vertical slices of every layer) on every rank,
    data parallel around it: each micro-batch forward and backward in turn."""

    def __init__(self, model: nn.Module, *, dp_group: dist.ProcessGroup | None):
        self.model, self.dp_group = model, dp_group

    def forward_backward(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        total = torch.zeros((), device=micro[0][0].device)
        for i, (x, y) in enumerate(micro):
            # all-reduce only after the last micro-batch's backward
            with maybe_no_sync(self.model, skip_sync=i < len(micro) - 1):
                loss = F.cross_entropy(self.model(x), y) / len(micro)
                loss.backward()
            total += loss.detach()
        return total

    def mean_loss(self, value: torch.Tensor) -> float:
        return mean_over(self.dp_group, value)

    def evaluate(self, data: RankData) -> dict[str, float]:
        return evaluate(self.model, data, group=self.dp_group)


def train_loop(
    runner: Runner,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: RankData,
    settings: LoopSettings,
    *,
    reporter: Reporter,
    faults: FaultPlan,
    splits: dict[str, Split] | None = None,
    sum_groups: list[dist.ProcessGroup] | None = None,
) -> LoopResult:
    """Train for `settings.steps` optimizer steps. `model` is this rank's part of the
    model; `splits` (parameters held in pieces) and `sum_groups` (groups whose ranks
    hold disjoint parameters: FSDP shards, pipeline stages) let clipping see the whole
    model's gradient."""
    result = LoopResult()
    window_loss = torch.zeros((), device=data.device)
    window_start, window_steps = time.perf_counter(), 0
    model.train()
    for step in range(settings.steps):
        started = time.perf_counter()
        faults.maybe_fail(step)

        optimizer.zero_grad(set_to_none=True)
        window_loss += runner.forward_backward(data.micro_batches(step))
        if settings.clip_norm > 0:
            clip_grad_norm(unwrap(model), settings.clip_norm, splits=splits or {}, sum_groups=sum_groups or [])
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()

        result.step_times.append(time.perf_counter() - started)
        window_steps += 1
        reporter.step_done(step)
        last = step == settings.steps - 1
        eval_now = last or (settings.eval_every > 0 and (step + 1) % settings.eval_every == 0)
        if eval_now or (step + 1) % settings.log_every == 0:
            elapsed = time.perf_counter() - window_start
            record = {
                "step": step + 1,
                "loss": runner.mean_loss(window_loss / window_steps),
                "lr": lr,
                "samples_per_s": settings.global_batch * window_steps / elapsed,
            }
            window_loss.zero_()
            window_steps = 0
            if eval_now:
                record.update(runner.evaluate(data))
            result.records.append(record)
            reporter.log(record)
            window_start = time.perf_counter()
    result.final_eval = {k: result.records[-1][k] for k in ("val_loss", "val_accuracy")}
    result.train_s = sum(result.step_times)
    return result
