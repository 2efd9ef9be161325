"""Parameters held in pieces across ranks, and what needs the whole of them.

Tensor-parallel and vertical layers keep plain local tensors (not DTensors), so
they compose with DDP, FSDP2 and ZeRO-1 unchanged. Each such parameter is
described by a :class:`Split`; the full weights (for `model.safetensors`) and
the global gradient norm (for clipping) are assembled from these
descriptions. Parameters sharded by FSDP2 are DTensors and carry their own.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from shardwise.comm.collectives import all_gather_uneven


@dataclass(frozen=True)
class Split:
    """Member k of `group` holds the entries at positions `index[k]` along `dim` of the full tensor."""

    group: dist.ProcessGroup
    dim: int
    index: tuple[np.ndarray, ...]

    @classmethod
    def contiguous(cls, group: dist.ProcessGroup, dim: int, sizes: list[int]) -> Split:
        bounds = np.cumsum([0, *sizes])
        return cls(group, dim, tuple(np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)))

    @property
    def sizes(self) -> list[int]:
        return [len(i) for i in self.index]

    def local(self, full: Tensor) -> Tensor:
        """This member's piece of the full tensor."""
        own = torch.as_tensor(self.index[dist.get_rank(self.group)], device=full.device)
        return full.index_select(self.dim, own).contiguous()

    def full(self, local: Tensor) -> Tensor:
        """The whole tensor, assembled from every member's piece (a collective on `group`)."""
        pieces = all_gather_uneven(local, self.sizes, dim=self.dim, group=self.group)
        shape = list(local.shape)
        shape[self.dim] = sum(self.sizes)
        out = local.new_empty(shape)
        for idx, piece in zip(self.index, pieces, strict=True):
            out.index_copy_(self.dim, torch.as_tensor(idx, device=local.device), piece)
        return out


def optimizer_keys(tensors: dict[str, Tensor]) -> list[str]:
    """The optimizer-state keys (momentum_buffer, exp_avg, step, ...) among logical tensors
    named `optim/KEY/NAME`, as checkpoints hold them."""
    return sorted({k.split("/")[1] for k in tensors if k.startswith("optim/")})


def is_dtensor(t: object) -> bool:
    """Whether `t` is a DTensor (FSDP2's sharded parameters), without importing DTensor's
    module, a second of start-up, for the layouts that never make one: there is none
    until something imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_tensor(t: Tensor) -> Tensor:
    return t.to_local() if is_dtensor(t) else t


def full_state_dict(model: nn.Module, splits: dict[str, Split]) -> dict[str, Tensor]:
    """The whole model's weights under its own names, on every rank (collective)."""
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if is_dtensor(t):
            t = t.full_tensor()
        if name in splits:
            t = splits[name].full(t)
        out[name] = t.clone()
    return out


def clip_grad_norm(
    model: nn.Module, max_norm: float, *, splits: dict[str, Split], sum_groups: list[dist.ProcessGroup]
) -> float:
    """Scale the gradients so that the norm of the whole model's gradient is at most
    `max_norm` (the rule of torch.nn.utils.clip_grad_norm_), with each piece counted
    once: split parameters summed over their group, then everything over each of
    `sum_groups` (FSDP shards, pipeline stages). Returns the norm before clipping."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    per_group: dict[dist.ProcessGroup, Tensor] = {}
    grads = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        sq = sum_of_squares(local_tensor(p.grad))
        if name in splits:
            group = splits[name].group
            per_group[group] = per_group.get(group, torch.zeros_like(total)) + sq
        else:
            total += sq
    for group, sq in per_group.items():  # the same groups in the same order on every member
        dist.all_reduce(sq, group=group)
        total += sq
    for group in sum_groups:
        dist.all_reduce(total, group=group)
    norm = math.sqrt(total.item())
    scale = min(1.0, max_norm / (norm + 1e-6))
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return norm


NORM_CHUNK = 1 << 16  # elements: 512 KiB in float64, cache-sized


def sum_of_squares(t: Tensor) -> Tensor:
    """The sum of `t`'s squared elements, accumulated in float64 a chunk at a time: as
    exact as squaring a float64 copy of the whole, without one (a copy, and its square, of
    the largest gradient would raise a rank's peak memory by 4x that gradient's bytes, and
    cost more time in page faults than the arithmetic)."""
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    # a GPU: chunks 64x as large, so the kernel launches stay few (a 16 MiB float64 chunk)
    size = NORM_CHUNK * (64 if t.device.type == "cuda" else 1)
    for chunk in t.detach().reshape(-1).split(size):
        wide = chunk.double()
        total += torch.dot(wide, wide)
    return total


def local_bytes(tensors) -> int:
    return sum(local_tensor(t).numel() * t.element_size() for t in tensors if t is not None)
