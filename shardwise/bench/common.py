"""What every benchmark scenario shares: running jobs, alternating sides, formatting."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console


def bench_console() -> Console:
    """Wide enough that the tables do not wrap when the output goes to a file."""
    return Console(width=max(120, Console().width))


def run_job(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(f"benchmark job failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")


def shardwise_train(args: list[str], out: Path, *, steps: int) -> dict:
    """Run `shardwise train ARGS` quietly for `steps` steps; its summary."""
    cmd = [sys.executable, "-m", "shardwise", "train", *args, "--out", str(out)]
    cmd += ["--train.steps", str(steps), "--train.eval_every", "0", "--train.log_every", str(steps)]
    cmd += ["--run.progress", "false"]
    run_job(cmd)
    return json.loads((out / "summary.json").read_text())


def torchrun_json(module: str, nproc: int, args: list[str], out: Path) -> dict:
    """Run a reference script under torchrun; the JSON it writes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    run_job([*cmd, "-m", module, *args, "--out", str(out)])
    return json.loads(out.read_text())


def alternate(
    sides: dict[str, Callable[[int], float]], repeats: int, console: Console, unit: float = 1e3
) -> dict[str, list[float]]:
    """Run each side once per repetition, rotating which goes first (A B C, B C A, ...);
    each side returns a step time in seconds."""
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            times[name].append(sides[name](i))
        console.print(f"  repetition {i + 1}: " + ", ".join(f"{n} {unit * times[n][-1]:.2f} ms" for n in names))
    return times


def spread(values: list[float], scale: float = 1e3) -> str:
    """Median (min - max)."""
    return f"{scale * statistics.median(values):.2f} ({scale * min(values):.2f} - {scale * max(values):.2f})"


def ratio_spread(a: list[float], b: list[float]) -> tuple[float, str]:
    """Ratio of medians, and the range of the per-repetition ratios."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return statistics.median(a) / statistics.median(b), f"{min(ratios):.3f} - {max(ratios):.3f}"


def mib(n: float) -> str:
    return f"{n / 2**20:,.2f}"
