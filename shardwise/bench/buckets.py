"""DDP's bucket size, measured on each link: `parallel.bucket_mb` against torch's own buckets.

The two models of `bench scaling` on 2 data-parallel ranks, with their batches per rank: the
compute-bound convnet (0.6 MB of gradients: one bucket of DDP's own, whose first bucket takes
1 MiB) in buckets of 0.05, 0.1 and 0.25 MiB, so that the first ones reduce during the backward;
and the communication-bound MLP (19 MB: two of DDP's buckets, 16.9 and 2.1 MB) in buckets of
0.25, 1 and 4 MiB, and 100 (one bucket). Each repetition runs every size side by side
(rotated); a size's figure is its step time over that of DDP's own buckets in the same
repetition (under 1: the size is faster).
"""

from __future__ import annotations

from shardwise.bench.common import Bench, alternate
from shardwise.bench.scaling import MODELS

N, STEPS = 2, 30
SIZES = {  # MiB; None: DDP's own buckets
    "compute-bound (convnet, digits)": (None, 0.05, 0.1, 0.25),
    "communication-bound (mlp 256-2048-2048-10)": (None, 0.25, 1.0, 4.0, 100.0),
}


def run(b: Bench) -> None:
    b.console.print(
        f"[bold]buckets[/]: DDP's bucket size on {N} data-parallel ranks ({b.where}), {STEPS} steps per run, "
        f"{b.repeats} rotated repetitions"
    )
    for name, (model, per_worker) in MODELS.items():

        def side(mb: float | None, model: list[str] = model, per_worker: int = per_worker):
            args = ["--nproc", str(N), "--train.batch_size", str(per_worker * N), *model]
            args += [] if mb is None else ["--parallel.bucket_mb", str(mb)]
            return lambda i: b.train(args, f"buckets-{per_worker}-{mb}-{i}", steps=STEPS)["step_time_s"]

        sides = {_label(mb): side(mb) for mb in SIZES[name]}
        b.console.print(f"  {name}, {per_worker} samples per rank")
        times = alternate(sides, b.repeats, b.console)
        own = times[_label(None)]
        for mb in SIZES[name][1:]:
            how = f"{per_worker} samples per rank, {N} ranks; step time / DDP's own buckets' step time"
            text = b.ratio("buckets", f"{name}: buckets of {mb:g} MiB / DDP's own", times[_label(mb)], own, how=how)
            b.console.print(f"  {name}, buckets of {mb:g} MiB: [bold]{text}[/] of DDP's own buckets' step")


def _label(mb: float | None) -> str:
    return "DDP's own" if mb is None else f"{mb:g} MiB"
