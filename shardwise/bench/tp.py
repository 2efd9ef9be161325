"""Tensor parallelism on a wide MLP: shardwise tp=N vs one process vs torch's DTensor.

The model is the registry's MLP on synthetic data of FEATURES features with
hidden layers of HIDDEN (4096, 4096): its weights dominate the
step. Three jobs per repetition, rotated (A B C, B C A, ...): shardwise with
one process, shardwise with tp=N, and torch's `parallelize_module` with
ColwiseParallel/RowwiseParallel over the same layers. Each reports its median
step time after 5 warm-up steps; the table gives the ratios and the
parameter bytes each rank holds.
"""

from __future__ import annotations

import statistics

from rich.table import Table

from shardwise.bench.common import Bench, alternate, mib, ratio_spread, spread

BATCH, FEATURES, HIDDEN, NPROC, STEPS = 64, 1024, "4096,4096", 2, 20


def run(b: Bench) -> None:
    nproc, steps, hidden, console = NPROC, STEPS, HIDDEN, b.console
    console.print(
        f"[bold]tp[/]: mlp {FEATURES} -> {hidden.replace(',', ' -> ')} -> 10 on synthetic data, "
        f"global batch {BATCH}, SGD, tp={nproc} ({b.where}), {steps} steps per run, "
        f"{b.repeats} rotated repetitions"
    )
    model = ["--model.name", "mlp", "--model.hidden", hidden, "--train.batch_size", str(BATCH)]
    model += ["--data.name", "synthetic", "--data.shape", str(FEATURES), "--data.samples", "4096"]
    held: dict[str, float] = {}

    def shardwise_side(name: str, args: list[str]):
        def side(i: int) -> float:
            summary = b.train([*args, *model], f"tp-{name}-{i}", steps=steps)
            held[name] = max(m["parameters_bytes"] for m in summary["memory"])
            return summary["step_time_s"]

        return side

    def torch_side(i: int) -> float:
        args = ["--steps", str(steps), "--batch-size", str(BATCH), "--features", str(FEATURES), "--hidden", hidden]
        result = b.reference("shardwise.bench.torch_tp_reference", nproc, args, f"tp-torch-{i}")
        held["torch DTensor"] = result["parameters_bytes"]
        return result["step_time_s"]

    sides = {
        "one process": shardwise_side("one", ["--nproc", "1"]),
        f"shardwise tp={nproc}": shardwise_side("tp", ["--nproc", str(nproc), "--parallel.tp", str(nproc)]),
        f"torch DTensor tp={nproc}": torch_side,
    }
    times = alternate(sides, b.repeats, console)
    names = list(times)
    held_by = dict(zip(names, [held["one"], held["tp"], held["torch DTensor"]], strict=True))
    table = Table(title="median over repetitions (min - max)")
    for col in ("", "ms / step", "samples/s", "step time / one process", "parameter MiB per rank"):
        table.add_column(col, justify="right")
    for name in names:
        ratio, per_rep = ratio_spread(times[name], times[names[0]])
        table.add_row(
            name,
            spread(times[name]),
            f"{BATCH / statistics.median(times[name]):,.0f}",
            f"{ratio:.3f} ({per_rep})",
            f"{mib(held_by[name])} ({held_by[name] / held_by[names[0]]:.3f})",
        )
    console.print(table)
    how = f"mlp {FEATURES}-{hidden.replace(',', '-')}-10, batch {BATCH}, tp={nproc}, median step time"
    one = b.ratio("tp", "step time: shardwise tp / one process", times[names[1]], times[names[0]], how=how)
    torch = b.ratio("tp", "step time: shardwise tp / torch DTensor tp", times[names[1]], times[names[2]], how=how)
    console.print(f"step time shardwise tp / one process: [bold]{one}[/]; / torch DTensor tp: [bold]{torch}[/]")
