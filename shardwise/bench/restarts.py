"""Restart trials: kill a random rank at a random step (or in the middle of a
checkpoint write) and check that `--max-restarts` brings the run to the same
weights as a run without failures.

Each trial draws, from its seed, a rank, a step and a fault: SIGKILL at the
start of the step, or an exit at one of the three points of the checkpoint
written after it. The run uses deterministic mode and checkpoints every 3
steps; its final model.safetensors must equal the uninterrupted run's bit for
bit.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

from rich.table import Table

from shardwise.bench.common import Bench

JOB = ["--model.name", "mlp", "--train.eval_every", "0", "--run.progress", "false"]
JOB += ["--train.checkpoint_every", "3", "--train.deterministic", "true"]
POINTS = ["checkpoint-shards", "checkpoint-manifest", "checkpoint-rename"]


def _train(out: Path, nproc: int, steps: int, fault: str = "") -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "shardwise", "train", "--nproc", str(nproc), *JOB, "--train.steps", str(steps)]
    cmd += ["--out", str(out), "--max-restarts", "3"]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SHARDWISE_FAULT": fault})
    return done, time.perf_counter() - started


def _equal(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


TRIALS, NPROC, STEPS, SEED = 10, 2, 12, 100


def run(b: Bench) -> None:
    trials, nproc, steps, seed, console = TRIALS, NPROC, STEPS, SEED, b.console
    console.print(
        f"[bold]restarts[/]: {trials} seeded trials, mlp on digits, {nproc} ranks, {steps} steps, "
        "checkpoints every 3 steps, --max-restarts 3 (loopback)"
    )
    work = b.work / "restarts"
    reference, _ = _train(work / "reference", nproc, steps)
    if reference.returncode:
        raise RuntimeError(f"the run without failures failed: {reference.stderr[-2000:]}")
    table = Table(title="trials")
    for col in ("trial", "rank", "step", "fault", "restarts", "exit", "same weights", "seconds"):
        table.add_column(col, justify="right")
    good = 0
    for trial in range(trials):
        rng = random.Random(seed + trial)
        rank, step = rng.randrange(nproc), rng.randrange(steps)
        kind = rng.choice(["kill", *(f"exit@{p}" for p in POINTS)])
        if kind.startswith("exit@") and (step + 1) % 3 and step + 1 != steps:
            step = min(steps - 1, step + 2 - (step % 3))  # a step after which a checkpoint is written
        if kind in ("exit@checkpoint-manifest", "exit@checkpoint-rename"):
            rank = 0  # rank 0 finishes the checkpoint
        out = work / f"trial-{trial}"
        done, seconds = _train(out, nproc, steps, f"{rank}:{step}:{kind}")
        same = done.returncode == 0 and _equal(out, work / "reference")
        good += same
        restarts = sum("restart" in line for line in done.stderr.splitlines())
        row = [trial, rank, step + 1, kind, restarts, done.returncode, same, f"{seconds:.1f}"]
        table.add_row(*map(str, row))
    console.print(table)
    how = "a kill, or an exit at one of 3 points of a checkpoint write, at a seeded rank and step"
    b.record("restarts", f"trials healed with the same weights (of {trials})", [good], unit="count", how=how)
    console.print(f"[bold]{good} of {trials}[/] trials completed with the same weights as the run without failures")
