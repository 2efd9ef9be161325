"""shardwise data parallel vs a plain torch DDP script: same model, batch, world size.

Each repetition runs both jobs, alternating which goes first (A B, B A, ...),
as separate multi-process jobs; each reports its median step time after 5
warm-up steps (forward, backward with the gradient all-reduce, optimizer
step, plus shardwise's data plan and scheduler). The ratio is shardwise over
torch: below 1.02 means shardwise costs at most 2% over plain DDP.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

BATCH = 64


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(f"benchmark job failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")


def _shardwise(nproc: int, steps: int, work: Path, i: int) -> float:
    out = work / f"shardwise-{i}"
    cmd = [sys.executable, "-m", "shardwise", "train", "--nproc", str(nproc), "--out", str(out)]
    cmd += ["--train.steps", str(steps), "--train.batch_size", str(BATCH), "--train.eval_every", "0"]
    cmd += ["--train.log_every", str(steps), "--run.progress", "false"]
    _run(cmd)
    return json.loads((out / "summary.json").read_text())["step_time_s"]


def _torch(nproc: int, steps: int, work: Path, i: int) -> float:
    out = work / f"torch-{i}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "shardwise.bench.torch_ddp_reference", "--steps", str(steps), "--batch-size", str(BATCH)]
    cmd += ["--out", str(out)]
    _run(cmd)
    return json.loads(out.read_text())["step_time_s"]


def main(*, nproc: int, repeats: int, steps: int) -> int:
    """Defaults live in the CLI (`shardwise bench ddp --help`)."""
    console = Console()
    console.print(
        f"[bold]bench ddp[/]: convnet on digits, global batch {BATCH}, {nproc} processes (gloo, loopback), "
        f"{steps} steps per run, {repeats} alternated repetitions"
    )
    a_times, b_times = [], []
    with tempfile.TemporaryDirectory(prefix="shardwise-bench-") as tmp:
        work = Path(tmp)
        for i in range(repeats):
            order = [("a", _shardwise), ("b", _torch)] if i % 2 == 0 else [("b", _torch), ("a", _shardwise)]
            for side, fn in order:
                (a_times if side == "a" else b_times).append(fn(nproc, steps, work, i))
            console.print(
                f"  repetition {i + 1}: shardwise {1e3 * a_times[-1]:.2f} ms, torch DDP {1e3 * b_times[-1]:.2f} ms"
            )
    ratios = [a / b for a, b in zip(a_times, b_times, strict=True)]
    med_a, med_b = statistics.median(a_times), statistics.median(b_times)
    table = Table(title="step time, median over repetitions (min - max)")
    for col in ("", "ms / step", "samples/s"):
        table.add_column(col, justify="right")
    table.add_row(
        "shardwise dp",
        f"{1e3 * med_a:.2f} ({1e3 * min(a_times):.2f} - {1e3 * max(a_times):.2f})",
        f"{BATCH / med_a:,.0f}",
    )
    table.add_row(
        "torch DDP", f"{1e3 * med_b:.2f} ({1e3 * min(b_times):.2f} - {1e3 * max(b_times):.2f})", f"{BATCH / med_b:,.0f}"
    )
    console.print(table)
    ratio = med_a / med_b
    console.print(
        f"ratio shardwise / torch DDP: [bold]{ratio:.3f}[/] "
        f"(per-repetition ratios {min(ratios):.3f} - {max(ratios):.3f}; "
        f"target <= 1.02: {'met' if ratio <= 1.02 else 'NOT met'})"
    )
    return 0
