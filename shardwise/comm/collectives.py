"""Collectives as autograd Functions: what a split layer needs in forward and backward.

Megatron-LM's f and g operators (Shoeybi et al., "Megatron-LM", 2019, section 3): a
column-parallel layer followed by a row-parallel one costs one all-reduce in forward
(g, `reduce_from_group`) and one in backward (f, inside `column_linear`, which runs it
beside the weight gradient). `gather_from_group` joins pieces of uneven width, so a
layer whose width does not divide the group size still splits exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from shardwise.p2p_ring import record


def _all_reduce(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def all_gather_uneven(x: Tensor, sizes: list[int], *, dim: int, group: dist.ProcessGroup) -> list[Tensor]:
    """Every member's piece of a tensor split along `dim` into `sizes` (one per member,
    in group rank order). Pieces are padded to the largest for the collective."""
    widest = max(sizes)
    pad_shape = list(x.shape)
    pad_shape[dim] = widest - x.shape[dim]
    padded = torch.cat([x, x.new_zeros(pad_shape)], dim=dim).contiguous() if pad_shape[dim] else x.contiguous()
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded, group=group)
    return [p.narrow(dim, 0, s) for p, s in zip(pieces, sizes, strict=True)]


class _ReduceFromGroup(torch.autograd.Function):
    """Forward: all-reduce (sum) the members' partial results, in place: every caller
    hands over a layer's own new output, which nothing else holds (a view is summed on a
    copy). Backward: identity (every member's partial gets the same gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        if not x.is_contiguous():
            return _all_reduce(x, group)
        ctx.mark_dirty(x)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _ColumnLinear(torch.autograd.Function):
    """`F.linear` of an input every member holds whole, by a member's slice of the output
    features. Its backward sums the input's gradient (each member's part) over the group
    while it computes the weight's gradient: the all-reduce is started as soon as the
    input gradient exists and waited for last, so it runs beside that product
    (Megatron-LM's overlap of the tensor-parallel all-reduce with the weight-gradient
    GEMM). The products are autograd's own for `F.linear` (input gradient grad @ W,
    weight gradient grad^T @ x, on the rows flattened), under the autocast the forward ran in."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, group: dist.ProcessGroup) -> Tensor:
        device = x.device.type
        ctx.amp = device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        ctx.group, ctx.has_bias, ctx.x_dtype = group, bias is not None, x.dtype
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        device, enabled, dtype = ctx.amp
        grad_x = grad_w = grad_b = work = None
        rows = grad.reshape(-1, grad.shape[-1])
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            if ctx.needs_input_grad[0]:
                grad_x = grad.matmul(weight).to(ctx.x_dtype)
                work = dist.all_reduce(grad_x, group=ctx.group, async_op=True)
            if ctx.needs_input_grad[1]:
                grad_w = rows.t().mm(x.reshape(-1, x.shape[-1]))
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = rows.sum(0)
        if work is not None:
            work.wait()
        return grad_x, grad_w, grad_b, None


class _GatherFromGroup(torch.autograd.Function):
    """Forward: all-gather the members' slices along dimension `dim`.
    Backward: keep this member's slice of the gradient (the gradient of the
    gathered tensor is the same on every member)."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], group: dist.ProcessGroup, dim: int) -> Tensor:
        ctx.rank, ctx.sizes, ctx.dim = dist.get_rank(group), sizes, dim
        return torch.cat(all_gather_uneven(x, sizes, dim=dim, group=group), dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        start = sum(ctx.sizes[: ctx.rank])
        return grad.narrow(ctx.dim, start, ctx.sizes[ctx.rank]).contiguous(), None, None, None


def reduce_from_group(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The sum of the members' `x`, a layer's own new output (summed in place)."""
    return _ReduceFromGroup.apply(x, group)


def column_linear(x: Tensor, weight: Tensor, bias: Tensor | None, group: dist.ProcessGroup) -> Tensor:
    """`F.linear(x, weight, bias)` on a slice of the output features; its backward sums the
    input gradient over `group` beside the weight gradient's product."""
    return _ColumnLinear.apply(x, weight, bias, group)


def gather_from_group(x: Tensor, sizes: list[int], group: dist.ProcessGroup, dim: int = -1) -> Tensor:
    return _GatherFromGroup.apply(x, sizes, group, dim)


def all_gather_json(obj, group: dist.ProcessGroup | None) -> list:
    """Every member's JSON-able `obj`, in group rank order (JSON on the wire, never pickle)."""
    import json

    if group is None or dist.get_world_size(group) == 1:
        return [obj]
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    widest = int(max(s.item() for s in sizes))
    padded = torch.cat([data, data.new_zeros(widest - data.numel())])
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded, group=group)
    return [json.loads(bytes(p[: int(s.item())].tolist())) for p, s in zip(pieces, sizes, strict=True)]


MAX_DIMS = 8


def send_tensor(t: Tensor, dst: int, group: dist.ProcessGroup) -> None:
    """Send a tensor whose shape the receiver does not know: its shape first (fixed
    size, no pickling), then its data. `dst` is a global rank."""
    shape = torch.zeros(MAX_DIMS + 1, dtype=torch.int64)
    shape[0] = t.dim()
    shape[1 : 1 + t.dim()] = torch.tensor(t.shape)
    record("send", dst, 0, shape)
    dist.send(shape, dst, group=group)
    record("send", dst, 0, t)
    dist.send(t.contiguous(), dst, group=group)


def recv_tensor(src: int, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Receive what :func:`send_tensor` sent from global rank `src`."""
    shape = torch.empty(MAX_DIMS + 1, dtype=torch.int64)
    record("recv", src, 0, shape)
    dist.recv(shape, src, group=group)
    t = torch.empty(shape[1 : 1 + int(shape[0])].tolist(), device=device, dtype=dtype)
    record("recv", src, 0, t)
    dist.recv(t, src, group=group)
    return t
