"""Pipelining: shardwise pp=P vs torch.distributed.pipelining driven directly vs one process.

The model is the registry's MLP on synthetic data of FEATURES features with
hidden layers `--hidden`. Three jobs per repetition, rotated: shardwise on one
process, shardwise with P stages and M micro-batches, and torch's own
PipelineStage + schedule over the same layers cut at the same place (the cut
shardwise chose by measured cost in the first repetition). Each reports its
median step time after 5 warm-up steps; shardwise also reports the measured
bubble fraction next to the theoretical (P - 1) / (M + P - 1).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from rich.table import Table

from shardwise.bench.common import alternate, bench_console, ratio_spread, shardwise_train, spread, torchrun_json

BATCH, FEATURES = 64, 1024


def main(*, nproc: int, microbatches: int, schedule: str, repeats: int, steps: int, hidden: str) -> int:
    console = bench_console()
    console.print(
        f"[bold]bench pp[/]: mlp {FEATURES} -> {hidden.replace(',', ' -> ')} -> 10 on synthetic data, "
        f"global batch {BATCH}, SGD, pp={nproc}, {microbatches} micro-batches, {schedule} (gloo, loopback), "
        f"{steps} steps per run, {repeats} rotated repetitions"
    )
    model = ["--model.name", "mlp", "--model.hidden", hidden, "--train.batch_size", str(BATCH)]
    model += ["--data.name", "synthetic", "--data.shape", str(FEATURES), "--data.samples", "4096"]
    pipeline = ["--nproc", str(nproc), "--parallel.pp", str(nproc), "--parallel.microbatches", str(microbatches)]
    pipeline += ["--parallel.schedule", schedule]
    found: dict = {"bubbles": []}

    def one(i: int) -> float:
        return shardwise_train(["--nproc", "1", *model], work / f"one-{i}", steps=steps)["step_time_s"]

    def ours(i: int) -> float:
        summary = shardwise_train([*pipeline, *model], work / f"pp-{i}", steps=steps)
        found.setdefault("cut", ",".join(str(r["first_layer"]) for r in summary["pipeline"]["cut"]))
        found["bubbles"].append(summary["pipeline"]["bubble_measured"])
        found["theory"] = summary["pipeline"]["bubble_theoretical"]
        return summary["step_time_s"]

    def theirs(i: int) -> float:
        if "cut" not in found:
            ours(-1 - i)
        args = ["--steps", str(steps), "--batch-size", str(BATCH), "--microbatches", str(microbatches)]
        args += ["--schedule", schedule, "--features", str(FEATURES), "--hidden", hidden, "--cut", found["cut"]]
        return torchrun_json("shardwise.bench.torch_pp_reference", nproc, args, work / f"torch-{i}.json")["step_time_s"]

    with tempfile.TemporaryDirectory(prefix="shardwise-bench-") as tmp:
        work = Path(tmp)
        names = ["one process", f"shardwise pp={nproc}", f"torch pipelining pp={nproc}"]
        times = alternate(dict(zip(names, [one, ours, theirs], strict=True)), repeats, console)
    table = Table(title="median over repetitions (min - max)")
    for col in ("", "ms / step", "samples/s", "step time / one process"):
        table.add_column(col, justify="right")
    for name in names:
        ratio, per_rep = ratio_spread(times[name], times[names[0]])
        table.add_row(
            name, spread(times[name]), f"{BATCH / statistics.median(times[name]):,.0f}", f"{ratio:.3f} ({per_rep})"
        )
    console.print(table)
    ratio, per_rep = ratio_spread(times[names[1]], times[names[2]])
    console.print(f"ratio shardwise pp / torch pipelining: [bold]{ratio:.3f}[/] (per-repetition {per_rep})")
    b = found["bubbles"]
    console.print(
        f"bubble fraction, shardwise pp={nproc}: measured [bold]{statistics.median(b):.3f}[/] "
        f"({min(b):.3f} - {max(b):.3f}), theoretical (P-1)/(M+P-1) = {found['theory']:.3f}; stage cut {found['cut']}"
    )
    return 0
