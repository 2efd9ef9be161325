"""Many tensors as one flat vector: the parameter server's slices, ZeRO-1's gather,
a pipeline stage's gradient averaging all send one buffer instead of one per
tensor (fewer, larger messages; the bucketing idea of Li et al., "PyTorch
Distributed", VLDB 2020). Order is always the order given: callers pass a
model's parameters in model order, the same on every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from shardwise.comm.compress import entries_of


def flatten(tensors: list[Tensor | None], like: list[Tensor] | None = None) -> Tensor:
    """One flat copy of `tensors`; a None (a parameter without a gradient) counts as zeros
    shaped like the matching entry of `like`."""
    parts = [(t if t is not None else torch.zeros_like(like[i])).detach().reshape(-1) for i, t in enumerate(tensors)]
    return torch.cat(parts)


@torch.no_grad()
def copy_flat(flat: Tensor, tensors: list[Tensor]) -> None:
    """Copy consecutive runs of `flat` into `tensors`, in place."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _pieces(tensors: list[Tensor], lo: int, hi: int):
    """(index, start, end within the tensor, offset within [lo, hi)) of each of `tensors`
    overlapping the range [lo, hi) of them laid end to end."""
    start = 0
    for i, t in enumerate(tensors):
        end = start + t.numel()
        if end > lo and start < hi:
            a, b = max(lo, start), min(hi, end)
            yield i, a - start, b - start, a - lo
        start = end


@torch.no_grad()
def read_range(tensors: list[Tensor | None], like: list[Tensor], lo: int, hi: int, out: Tensor) -> None:
    """Fill `out` with the range [lo, hi) of `tensors` laid end to end (a None counts as
    zeros shaped like the matching entry of `like`): one pass, no flat copy of the whole."""
    for i, a, b, at in _pieces(like, lo, hi):
        piece = out[at : at + b - a]
        if tensors[i] is None:
            piece.zero_()
        else:
            piece.copy_(tensors[i].detach().reshape(-1)[a:b])


@torch.no_grad()
def write_range(piece: Tensor, lo: int, tensors: list[Tensor]) -> None:
    """Copy `piece`, the range starting at `lo` of `tensors` laid end to end, into them."""
    for i, a, b, at in _pieces(tensors, lo, lo + piece.numel()):
        t = tensors[i]
        if t.is_contiguous():
            t.view(-1)[a:b].copy_(piece[at : at + b - a])
        else:  # (a strided parameter: through a contiguous copy)
            whole = t.reshape(-1).clone()
            whole[a:b] = piece[at : at + b - a]
            t.copy_(whole.view(t.shape))


def named_views(flat: Tensor, named: list[tuple[str, Tensor]], *, prefix: str = "") -> dict[str, Tensor]:
    """`prefix + NAME` for each tensor of `named`, cut (cloned) from `flat` in order."""
    out, offset = {}, 0
    for name, t in named:
        out[prefix + name] = flat[offset : offset + t.numel()].view(t.shape).clone()
        offset += t.numel()
    return out


@torch.no_grad()
def sum_gradients(params: list[Tensor], group: dist.ProcessGroup) -> None:
    """Sum the gradients of `params` over `group` with one all-reduce of one flat buffer
    (spatial bands: each holds its share of the banded layers' weight gradients)."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        flat = flatten(grads)
        dist.all_reduce(flat, group=group)
        copy_flat(flat, grads)


@torch.no_grad()
def average_gradients(named: list[tuple[str, Tensor]], group: dist.ProcessGroup | None, compressor=None) -> None:
    """Average the gradients of the `named` parameters over `group` with one all-reduce of
    one flat buffer (parameters without a gradient take no part; every member has the same
    ones), or through `compressor` (comm/compress.py), which then counts a step."""
    if group is None:
        return
    named = [(name, p.grad) for name, p in named if p.grad is not None]
    grads = [g for _, g in named]
    flat = flatten(grads)
    if compressor is not None:
        flat = compressor.average(flat, entries_of(named))
        compressor.end_step()
    else:
        dist.all_reduce(flat, group=group)
        flat /= dist.get_world_size(group)
    copy_flat(flat, grads)
