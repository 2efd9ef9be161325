"""Activation checkpointing (train.activation_checkpointing = layers) against none, per layout:
what it saves in peak memory and what its recompute costs in step time, measured and as the
cost model predicted them.

A convnet on 3 x 32 x 32 images with a batch large enough that training's activations, not
the final evaluation's, set the peak; one process, then dp, tp, pp (GPipe, 4 micro-batches)
and spatial on 2 ranks. Each repetition runs both modes of a layout, alternating which goes
first. The figures: layers / none per repetition (median, min and max) of the median step
time and of the largest rank's measured peak (its parameters plus its resident memory's
growth while training), beside the same ratios of the cost model's predictions.

The resident high-water mark counts what glibc's allocator keeps of freed blocks to reuse,
which moves from run to run and need not fall when fewer bytes are alive at once. So each
mode also runs once more with the allocator told to hand every freed block of 64 KiB or more
back (as the planner measures a pass's memory, `plan/activations.py`): its peak is the bytes
alive at once, what checkpointing saves and the cost model predicts. That setting slows
every allocation, so the step times are the default allocator's.
"""

from __future__ import annotations

import statistics

from rich.table import Table

from shardwise.bench.common import GIVE_BACK, Bench, alternate, per_repetition

STEPS = 12
MODEL = ["--model.name", "convnet", "--model.channels", "16,16,32,32", "--data.name", "synthetic"]
MODEL += ["--data.shape", "3,32,32", "--train.batch_size", "512"]
LAYOUTS = {
    "one process": ["--nproc", "1"],
    "dp=2": ["--nproc", "2"],
    "tp=2": ["--nproc", "2", "--parallel.tp", "2"],
    "pp=2 gpipe M=4": ["--nproc", "2", "--parallel.pp", "2", "--parallel.microbatches", "4"],
    "spatial=2": ["--nproc", "2", "--parallel.spatial", "2"],
}
MODES = ("none", "layers")
LIVE = "; one run each with glibc handing back freed blocks of 64 KiB and more (MALLOC_MMAP_THRESHOLD_)"


def run(b: Bench) -> None:
    b.console.print(
        f"[bold]checkpointing[/]: {' '.join(MODEL)}, {STEPS} steps, train.activation_checkpointing none and "
        f"layers per layout ({b.where}), {b.repeats} alternated repetitions"
    )
    table = Table(title="layers / none, median over repetitions (min - max); the cost model's ratio beside")
    columns = ("layout", "step time", "predicted", "peak RSS", "live peak", "predicted")
    for col in (*columns, "live MiB none / layers", "predicted MiB"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    for layout, args in LAYOUTS.items():
        seen: dict[str, list[dict]] = {m: [] for m in MODES}

        def side(mode: str, layout=layout, args=args, seen=seen):
            def one(i: int) -> float:
                name = f"ckpt-{layout.replace(' ', '_').replace('=', '')}-{mode}-{i}"
                check = b.train([*MODEL, *args, "--train.activation_checkpointing", mode], name, steps=STEPS)
                seen[mode].append(check["model_check"])
                return check["step_time_s"]

            return one

        times = alternate({m: side(m) for m in MODES}, b.repeats, b.console)
        peaks = {m: [c["measured_peak_bytes"] for c in seen[m]] for m in MODES}
        live = {}
        for mode in MODES:  # the bytes alive at once: freed blocks handed back
            name = f"ckpt-{layout.replace(' ', '_').replace('=', '')}-{mode}-live"
            args_live = [*MODEL, *args, "--train.activation_checkpointing", mode]
            live[mode] = b.train(args_live, name, steps=STEPS, env=GIVE_BACK)["model_check"]["measured_peak_bytes"]
        predicted = {m: seen[m][0]["predicted"] for m in MODES}  # the same prediction every repetition
        how = f"{' '.join(MODEL)} {' '.join(args)}; {STEPS} steps; layers / none per repetition"
        step = b.ratio("checkpointing", f"{layout}: step time layers / none", times["layers"], times["none"], how=how)
        peak = b.ratio("checkpointing", f"{layout}: peak RSS layers / none", peaks["layers"], peaks["none"], how=how)
        step_p = predicted["layers"]["step_s"] / predicted["none"]["step_s"]
        peak_p = predicted["layers"]["peak_bytes"] / predicted["none"]["peak_bytes"]
        b.record("checkpointing", f"{layout}: predicted step time layers / none", [step_p], how=how)
        b.record("checkpointing", f"{layout}: predicted peak memory layers / none", [peak_p], how=how)
        live_ratio = live["layers"] / live["none"]
        b.record("checkpointing", f"{layout}: live peak memory layers / none", [live_ratio], how=how + LIVE)
        predicted_mib = " / ".join(f"{predicted[m]['peak_bytes'] / 2**20:,.1f}" for m in MODES)
        table.add_row(
            layout, step, f"{step_p:.3f}", peak, f"{live_ratio:.3f}", f"{peak_p:.3f}",
            " / ".join(f"{live[m] / 2**20:,.1f}" for m in MODES), predicted_mib,
        )  # fmt: skip
        ratio = statistics.median(per_repetition(times["layers"], times["none"]))
        b.console.print(f"  {layout}: step x{ratio:.2f}, live peak x{live_ratio:.2f} (predicted x{peak_p:.2f})")
    b.console.print(table)
