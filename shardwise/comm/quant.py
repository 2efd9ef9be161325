"""int8 quantisation with a scale per block of BLOCK entries (comm/compress.py's int8).

One scale for a whole bucket (max |x| / 127 over millions of entries) rounds every entry
under a 254th of the bucket's largest to zero: a layer whose gradients are small beside
another's in the same bucket sends nothing for many steps, its gradient piling up in the
residual until it goes in one burst (error feedback delays, it does not drop). On the
digits convnet one such run of 2 ranks diverged at its learning rate's peak. A scale per
block (QSGD's buckets, Alistarh et al. 2017; the block-wise quantisation of ZeRO++) keeps
each block's error within its own largest entry, for one float scale per BLOCK bytes:
0.4% more bytes at 1024.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 1024  # entries per scale


def blocks(n: int) -> int:
    """The blocks of `n` entries (the last one padded with zeros)."""
    return -(-n // BLOCK)


def quantize(flat: Tensor, work: Tensor, q: Tensor, residual: Tensor) -> Tensor:
    """`flat` as int8 in `q` (blocks(n) x BLOCK entries, the padding zero) with one scale a
    block, returned; `residual` gets what the bytes do not say. `work`: float scratch of
    q's size."""
    n = flat.numel()
    full = n // BLOCK * BLOCK
    work[full:].zero_()
    work[full:n].copy_(flat[full:])  # the last, partial block padded (the others are read in place)
    rows, blocks_in = work.view(-1, BLOCK), flat[:full].view(-1, BLOCK)
    tail = rows[full // BLOCK :]
    # max |x| a block (aminmax along a dimension takes 20 times as long here); a NaN or inf
    # makes its block's scale one, which the caller checks
    top = torch.cat([blocks_in.amax(dim=1), tail.amax(dim=1)])
    low = torch.cat([blocks_in.amin(dim=1), tail.amin(dim=1)])
    scales = torch.maximum(top, low.neg_()).clamp_min_(torch.finfo(flat.dtype).tiny).div_(127)
    torch.div(blocks_in, scales[: full // BLOCK, None], out=rows[: full // BLOCK])
    tail.div_(scales[full // BLOCK :, None])
    # no clamp: |x| / (max |x| / 127) exceeds 127 by a rounding at most, which round() takes back
    q.copy_(work.round_())
    rows.mul_(scales[:, None])
    torch.sub(flat, work[:n], out=residual)
    return scales


def sum_of(qs: Tensor, scales: Tensor, world: int, out: Tensor, work: Tensor) -> Tensor:
    """Into `out` (n entries): the sum over `world` ranks of each one's dequantised bytes
    (`qs`, every rank's blocks back to back; `scales`, every rank's scales), in rank order, so
    every rank holds the same sum. `work`: float scratch of a rank's padded size."""
    n, size = out.numel(), work.numel()
    per, full = size // BLOCK, n // BLOCK
    whole = out[: full * BLOCK].view(full, BLOCK)
    out.zero_()
    for r in range(world):
        rows = work.copy_(qs[r * size : (r + 1) * size]).view(per, BLOCK)
        s = scales[r * per : (r + 1) * per, None]
        whole.addcmul_(rows[:full], s[:full])
        if full < per:  # the last, partial block
            out[full * BLOCK :].addcmul_(rows[full, : n - full * BLOCK], s[full])
    return out
