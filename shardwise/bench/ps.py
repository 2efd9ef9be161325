"""Parameter server: synchronous PS vs all-reduce, and asynchronous vs synchronous
with a straggler, in one run.

Part 1: the same MLP, data and global batch trained by W workers that all-reduce
(W processes) and by W workers with one server (W + 1 processes), W = 2 and 4;
median step time after warm-up, rotated repetitions.

Part 2: W = 3 workers and one server, one worker `--slow-factor` times slower
(`ps.slow_worker`, a test and benchmark aid: it sleeps after its backward).
Synchronous, and asynchronous with staleness bounds 1 and `--loose`, once with
the same worker slow on every step and once with the slow worker drawn anew
each step. Throughput is samples applied per second of training.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from rich.table import Table

from shardwise.bench.common import alternate, bench_console, ratio_spread, shardwise_train, spread

FEATURES = 512


def main(*, workers: list[int], repeats: int, steps: int, hidden: str, slow_factor: float, loose: int) -> int:
    console = bench_console()
    batch = 96  # divisible by 2, 3 and 4 workers
    model = ["--model.name", "mlp", "--model.hidden", hidden, "--train.batch_size", str(batch)]
    model += ["--data.name", "synthetic", "--data.shape", str(FEATURES), "--data.samples", "4096"]
    console.print(
        f"[bold]bench ps[/]: mlp {FEATURES} -> {hidden.replace(',', ' -> ')} -> 10 on synthetic data, global batch "
        f"{batch}, SGD (gloo, loopback), {steps} steps per run, {repeats} rotated repetitions"
    )

    with tempfile.TemporaryDirectory(prefix="shardwise-bench-") as tmp:
        work = Path(tmp)

        def job(name: str, args: list[str]):
            def run(i: int) -> float:
                summary = shardwise_train([*args, *model], work / f"{name}-{i}".replace(" ", "_"), steps=steps)
                return batch / summary["samples_per_s"]  # seconds per global step, over the whole run

            return run

        console.print("[bold]1. synchronous parameter server vs all-reduce[/]")
        sides = {}
        for w in workers:
            sides[f"all-reduce {w} workers"] = job(f"ar{w}", ["--nproc", str(w)])
            sides[f"ps 1 server + {w} workers"] = job(f"ps{w}", ["--nproc", str(w + 1), "--parallel.mode", "ps"])
        times = alternate(sides, repeats, console)
        table = Table(title="seconds per step: median over repetitions (min - max)")
        for col in ("workers", "all-reduce ms / step", "sync ps ms / step", "ps / all-reduce"):
            table.add_column(col, justify="right")
        for w in workers:
            ar, ps = times[f"all-reduce {w} workers"], times[f"ps 1 server + {w} workers"]
            ratio, per_rep = ratio_spread(ps, ar)
            table.add_row(str(w), spread(ar), spread(ps), f"[bold]{ratio:.3f}[/] ({per_rep})")
        console.print(table)

        ps3 = ["--nproc", "4", "--parallel.mode", "ps", "--ps.slow_factor", str(slow_factor)]
        for pattern, slow in (("the same worker (rank 3)", "3"), ("a different worker each step", "-1")):
            console.print(f"[bold]2. one straggler {slow_factor:g}x slower: {pattern}[/]")
            straggling = [*ps3, "--ps.slow_worker", slow]
            sides = {"sync": job(f"sync{slow}", straggling)}
            for k in (1, loose):
                asynchronous = [*straggling, "--ps.asynchronous", "true", "--ps.staleness", str(k)]
                sides[f"async k={k}"] = job(f"async{k}{slow}", asynchronous)
            times = alternate(sides, repeats, console)
            table = Table(title="throughput: median over repetitions (min - max)")
            for col in ("", "ms / step", "samples/s", "throughput / sync"):
                table.add_column(col, justify="right")
            for name, t in times.items():
                ratio, per_rep = ratio_spread(times["sync"], t)
                rate = batch / statistics.median(t)
                table.add_row(name, spread(t), f"{rate:,.0f}", f"[bold]{ratio:.3f}[/] ({per_rep})")
            console.print(table)
    console.print(
        "A bound of k steps lets the fast workers lead a straggler that is always the same by k steps only, "
        "so in the long run they wait for it; a straggler that moves is absorbed."
    )
    return 0
