"""Spatial partitioning on a large image: S bands vs one process.

A ResNet (3x3 stem, one basic block per width, group norm, global pooling) on
random SIZE x SIZE RGB images (512), batch 2: the feature maps dominate both time and
memory. Each repetition runs one process and S processes (rotated order),
reporting the median step time and, per rank, the bytes of activations saved
for the backward pass (expected: about 1/S of one process, plus halo rows).
"""

from __future__ import annotations

from rich.table import Table

from shardwise.bench.common import Bench, alternate, mib, ratio_spread, spread

NPROC, SIZE, STEPS = 2, 512, 4


def run(b: Bench) -> None:
    nproc, size, steps, console = NPROC, SIZE, STEPS, b.console
    console.print(
        f"[bold]spatial[/]: resnet (widths 8, 16, 32, group norm) on {size} x {size} RGB images, batch 2, "
        f"spatial={nproc} vs one process ({b.where}), {steps} steps per run, {b.repeats} rotated repetitions"
    )
    saved: dict[str, list[int]] = {}

    def side(name: str, n: int):
        def run(i: int) -> float:
            args = ["--size", str(size), "--steps", str(steps)]
            result = b.reference("shardwise.bench.spatial_worker", n, args, f"spatial-{n}-{i}")
            saved[name] = result["saved_bytes"]
            return result["step_time_s"]

        return run

    names = ["one process", f"spatial={nproc}"]
    times = alternate({names[0]: side(names[0], 1), names[1]: side(names[1], nproc)}, b.repeats, console)
    table = Table(title="median over repetitions (min - max)")
    for col in ("", "ms / step", "step time / one process", "saved activations per rank, MiB (/ one process)"):
        table.add_column(col, justify="right")
    whole = saved[names[0]][0]
    for name in names:
        ratio, per_rep = ratio_spread(times[name], times[names[0]])
        held = ", ".join(f"{mib(b)} ({b / whole:.3f})" for b in saved[name])
        table.add_row(name, spread(times[name]), f"{ratio:.3f} ({per_rep})", held)
    console.print(table)
    how = f"resnet 8-16-32, group norm, {size}x{size} RGB, batch 2, spatial={nproc}; no torch equivalent"
    ratio = b.ratio("spatial", "step time: spatial / one process", times[names[1]], times[names[0]], how=how)
    largest = max(saved[names[1]]) / whole
    b.record("spatial", "saved activations, largest rank / one process", [largest], how=f"1/S = {1 / nproc:.3f}")
    console.print(
        f"spatial={nproc}: step time ratio [bold]{ratio}[/], largest rank's saved activations "
        f"[bold]{largest:.3f}[/] of one process (1/S = {1 / nproc:.3f}, plus halos)"
    )
