"""Optimizer-state sharding (ZeRO stage 1; Rajbhandari et al., "ZeRO", SC 2020).

Every rank keeps the whole model and the whole (all-reduced) gradient, but the
optimizer's state only for its 1/N slice of the parameters, cut element-wise
from their concatenation: a rank steps its slice and an all-gather hands every
rank the updated parameters. SGD and AdamW act element by element, so the
result is the same as stepping the whole model in one place.

torch's ZeroRedundancyOptimizer assigns whole parameter tensors to ranks; on a
model whose largest tensor dominates (the usual case), one rank then holds most
of the state. Cutting the flat vector gives every rank the same share.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn


class ShardedOptimizer(torch.optim.Optimizer):
    """Wraps `build(params)` (an element-wise optimizer) so each rank of `group` steps
    only its slice. Its param_groups are the inner optimizer's: LR schedules apply."""

    def __init__(self, params: list[Tensor], build: Callable[[list[Tensor]], torch.optim.Optimizer], group):
        self.params, self.group = params, group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        total = sum(p.numel() for p in params)
        self.per_rank = -(-total // world)
        self.lo = rank * self.per_rank
        # this rank's slice of the parameters, stepped by the inner optimizer; it holds
        # data only during a step (the parameters themselves are the lasting copy)
        self.slice = nn.Parameter(torch.empty(0, device=params[0].device))
        self.inner = build([self.slice])
        super().__init__([self.slice], {})
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    def _own(self, tensors: list[Tensor]) -> Tensor:
        """This rank's slice of the concatenation of `tensors`, without building the whole of it."""
        pieces, offset, hi = [], 0, self.lo + self.per_rank
        for t in tensors:
            a, b = max(self.lo, offset), min(hi, offset + t.numel())
            if a < b:
                pieces.append(t.reshape(-1)[a - offset : b - offset])
            offset += t.numel()
        own = torch.cat(pieces) if pieces else tensors[0].new_empty(0)
        return torch.cat([own, own.new_zeros(self.per_rank - own.numel())]) if own.numel() < self.per_rank else own

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.slice.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "closures are not supported"
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.slice.data = self._own([p.detach() for p in self.params])
        self.slice.grad = self._own(grads)
        self.inner.step()
        gathered = self.slice.new_empty(self.per_rank * dist.get_world_size(self.group))
        dist.all_gather_into_tensor(gathered, self.slice.detach(), group=self.group)
        self.slice.grad, self.slice.data = None, self.slice.new_empty(0)
        offset = 0
        for p in self.params:
            p.copy_(gathered[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def state_tensors(self) -> list[Tensor]:
        """The optimizer state this rank holds: that of its slice."""
        return [v for s in self.inner.state.values() for v in s.values() if torch.is_tensor(v)]
