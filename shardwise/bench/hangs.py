"""`shardwise bench hangs`: seeded runs that each break one rank's collectives, and whether the
job's last line names the culprit rank and what it did.

Each trial draws from its seed a rank of 3, a step, and a fault (train/faults.py) on a fully
sharded (FSDP2) job, whose ranks agree on finite steps by a collective each step, with
`train.collective_timeout_s` = TIMEOUT_S:
- `hang`: the process stops; named as the rank that stopped answering;
- `slow`: a straggler that sleeps 10 s, past the timeout; named as the rank the others waited for
  (these two on a pipeline of 3 stages in half the trials: the stages waiting on it must not be
  read as deadlocked);
- `skip`: it leaves out the step's agreement on finite gradients; `order`: it measures the
  gradient norm before that agreement; both named with the call it never made and the one it
  made instead;
- `shape`, `dtype`: its part of the agreement has another shape, or float64 (gloo aborts the
  rank that receives it); named with both calls;
- `deadlock` (on a pipeline of 3 stages instead): the stage waits on a receive its neighbour
  never sends; named with both waits;
- `link` (on the emulated cluster only): its host's link goes down after the step; named as cut
  off.
A trial counts when the job ends with exit 1 and its last line names the rank and the
disagreement; the time from the fault's step to the job's end is measured against the
timeout + 5 s.

What the rings cost: the digits convnet on 2 ranks with torch's flight recorder as every
launched job has it, and with it off (TORCH_FR_BUFFER_SIZE=0), alternated; the step time ratio.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.table import Table

from shardwise.bench.common import Bench, alternate
from shardwise.train.outputs import read_metrics

TRIALS, SEED, NPROC, STEPS, TIMEOUT_S = 24, 11, 3, 12, 3.0
JOB = ["--model.name", "mlp", "--train.eval_every", "0", "--run.progress", "false", "--train.batch_size", "48",
       "--train.collective_timeout_s", str(TIMEOUT_S), "--train.log_every", "1"]  # fmt: skip
PIPELINE, SHARDED = ["--parallel.pp", str(NPROC)], ["--parallel.shard", "full"]
EITHER = ("hang", "slow")  # on either layout: a pipeline's waits on a stopped stage are no deadlock
SKIPPED = ("skipped a collective or called it out of order", "rank {rank} never called all_reduce")
MISMATCHED = ("disagrees with the others' collectives", "rank {rank} called all_reduce")
SAID = {  # how the last line begins, and what else it says of the rank's collectives
    "hang": ("stopped answering (its process is stopped)", ""),
    "slow": ("stopped answering (it never reached the collective)", ""),
    "skip": SKIPPED,
    "order": SKIPPED,
    "shape": MISMATCHED,
    "dtype": MISMATCHED,
    "deadlock": ("deadlocked on point-to-point messages", "rank {rank} waits to receive #1 (tag 77"),
    "link": ("was cut off", "the link of host"),
}


def _trial(b: Bench, out: Path, rank: int, step: int, kind: str, layout: list[str]):
    """The job with the fault; its result and when it ended."""
    cmd = [sys.executable, "-m", "shardwise", "train", "--nproc", str(NPROC), *JOB, "--train.steps", str(STEPS)]
    cmd += layout + ["--out", str(out)]
    cluster = b.placement.cluster
    if cluster:
        cmd += ["--cluster", f"emulated:{cluster.name}"]
    if kind != "link":
        env = {**os.environ, "SHARDWISE_FAULT": f"{rank}:{step}:{kind}"}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env), time.time()
    from shardwise.cluster import netns

    host = b.placement.host(rank)
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # the link goes down once the fault's step is logged
        deadline = time.monotonic() + 300
        while job.poll() is None and not _logged(out, step) and time.monotonic() < deadline:
            time.sleep(0.05)
        netns.set_link(cluster, host, up=False)
        stdout, stderr = job.communicate(timeout=300)
    finally:
        netns.set_link(cluster, host, up=True)
        if job.poll() is None:
            job.kill()
    return subprocess.CompletedProcess(cmd, job.returncode, stdout, stderr), time.time()


def _records(out: Path) -> list[dict]:
    """Rank 0's metrics.jsonl so far (none while it is being created or a line written)."""
    try:
        return read_metrics(out / "metrics.jsonl")
    except (OSError, ValueError):
        return []


def _logged(out: Path, step: int) -> bool:
    """Whether the job has logged `step` (counted from 1, as metrics.jsonl counts)."""
    return any(r["step"] >= step for r in _records(out))


def _fault_time(out: Path, step: int) -> float | None:
    """When the step before the faulty one was logged (rank 0's metrics.jsonl)."""
    return max((r["time_unix"] for r in _records(out) if r["step"] <= step), default=None)


def run(b: Bench) -> None:
    trials(b)
    ring_cost(b)


def trials(b: Bench) -> None:
    kinds = sorted(k for k in SAID if k != "link" or b.placement.cluster and b.placement.cluster.hosts >= NPROC)
    b.console.print(f"[bold]hangs[/]: {TRIALS} seeded trials, a rank of {NPROC} with one fault of "
                    f"{', '.join(kinds)}; collective timeout {TIMEOUT_S:g} s ({b.where})")  # fmt: skip
    table = Table(title="trials")
    for col in ("trial", "layout", "rank", "step", "fault", "exit", "named", "s after the fault"):
        table.add_column(col, justify="right")
    named, delays = 0, []
    for trial in range(TRIALS):
        rng = random.Random(SEED + trial)
        rank, step, kind = rng.randrange(NPROC), rng.randrange(2, STEPS - 2), rng.choice(kinds)
        pipeline = kind == "deadlock" or kind in EITHER and rng.random() < 0.5
        out = b.work / f"hangs-{trial}"
        done, ended = _trial(b, out, rank, step, kind, PIPELINE if pipeline else SHARDED)
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        begins, names = SAID[kind]
        ok = done.returncode == 1 and last.startswith(f"shardwise: rank {rank} {begins}")
        ok = ok and names.format(rank=rank) in last
        named += ok
        began = _fault_time(out, step)
        delay = ended - began if began else float("nan")
        delays += [delay] if began else []
        where = f"pp={NPROC}" if pipeline else "FSDP"
        table.add_row(*map(str, (trial, where, rank, step + 1, kind, done.returncode, ok, f"{delay:.1f}")))
        if not ok:
            b.console.print(f"trial {trial}: {last}")
    b.console.print(table)
    how = f"{TRIALS} seeded trials of {', '.join(kinds)} faults on a rank of {NPROC}, timeout {TIMEOUT_S:g} s"
    b.record("hangs", f"culprit rank and collective named (of {TRIALS})", [named], unit="count", how=how)
    if delays:
        b.record("hangs", "s from the fault's step to the job's end", delays, unit="s", how=how)
        b.console.print(f"{named} of {TRIALS} named; {statistics.median(delays):.1f} s (median) from the fault to the "
                        f"end, against a timeout of {TIMEOUT_S:g} s + 5")  # fmt: skip


def ring_cost(b: Bench) -> None:
    """Step time with the flight recorder's ring over without it, alternated `b.repeats` times."""
    steps = 300

    def job(size: str):
        env = {**os.environ, "TORCH_FR_BUFFER_SIZE": size}
        return lambda i: b.train(["--nproc", "2"], f"ring-{size}-{i}", steps=steps, env=env)["step_time_s"]

    b.console.print(f"[bold]hangs[/]: the ring's cost, convnet on digits, 2 ranks, {steps} steps a run, "
                    f"{b.repeats} alternated repetitions")  # fmt: skip
    times = alternate({"ring": job("2000"), "no ring": job("0")}, b.repeats, b.console)
    how = f"convnet, digits, 2 ranks, {steps} steps, median step time; TORCH_FR_BUFFER_SIZE 2000 against 0"
    text = b.ratio("hangs", "step time: flight recorder on / off", times["ring"], times["no ring"], how=how)
    b.console.print(f"step time with the ring / without: [bold]{text}[/] (target < 1.02)")
