"""Pipelining: shardwise pp=P vs torch.distributed.pipelining driven directly vs one process.

The model is the registry's MLP on synthetic data of FEATURES features with
hidden layers HIDDEN. Three jobs per repetition, rotated: shardwise on one
process, shardwise with P stages and M micro-batches, and torch's own
PipelineStage + schedule over the same layers cut at the same place (the cut
shardwise chose by measured cost in the first repetition). Each reports its
median step time after 5 warm-up steps; shardwise also reports the measured
bubble fraction next to the theoretical (P - 1) / (M + P - 1).
"""

from __future__ import annotations

import statistics

from rich.table import Table

from shardwise.bench.common import Bench, alternate, ratio_spread, spread

BATCH, FEATURES, HIDDEN = 64, 1024, "2048,2048,2048"
NPROC, MICROBATCHES, SCHEDULE, STEPS = 2, 4, "1f1b", 20


def run(b: Bench) -> None:
    nproc, microbatches, schedule, steps, hidden, console = NPROC, MICROBATCHES, SCHEDULE, STEPS, HIDDEN, b.console
    console.print(
        f"[bold]pp[/]: mlp {FEATURES} -> {hidden.replace(',', ' -> ')} -> 10 on synthetic data, "
        f"global batch {BATCH}, SGD, pp={nproc}, {microbatches} micro-batches, {schedule} ({b.where}), "
        f"{steps} steps per run, {b.repeats} rotated repetitions"
    )
    model = ["--model.name", "mlp", "--model.hidden", hidden, "--train.batch_size", str(BATCH)]
    model += ["--data.name", "synthetic", "--data.shape", str(FEATURES), "--data.samples", "4096"]
    pipeline = ["--nproc", str(nproc), "--parallel.pp", str(nproc), "--parallel.microbatches", str(microbatches)]
    pipeline += ["--parallel.schedule", schedule]
    found: dict = {"bubbles": []}

    def one(i: int) -> float:
        return b.train(["--nproc", "1", *model], f"pp-one-{i}", steps=steps)["step_time_s"]

    def ours(i: int) -> float:
        summary = b.train([*pipeline, *model], f"pp-sw-{i}", steps=steps)
        found.setdefault("cut", ",".join(str(r["first_layer"]) for r in summary["pipeline"]["cut"]))
        found["bubbles"].append(summary["pipeline"]["bubble_measured"])
        found["theory"] = summary["pipeline"]["bubble_theoretical"]
        return summary["step_time_s"]

    def theirs(i: int) -> float:
        if "cut" not in found:
            ours(-1 - i)
        args = ["--steps", str(steps), "--batch-size", str(BATCH), "--microbatches", str(microbatches)]
        args += ["--schedule", schedule, "--features", str(FEATURES), "--hidden", hidden, "--cut", found["cut"]]
        return b.reference("shardwise.bench.torch_pp_reference", nproc, args, f"pp-torch-{i}")["step_time_s"]

    names = ["one process", f"shardwise pp={nproc}", f"torch pipelining pp={nproc}"]
    times = alternate(dict(zip(names, [one, ours, theirs], strict=True)), b.repeats, console)
    table = Table(title="median over repetitions (min - max)")
    for col in ("", "ms / step", "samples/s", "step time / one process"):
        table.add_column(col, justify="right")
    for name in names:
        ratio, per_rep = ratio_spread(times[name], times[names[0]])
        table.add_row(
            name, spread(times[name]), f"{BATCH / statistics.median(times[name]):,.0f}", f"{ratio:.3f} ({per_rep})"
        )
    console.print(table)
    how = f"mlp {FEATURES}-{hidden.replace(',', '-')}-10, batch {BATCH}, pp={nproc}, M={microbatches}, {schedule}"
    one = b.ratio("pp", "step time: shardwise pp / one process", times[names[1]], times[names[0]], how=how)
    torch = b.ratio("pp", "step time: shardwise pp / torch pipelining", times[names[1]], times[names[2]], how=how)
    console.print(f"step time shardwise pp / one process: [bold]{one}[/]; / torch pipelining: [bold]{torch}[/]")
    bubble = b.record(
        "pp", "bubble fraction, measured", found["bubbles"], unit="fraction", how=f"theory {found['theory']:.3f}"
    )
    console.print(
        f"bubble fraction, shardwise pp={nproc}: measured [bold]{bubble}[/], "
        f"theoretical (P-1)/(M+P-1) = {found['theory']:.3f}; stage cut {found['cut']}"
    )
