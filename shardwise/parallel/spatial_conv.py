"""A convolution on this rank's band of rows (`parallel/spatial.py` cuts the maps).

Two ways, chosen per layer:

- **Centred** (stride 1 down the rows, a window of 2p + 1 rows with p rows of padding:
  the 3 x 3 convolutions with padding 1 that most of a ResNet is): the output band is
  the input band. The band is convolved as it is, with torch's own zero padding where
  the neighbours' rows belong, while the p edge rows each neighbour needs travel
  (`comm.halo.post_exchange`). Then the p output rows next to each neighbour are
  computed again from the halo and the band's first (or last) 2p rows, as one process
  computes them, and replace the ones the zeros made. No copy of the band is made, and
  the exchange runs beside the band's convolution, so a band waits only for a
  neighbour that is really behind. The backward goes the same way round: the halo
  rows' gradient first (a convolution's backward over the halo with zero rows for the
  band: a convolution is linear in its input, and the band's own part comes from the
  band's backward), sent while the band's own gradients are computed; what comes back
  is added to the edge rows. The weight's gradient is the sum of those parts (in
  float32 under autocast), so it agrees with one process's to rounding, not bit for bit.
- **With its halo** (any other stride, window or padding): the halo rows are received
  first and the band is convolved with them attached (`comm.halo.gather_halo`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from shardwise.comm.halo import HaloPlan, assemble, edge_padding, gather_halo, post_exchange, scatter_halo_grad
from shardwise.errors import ShardwiseError
from shardwise.ranges import even_bounds


def pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def window_plan(height: int, kernel: int, stride: int, padding: int, group, layer: str) -> HaloPlan:
    out_height = (height + 2 * padding - kernel) // stride + 1
    plan = HaloPlan(height, out_height, kernel, stride, padding, dist.get_world_size(group), dist.get_rank(group))
    plan.check(layer)
    return plan


def _convolution_backward(grad: Tensor, x: Tensor, weight: Tensor, conv: tuple, padding, mask: list[bool]):
    """torch's own convolution backward (input, weight and bias gradients in one call)."""
    stride, _, _, groups, has_bias = conv
    bias_sizes = [weight.shape[0]] if has_bias and mask[2] else None
    return torch.ops.aten.convolution_backward(
        grad, x, weight, bias_sizes, list(stride), list(padding), [1, 1], False, [0, 0], groups, mask
    )


def _wide(t: Tensor) -> Tensor:
    """A half-precision tensor in float32 (for a sum of a few parts), any other as it is."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


class _CentredConv2d(torch.autograd.Function):
    """The centred way (module docstring): forward and backward overlap the halo exchange
    with the band's own convolution. Every band holds at least 2p rows."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan: HaloPlan, group, width_stride, width_padding, groups):
        p, rank, parts = plan.padding, plan.rank, plan.parts
        peers = [peer for peer in (rank - 1, rank + 1) if 0 <= peer < parts]
        edge = {rank - 1: x[:, :, :p], rank + 1: x[:, :, x.shape[2] - p :]}
        shape = (x.shape[0], x.shape[1], p, x.shape[3])
        works, got = post_exchange({q: edge[q] for q in peers}, {q: shape for q in peers}, group, x)
        out = F.conv2d(x, weight, bias, (1, width_stride), (p, width_padding), 1, groups)
        for work in works:
            work.wait()
        top, bottom = got.get(rank - 1), got.get(rank + 1)

        def edge_rows(rows: Tensor) -> Tensor:  # p output rows from the 3p input rows behind them
            return F.conv2d(rows, weight, bias, (1, width_stride), (0, width_padding), 1, groups)

        if top is not None:
            out[:, :, :p] = edge_rows(torch.cat([top, x[:, :, : 2 * p]], 2))
        if bottom is not None:
            out[:, :, out.shape[2] - p :] = edge_rows(torch.cat([x[:, :, x.shape[2] - 2 * p :], bottom], 2))
        ctx.save_for_backward(x, weight, *(t for t in (top, bottom) if t is not None))
        ctx.has, ctx.plan, ctx.group = (top is not None, bottom is not None), plan, group
        ctx.conv = ((1, width_stride), (p, width_padding), 1, groups, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, *halo = ctx.saved_tensors
        top = halo.pop(0) if ctx.has[0] else None
        bottom = halo.pop(0) if ctx.has[1] else None
        # under autocast the forward ran in the gradient's precision (bf16): so does the
        # backward, and each gradient comes back in its own tensor's dtype (float32 weights)
        low, p, rank = grad.dtype, ctx.plan.padding, ctx.plan.rank
        w, width_padding = weight.to(low), ctx.conv[1][1]
        # every rank of the group takes the same branch: the bands of one layer all need it or not
        want_x = ctx.needs_input_grad[0]
        send, grad_w = {}, None
        zeros = grad.new_zeros(x.shape[0], x.shape[1], 2 * p, x.shape[3])
        for peer, halo_rows in ((rank - 1, top), (rank + 1, bottom)):
            if halo_rows is None:
                continue
            above = peer < rank
            small = torch.cat([halo_rows.to(low), zeros] if above else [zeros, halo_rows.to(low)], 2)
            rows = grad[:, :, :p] if above else grad[:, :, grad.shape[2] - p :]
            g_small, g_w, _ = _convolution_backward(rows, small, w, ctx.conv, (0, width_padding), [want_x, True, False])
            grad_w = _wide(g_w) if grad_w is None else grad_w + _wide(g_w)
            if want_x:
                send[peer] = g_small[:, :, :p] if above else g_small[:, :, g_small.shape[2] - p :]
        shape = (x.shape[0], x.shape[1], p, x.shape[3])
        works, got = post_exchange(send, {q: shape for q in send}, ctx.group, grad) if want_x else ([], {})
        grad_x, g_w, grad_b = _convolution_backward(
            grad, x.to(low), w, ctx.conv, ctx.conv[1], [want_x, True, ctx.conv[4]]
        )
        grad_w = (g_w if grad_w is None else _wide(g_w) + grad_w).to(weight.dtype)
        grad_b = grad_b.to(weight.dtype) if ctx.conv[4] else None
        for work in works:
            work.wait()
        if not want_x:  # the image itself (the first convolution): no gradient to make or send
            return None, grad_w, grad_b, None, None, None, None, None
        grad_x = grad_x.to(x.dtype)
        if rank - 1 in got:
            grad_x[:, :, :p] += got[rank - 1]
        if rank + 1 in got:
            grad_x[:, :, grad_x.shape[2] - p :] += got[rank + 1]
        return grad_x, grad_w, grad_b, None, None, None, None, None


class _HaloConv2d(torch.autograd.Function):
    """The way with its halo (module docstring), keeping for the backward only the band
    (which the previous layer keeps anyway) and the few halo rows, not a second copy of
    the band with the halo attached.

    Forward: exchange the halo, convolve. Backward: rebuild the rows, take the input and
    weight gradients, send the halo rows' gradient back to their owners."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan, group, stride, width_padding, groups):
        rows, top, bottom = gather_halo(x, plan, group, pad_value=0.0)  # with the edge's zero rows
        ctx.save_for_backward(x, weight, *(t for t in (top, bottom) if t is not None))
        ctx.has = (top is not None, bottom is not None)
        ctx.plan, ctx.group = plan, group
        ctx.conv = (stride, (0, width_padding), 1, groups, bias is not None)
        return F.conv2d(rows, weight, bias, stride, (0, width_padding), 1, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight, *halo = ctx.saved_tensors
        top = halo.pop(0) if ctx.has[0] else None
        bottom = halo.pop(0) if ctx.has[1] else None
        padded = assemble(x, ctx.plan, top, bottom, pad_value=0.0)
        above, below = edge_padding(ctx.plan)
        low = grad.dtype  # autocast: as in _CentredConv2d
        want_x, has_bias = ctx.needs_input_grad[0], ctx.conv[4]
        grad_rows, grad_weight, grad_bias = _convolution_backward(
            grad, padded.to(low), weight.to(low), ctx.conv, ctx.conv[1], [want_x, True, has_bias]
        )
        grad_weight = grad_weight.to(weight.dtype)
        grad_bias = grad_bias.to(weight.dtype) if has_bias else None
        if not want_x:  # the image itself (the first convolution): no gradient to make or send
            return None, grad_weight, grad_bias, None, None, None, None, None
        grad_rows = grad_rows.to(x.dtype)[:, :, above : grad_rows.shape[2] - below]
        grad_x = scatter_halo_grad(grad_rows, ctx.plan, ctx.group, x.shape)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class SpatialConv2d(nn.Module):
    def __init__(self, full: nn.Conv2d, height: int, group: dist.ProcessGroup, name: str):
        super().__init__()
        if pair(full.dilation) != (1, 1) or full.padding_mode != "zeros" or isinstance(full.padding, str):
            raise ShardwiseError("parallel.spatial", f"{name}: only zero padding given in pixels, dilation 1")
        self.group, self.groups = group, full.groups
        (kh, _), (sh, sw), (ph, pw) = pair(full.kernel_size), pair(full.stride), pair(full.padding)
        self.stride, self.width_padding = (sh, sw), pw
        self.plan = window_plan(height, kh, sh, ph, group, name)
        # centred: the output band is the input band, and every band holds the 2p rows its edges need
        bands = even_bounds(height, self.plan.parts)
        self.centred = sh == 1 and ph > 0 and kh == 2 * ph + 1 and all(b - a >= 2 * ph for a, b in bands)
        self.weight = nn.Parameter(full.weight.detach().clone())
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        # the weight gradient is this band's share: the runner sums them (Part.band_sum)
        w, b, plan, group = self.weight, self.bias, self.plan, self.group
        if self.centred:
            return _CentredConv2d.apply(x, w, b, plan, group, self.stride[1], self.width_padding, self.groups)
        return _HaloConv2d.apply(x, w, b, plan, group, self.stride, self.width_padding, self.groups)
