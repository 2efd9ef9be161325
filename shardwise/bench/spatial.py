"""Spatial partitioning on a large image: S bands vs one process.

A ResNet (3x3 stem, one basic block per width, group norm, global pooling) on
random SIZE x SIZE RGB images, batch 2: the feature maps dominate both time and
memory. Each repetition runs one process and S processes (rotated order),
reporting the median step time and, per rank, the bytes of activations saved
for the backward pass (expected: about 1/S of one process, plus halo rows).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.table import Table

from shardwise.bench.common import alternate, bench_console, mib, ratio_spread, spread, torchrun_json


def main(*, nproc: int, size: int, repeats: int, steps: int) -> int:
    console = bench_console()
    console.print(
        f"[bold]bench spatial[/]: resnet (widths 8, 16, 32, group norm) on {size} x {size} RGB images, batch 2, "
        f"spatial={nproc} vs one process (gloo, loopback), {steps} steps per run, {repeats} rotated repetitions"
    )
    saved: dict[str, list[int]] = {}

    def side(name: str, n: int):
        def run(i: int) -> float:
            args = ["--size", str(size), "--steps", str(steps)]
            result = torchrun_json("shardwise.bench.spatial_worker", n, args, work / f"{name}-{i}.json")
            saved[name] = result["saved_bytes"]
            return result["step_time_s"]

        return run

    with tempfile.TemporaryDirectory(prefix="shardwise-bench-") as tmp:
        work = Path(tmp)
        names = ["one process", f"spatial={nproc}"]
        times = alternate({names[0]: side(names[0], 1), names[1]: side(names[1], nproc)}, repeats, console)
    table = Table(title="median over repetitions (min - max)")
    for col in ("", "ms / step", "step time / one process", "saved activations per rank, MiB (/ one process)"):
        table.add_column(col, justify="right")
    whole = saved[names[0]][0]
    for name in names:
        ratio, per_rep = ratio_spread(times[name], times[names[0]])
        held = ", ".join(f"{mib(b)} ({b / whole:.3f})" for b in saved[name])
        table.add_row(name, spread(times[name]), f"{ratio:.3f} ({per_rep})", held)
    console.print(table)
    ratio, _ = ratio_spread(times[names[1]], times[names[0]])
    largest = max(saved[names[1]]) / whole
    console.print(
        f"spatial={nproc}: step time ratio [bold]{ratio:.3f}[/], largest rank's saved activations "
        f"[bold]{largest:.3f}[/] of one process (1/S = {1 / nproc:.3f}, plus halos)"
    )
    return 0
