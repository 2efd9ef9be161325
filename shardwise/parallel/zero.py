"""Optimizer-state sharding (ZeRO stage 1; Rajbhandari et al., "ZeRO", SC 2020).

Every rank keeps the whole model and the whole (all-reduced) gradient, but the
optimizer's state only for its 1/N slice of the parameters, cut element-wise
from their concatenation: a rank steps its slice and an all-gather hands every
rank the updated parameters. SGD and AdamW act element by element, so the
result is the same as stepping the whole model in one place.

A rank's slice is held as pieces, one per parameter it overlaps, each a
parameter of the inner (torch) optimizer. So the inner optimizer sees what
one process would: a parameter without a gradient this step is left alone
(no momentum, no weight decay), and AdamW counts steps per parameter.

torch's ZeroRedundancyOptimizer assigns whole parameter tensors to ranks; on a
model whose largest tensor dominates (the usual case), one rank then holds most
of the state. Cutting the flat vector gives every rank the same share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from shardwise.comm.collectives import all_gather_json
from shardwise.parallel.part import Part
from shardwise.parallel.splits import optimizer_keys

if TYPE_CHECKING:
    from shardwise.topology import RankMesh


def apply_zero(part: Part, mesh: RankMesh) -> Part:
    """Shard the optimizer state over the mesh's dp axis where the layout asks for it
    (shard=optimizer): the run then builds a :class:`ShardedOptimizer` over that group."""
    group = mesh.groups["dp"]
    if group is None or mesh.dims.shard != "optimizer":
        return part
    return part.but(zero_group=group)


class ShardedOptimizer(torch.optim.Optimizer):
    """Wraps `build(params)` (an element-wise optimizer) so each rank of `group` steps
    only its slice. Its param_groups are the inner optimizer's: LR schedules apply."""

    def __init__(self, params: list[Tensor], build: Callable[[list[Tensor]], torch.optim.Optimizer], group):
        self.params, self.group = params, group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        total = sum(p.numel() for p in params)
        self.per_rank = -(-total // world)
        lo, hi = rank * self.per_rank, min(total, (rank + 1) * self.per_rank)
        # (parameter index, start, end) of every piece of this rank's slice, in flat order
        self.pieces: list[tuple[int, int, int]] = []
        offset = 0
        for i, p in enumerate(params):
            a, b = max(lo, offset), min(hi, offset + p.numel())
            if a < b:
                self.pieces.append((i, a - offset, b - offset))
            offset += p.numel()
        # the inner optimizer's parameters: they hold data only during a step (the
        # model's parameters are the lasting copy); a rank past the end holds an empty one
        like = [params[i] for i, _, _ in self.pieces] or params[:1]
        self.slots = [nn.Parameter(torch.empty(0, device=p.device, dtype=p.dtype)) for p in like]
        self.inner = build(self.slots)
        super().__init__(self.slots, {})
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "closures are not supported"
        for slot, (i, a, b) in zip(self.slots, self.pieces, strict=False):
            p = self.params[i]
            slot.data = p.detach().view(-1)[a:b]  # stepped in place: the all-gather then hands it to all
            slot.grad = None if p.grad is None else p.grad.reshape(-1)[a:b]
        self.inner.step()
        own = [slot.data for slot in self.slots[: len(self.pieces)]]
        own = torch.cat(own) if own else self.params[0].new_empty(0)
        if own.numel() < self.per_rank:
            own = torch.cat([own, own.new_zeros(self.per_rank - own.numel())])
        gathered = own.new_empty(self.per_rank * dist.get_world_size(self.group))
        dist.all_gather_into_tensor(gathered, own, group=self.group)
        for slot in self.slots:
            slot.grad, slot.data = None, slot.new_empty(0)
        offset = 0
        for p in self.params:
            p.copy_(gathered[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def state_tensors(self) -> list[Tensor]:
        """The optimizer state this rank holds: that of its slice."""
        return [v for s in self.inner.state.values() for v in s.values() if torch.is_tensor(v)]

    # -- checkpoints: pieces <-> whole tensors ---------------------------------------
    def logical_state(self, names: list[str]) -> dict[str, Tensor]:
        """`optim/KEY/NAME` of every parameter (named in model order) that has state,
        whole, on every rank of the group (a collective)."""
        mine: dict[str, str] = {}  # key -> "scalar" | "tensor", as this rank's pieces hold them
        for slot in self.slots[: len(self.pieces)]:
            for key, value in self.inner.state.get(slot, {}).items():
                if torch.is_tensor(value):
                    mine[key] = "scalar" if value.dim() == 0 else "tensor"
        kinds: dict[str, str] = {}
        for other in all_gather_json(mine, self.group):
            kinds |= other
        device = self.params[0].device
        has = torch.zeros(len(self.params), dtype=torch.int64, device=device)
        for slot, (i, _, _) in zip(self.slots, self.pieces, strict=False):
            has[i] = int(bool(self.inner.state.get(slot)))
        dist.all_reduce(has, op=dist.ReduceOp.MAX, group=self.group)
        out: dict[str, Tensor] = {}
        for key, kind in sorted(kinds.items()):
            if kind == "scalar":  # a per-parameter count: the same in every piece of a parameter
                counts = torch.full((len(self.params),), -1.0, dtype=torch.float64, device=device)
                dtype = torch.float32
                for slot, (i, _, _) in zip(self.slots, self.pieces, strict=False):
                    if key in self.inner.state.get(slot, {}):
                        value = self.inner.state[slot][key]
                        counts[i], dtype = value.item(), value.dtype
                dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=self.group)
                for i, name in enumerate(names):
                    if has[i]:
                        out[f"optim/{key}/{name}"] = torch.tensor(counts[i].item(), dtype=dtype)
                continue
            own = []
            for slot, (i, a, b) in zip(self.slots, self.pieces, strict=False):
                value = self.inner.state.get(slot, {}).get(key)
                own.append(value if value is not None else self.params[i].new_zeros(b - a))
            flat = torch.cat(own) if own else self.params[0].new_empty(0)
            flat = torch.cat([flat, flat.new_zeros(self.per_rank - flat.numel())])
            gathered = flat.new_empty(self.per_rank * dist.get_world_size(self.group))
            dist.all_gather_into_tensor(gathered, flat, group=self.group)
            offset = 0
            for i, (name, p) in enumerate(zip(names, self.params, strict=True)):
                if has[i]:
                    out[f"optim/{key}/{name}"] = gathered[offset : offset + p.numel()].view(p.shape).clone()
                offset += p.numel()
        return out

    def load_logical(self, names: list[str], tensors: dict[str, Tensor]) -> None:
        """Take this rank's pieces of the whole optimizer state in `tensors` (every rank reads it all)."""
        keys = optimizer_keys(tensors)
        for slot, (i, a, b) in zip(self.slots, self.pieces, strict=False):
            p, state = self.params[i], {}
            for key in keys:
                full = tensors.get(f"optim/{key}/{names[i]}")
                if full is None:
                    continue
                if full.dim() == 0:
                    state[key] = full.clone()
                else:
                    state[key] = full.reshape(-1)[a:b].to(device=p.device, dtype=p.dtype).clone()
            if state:
                self.inner.state[slot] = state
