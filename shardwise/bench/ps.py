"""Parameter server: synchronous PS vs all-reduce, and asynchronous vs synchronous
with a straggler, in one run.

Part 1: the same MLP, data and global batch trained by W workers that all-reduce
(W processes), by W workers with one server (W + 1 processes), and by W workers each
the server of one slice (parallel.colocate, W processes), W = 2 and 4; median step
time after warm-up, rotated repetitions.

Part 2 (loopback only): W = 3 workers and one server, one worker SLOW_FACTOR
times slower (`ps.slow_worker`, a test and benchmark aid: it sleeps after its
backward). Synchronous, and asynchronous with staleness bounds 1 and LOOSE, once with
the same worker slow on every step and once with the slow worker drawn anew
each step. Throughput is samples applied per second of training.
"""

from __future__ import annotations

import statistics

from rich.table import Table

from shardwise.bench.common import Bench, alternate, spread

FEATURES, HIDDEN, STEPS, WORKERS, SLOW_FACTOR, LOOSE = 512, "1024,1024", 30, (2, 4), 2.0, 8


def run(b: Bench) -> None:
    workers, steps, hidden, slow_factor, loose, console = WORKERS, STEPS, HIDDEN, SLOW_FACTOR, LOOSE, b.console
    batch = 96  # divisible by 2, 3 and 4 workers
    model = ["--model.name", "mlp", "--model.hidden", hidden, "--train.batch_size", str(batch)]
    model += ["--data.name", "synthetic", "--data.shape", str(FEATURES), "--data.samples", "4096"]
    console.print(
        f"[bold]ps[/]: mlp {FEATURES} -> {hidden.replace(',', ' -> ')} -> 10 on synthetic data, global batch "
        f"{batch}, SGD ({b.where}), {steps} steps per run, {b.repeats} rotated repetitions"
    )
    how = f"mlp {FEATURES}-{hidden.replace(',', '-')}-10, batch {batch}, seconds per step over the run"

    def job(name: str, args: list[str]):
        def run(i: int) -> float:
            summary = b.train([*args, *model], f"ps-{name}-{i}", steps=steps)
            return batch / summary["samples_per_s"]  # seconds per global step, over the whole run

        return run

    console.print("[bold]1. synchronous parameter server vs all-reduce[/]")
    sides = {}
    for w in workers:
        sides[f"all-reduce {w} workers"] = job(f"ar{w}", ["--nproc", str(w)])
        sides[f"ps 1 server + {w} workers"] = job(f"ps{w}", ["--nproc", str(w + 1), "--parallel.mode", "ps"])
        colocated = ["--nproc", str(w), "--parallel.mode", "ps", "--parallel.colocate", "true"]
        sides[f"ps colocated on {w} workers"] = job(f"co{w}", colocated)
    times = alternate(sides, b.repeats, console)
    table = Table(title="seconds per step: median over repetitions (min - max)")
    columns = ("workers", "all-reduce ms / step", "sync ps ms / step", "ps / all-reduce")
    for col in (*columns, "colocated ps ms / step", "colocated / all-reduce"):
        table.add_column(col, justify="right")
    for w in workers:
        ar, ps = times[f"all-reduce {w} workers"], times[f"ps 1 server + {w} workers"]
        co = times[f"ps colocated on {w} workers"]
        text = b.ratio("ps", f"step time: sync ps (1 server) / all-reduce, {w} workers", ps, ar, how=how)
        text_co = b.ratio("ps", f"step time: sync ps colocated / all-reduce, {w} workers", co, ar, how=how)
        table.add_row(str(w), spread(ar), spread(ps), text, spread(co), text_co)
    console.print(table)
    if b.placement.cluster:
        return  # the straggler part measures waiting, not the link: loopback only

    ps3 = ["--nproc", "4", "--parallel.mode", "ps", "--ps.slow_factor", str(slow_factor)]
    for pattern, slow in (("the same worker (rank 3)", "3"), ("a different worker each step", "-1")):
        console.print(f"[bold]2. one straggler {slow_factor:g}x slower: {pattern}[/]")
        straggling = [*ps3, "--ps.slow_worker", slow]
        sides = {"sync": job(f"sync{slow}", straggling)}
        for k in (1, loose):
            asynchronous = [*straggling, "--ps.asynchronous", "true", "--ps.staleness", str(k)]
            sides[f"async k={k}"] = job(f"async{k}{slow}", asynchronous)
        times = alternate(sides, b.repeats, console)
        table = Table(title="throughput: median over repetitions (min - max)")
        for col in ("", "ms / step", "samples/s", "throughput / sync"):
            table.add_column(col, justify="right")
        for name, t in times.items():
            text = "1.000"
            if name != "sync":
                measure = f"throughput: {name} / sync, straggler {slow_factor:g}x, {pattern}"
                text = b.ratio("ps", measure, times["sync"], t, how="3 workers + 1 server")
            table.add_row(name, spread(t), f"{batch / statistics.median(t):,.0f}", text)
        console.print(table)
    console.print(
        "A bound of k steps lets the fast workers lead a straggler that is always the same by k steps only, "
        "so in the long run they wait for it; a straggler that moves is absorbed."
    )
