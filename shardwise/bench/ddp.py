"""shardwise data parallel vs a plain torch DDP script: same model, batch, world size.

Each repetition runs both jobs, alternating which goes first (A B, B A, ...),
as separate multi-process jobs; each reports its median step time after 5
warm-up steps (forward, backward with the gradient all-reduce, optimizer
step, plus shardwise's data plan and scheduler). The ratio is shardwise over
torch: below 1.02 means shardwise costs at most 2% over plain DDP.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from rich.table import Table

from shardwise.bench.common import alternate, bench_console, ratio_spread, shardwise_train, spread, torchrun_json

BATCH = 64


def main(*, nproc: int, repeats: int, steps: int) -> int:
    """Defaults live in the CLI (`shardwise bench ddp --help`)."""
    console = bench_console()
    console.print(
        f"[bold]bench ddp[/]: convnet on digits, global batch {BATCH}, {nproc} processes (gloo, loopback), "
        f"{steps} steps per run, {repeats} alternated repetitions"
    )
    with tempfile.TemporaryDirectory(prefix="shardwise-bench-") as tmp:
        work = Path(tmp)
        sides = {
            "shardwise dp": lambda i: shardwise_train(
                ["--nproc", str(nproc), "--train.batch_size", str(BATCH)], work / f"shardwise-{i}", steps=steps
            )["step_time_s"],
            "torch DDP": lambda i: torchrun_json(
                "shardwise.bench.torch_ddp_reference",
                nproc,
                ["--steps", str(steps), "--batch-size", str(BATCH)],
                work / f"torch-{i}.json",
            )["step_time_s"],
        }
        times = alternate(sides, repeats, console)
    table = Table(title="step time, median over repetitions (min - max)")
    for col in ("", "ms / step", "samples/s"):
        table.add_column(col, justify="right")
    for name, values in times.items():
        table.add_row(name, spread(values), f"{BATCH / statistics.median(values):,.0f}")
    console.print(table)
    ratio, per_rep = ratio_spread(times["shardwise dp"], times["torch DDP"])
    console.print(
        f"ratio shardwise / torch DDP: [bold]{ratio:.3f}[/] (per-repetition ratios {per_rep}; "
        f"target <= 1.02: {'met' if ratio <= 1.02 else 'NOT met'})"
    )
    return 0
