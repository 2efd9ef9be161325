"""Sharded parameters and optimizer state: what each rank holds at N = 1, 2, 4.

For each data-parallel degree N and each `parallel.shard` mode, one short
AdamW run of an MLP whose weights dominate; every rank measures the bytes of
the parameters, gradients and optimizer state it holds after the last step
(the tensors it owns, not allocator peaks). The table gives the largest rank's
bytes and their ratio to one process: `full` should fall as 1/N in all three,
`optimizer` in the optimizer state only.
"""

from __future__ import annotations

from rich.table import Table

from shardwise.bench.common import Bench, mib

KINDS = ("parameters", "gradients", "optimizer")
SIZES, HIDDEN, STEPS = (1, 2, 4), "2048,2048", 3


def run(b: Bench) -> None:
    sizes, hidden, steps, console = SIZES, HIDDEN, STEPS, b.console
    console.print(
        f"[bold]shard[/]: mlp 1024 -> {hidden.replace(',', ' -> ')} -> 10, AdamW, synthetic data, "
        f"N = {', '.join(map(str, sizes))} data-parallel ranks ({b.where}), {steps} steps per run; bytes are "
        "counted, not timed: one run each"
    )
    model = ["--model.name", "mlp", "--model.hidden", hidden, "--train.optimizer", "adamw", "--train.lr", "0.001"]
    model += ["--data.name", "synthetic", "--data.shape", "1024", "--data.samples", "2048"]
    table = Table(title="bytes held by the largest rank, MiB (ratio to one process)")
    for col in ("N", "shard", *KINDS, "total"):
        table.add_column(col, justify="right")
    base: dict[str, float] = {}
    for n in sizes:
        for mode in ("none", "optimizer", "full") if n > 1 else ("none",):
            args = ["--nproc", str(n), "--parallel.shard", mode, *model]
            memory = b.train(args, f"shard-{mode}-{n}", steps=steps)["memory"]
            largest = {k: max(m[f"{k}_bytes"] for m in memory) for k in KINDS}
            largest["total"] = max(sum(m[f"{k}_bytes"] for k in KINDS) for m in memory)
            base = base or largest
            cells = [f"{mib(largest[k])} ({largest[k] / base[k]:.3f})" for k in (*KINDS, "total")]
            table.add_row(str(n), mode, *cells)
            if n > 1:
                how = "parameters + gradients + optimizer state held by the largest rank (FSDP2 / ZeRO-1)"
                b.record(
                    "shard", f"bytes: shard={mode} N={n} / one process", [largest["total"] / base["total"]], how=how
                )
            console.print(f"  N={n} shard={mode}: total {mib(largest['total'])} MiB on the largest rank")
    console.print(table)
