"""bf16 mixed precision against float32 on the main job (`make train`: the convnet on the
bundled digits, 2 data-parallel ranks, the default 500 steps and schedule).

Each repetition trains both, alternating which goes first; each reports its median step
time after warm-up and its final validation accuracy. The figures: the step-time ratio
bf16 / fp32 (median of the per-repetition ratios, min and max) and each side's accuracy.
On a CPU without bfloat16 matrix units, autocast's casts cost more than its arithmetic
saves, and the ratio is above 1; on a GPU (or a CPU with AMX) it is expected below.
"""

from __future__ import annotations

import statistics

from rich.table import Table

from shardwise.bench.common import Bench, alternate, spread

NPROC, STEPS = 2, 500


def run(b: Bench) -> None:
    b.console.print(
        f"[bold]precision[/]: the main job (convnet on digits, {NPROC} ranks, {b.where}), {STEPS} steps, "
        f"train.precision fp32 and bf16, {b.repeats} alternated repetitions"
    )
    accuracy: dict[str, list[float]] = {"fp32": [], "bf16": []}

    def side(precision: str):
        def one(i: int) -> float:
            summary = b.train(
                ["--nproc", str(NPROC), "--train.precision", precision], f"precision-{precision}-{i}", steps=STEPS
            )
            accuracy[precision].append(summary["val_accuracy"])
            return summary["step_time_s"]

        return one

    times = alternate({"fp32": side("fp32"), "bf16": side("bf16")}, b.repeats, b.console)
    table = Table(title="the main job, median over repetitions (min - max)")
    for col in ("precision", "ms / step", "validation accuracy %"):
        table.add_column(col, justify="right")
    for name, values in times.items():
        table.add_row(name, spread(values), spread(accuracy[name], scale=100))
    b.console.print(table)
    how = f"convnet, digits, {NPROC} ranks, {STEPS} steps, median step time after warm-up"
    text = b.ratio("precision", "step time: bf16 / fp32 (main job)", times["bf16"], times["fp32"], how=how)
    for name in ("fp32", "bf16"):
        b.record(
            "precision", f"validation accuracy: {name} (main job)", accuracy[name], unit="fraction",
            how=f"final validation accuracy after {STEPS} steps",
        )  # fmt: skip
    b.console.print(
        f"step time bf16 / fp32: [bold]{text}[/]; accuracy fp32 {100 * statistics.median(accuracy['fp32']):.2f}%, "
        f"bf16 {100 * statistics.median(accuracy['bf16']):.2f}%"
    )
