"""Rank 0's console: the progress bar while training and a one-screen summary at the end."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from shardwise.train.outputs import MetricsLog


class NullReporter:
    """Ranks other than 0 report nothing."""

    def __enter__(self) -> NullReporter:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def step_done(self, step: int) -> None:
        pass

    def log(self, record: dict) -> None:
        pass


class ConsoleReporter:
    """Writes metrics.jsonl and draws a progress bar with loss, samples/s and ETA."""

    def __init__(self, metrics: MetricsLog, *, total_steps: int, console: Console, show_progress: bool, board=None):
        self.metrics, self.board = metrics, board
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("acc {task.fields[acc]}"),
            TextColumn("{task.fields[sps]} samples/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not show_progress,
            refresh_per_second=4,
        )
        self.task = self.progress.add_task("train", total=total_steps, loss="-", acc="-", sps="-")

    def __enter__(self) -> ConsoleReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()
        self.metrics.close()
        if self.board is not None:
            self.board.close()

    def step_done(self, step: int) -> None:
        self.progress.advance(self.task)

    def log(self, record: dict) -> None:
        self.metrics.write(record)
        if self.board is not None:
            self.board.log(record)
        fields = {"loss": f"{record['loss']:.4f}", "sps": f"{record['samples_per_s']:,.0f}"}
        if "val_accuracy" in record:
            fields["acc"] = f"{100 * record['val_accuracy']:.1f}%"
        self.progress.update(self.task, **fields)


def open_reporter(
    out_dir: Path | None,
    console: Console | None,
    *,
    start_step: int,
    total_steps: int,
    show_progress: bool,
    tensorboard: bool = False,
) -> ConsoleReporter | NullReporter:
    """Where rank 0 of a run that writes puts its progress (metrics.jsonl, TensorBoard's
    event files, the bar); the others drop it. A resumed run keeps the lines (and the
    events) of the steps before `start_step`."""
    if out_dir is None or console is None:
        return NullReporter()
    metrics = MetricsLog(out_dir / "metrics.jsonl", from_step=start_step)
    board = Board(out_dir / "tensorboard", start_step) if tensorboard else None
    return ConsoleReporter(metrics, total_steps=total_steps, console=console, show_progress=show_progress, board=board)


# metrics.jsonl's keys as TensorBoard's tags
BOARD_TAGS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "val_loss": "validation/loss",
    "val_accuracy": "validation/accuracy",
    "samples_per_s": "speed/samples_per_s",
    "comm_share": "speed/comm_share",
}


class Board:
    """TensorBoard event files, by the `tensorboard` package's writer (through torch's)."""

    def __init__(self, folder: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops the events after its checkpoint, as metrics.jsonl drops the lines
        self.writer = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict) -> None:
        wall = record.get("time_unix")
        for key, tag in BOARD_TAGS.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, value, global_step=record["step"], walltime=wall)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def render_summary(summary: dict, out_dir: str) -> Table:
    table = Table(title="shardwise run summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("validation accuracy", f"{100 * summary['val_accuracy']:.2f}%"),
        ("validation loss", f"{summary['val_loss']:.4f}"),
        ("final train loss", f"{summary['train_loss']:.4f}"),
        ("steps", f"{summary['steps']} x global batch {summary['global_batch']}"),
        ("layout", f"{_layout(summary)} on {summary['world_size']} process(es), {summary['backend']}"),
        ("placement", summary.get("placement", "this machine")),
        ("model", f"{summary['model']} ({summary['parameters']:,} parameters)"),
        ("throughput", f"{summary['samples_per_s']:,.0f} samples/s, median step {1e3 * summary['step_time_s']:.2f} ms"),
        ("wall time", f"{summary['wall_s']:.1f} s"),
        ("outputs", out_dir),
    ]
    check = summary.get("model_check", {})
    if "predicted" in check:
        rows.insert(-2, ("cost model", _model_check(check)))
    if "compression" in summary:
        c = summary["compression"]
        sent = f"{c['method']}: rank 0 sent {c['ratio']:.1%} of the float32 gradient bytes"
        rows.insert(-2, ("gradient compression", sent + f" (the first {c['warmup_steps']} steps whole)"))
        trial = c.get("trial") or {}
        if trial.get("step_s"):
            timed = ", ".join(f"{m} {1e3 * t:.2f} ms" for m, t in trial["step_s"].items())
            after = f" ({1e3 * trial['kept_step_s']:.2f} ms a step after)" if trial.get("kept_step_s") else ""
            rows.insert(-2, ("compression trial", f"{timed} a step: kept {trial['chosen']}{after}"))
    if "pipeline" in summary:
        p = summary["pipeline"]
        theory = f"{p['bubble_theoretical']:.1%} in theory ({p.get('schedule', '1f1b')}'s order, equal stages)"
        bubble = f"{p['bubble_measured']:.1%} measured, {theory}"
        rows.insert(-2, ("pipeline bubble", bubble))
    for k, v in rows:
        table.add_row(k, v)
    return table


def _model_check(check: dict) -> str:
    """Predicted against measured step time and peak memory, in one line."""
    p = check["predicted"]
    text = f"step {1e3 * p['step_s']:.2f} ms predicted, {1e3 * check['measured_step_s']:.2f} ms measured"
    if check.get("step_ratio") is not None:
        text += f" ({check['step_ratio']:.2f}x)"
    if "measured_load_s" in check and "load_s" in p:
        text += f", of which loading {1e3 * p['load_s']:.3f} and {1e3 * check['measured_load_s']:.3f}"
    if "measured_peak_bytes" in check:
        peak, measured = p["peak_bytes"] / 2**20, check["measured_peak_bytes"] / 2**20
        text += f"; peak {peak:,.1f} MiB predicted, {measured:,.1f} measured"
        if check.get("memory_ratio") is not None:
            text += f" ({check['memory_ratio']:.2f}x)"
        if "budget_bytes" in check:
            over = "over" if check["over_budget"] else "within"
            text += f", {over} train.memory_per_rank ({check['budget_bytes'] / 2**20:,.1f} MiB)"
    return text


def _layout(summary: dict) -> str:
    """The layout with what its data-parallel ranks shard, where they shard anything."""
    shard = summary.get("shard", "none")
    return summary["layout"] if shard == "none" else f"{summary['layout']}, shard={shard}"
