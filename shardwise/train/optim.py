"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from shardwise.config import TrainConfig
from shardwise.parallel.zero import ShardedOptimizer


def build_optimizer(
    cfg: TrainConfig, model: nn.Module, *, zero_group: dist.ProcessGroup | None = None
) -> torch.optim.Optimizer:
    """SGD or AdamW; with `zero_group`, each rank of the group keeps the optimizer
    state of only its 1/N slice of the parameters (ZeRO-1, parallel/zero.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    build = functools.partial(optimizer_for, cfg)
    if zero_group is not None:
        return ShardedOptimizer(params, build, zero_group)
    return build(params)


def optimizer_for(cfg: TrainConfig, tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The configured optimizer over `tensors`."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(tensors, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(tensors, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_at(cfg: TrainConfig) -> Callable[[int], float]:
    """The learning rate for the update made at each step (what build_scheduler sets)."""
    factor = schedule_factor(cfg)
    return lambda step: cfg.lr * factor(step)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors this rank holds for the optimizer (only its slice's under ZeRO-1)."""
    if isinstance(optimizer, ShardedOptimizer):
        return optimizer.state_tensors()
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def lr_factor(
    step: int, *, total_steps: int, schedule: str, warmup_steps: int, step_every: int = 100, step_gamma: float = 0.1
) -> float:
    """Multiplier of the peak rate for the update made at `step` (0-based).

    Linear warm-up from 1/warmup to 1 over `warmup_steps`, then constant, step
    (times `step_gamma` every `step_every` steps) or cosine decay to zero at the
    last step (Loshchilov & Hutter, SGDR, 2017).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    after = step - warmup_steps
    if schedule == "step":
        return step_gamma ** (after // step_every)
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(after, span) / span))
    return 1.0


def schedule_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """The schedule's multiplier of `cfg.lr` at each step."""
    return functools.partial(
        lr_factor,
        total_steps=cfg.steps,
        schedule=cfg.schedule,
        warmup_steps=cfg.warmup_steps,
        step_every=cfg.step_every,
        step_gamma=cfg.step_gamma,
    )


def build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, *, start: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule, having taken `start` steps already (a resumed run's position)."""
    if start == 0:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(cfg))
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    # constructed at step start - 1, the scheduler takes its first step to `start` and sets the rates
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(cfg), last_epoch=start - 1)
