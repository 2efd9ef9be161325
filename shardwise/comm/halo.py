"""Halo exchange: the rows a sliding window needs from the neighbouring bands.

A feature map of height H is cut into bands of rows, one per rank of the
spatial group (`ranges.even_bounds`, so heights may differ by one). A window of
`kernel` rows, moving by `stride` with `padding` rows of padding, computes
output row o from input rows o*stride - padding .. o*stride - padding +
kernel - 1. Each rank therefore needs a run of input rows that reaches a few
rows into its neighbours' bands (the halo; Dryden et al., "Improving Strong-
Scaling of CNN Training by Exploiting Finer-Grained Parallelism", IPDPS 2019).
The exchange is point-to-point and only between neighbours; its backward
sends the halo's gradient back to the rows' owners, who add it to their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from shardwise.errors import ShardwiseError
from shardwise.ranges import even_bounds


@dataclass(frozen=True)
class HaloPlan:
    """Which input rows rank `rank` needs for its output band, and who sends what."""

    height: int
    out_height: int
    kernel: int
    stride: int
    padding: int
    parts: int
    rank: int

    def need(self, rank: int) -> tuple[int, int]:
        """Input rows [a, b) behind `rank`'s output rows (may reach into the padding)."""
        o0, o1 = even_bounds(self.out_height, self.parts)[rank]
        if o0 == o1:
            return (0, 0)
        return o0 * self.stride - self.padding, (o1 - 1) * self.stride - self.padding + self.kernel

    def clamped(self, rank: int) -> tuple[int, int]:
        a, b = self.need(rank)
        return max(a, 0), min(b, self.height)

    def rows_between(self, receiver: int, owner: int) -> tuple[int, int]:
        """Rows of `owner`'s band that `receiver` needs, [start, end) in global rows."""
        a, b = self.clamped(receiver)
        i0, i1 = even_bounds(self.height, self.parts)[owner]
        return max(a, i0), min(b, i1)

    def check(self, layer: str) -> None:
        """Refuse a layout where a rank would need rows beyond its neighbours' bands."""
        own = even_bounds(self.height, self.parts)
        if self.out_height < self.parts:
            raise ShardwiseError(
                "parallel.spatial",
                f"{self.parts} bands, but {layer} gives {self.out_height} rows, fewer than one per band",
            )
        for r in range(self.parts):
            a, b = self.clamped(r)
            if a >= b:
                continue
            lo = own[max(r - 1, 0)][0]
            hi = own[min(r + 1, self.parts - 1)][1]
            if a < lo or b > hi or own[r][0] == own[r][1]:
                raise ShardwiseError(
                    "parallel.spatial",
                    f"{self.parts} bands, but {layer} sees only {self.height} rows: with its {self.kernel}-row "
                    f"window (stride {self.stride}, padding {self.padding}) a band would need rows beyond its "
                    "neighbours'",
                )


def post_exchange(pieces: dict[int, Tensor], wanted: dict[int, tuple], group: dist.ProcessGroup, like: Tensor):
    """Start sending pieces[peer] to each peer and receiving a tensor shaped wanted[peer] from
    each: (the works to wait for, the tensors they fill). The caller computes meanwhile."""
    ops, received = [], {}
    for peer, t in pieces.items():
        ops.append(dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(group, peer), group))
    for peer, shape in wanted.items():
        received[peer] = like.new_empty(shape)
        ops.append(dist.P2POp(dist.irecv, received[peer], dist.get_global_rank(group, peer), group))
    return (dist.batch_isend_irecv(ops) if ops else []), received


def _exchange(pieces: dict[int, Tensor], wanted: dict[int, tuple], group: dist.ProcessGroup, like: Tensor):
    """Send pieces[peer] to each peer and receive a tensor shaped wanted[peer] from each."""
    works, received = post_exchange(pieces, wanted, group, like)
    for work in works:
        work.wait()
    return received


def gather_halo(
    x: Tensor, plan: HaloPlan, group: dist.ProcessGroup, pad_value: float
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The rows this rank's window needs, with `pad_value` rows where it hangs over the
    image's edge: (rows, received top, received bottom)."""
    own0, _ = even_bounds(plan.height, plan.parts)[plan.rank]
    send, recv = {}, {}
    for peer in (plan.rank - 1, plan.rank + 1):
        if 0 <= peer < plan.parts:
            s0, s1 = plan.rows_between(peer, plan.rank)
            if s0 < s1:
                send[peer] = x[:, :, s0 - own0 : s1 - own0]
            r0, r1 = plan.rows_between(plan.rank, peer)
            if r0 < r1:
                recv[peer] = (x.shape[0], x.shape[1], r1 - r0, x.shape[3])
    got = _exchange(send, recv, group, x)
    top, bottom = got.get(plan.rank - 1), got.get(plan.rank + 1)
    return assemble(x, plan, top, bottom, pad_value), top, bottom


def assemble(x: Tensor, plan: HaloPlan, top: Tensor | None, bottom: Tensor | None, pad_value: float) -> Tensor:
    """Own rows that the window needs, between the halo rows received from above and below,
    and `pad_value` rows where the window hangs over the image's edge: one copy of the band
    (a separate pad would copy it again)."""
    own0, _ = even_bounds(plan.height, plan.parts)[plan.rank]
    m0, m1 = plan.rows_between(plan.rank, plan.rank)
    above, below = edge_padding(plan)

    def padding(rows: int) -> list[Tensor]:
        return [x.new_full((x.shape[0], x.shape[1], rows, x.shape[3]), pad_value)] if rows else []

    parts = padding(above) + [t for t in (top,) if t is not None]
    if m0 < m1:
        parts.append(x[:, :, m0 - own0 : m1 - own0])
    parts += [t for t in (bottom,) if t is not None] + padding(below)
    return torch.cat(parts, dim=2) if parts else x.new_empty(x.shape[0], x.shape[1], 0, x.shape[3])


def scatter_halo_grad(grad: Tensor, plan: HaloPlan, group: dist.ProcessGroup, shape: torch.Size) -> Tensor:
    """The gradient of this rank's own rows, from the gradient of the rows its window
    used: the halo part goes back to its owners, and theirs for the rows sent comes back."""
    own0, own1 = even_bounds(plan.height, plan.parts)[plan.rank]
    a, _ = plan.clamped(plan.rank)
    send, recv = {}, {}
    for peer in (plan.rank - 1, plan.rank + 1):
        if 0 <= peer < plan.parts:
            r0, r1 = plan.rows_between(plan.rank, peer)  # rows received from peer: their gradient goes back
            if r0 < r1:
                send[peer] = grad[:, :, r0 - a : r1 - a]
            s0, s1 = plan.rows_between(peer, plan.rank)  # rows sent to peer: their gradient comes back
            if s0 < s1:
                recv[peer] = (shape[0], shape[1], s1 - s0, shape[3])
    got = _exchange(send, recv, group, grad)
    m0, m1 = plan.rows_between(plan.rank, plan.rank)
    if (m0, m1) == (own0, own1):  # the window used every own row: their gradient, in one copy
        grad_x = grad[:, :, m0 - a : m1 - a].contiguous()
    else:
        grad_x = grad.new_zeros(shape)
        if m0 < m1:
            grad_x[:, :, m0 - own0 : m1 - own0] += grad[:, :, m0 - a : m1 - a]
    for peer, g in got.items():
        s0, s1 = plan.rows_between(peer, plan.rank)
        grad_x[:, :, s0 - own0 : s1 - own0] += g
    return grad_x


def edge_padding(plan: HaloPlan) -> tuple[int, int]:
    """Rows of padding above and below where the window hangs over the image's edge."""
    a, b = plan.need(plan.rank)
    if a >= b:
        return 0, 0
    return max(0, -a), max(0, b - plan.height)


class _HaloExchange(torch.autograd.Function):
    """Forward: this rank's band plus the halo rows received from its neighbours,
    cut to exactly the rows its window needs. Backward: the halo rows' gradient
    goes back to their owners and is added to the gradient of the rows sent."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: HaloPlan, group: dist.ProcessGroup, pad_value: float) -> Tensor:
        ctx.plan, ctx.group, ctx.shape = plan, group, x.shape
        return gather_halo(x, plan, group, pad_value)[0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        above, below = edge_padding(ctx.plan)  # the padding rows' gradient goes nowhere
        grad = grad[:, :, above : grad.shape[2] - below]
        return scatter_halo_grad(grad, ctx.plan, ctx.group, ctx.shape), None, None, None


def with_halo(x: Tensor, plan: HaloPlan, group: dist.ProcessGroup, *, pad_value: float = 0.0) -> Tensor:
    """The rows behind this rank's output band: own rows, neighbours' halo rows, and
    `pad_value` rows where the window hangs over the image's top or bottom edge."""
    return _HaloExchange.apply(x, plan, group, pad_value)
