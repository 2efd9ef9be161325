"""The logical training state: what a checkpoint holds, whatever the layout.

Tensors are stored whole under the model's own names: weights as
`model/NAME`, optimizer state as `optim/KEY/NAME` (KEY: momentum_buffer,
exp_avg, exp_avg_sq, step). Saving assembles them from the layout's pieces
(tensor-parallel and vertical splits, FSDP2 shards, ZeRO-1 and parameter-server
slices of the flat parameter vector); pipeline stages each hold their own
layers' tensors whole. Loading cuts them again for whatever layout the run has
now, so a checkpoint of any layout loads into any other.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from shardwise.parallel.splits import Split, full_state_dict
from shardwise.parallel.zero import ShardedOptimizer


def logical_model(model: nn.Module, splits: dict[str, Split]) -> dict[str, Tensor]:
    """`model/NAME` for every weight this rank's part of the model holds (collective)."""
    return {f"model/{k}": v for k, v in full_state_dict(model, splits).items()}


def logical_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, splits: dict[str, Split]) -> dict:
    """`optim/KEY/NAME` for every parameter of this rank's part of the model (collective:
    every member of a split, shard or slice group calls it, in the same order)."""
    named = list(model.named_parameters())
    if isinstance(optimizer, ShardedOptimizer):
        return _from_flat_slices(named, optimizer.inner.state.get(optimizer.slice, {}), optimizer.group)
    out: dict[str, Tensor] = {}
    for name, p in named:  # model order: the same on every rank of a group
        for key, value in sorted(optimizer.state.get(p, {}).items()):
            if not torch.is_tensor(value):
                continue
            value = value.detach()
            if isinstance(value, DTensor):
                value = value.full_tensor()
            elif name in splits and value.dim() > 0:
                value = splits[name].full(value)
            out[f"optim/{key}/{name}"] = value.clone()
    return out


def _from_flat_slices(named: list[tuple[str, Tensor]], state: dict, group: dist.ProcessGroup) -> dict[str, Tensor]:
    """Per-parameter tensors from each rank's equal slice of the flat vector (ZeRO-1)."""
    out: dict[str, Tensor] = {}
    for key, value in sorted(state.items()):
        if value.dim() == 0:  # a count, the same for every parameter
            out |= {f"optim/{key}/{name}": value.detach().clone() for name, _ in named}
            continue
        flat = value.new_empty(value.numel() * dist.get_world_size(group))
        dist.all_gather_into_tensor(flat, value.detach().contiguous(), group=group)
        out |= unflatten(flat, named, prefix=f"optim/{key}/")
    return out


def unflatten(flat: Tensor, named: list[tuple[str, Tensor]], *, prefix: str) -> dict[str, Tensor]:
    out, offset = {}, 0
    for name, p in named:
        out[prefix + name] = flat[offset : offset + p.numel()].view(p.shape).clone()
        offset += p.numel()
    return out


def flatten(tensors: dict[str, Tensor], named: list[tuple[str, Tensor]], *, prefix: str) -> Tensor:
    return torch.cat([tensors[prefix + name].reshape(-1) for name, _ in named])


def model_weights(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}


def optimizer_keys(tensors: dict[str, Tensor]) -> list[str]:
    return sorted({k.split("/")[1] for k in tensors if k.startswith("optim/")})


@torch.no_grad()
def load_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, splits: dict[str, Split], tensors: dict[str, Tensor]
) -> None:
    """Put the logical optimizer state into this layout's optimizer: each rank keeps its piece."""
    named = list(model.named_parameters())
    keys = optimizer_keys(tensors)
    if isinstance(optimizer, ShardedOptimizer):
        state = {}
        for key in keys:
            first = tensors[f"optim/{key}/{named[0][0]}"]
            if first.dim() == 0:
                state[key] = first.clone()
            else:
                state[key] = optimizer._own([tensors[f"optim/{key}/{name}"] for name, _ in named]).clone()
        optimizer.inner.state[optimizer.slice] = state
        return
    for name, p in named:
        state = {}
        for key in keys:
            full = tensors[f"optim/{key}/{name}"]
            if full.dim() == 0:
                state[key] = full.clone()
            elif isinstance(p, DTensor):
                state[key] = distribute_tensor(full.to(p.device), p.device_mesh, p.placements)
            elif name in splits:
                state[key] = splits[name].local(full.to(p.device))
            else:
                state[key] = full.to(p.device).clone()
        if state:
            optimizer.state[p] = state
