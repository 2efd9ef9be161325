"""Sharded parameters and optimizer state: what each rank holds at N = 1, 2, 4.

For each data-parallel degree N and each `parallel.shard` mode, one short
AdamW run of an MLP whose weights dominate. Counted: the bytes of the
parameters, gradients and optimizer state each rank holds after the last step
(the tensors it owns): `full` should fall as 1/N in all three, `optimizer` in
the optimizer state only. Measured: each rank's peak resident memory during
the training loop (the kernel's VmHWM, reset as the loop starts) and how far
it rose above the resident memory at that start: these also hold what the
count leaves out (DDP's gradient buckets, FSDP's all-gather and reduce-scatter
buffers, activations). glibc keeps freed memory resident unless told to map
large blocks on their own; the jobs run with MALLOC_MMAP_THRESHOLD_ fixed at
128 KiB so that a freed buffer leaves the count, and the peak is what was live.
The table gives the largest rank and its ratio to one process.
"""

from __future__ import annotations

from rich.table import Table

from shardwise.bench.common import Bench, mib

KINDS = ("parameters", "gradients", "optimizer")
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # freed large blocks go back to the system
SIZES, HIDDEN, STEPS = (1, 2, 4), "4096,4096", 3


def run(b: Bench) -> None:
    sizes, hidden, steps, console = SIZES, HIDDEN, STEPS, b.console
    console.print(
        f"[bold]shard[/]: mlp 1024 -> {hidden.replace(',', ' -> ')} -> 10, AdamW, synthetic data, "
        f"N = {', '.join(map(str, sizes))} data-parallel ranks ({b.where}), {steps} steps per run; bytes are "
        "counted, not timed: one run each"
    )
    model = ["--model.name", "mlp", "--model.hidden", hidden, "--train.optimizer", "adamw", "--train.lr", "0.001"]
    model += ["--data.name", "synthetic", "--data.shape", "1024", "--data.samples", "2048"]
    table = Table(title="bytes of the largest rank, MiB (ratio to one process)")
    for col in ("N", "shard", *KINDS, "total counted", "peak RSS measured", "RSS added in training"):
        table.add_column(col, justify="right")
    base: dict[str, float] = {}
    for n in sizes:
        for mode in ("none", "optimizer", "full") if n > 1 else ("none",):
            args = ["--nproc", str(n), "--parallel.shard", mode, *model]
            memory = b.train(args, f"shard-{mode}-{n}", steps=steps, env=ALLOCATOR)["memory"]
            largest = {k: max(m[f"{k}_bytes"] for m in memory) for k in KINDS}
            largest["total"] = max(sum(m[f"{k}_bytes"] for k in KINDS) for m in memory)
            largest["peak"] = max(m["rss_peak_bytes"] for m in memory)
            largest["added"] = max(m["rss_peak_bytes"] - m["rss_start_bytes"] for m in memory)
            base = base or largest
            cells = [f"{mib(largest[k])} ({largest[k] / base[k]:.3f})" for k in (*KINDS, "total", "peak", "added")]
            table.add_row(str(n), mode, *cells)
            if n > 1:
                for key, what, how in (
                    ("total", "bytes", "parameters + gradients + optimizer state held by the largest rank, counted"),
                    ("peak", "peak RSS", "the largest rank's peak resident memory in training (VmHWM), measured"),
                    ("added", "RSS added", "how far the largest rank's resident memory rose in training, measured"),
                ):
                    name = f"{what}: shard={mode} N={n} / one process"
                    b.record("shard", name, [largest[key] / base[key]], how=how)
            console.print(
                f"  N={n} shard={mode}: {mib(largest['total'])} MiB counted; measured: peak RSS "
                f"{mib(largest['peak'])} MiB, of which {mib(largest['added'])} MiB added in training (largest rank)"
            )
    console.print(table)
