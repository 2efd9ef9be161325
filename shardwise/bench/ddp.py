"""shardwise data parallel vs a plain torch DDP script: same model, batch, world size.

Each repetition runs both jobs, alternating which goes first (A B, B A, ...),
as separate multi-process jobs placed alike; each reports its median step time
after 5 warm-up steps (forward, backward with the gradient all-reduce,
optimizer step, plus shardwise's data plan and scheduler). The ratio is
shardwise over torch: below 1.02 means shardwise costs at most 2% over DDP.
"""

from __future__ import annotations

import statistics

from rich.table import Table

from shardwise.bench.common import Bench, alternate, spread

BATCH, NPROC, STEPS = 64, 2, 150


def run(b: Bench) -> None:
    b.console.print(
        f"[bold]ddp[/]: convnet on digits, global batch {BATCH}, {NPROC} ranks ({b.where}), "
        f"{STEPS} steps per run, {b.repeats} alternated repetitions"
    )
    sides = {
        "shardwise dp": lambda i: b.train(
            ["--nproc", str(NPROC), "--train.batch_size", str(BATCH)], f"ddp-sw-{i}", steps=STEPS
        )["step_time_s"],
        "torch DDP": lambda i: b.reference(
            "shardwise.bench.torch_ddp_reference",
            NPROC,
            ["--steps", str(STEPS), "--batch-size", str(BATCH)],
            f"ddp-torch-{i}",
        )["step_time_s"],
    }
    times = alternate(sides, b.repeats, b.console)
    table = Table(title="step time, median over repetitions (min - max)")
    for col in ("", "ms / step", "samples/s"):
        table.add_column(col, justify="right")
    for name, values in times.items():
        table.add_row(name, spread(values), f"{BATCH / statistics.median(values):,.0f}")
    b.console.print(table)
    how = f"convnet, digits, global batch {BATCH}, {NPROC} ranks, median step time after warm-up"
    text = b.ratio("ddp", "step time: shardwise dp / torch DDP", times["shardwise dp"], times["torch DDP"], how=how)
    b.console.print(f"step time shardwise dp / torch DDP: [bold]{text}[/] (target <= 1.02)")
