"""Data parallelism: every rank holds the whole model and averages gradients.

Built on torch's DistributedDataParallel (bucketed all-reduce overlapped with
the backward pass; Li et al., "PyTorch Distributed", VLDB 2020). With the loss
averaged over each rank's equal share of the global batch, the averaged
gradient is exactly the gradient of the mean loss over the global batch, so
one optimizer step matches one process with the whole batch.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def apply_data_parallel(model: nn.Module, *, group: dist.ProcessGroup, device: torch.device) -> nn.Module:
    """Wrap `model` for data parallelism over `group`; a group of one leaves it as is."""
    if dist.get_world_size(group) == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    # DDP broadcasts rank 0's parameters and buffers at construction, so ranks start equal
    return DistributedDataParallel(model, device_ids=device_ids, process_group=group)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside any data-parallel wrapper: its own parameter names."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def maybe_no_sync(model: nn.Module, skip_sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce for all but the last micro-batch of a step."""
    if skip_sync and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()
