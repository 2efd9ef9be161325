"""Spatial partitioning: every feature map of the conv stack cut into bands of rows.

Each rank of the spatial group holds a band of rows of the input image and of
every feature map after it (`ranges.even_bounds`: heights may differ by one).
Before each convolution or pooling window the neighbours exchange exactly the
halo rows the window needs (`comm.halo`), so each rank computes its band of
the output as the whole layer would; a centred convolution exchanges them while it
convolves its band (`parallel/spatial_conv.py`). Weights are the same on every rank; each
band contributes its share of their gradient, and the shares of every banded
layer are summed over the group in one all-reduce after the backward
(`comm.flat.sum_gradients` over `Part.band_sum`, called by the runner: one all-reduce per parameter inside
the backward paid a collective's latency each). Normalisation
statistics are sums over the group. The bands are gathered only where the
fully-connected head begins (flatten) or reduced by global average pooling;
the head then runs whole on every rank.

Applied from outside to a model's `features`: Conv2d (any kernel, stride,
zero padding; dilation 1), MaxPool2d/AvgPool2d, GroupNorm, BatchNorm2d,
AdaptiveAvgPool2d(1) and Flatten are replaced; everything else there must act
on each pixel alone (activations, identity).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from shardwise.comm.collectives import gather_from_group, reduce_from_group
from shardwise.comm.cost import Link, all_reduce, between_compute
from shardwise.comm.halo import with_halo
from shardwise.errors import ShardwiseError
from shardwise.parallel.part import Part
from shardwise.parallel.spatial_conv import SpatialConv2d, pair, window_plan
from shardwise.parallel.spatial_norm import BandGroupNorm
from shardwise.ranges import even_sizes

if TYPE_CHECKING:
    from shardwise.topology import RankMesh


class SpatialPool2d(nn.Module):
    def __init__(self, full: nn.MaxPool2d | nn.AvgPool2d, height: int, group: dist.ProcessGroup, name: str):
        super().__init__()
        self.is_max = isinstance(full, nn.MaxPool2d)
        if full.ceil_mode or (self.is_max and pair(full.dilation) != (1, 1)):
            raise ShardwiseError("parallel.spatial", f"{name}: pooling with ceil_mode or dilation is not supported")
        if not self.is_max and (not full.count_include_pad or full.divisor_override):
            raise ShardwiseError("parallel.spatial", f"{name}: average pooling must count the padding")
        self.group = group
        self.kernel, self.stride = pair(full.kernel_size), pair(full.stride or full.kernel_size)
        ph, self.width_padding = pair(full.padding)
        self.plan = window_plan(height, self.kernel[0], self.stride[0], ph, group, name)

    def forward(self, x: Tensor) -> Tensor:
        pad_value = float("-inf") if self.is_max else 0.0
        rows = with_halo(x, self.plan, self.group, pad_value=pad_value)
        pool = F.max_pool2d if self.is_max else F.avg_pool2d
        return pool(rows, self.kernel, self.stride, (0, self.width_padding))


class _BandNormalize(torch.autograd.Function):
    """x_hat = (x - mean) / sqrt(var + eps), mean and var over `dims` of every band.

    Forward: two all-reduces (the sum, then the sum of squared deviations, as
    torch's own norms compute them). Backward: the usual normalisation gradient,
    dx = rstd (g - mean(g) - x_hat mean(g x_hat)), whose two means are again sums
    over every band. Only x_hat and rstd are kept for the backward pass, as
    torch's fused norms do."""

    @staticmethod
    def forward(ctx, x: Tensor, dims: tuple[int, ...], count: int, eps: float, group: dist.ProcessGroup):
        total = x.sum(dim=dims, keepdim=True)
        dist.all_reduce(total, group=group)
        mean = total / count
        centred = x - mean
        sq = (centred * centred).sum(dim=dims, keepdim=True)
        dist.all_reduce(sq, group=group)
        var = sq / count
        rstd = torch.rsqrt(var + eps)
        x_hat = centred.mul_(rstd)
        ctx.save_for_backward(x_hat, rstd)
        ctx.dims, ctx.count, ctx.group = dims, count, group
        ctx.mark_non_differentiable(mean, var)
        return x_hat, mean, var

    @staticmethod
    def backward(ctx, grad: Tensor, _mean, _var):
        x_hat, rstd = ctx.saved_tensors
        sums = torch.cat([grad.sum(dim=ctx.dims, keepdim=True), (grad * x_hat).sum(dim=ctx.dims, keepdim=True)])
        dist.all_reduce(sums, group=ctx.group)
        g_mean, gx_mean = (sums / ctx.count).chunk(2)
        return rstd * (grad - g_mean - x_hat * gx_mean), None, None, None, None


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is None:
        return y
    return y * weight[:, None, None] + bias[:, None, None]  # gradients: this band's share


class SpatialGroupNorm(nn.Module):
    """GroupNorm whose mean and variance (per sample and group) cover every band."""

    def __init__(self, full: nn.GroupNorm, height: int, group: dist.ProcessGroup):
        super().__init__()
        self.group, self.num_groups, self.eps = group, full.num_groups, full.eps
        self.rows = even_sizes(height, dist.get_world_size(group))  # every band's, as the convolutions cut them
        self.weight = nn.Parameter(full.weight.detach().clone()) if full.affine else None
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.affine else None

    def forward(self, x: Tensor) -> Tensor:
        # the statistics of every band, the affine folded in: one collective each way (spatial_norm.py)
        return BandGroupNorm.apply(x, self.weight, self.bias, self.num_groups, self.rows, self.eps, self.group)


class SpatialBatchNorm2d(nn.Module):
    """BatchNorm2d whose batch statistics (per channel) cover every band; running
    statistics are updated with the whole map's, so every rank keeps the same."""

    def __init__(self, full: nn.BatchNorm2d, height: int, group: dist.ProcessGroup):
        super().__init__()
        self.group, self.eps, self.momentum, self.height = group, full.eps, full.momentum, height
        self.weight = nn.Parameter(full.weight.detach().clone()) if full.affine else None
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.affine else None
        self.register_buffer("running_mean", full.running_mean.detach().clone())
        self.register_buffer("running_var", full.running_var.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        if self.training:
            count = n * self.height * w
            y, mean, var = _BandNormalize.apply(x, (0, 2, 3), count, self.eps, self.group)
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(m * mean.reshape(c))
                self.running_var.mul_(1 - m).add_(m * var.reshape(c) * count / max(count - 1, 1))
        else:
            mean, var = self.running_mean.reshape(1, c, 1, 1), self.running_var.reshape(1, c, 1, 1)
            y = (x - mean) * torch.rsqrt(var + self.eps)
        return _affine(y, self.weight, self.bias)


class GlobalAvgPool(nn.Module):
    """AdaptiveAvgPool2d(1) over all bands: the result is whole on every rank."""

    def __init__(self, height: int, group: dist.ProcessGroup):
        super().__init__()
        self.height, self.group = height, group

    def forward(self, x: Tensor) -> Tensor:
        total = reduce_from_group(x.sum(dim=(2, 3), keepdim=True), self.group)
        return total / (self.height * x.shape[3])


class GatherRows(nn.Module):
    """The whole feature map on every rank, where the fully-connected head begins."""

    def __init__(self, height: int, group: dist.ProcessGroup, then: nn.Module):
        super().__init__()
        self.sizes = even_sizes(height, dist.get_world_size(group))
        self.group, self.then = group, then

    def forward(self, x: Tensor) -> Tensor:
        return self.then(gather_from_group(x, self.sizes, self.group, dim=2))


ELEMENTWISE = (nn.ReLU, nn.Identity, nn.Sequential)


def _input_heights(features: nn.Module, in_shape: tuple[int, int, int]) -> dict[str, int]:
    """The height of the map each module of `features` receives (a pass on zeros)."""
    heights: dict[str, int] = {}

    def record(name: str):
        def hook(_module, args) -> None:  # returns None: the input stays as it is
            heights.setdefault(name, args[0].shape[-2])

        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in features.named_modules()]
    first = next(features.parameters(), None)
    device, dtype = (first.device, first.dtype) if first is not None else (torch.device("cpu"), torch.float32)
    was_training = features.training
    features.eval()  # the tracing pass must not move batch-norm statistics
    with torch.no_grad():
        features(torch.zeros(1, *in_shape, device=device, dtype=dtype))
    features.train(was_training)
    for h in hooks:
        h.remove()
    return heights


def apply_spatial(part: Part, mesh: RankMesh, *, in_shape: tuple[int, ...], check_convolution: bool = True) -> Part:
    """Cut every feature map of the model's `features` into bands of rows across the mesh's
    spatial axis (layers replaced in place). The weights stay whole on every rank: no splits.
    (`check_convolution=False` lets a stack without convolutions through, for tests of single layers.)"""
    group, model = mesh.groups["spatial"], part.model
    if group is None or dist.get_world_size(group) == 1:
        return part
    if not isinstance(getattr(model, "features", None), nn.Sequential):
        raise ShardwiseError(
            "parallel.spatial",
            f"{type(model).__name__} has no `features`, an nn.Sequential convolution stack, to cut into bands",
        )
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.features.modules())
    if len(in_shape) != 3 or (check_convolution and not has_conv):
        raise ShardwiseError("parallel.spatial", "needs a convolutional model (convnet or resnet) on images")
    heights = _input_heights(model.features, in_shape)
    replacements: dict[str, nn.Module] = {}
    for name, m in model.features.named_modules():
        where, h = f"features.{name}", heights.get(name)
        if isinstance(m, nn.Conv2d):
            replacements[name] = SpatialConv2d(m, h, group, where)
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            replacements[name] = SpatialPool2d(m, h, group, where)
        elif isinstance(m, nn.GroupNorm):
            replacements[name] = SpatialGroupNorm(m, h, group)
        elif isinstance(m, nn.BatchNorm2d):
            replacements[name] = SpatialBatchNorm2d(m, h, group)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            if pair(m.output_size) != (1, 1):
                raise ShardwiseError("parallel.spatial", f"{where}: only global average pooling (output 1)")
            replacements[name] = GlobalAvgPool(h, group)
        elif isinstance(m, nn.Flatten):
            if h is not None and h > 1:  # a one-row map was pooled whole already (GlobalAvgPool)
                replacements[name] = GatherRows(h, group, m)
        elif not list(m.children()) and not isinstance(m, ELEMENTWISE):
            raise ShardwiseError("parallel.spatial", f"{where}: {type(m).__name__} is not supported on bands")
    for name, new in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(model.features.get_submodule(parent) if parent else model.features, child, new)
    banded = (SpatialConv2d, SpatialGroupNorm, SpatialBatchNorm2d)
    params = [p for m in model.modules() if isinstance(m, banded) for p in m.parameters(recurse=False)]
    return part.but(band_sum=(group, params))


def band_sum_seconds(link: Link, spatial: int, param_bytes: float) -> float:
    """The bands' weight gradients summed in one all-reduce, once a step (the planner's cost model)."""
    return all_reduce(link, spatial, param_bytes) if spatial > 1 else 0.0


def halo_seconds(link: Link, spatial: int, halo_bytes: float, windows: int, norm_bytes: float, norms: int) -> float:
    """The exchanges of a spatially cut step (the planner's cost model). Each of `windows`
    windows takes its band's edge rows from its neighbours before its forward and sends
    their gradient back after its backward (`halo_bytes` in all, for this rank's samples);
    each of `norms` norms gathers the bands' statistics in the forward and adds up its sums
    in the backward (`norm_bytes` in all). Each exchange costs at least the link's measured
    `sync_s`: a band waits there for its neighbour, which computes beside it."""
    if spatial <= 1:
        return 0.0
    each = between_compute(link, link.alpha_s)
    return 2 * (windows + norms) * each + 2 * link.beta_s_per_byte * (halo_bytes + norm_bytes)
