"""Group norm over bands of rows (spatial partitioning), in one autograd function with its
affine transform, as torch's own group norm is: one collective each way, and torch's fused
kernels for every pass over the band.

Forward: each band's mean and deviation per sample and group from torch's group norm kernel,
all-gathered (2 x N x G numbers a rank) and combined exactly, weighted by the bands' sizes
(Chan et al.'s pairwise update: no sum of squares to cancel); then each (sample, channel)
plane normalised with those statistics and the affine applied in one pass: batch norm's
inference kernel over the N x C planes, at least in float32 (as autocast runs torch's group
norm). Kept for the backward: the band itself, in its own precision (the convolution before
keeps its own input, not its output), the means and the variances.

Backward: batch norm's backward kernel over the same planes gives the gradient through the
plane's scale (g w rstd) and, per sample and channel, the sums of g and of g x_hat: the only
quantities every band needs. One all-reduce of 2 x N x C numbers gives the group means of
the standard normalisation gradient, dx = rstd (g w - mean(g w) - x_hat mean(g w x_hat)),
the last two terms again one fused pass; and this band's shares of the weight's and bias's
gradients (summed over the bands with the other banded layers' after the backward,
`Part.band_sum`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _planes(t: Tensor) -> Tensor:
    """(N, C, H, W) as one sample of N x C channels: a batch norm over it is per plane."""
    n, c, h, w = t.shape
    return t.reshape(1, n * c, h, w)


class BandGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, groups: int, rows: list[int], eps: float, group):
        n, c, h, w = x.shape
        k = c // groups
        # at least float32, as autocast runs torch's group norm: a bfloat16 band is read up (and
        # kept for the backward as it came, half the bytes)
        band, x = x, x.to(torch.promote_types(x.dtype, torch.float32))
        _, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, n, c, h * w, groups, 0.0)  # this band's
        gathered = [torch.empty(2, n, groups, dtype=mean.dtype) for _ in rows]
        dist.all_gather(gathered, torch.stack([mean, rstd.pow(-2)]), group=group)  # rstd 1/0: variance 0
        sizes = torch.tensor(rows, dtype=mean.dtype).reshape(-1, 1, 1)  # each band's rows: its weight
        means, variances = torch.stack(gathered).unbind(1)  # (bands, n, groups) each
        total = sizes.sum()
        mean = (sizes * means).sum(0) / total
        var = (sizes * (variances + (means - mean) ** 2)).sum(0) / total
        mean_c, var_c = mean.repeat_interleave(k, 1).reshape(-1), var.repeat_interleave(k, 1).reshape(-1)
        w_c = (weight if weight is not None else mean.new_ones(c)).to(x.dtype).repeat(n)
        b_c = (bias if bias is not None else mean.new_zeros(c)).to(x.dtype).repeat(n)
        ctx.save_for_backward(band, mean_c, var_c, w_c)
        ctx.groups, ctx.count, ctx.group, ctx.eps = groups, k * sum(rows) * w, group, eps
        ctx.weight_dtype = weight.dtype if weight is not None else None
        return F.batch_norm(_planes(x), mean_c, var_c, w_c, b_c, False, 0.0, eps).reshape(x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        band, mean_c, var_c, w_c = ctx.saved_tensors
        x, n, c = band.to(mean_c.dtype), *band.shape[:2]
        # g w rstd, and per plane the sums of g x_hat and of g (this band's)
        scaled, gx_sum, g_sum = torch.ops.aten.native_batch_norm_backward(
            _planes(grad.to(x.dtype).contiguous()), _planes(x), w_c, mean_c, var_c, None, None, False, ctx.eps,
            [True, True, True],
        )  # fmt: skip
        local = torch.stack([g_sum, gx_sum]).reshape(2, n, c)
        sums = local.clone()
        dist.all_reduce(sums, group=ctx.group)
        k = c // ctx.groups
        # the group means of g w and of g w x_hat over every band, per sample and group, per plane
        a, b = ((sums * w_c.reshape(n, c)).reshape(2, n, ctx.groups, k).sum(3) / ctx.count).repeat_interleave(k, 2)
        a, b = a.reshape(-1), b.reshape(-1)
        rstd = torch.rsqrt(var_c + ctx.eps)
        # - rstd (a + x_hat b) = x p + q, one batch-norm pass (mean 0, variance 1) added to g w rstd
        p = -rstd * rstd * b
        q = rstd * rstd * b * mean_c - rstd * a
        zeros, ones = torch.zeros_like(p), torch.ones_like(p)
        grad_x = scaled.add_(F.batch_norm(_planes(x), zeros, ones, p, q, False, 0.0, 0.0)).reshape(x.shape)
        grad_x = grad_x.to(band.dtype)
        if ctx.weight_dtype is None:
            return grad_x, None, None, None, None, None, None
        shares = local.sum(1).to(ctx.weight_dtype)  # this band's shares of the bias's and weight's gradients
        return grad_x, shares[1], shares[0], None, None, None, None
