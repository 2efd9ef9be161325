"""Gradient compression with error feedback: fewer bytes on the link for the gradient
average, the loss carried into the next step.

Every method here turns a flat gradient x (a DDP bucket, a pipeline stage's gradient)
into the average over the group of what each rank sends:

- bf16 / fp16: each rank sends x in half precision (torch's own `bf16_compress_hook` and
  `fp16_compress_hook` under DDP; the same cast and all-reduce elsewhere). Half the bytes;
  rounding, not dropping, so no error feedback.
- int8: each rank sends round(x / s) in int8 with a float scale s = max|x| / 127 per block
  of 1024 entries (comm/quant.py says why not one per bucket); the ranks gather every
  rank's bytes and scales and add them up (an all-gather: int8 cannot be summed on the wire
  without overflowing). A quarter of the bytes per rank and 0.4% more, (n - 1) of them
  received.
- topk: each rank sends the k = ceil(ratio x size) entries of largest magnitude, values
  and indices (Aji and Heafield 2017; Lin et al., "Deep Gradient Compression", 2018),
  gathered and added up.
- powersgd: each weight matrix M (a parameter viewed as rows x the rest) is sent as the
  rank-r factors of one step of power iteration, P = M Q and Q = M^T P, each all-reduced,
  Q kept for the next step (Vogels et al., "PowerSGD", NeurIPS 2019); vectors (biases,
  norms) go whole. r (rows + columns) floats per matrix instead of rows x columns.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019): the lossy methods (int8,
topk, powersgd) add this rank's residual to the gradient before compressing, and keep as
the next residual what they failed to send: residual = (x + residual) - what was applied
for this rank. The applied average plus the mean residual over ranks is then, step after
step, exactly the sum of the true gradients' averages (up to float rounding): nothing is
lost, only delayed. Residuals are kept per parameter name (not per DDP bucket, whose
index changes when DDP rebuilds its buckets after the first step), so a checkpoint holds
them by name.

The first `warmup_steps` steps average exactly (a plain all-reduce): early gradients are
large and change fast, and compressing them costs accuracy (Lin et al. 2018's warm-up).
So does a bucket smaller than `min_bucket_bytes`, where a method's compute and extra
collectives cost more than the bytes it saves (plan/compression.py `bucket_plan`); what
its parameters owe is added in first.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from shardwise.comm import quant
from shardwise.comm.methods import HALF, LOSSY
from shardwise.comm.residuals import Residuals
from shardwise.comm.topk import largest
from shardwise.comm.trial import Trial


@dataclass(frozen=True)
class CompressionSettings:
    method: str = "none"
    topk_ratio: float = 0.01
    powersgd_rank: int = 4
    warmup_steps: int = 0
    candidates: tuple[str, ...] = ()  # auto's shortlist, timed in the run (comm/trial.py)
    min_bucket_bytes: int = 0  # a smaller bucket is averaged whole, whatever the method


@dataclass(frozen=True)
class Entry:
    """One parameter's run of a flat gradient."""

    name: str
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def entries_of(named: list[tuple[str, Tensor]]) -> list[Entry]:
    """The runs of a flat vector that holds `named`'s tensors one after another."""
    out, offset = [], 0
    for name, t in named:
        out.append(Entry(name, offset, tuple(t.shape)))
        offset += t.numel()
    return out


class Compressor:
    """One rank's compression state over `group`: the residual of every parameter, PowerSGD's
    Q of every matrix, and the steps averaged so far (the warm-up counts them)."""

    def __init__(self, settings: CompressionSettings, group: dist.ProcessGroup | None):
        self.settings, self.group = settings, group
        self.world = dist.get_world_size(group) if group is not None else 1
        self._res = Residuals()
        self.q: dict[str, Tensor] = {}
        self.steps = 0
        self.bytes_sent = 0  # this rank's payload, summed over steps (what the link carried for it)
        self.bytes_whole = 0  # what it would have sent uncompressed (float32 gradients)
        self._buffers: dict[str, Tensor] = {}
        self._device: torch.device | None = None  # the gradients' (the buffers follow them)
        self._judged: list[bool | None] = []  # this step's buckets so far (`vouch`)
        self._verdict: bool | None = None  # the last step's, until the loop takes it
        candidates = settings.candidates
        self.trial = Trial(candidates, settings.warmup_steps, group) if len(candidates) > 1 else None

    @property
    def residuals(self) -> dict[str, Tensor]:
        """This rank's residual of every parameter, by name."""
        return self._res.by_name

    @property
    def methods(self) -> tuple[str, ...]:
        """Every method this run may average with: the trial's candidates, else the one named."""
        return self.settings.candidates or (self.settings.method,)

    @property
    def method(self) -> str:
        """The method that averages this step: a candidate's in auto's trial, then the one
        the trial chose; else the one named."""
        if self.trial is None:
            return self.settings.method
        return self.trial.method(self.steps) or self.trial.chosen or self.settings.method

    @property
    def owes(self) -> bool:
        """Whether the run can keep residuals (error feedback) that a checkpoint must hold:
        once auto's trial has kept a lossless method, only until the next step settles them
        (the same on every rank of the group: they average the same parameters alike)."""
        if self.trial is not None and self.trial.chosen is not None:
            return self.trial.chosen in LOSSY or bool(self.residuals)
        return any(m in LOSSY for m in self.methods)

    @property
    def compressing(self) -> bool:
        return self.method != "none" and self.steps >= self.settings.warmup_steps

    def whole(self, flat: Tensor) -> bool:
        """Whether `flat` is averaged whole (a plain all-reduce): in the warm-up, under none,
        and for a bucket under `min_bucket_bytes`, where the method costs more than it saves."""
        return not self.compressing or flat.numel() * flat.element_size() < self.settings.min_bucket_bytes

    def average(self, flat: Tensor, entries: list[Entry]) -> Tensor:
        """The group's average of `flat` as the method sends it (in place where it can),
        this rank's residuals updated."""
        method = self.method
        if self.world == 1:
            self.vouch(None)
            return flat
        self._device = flat.device
        if self.unsettled(flat):
            self.settle(flat, entries)
        if self.whole(flat):
            self.vouch(None)
            self.tally(flat, flat.numel() * flat.element_size())
            self._all_reduce(flat)
            return flat.div_(self.world)
        self.tally(flat)  # the method adds what it sends
        if method in HALF:
            self.vouch(None)
            return self._half(flat, torch.bfloat16 if method == "bf16" else torch.float16)
        key, owed = self._res.flat(flat, entries)
        # the new residual goes to the bucket's spare buffer, kept only if the average is
        # finite: a step the loop skips for a non-finite gradient leaves the residuals (and
        # PowerSGD's Qs) as they were, on every rank alike. Each method judges that from what
        # it received (a few scales, k values, the factors), not by another pass over the
        # bucket: a NaN or inf anywhere in a rank's x reaches them (int8's scale is max |x|;
        # top-k sends the non-finite entries first; a factor is a product with all of x). A
        # finite bucket of a step the loop skips for another is taken back (`skipped`)
        new = self._res.spare(key, flat)
        if method == "powersgd":  # x + what earlier steps owe, in the spare: its residual is made there
            applied, finite = self._powersgd(flat, entries, torch.add(flat, owed, out=new))
        else:
            flat.add_(owed)  # x + what earlier steps owe: what this rank means to send
            applied, finite = (self._int8 if method == "int8" else self._topk)(flat, new)
        if finite:
            self._res.keep(self.steps, key, entries, new)
        self.vouch(finite)
        return applied

    def vouch(self, finite: bool | None) -> None:
        """Note how a bucket of this step was averaged: through a lossy method, which judged
        from what it received whether the average is finite (`finite`, the same on every rank
        of the group), or not (None: a plain all-reduce or half precision, which judge
        nothing)."""
        self._judged.append(finite)

    def take_verdict(self) -> bool | None:
        """Whether the gradients the last step averaged are finite, where every bucket went
        through a lossy method: the loop need not look at them again (a pass over every
        gradient: 2 ms a step of the MLP 64-2048-2048-10 on one thread). None where any went
        otherwise, or no step has ended since the last call: then the loop looks."""
        verdict, self._verdict = self._verdict, None
        return verdict

    def forget_buffers(self) -> None:
        """After `residuals` were set from outside (a checkpoint): the next average builds
        its flat residuals from them."""
        self._res.forget()

    def end_step(self) -> None:
        judged, self._judged = self._judged, []
        self._verdict = None if not judged or None in judged else all(judged)
        self._res.expire(self.steps)
        if self.trial is not None and self.trial.chosen is None:
            self.trial.step_ended(self.steps)
            if self.trial.chosen is not None:  # decided: the other candidates' buffers go
                self._buffers.clear()
                if self.trial.chosen != "powersgd":
                    self.q.clear()
        self.steps += 1

    def unsettled(self, flat: Tensor) -> bool:
        """Whether `flat` is averaged without error feedback (a method without it, after lossy
        steps of auto's trial; a bucket averaged whole) while residuals are owed: the
        average must `settle` those of its parameters."""
        return bool(self.residuals) and (self.method not in LOSSY or self.whole(flat))

    def settle(self, flat: Tensor, entries: list[Entry]) -> None:
        """Before a method without error feedback averages `flat`: add in what lossy steps of
        auto's trial left owed for its parameters, once (nothing is lost)."""
        self._res.settle(self.steps, flat, entries)

    def skipped(self) -> None:
        """The loop skipped the step just averaged (a non-finite loss or gradient anywhere):
        every residual and Q goes back to what it was before it, as if it had never been
        averaged, on every rank alike (each skips the same steps)."""
        self._res.take_back(self.steps - 1)

    def tally(self, flat: Tensor, sent: int = 0) -> None:
        """Count a bucket averaged: its bytes whole, and `sent` of them on the link (each
        method adds its own payload)."""
        self.bytes_whole += flat.numel() * flat.element_size()
        self.bytes_sent += sent

    def summary(self, step_times: list[float] = (), first_step: int = 0) -> dict:
        """What the run's summary says of it: the method and the bytes this rank sent; and of
        a trial, the median of this rank's `step_times` (from step `first_step`) after it."""
        s, sent, whole = self.settings, self.bytes_sent, self.bytes_whole
        ratio = sent / max(whole, 1)
        out = {
            "method": self.method,
            "warmup_steps": s.warmup_steps,
            "bytes_sent": sent,
            "bytes_whole": whole,
            "ratio": ratio,
        }
        if self.trial is None:
            return out
        return out | {"trial": self.trial.summary(step_times[max(0, self.trial.end - first_step) :])}

    # the lossy methods: each returns the group's average (this rank's residual written to
    # `residual`) and whether the average is finite

    def _half(self, flat: Tensor, dtype: torch.dtype) -> Tensor:
        half = flat.to(dtype).div_(self.world)
        self.bytes_sent += half.numel() * half.element_size()
        self._all_reduce(half)
        return flat.copy_(half)

    def _int8(self, flat: Tensor, residual: Tensor) -> tuple[Tensor, bool]:
        size = quant.blocks(flat.numel()) * quant.BLOCK  # padded to whole blocks
        work = self._scratch("work", size, flat.dtype)
        q = self._scratch("q", size, torch.int8)
        scale = quant.quantize(flat, work, q, residual)
        qs = self._scratch("qs", self.world * size, torch.int8)
        scales = torch.empty(self.world * scale.numel(), dtype=flat.dtype, device=flat.device)
        self.bytes_sent += size + scale.numel() * scale.element_size()
        self._all_gather(qs, q)
        self._all_gather(scales, scale)
        if not bool(torch.isfinite(scales).all()):  # a non-finite x has a non-finite max
            return flat.fill_(float("nan")), False
        # the average: each rank's bytes times its scales over the ranks (the scales divided,
        # a few floats a block, not the bucket after)
        return quant.sum_of(qs, scales.div_(self.world), self.world, flat, work), True

    def _topk(self, flat: Tensor, residual: Tensor) -> tuple[Tensor, bool]:
        k = max(1, math.ceil(self.settings.topk_ratio * flat.numel()))
        index = largest(torch.abs(flat, out=self._scratch("work", flat.numel(), flat.dtype)), k)
        values = flat[index]
        residual.copy_(flat).index_fill_(0, index, 0.0)  # all but what is sent
        values_all = torch.empty(self.world * k, dtype=flat.dtype, device=flat.device)
        # a bucket holds fewer than 2^31 entries: int32 indices
        index_all = torch.empty(self.world * k, dtype=torch.int32, device=flat.device)
        self.bytes_sent += k * (values.element_size() + 4)
        self._all_gather(values_all, values)
        self._all_gather(index_all, index.to(torch.int32))
        finite = bool(torch.isfinite(values_all).all())  # NaN and inf are the largest: sent if present
        return flat.zero_().index_add_(0, index_all.long(), values_all.div_(self.world)), finite

    def _powersgd(self, flat: Tensor, entries: list[Entry], x: Tensor) -> tuple[Tensor, bool]:
        """One power-iteration step per matrix of `x` (this rank's gradient plus what it owes),
        the Ps of a bucket (and its vectors, whole) in one all-reduce, its Qs in a second; the
        average written to `flat` and this rank's residual left in `x`. A matrix's residual is
        against the group's approximation (the factors are the group's, as in torch's hook); a
        vector goes whole and leaves none."""
        rank = self.settings.powersgd_rank
        matrices, vectors = [], []
        for e in entries:
            rows = e.shape[0] if e.shape else 1  # a 0-d parameter goes whole
            cols = e.numel // max(rows, 1)
            r = min(rank, rows, cols)
            # a matrix is worth factoring only if its factors are smaller than it
            (matrices if len(e.shape) > 1 and r * (rows + cols) < rows * cols else vectors).append((e, rows, cols, r))
        views = [x[e.offset : e.offset + e.numel].view(rows, cols) for e, rows, cols, _ in matrices]
        ps = [m @ self._q(e.name, cols, r) for m, (e, _, cols, r) in zip(views, matrices, strict=True)]
        whole = [x[e.offset : e.offset + e.numel] for e, *_ in vectors]
        first = torch.cat([p.reshape(-1) for p in ps] + whole) if ps or whole else flat.new_zeros(0)
        self.bytes_sent += first.numel() * first.element_size()
        self._all_reduce(first)
        first.div_(self.world)
        offset = 0
        for i, p in enumerate(ps):
            ps[i] = _orthonormal(first[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        for (e, *_), w in zip(vectors, whole, strict=True):
            flat[e.offset : e.offset + e.numel].copy_(first[offset : offset + w.numel()])
            offset += w.numel()
            w.zero_()
        if not matrices:
            return flat, bool(torch.isfinite(first).all())
        # Q = M^T P, as (P^T M)^T: the product that reads M along its rows
        second = torch.cat([(p.t() @ m).reshape(-1) for m, p in zip(views, ps, strict=True)])
        self.bytes_sent += second.numel() * second.element_size()
        self._all_reduce(second)
        second.div_(self.world)
        # the same factors on every rank: the same decision (a NaN in the Ps reaches the Qs)
        finite = bool(torch.isfinite(second).all()) and bool(torch.isfinite(first).all())
        offset = 0
        for (e, rows, cols, r), m, p in zip(matrices, views, ps, strict=True):
            q = second[offset : offset + r * cols].view(r, cols).t().contiguous()
            offset += r * cols
            if finite:  # warm start: the next step's iteration begins from it
                self._res.log(self.steps, functools.partial(self._put_q, e.name, self.q.get(e.name)))
                self.q[e.name] = q
            # the residual M - P Q^T in place, one pass over M (no copy of it first), then the
            # average P Q^T written into the bucket
            m.addmm_(p, q.t(), alpha=-1)
            torch.mm(p, q.t(), out=flat[e.offset : e.offset + e.numel].view(rows, cols))
        return flat, finite

    def _q(self, name: str, cols: int, rank: int) -> Tensor:
        """The Q a matrix's iteration starts from: the last step's, else a seeded random one
        (the same on every rank, so the ranks' Ps add up)."""
        q = self.q.get(name)
        if q is None or q.shape != (cols, rank):
            seed = zlib.crc32(name.encode())
            q = torch.randn(cols, rank, generator=torch.Generator().manual_seed(seed)).to(self._device)
        return q

    # the collectives (a dry run for the cost model replaces them: plan/compression.py)

    def _all_reduce(self, t: Tensor) -> None:
        dist.all_reduce(t, group=self.group)

    def _all_gather(self, out: Tensor, t: Tensor) -> None:
        dist.all_gather_single(out, t, group=self.group)

    def _put_q(self, name: str, q: Tensor | None) -> None:
        if q is None:
            self.q.pop(name, None)
        else:
            self.q[name] = q

    # buffers kept from step to step (fresh ones of a bucket's size cost page faults every step)

    def _scratch(self, name: str, n: int, dtype: torch.dtype) -> Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty(n, dtype=dtype, device=self._device)
        return buf[:n]


def compressor_bytes(settings: CompressionSettings, grad_bytes: float, bucket_bytes: float, world: int) -> float:
    """The bytes a rank's Compressor holds once it has averaged a step (its buffers stay from
    step to step), for float32 gradients of `grad_bytes` averaged in buckets of at most
    `bucket_bytes`: the cost model's memory (plan/memory.py)."""
    b = min(grad_bytes, bucket_bytes)
    if settings.method in HALF:
        return b / 2  # a bucket's half-precision copy, while it is averaged
    if settings.method not in LOSSY or world <= 1:
        return 0.0
    kept = 2 * grad_bytes  # the residuals, and a spare of each bucket's (kept a step: comm/residuals.py)
    if settings.method == "int8":
        return kept + b + b / 4 + world * b / 4  # a working copy, this rank's bytes, every rank's
    if settings.method == "topk":
        return kept + b + world * settings.topk_ratio * b * 2  # the magnitudes; every rank's values, indices
    return kept  # powersgd: its factors are small beside the gradients


def _orthonormal(p: Tensor) -> Tensor:
    """P's columns made orthonormal (reduced QR): the projection PowerSGD applies."""
    return torch.linalg.qr(p, mode="reduced").Q
