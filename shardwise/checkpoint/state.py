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

from shardwise.comm.flat import flatten, named_views
from shardwise.parallel.splits import Split, full_state_dict, is_dtensor, optimizer_keys
from shardwise.parallel.zero import ShardedOptimizer


def logical_model(model: nn.Module, splits: dict[str, Split]) -> dict[str, Tensor]:
    """`model/NAME` for every weight this rank's part of the model holds (collective)."""
    return {f"model/{k}": v for k, v in full_state_dict(model, splits).items()}


def logical_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, splits: dict[str, Split]) -> dict:
    """`optim/KEY/NAME` for every parameter of this rank's part of the model (collective:
    every member of a split, shard or slice group calls it, in the same order)."""
    named = list(model.named_parameters())
    if isinstance(optimizer, ShardedOptimizer):
        return optimizer.logical_state([name for name, _ in named])
    out: dict[str, Tensor] = {}
    for name, p in named:  # model order: the same on every rank of a group
        for key, value in sorted(optimizer.state.get(p, {}).items()):
            if not torch.is_tensor(value):
                continue
            value = value.detach()
            # a tensor-parallel piece sharded again by FSDP: first the FSDP shards make
            # the piece, then the split's pieces make the whole tensor
            if is_dtensor(value):
                value = value.full_tensor()
            if name in splits and value.dim() > 0:
                value = splits[name].full(value)
            out[f"optim/{key}/{name}"] = value.clone()
    return out


def model_weights(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}


@torch.no_grad()
def load_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, splits: dict[str, Split], tensors: dict[str, Tensor]
) -> None:
    """Put the logical optimizer state into this layout's optimizer: each rank keeps its piece."""
    named = list(model.named_parameters())
    keys = optimizer_keys(tensors)
    if isinstance(optimizer, ShardedOptimizer):
        optimizer.load_logical([name for name, _ in named], tensors)
        return
    for name, p in named:
        state = {}
        for key in keys:
            full = tensors.get(f"optim/{key}/{name}")
            if full is None:  # a parameter that never had a gradient has no state
                continue
            if full.dim() == 0:
                state[key] = full.clone()
                continue
            full = full.to(device=p.device, dtype=p.dtype)
            piece = splits[name].local(full) if name in splits else full.clone()
            if is_dtensor(p):  # FSDP shards this rank's piece (of a tensor-parallel split, maybe)
                from torch.distributed.tensor import distribute_tensor

                piece = distribute_tensor(piece, p.device_mesh, p.placements)
            state[key] = piece
        if state:
            optimizer.state[p] = state


def compression_state(compressor, model: nn.Module, splits: dict[str, Split], rank: int) -> dict[str, Tensor]:
    """What gradient compression owes (comm/compress.py), two ways: this rank's own residuals
    and PowerSGD factors, `comm/rankR/residual/NAME` and `comm/rankR/q/NAME` (a resume on the
    same layout takes them back exactly), and `comm/residual/NAME`, the whole tensor of the
    mean residual over the data-parallel ranks (collective), which is what the average still
    owes: a resume on another layout gives every rank its piece of it, so none is lost. And
    `comm/rankR/trial`, what auto's trial decided (comm/trial.py)."""
    if compressor is None:
        return {}
    out = {f"comm/rank{rank}/trial": compressor.trial.state()} if compressor.trial is not None else {}
    if not compressor.owes:
        return out
    out |= {f"comm/rank{rank}/residual/{k}": v.clone() for k, v in compressor.residuals.items()}
    out |= {f"comm/rank{rank}/q/{k}": v.clone() for k, v in compressor.q.items()}
    named = list(model.named_parameters())  # model order: the same on every rank
    flat = flatten([compressor.residuals.get(name) for name, _ in named], like=[p for _, p in named])
    dist.all_reduce(flat, group=compressor.group)  # one collective for all of them
    flat /= compressor.world
    for name, mean in named_views(flat, named).items():
        out[f"comm/residual/{name}"] = splits[name].full(mean) if name in splits else mean
    return out


def decided_trial(compressor) -> dict[str, Tensor]:
    """`comm/trial`: auto's trial once decided, the same on every rank (the agreed medians and
    the method kept), for the state a replica serves its peers (peer_state.py), which holds no
    rank's own tensors."""
    trial = compressor.trial if compressor is not None else None
    return {"comm/trial": trial.state()} if trial is not None and trial.chosen is not None else {}


def load_compression(
    compressor, model: nn.Module, splits: dict[str, Split], tensors: dict[str, Tensor], *, rank: int, same: bool
) -> None:
    """A checkpoint's compression state into this rank's compressor: its own on the same
    layout (`same`), else its piece of the mean residual (PowerSGD's factors start afresh)."""
    if compressor is None:
        return
    compressor.forget_buffers()
    own = f"comm/rank{rank}/"
    trial = tensors.get(own + "trial", tensors.get("comm/trial"))  # (a peer's state: the decided one)
    if same and trial is not None and compressor.trial is not None:  # timed on this layout
        compressor.trial.load(trial)
    mine = {key.removeprefix(own).partition("/")[::2]: v for key, v in tensors.items() if key.startswith(own)}
    mine = {(kind, name): v for (kind, name), v in mine.items() if kind in ("residual", "q")}
    # the same layout holds the same parameters on each rank, unless a pipeline was cut
    # elsewhere (by the clock): then the mean residuals, by name
    if same and mine and {name for _, name in mine} <= {name for name, _ in model.named_parameters()}:
        for (kind, name), value in mine.items():
            getattr(compressor, "residuals" if kind == "residual" else "q")[name] = value.clone()
        return
    for name, _ in model.named_parameters():
        whole = tensors.get(f"comm/residual/{name}")
        if whole is not None:
            compressor.residuals[name] = splits[name].local(whole) if name in splits else whole.clone()
