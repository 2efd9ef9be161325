"""Pipeline schedules side by side: every schedule torch offers, pp = 2, against one process.

The model is the registry's MLP with seven equal hidden layers (FEATURES wide) and a
classifier on synthetic data, deep enough to cut into two stages a rank. Per repetition,
rotated: one process, then pp = 2 under GPipe and 1F1B (one stage a rank) and under
interleaved 1F1B, zero-bubble and zbv (two stages a rank), each at M micro-batches. Each
reports its median step time after warm-up; shardwise also reports each schedule's measured
bubble (the idle share of the ranks' time in a step) against its own theory (its order
played out with equal stages, `parallel/pipeline_cost.py ideal_bubble`), and the cost
model's predicted step against the measured one.
"""

from __future__ import annotations

import statistics

from rich.table import Table

from shardwise.bench.common import Bench, alternate, ratio_spread, spread

BATCH, FEATURES, LAYERS = 64, 1024, 7
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero-bubble", "zbv")
MICROBATCHES, STEPS = (4, 8), 20


def run(b: Bench) -> None:
    hidden = ",".join([str(FEATURES)] * LAYERS)
    b.console.print(
        f"[bold]pp-schedules[/]: mlp {FEATURES} -> {LAYERS} x {FEATURES} -> 10 on synthetic data, global batch "
        f"{BATCH}, SGD, pp=2, {', '.join(SCHEDULES)} at {' and '.join(map(str, MICROBATCHES))} micro-batches "
        f"({b.where}), {STEPS} steps per run, {b.repeats} rotated repetitions"
    )
    model = ["--model.name", "mlp", "--model.hidden", hidden, "--train.batch_size", str(BATCH)]
    model += ["--data.name", "synthetic", "--data.shape", str(FEATURES), "--data.samples", "4096"]
    for m in MICROBATCHES:
        _one_count(b, model, m)


def _one_count(b: Bench, model: list[str], m: int) -> None:
    found: dict = {s: {"bubbles": [], "predicted": []} for s in SCHEDULES}

    def one(i: int) -> float:
        return b.train(["--nproc", "1", *model], f"pps-one-m{m}-{i}", steps=STEPS)["step_time_s"]

    def side(schedule: str):
        def timed(i: int) -> float:
            args = ["--nproc", "2", "--parallel.pp", "2", "--parallel.microbatches", str(m)]
            summary = b.train([*args, "--parallel.schedule", schedule, *model], f"pps-{schedule}-m{m}-{i}", steps=STEPS)
            pipe, check = summary["pipeline"], summary["model_check"]
            found[schedule]["bubbles"].append(pipe["bubble_measured"])
            found[schedule]["theory"] = pipe["bubble_theoretical"]
            found[schedule]["predicted"].append(check["predicted"]["step_s"])
            return summary["step_time_s"]

        return timed

    sides = {"one process": one} | {s: side(s) for s in SCHEDULES}
    times = alternate(sides, b.repeats, b.console)
    table = Table(title=f"pp = 2, M = {m}: median over repetitions (min - max)")
    for col in ("", "ms / step", "step time / one process", "bubble measured", "in theory", "predicted ms"):
        table.add_column(col, justify="right")
    table.add_row("one process", spread(times["one process"]), "1", "", "", "")
    for s in SCHEDULES:
        ratio, per_rep = ratio_spread(times[s], times["one process"])
        f = found[s]
        how = f"mlp {FEATURES} x {LAYERS + 1} layers, batch {BATCH}, pp=2, M={m}"
        b.ratio("pp-schedules", f"step time: {s} M={m} / one process", times[s], times["one process"], how=how)
        b.record("pp-schedules", f"bubble fraction, {s} M={m}", f["bubbles"], unit="fraction",
                 how=f"theory {f['theory']:.3f}")  # fmt: skip
        b.ratio("pp-schedules", f"step time: {s} M={m}, predicted / measured", f["predicted"], times[s], how=how)
        table.add_row(
            s, spread(times[s]), f"{ratio:.3f} ({per_rep})", f"{statistics.median(f['bubbles']):.3f}",
            f"{f['theory']:.3f}", f"{1e3 * statistics.median(f['predicted']):.2f}",
        )  # fmt: skip
    b.console.print(table)
