"""comm.compression = auto: the cost model picks the method whose averaging of a step's
gradients takes least time on this link, compressing and all.

Per method, the seconds a step spends averaging the gradients of the part a
data-parallel rank holds (`bucket_plan`):

- its collectives on the measured link (comm/cost.py): none and bf16/fp16 an all-reduce
  of 4 or 2 bytes per entry (the latter at the half type's measured rate); int8 an
  all-gather of every rank's byte per entry and scale; top-k two all-gathers of every
  rank's k values and indices; PowerSGD two all-reduces, of the Ps (and vectors) and of
  the Qs;
- its own compute, measured here on gradients of the model's shapes by a dry run of
  the very code that compresses (comm/compress.py), its collectives replaced by local
  copies, on one thread as a rank computes; where more ranks than cores share this
  machine, every rank compresses at once, and that compute takes world / cores as long,
  as the model's own passes do (plan/model.py `core_stretch`).

The gradient bytes of a rank's part are the whole model's over the layout's model-
parallel degrees (tp x pp x vertical x spatial): the shapes are the whole model's.
Collectives are taken as not overlapped with the backward, for every method alike.

Per bucket (`bucket_plan`): DDP averages the gradients in buckets (`ddp_buckets`; a
lossy method's first bucket as large as the rest, parallel/data.py `bucket_caps`), each
with its own collectives, so each method is priced bucket by bucket, and a bucket where
it would take longer than a plain all-reduce (a small one, where the extra collectives'
latency outweighs the bytes saved) is priced, and run, whole: the method's
`comm.min_bucket_bytes` is the least size from which every bucket pays.

The choice (`choose`) compares whole steps: the cost model's step of the run's layout
with each method's averaging in place of DDP's all-reduce (overlapped with the backward,
for none), so that a compute-bound model's small averaging is weighed as the small part
of a step it is. A method must save a margin of none's step, larger for a lossy method:
what it costs in steps to an accuracy is for the bench to show (`shardwise bench
compression`), not for a prediction of a step's time.

A run that names a method is priced the same way (`averaging`): the planner's step then
averages through that method instead of DDP's overlapped all-reduce (plan/model.py).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from shardwise.comm import quant
from shardwise.comm.compress import CompressionSettings, Compressor, entries_of
from shardwise.comm.cost import Link, all_gather, all_reduce
from shardwise.comm.methods import LOSSY, MARGIN, METHODS, fair, lossless_base
from shardwise.comm.trial import STEPS_EACH, TRIAL_BAND
from shardwise.config import Config
from shardwise.parallel.data import bucket_caps
from shardwise.parallel.data import ddp_buckets as bucketed

ROUNDS = 3


class DryCompressor(Compressor):
    """The compressor's own compute for a group of `world` ranks that all send what this
    one sends: its collectives are local copies."""

    def __init__(self, settings: CompressionSettings, world: int):
        super().__init__(settings, None)
        self.world = world

    def _all_reduce(self, t: Tensor) -> None:
        t.mul_(self.world)

    def _all_gather(self, out: Tensor, t: Tensor) -> None:
        out.view(self.world, -1).copy_(t.reshape(1, -1).expand(self.world, -1))  # no allocation, as a gather into place


def compute_seconds(shapes: list[tuple[int, ...]], settings: CompressionSettings, world: int) -> float:
    """What compressing and decompressing gradients of `shapes` costs one rank (median of
    ROUNDS after a first, unmeasured one); 0 for none."""
    if settings.method == "none":
        return 0.0
    named = [(f"p{i}", torch.empty(s)) for i, s in enumerate(shapes)]
    entries = entries_of(named)
    flat = torch.randn(sum(math.prod(s) for s in shapes), generator=torch.Generator().manual_seed(0))
    dry = DryCompressor(settings, world)
    times, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # as a rank computes
    try:
        for _ in range(ROUNDS + 1):
            work = flat.clone()
            started = time.perf_counter()
            dry.average(work, entries)
            times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times[1:])


def collective_seconds(
    shapes: list[tuple[int, ...]], settings: CompressionSettings, link: Link, dp: int, elem: int = 4
) -> float:
    """The method's collectives for gradients of `shapes` (`elem` bytes an entry) over `dp`
    ranks on `link`."""
    n = sum(math.prod(s) for s in shapes)
    method = settings.method
    if method == "none":
        return all_reduce(link, dp, elem * n)
    if method in ("bf16", "fp16"):
        return all_reduce(link, dp, 2 * n, method)  # summed at that type's own rate
    if method == "int8":
        size = quant.blocks(n)
        return all_gather(link, dp, dp * size * quant.BLOCK) + all_gather(link, dp, dp * 4 * size)
    if method == "topk":
        k = max(1, math.ceil(settings.topk_ratio * n))
        return all_gather(link, dp, dp * elem * k) + all_gather(link, dp, dp * 4 * k)
    first = second = 0
    for s in shapes:
        rows = s[0] if s else 1
        cols = math.prod(s) // max(rows, 1)
        r = min(settings.powersgd_rank, rows, cols)
        if len(s) > 1 and r * (rows + cols) < rows * cols:
            first, second = first + r * rows, second + r * cols
        else:
            first += math.prod(s)
    return all_reduce(link, dp, elem * first) + (all_reduce(link, dp, elem * second) if second else 0.0)


def ddp_buckets(shapes: list[tuple[int, ...]], elem: int = 4, **caps: int) -> list[list[tuple[int, ...]]]:
    """The gradients of `shapes` (in the model's order) in DDP's buckets (parallel/data.py
    `ddp_buckets`, whose `first` and `cap` `caps` may name), in the order DDP launches them."""
    return bucketed(shapes, lambda s: elem * math.prod(s), **caps)


def bucket_bytes(bucket: list[tuple[int, ...]], elem: int = 4) -> int:
    return elem * sum(math.prod(s) for s in bucket)


def bucket_plan(
    shapes,
    settings: CompressionSettings,
    link: Link,
    dp: int,
    elem: int = 4,
    named: int | None = None,
    stretch: float = 1.0,
) -> dict[str, tuple[float, int]]:
    """Per method: its averaging time for a step, bucket by bucket (`ddp_buckets`: the
    buckets the method would run in, `bucket_caps`, with `named` parallel.bucket_mb's
    bytes; its collectives, and its compute x `stretch`, the cores' sharing), with the
    buckets below its `min_bucket_bytes` averaged whole, and that size: the least from
    which every bucket takes less time through the method than through a plain all-reduce
    (0: all do, or none does: then the method is priced through every bucket, as it
    would run)."""
    out = {}
    for method in METHODS:
        buckets = ddp_buckets(shapes, elem, **bucket_caps([method], named))
        sizes = [bucket_bytes(b, elem) for b in buckets]
        s = CompressionSettings(method, settings.topk_ratio, settings.powersgd_rank)  # no warm-up: compressing
        times = [collective_seconds(b, s, link, dp, elem) + stretch * compute_seconds(b, s, dp) for b in buckets]
        whole = [collective_seconds(b, CompressionSettings(), link, dp, elem) for b in buckets]
        losing = [size for size, t, w in zip(sizes, times, whole, strict=True) if t >= w]
        least = max(losing) + 1 if method != "none" and losing else 0
        if least > max(sizes):  # it pays on no bucket: priced as it is (the choice passes it by)
            least = 0
        seconds = sum(t if size >= least else w for size, t, w in zip(sizes, times, whole, strict=True))
        out[method] = seconds, least
    return out


def whole_below(
    plan: dict[str, tuple[float, int]], methods: list[str], shapes, elem: int = 4, named: int | None = None
) -> tuple[int, str]:
    """The run's `comm.min_bucket_bytes` for `methods` (the one chosen, or the trial's
    candidates: the largest of theirs, one size for all), and the words that say it ("":
    every bucket goes through the method)."""
    least = max(plan[m][1] for m in methods)
    if not least:
        return 0, ""
    sizes = [bucket_bytes(b, elem) for b in ddp_buckets(shapes, elem, **bucket_caps(methods, named))]
    slower = [m for m in methods if plan[m][1] == least]
    return least, (
        f"; {sum(size < least for size in sizes)} of DDP's {len(sizes)} buckets go whole (those under "
        f"{least:,} bytes): there {' and '.join(slower)} would take longer than a plain all-reduce"
    )


def rank_shapes(model: nn.Module, tp: int) -> list[tuple[int, ...]]:
    """The gradient shapes a data-parallel rank averages: tensor parallelism cuts the rows
    of the layers it splits (taken here as all of them); a stage, a band or a column
    group holds fewer parameters whole (the whole model here)."""
    return [(max(1, p.shape[0] // tp), *p.shape[1:]) if p.dim() else () for p in model.parameters()]


def averaging(model: nn.Module, settings: CompressionSettings, link: Link, elem: int) -> Callable[..., float]:
    """A layout's time to average a step's gradients through `settings`' method on `link`
    (collectives and compute, bucket by bucket, those under its min_bucket_bytes whole), by
    its dims (`topology.ParallelDims`) and the cores' sharing (`stretch`, by which the
    compute takes longer); the compute is measured once per (tp, dp, DDP's buckets)."""
    measured: dict[tuple[int, int, int | None], tuple[list, list[bool], float]] = {}
    least = settings.min_bucket_bytes
    settings = CompressionSettings(settings.method, settings.topk_ratio, settings.powersgd_rank)  # compressing

    def seconds(dims, stretch: float) -> float:
        key = (dims.tp, dims.dp, dims.bucket_bytes)
        if key not in measured:
            caps = bucket_caps([settings.method], dims.bucket_bytes)
            buckets = ddp_buckets(rank_shapes(model, dims.tp), elem, **caps)
            through = [bucket_bytes(b, elem) >= least for b in buckets]
            compute = sum(compute_seconds(b, settings, dims.dp) for b, t in zip(buckets, through, strict=True) if t)
            measured[key] = buckets, through, compute
        buckets, through, compute = measured[key]
        return compute * stretch + sum(
            collective_seconds(b, settings if t else CompressionSettings(), link, dims.dp, elem)
            for b, t in zip(buckets, through, strict=True)
        )

    return seconds


def choose(averaging: dict[str, float], steps: dict[str, float] | None = None) -> tuple[str, str]:
    """The method to run, and one line saying why. `steps` are the cost model's whole steps
    under each method (its averaging in place of DDP's overlapped all-reduce), where it
    could price them; else the averaging times alone are compared. The fastest method
    that saves its margin (comm/methods.py `fair`): a lossless one (bf16, fp16) a tenth of
    none's time, a lossy one (error-fed) a third of the fastest lossless method's, since it
    can also need more steps to the same accuracy, which no prediction of a step sees."""
    times, what = (steps, "a step") if steps else (averaging, "a step to average the gradients")
    kept = fair(times)
    best = min(kept, key=kept.get)
    others = ", ".join(f"{m} {1e3 * t:.1f}" for m, t in sorted(times.items(), key=lambda kv: kv[1]) if m != best)
    line = f"{best}: {1e3 * times[best]:.1f} ms {what} predicted (ms: {others})"
    faster = min(times, key=times.get)
    if faster != best:
        line += f"; {faster} does not save its margin ({_margin(faster, times)}), the least to be worth it"
    return best, line


def _margin(method: str, times: dict[str, float]) -> str:
    return f"a third of {lossless_base(times)}'s time" if method in LOSSY else "a tenth of none's time"


def pick(averaging: dict[str, float], steps: dict[str, float] | None) -> tuple[str, list[str], str]:
    """auto's choice (`choose`), the methods the run times itself (`shortlist`; none where
    fewer than two), and the line that says both."""
    best, line = choose(averaging, steps)
    candidates = shortlist(steps or averaging, best)
    if len(candidates) < 2:
        return best, [], line
    line += f"; the run times {', '.join(candidates)} for {STEPS_EACH} steps each and keeps the fastest"
    return best, candidates, line


def shortlist(times: dict[str, float], best: str) -> list[str]:
    """The methods the run times itself (comm/trial.py), the fastest predicted first: those
    predicted within TRIAL_BAND of `best`'s time that save their margin, and the fastest
    lossless method predicted to save its margin (none at least), against which a lossy
    one must save its margin in the run too, but only where that is a close call: a
    lossy candidate TRIAL_BAND slower than predicted would not save it. A lossy method
    predicted to clear its margin by more is not held up by steps of the slower lossless
    method (on the MLP at 1 Gbit/s, five of fp16's steps cost as much as fourteen of
    top-k's). Where none is predicted best, no trial: nothing is expected to pay."""
    if best == "none":
        return ["none"]
    near = {m for m, t in fair(times).items() if t <= (1 + TRIAL_BAND) * times[best]}
    base = lossless_base(times)  # (none at least)
    if base in near or any(m in LOSSY and (1 + TRIAL_BAND) * times[m] > MARGIN * times[base] for m in near):
        near.add(base)
    return sorted(near, key=times.get)


def run_averaging(cfg: Config, link: Link):
    """How the run's named compression method averages a layout's gradients (the planner's
    step prices it instead of DDP's all-reduce); None without one (auto is chosen later)."""
    from shardwise.data import load_source
    from shardwise.models import build_model

    settings = named_settings(cfg)
    if settings is None:
        return None
    dataset = load_source(cfg.data, seed=cfg.train.seed)
    model = build_model(cfg.model, dataset.in_shape, dataset.num_classes)
    return averaging(model, settings, link, torch.finfo(getattr(torch, cfg.train.dtype)).bits // 8)


def named_settings(cfg: Config) -> CompressionSettings | None:
    """The run's named compression method, as the cost model takes it (None: none, or auto
    before it is chosen)."""
    c = cfg.comm
    if c.compression in ("none", "auto"):
        return None
    return CompressionSettings(c.compression, c.topk_ratio, c.powersgd_rank, min_bucket_bytes=c.min_bucket_bytes)
