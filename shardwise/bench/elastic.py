"""`shardwise bench elastic`: an elastic job on the emulated cluster that loses a host on a
seeded schedule and gets it back, against the same job with no failure.

Every PERIOD_S seconds for DURATION_S, a host drawn from the seed is taken down (its link
down and its ranks killed, as a machine that dies) and brought back HALF of a period later.
The job (`--nproc 1:HOSTS`, one rank a host, float64) goes on with the hosts left and grows
back at the first checkpoint after the host returns (elastic.py). It runs twice on the same
schedule: going on from the survivors' memory (`train.recovery = "peer"`, peer_state.py) and
from the newest checkpoint (`disk`). From each rank-0 log line of every step (metrics.jsonl,
its wall-clock time), rank 0's and the launcher's lines it reports, for each:

- recovery: from the loss to the first step after it, median, least and most (it includes
  `train.rejoin_timeout_s`, the wait for the host before going on without it), and the same
  less that wait;
- steps done again: those done after the step the job went on from, before the loss (from
  disk, fewer than `train.checkpoint_every`; from memory, none);
- samples skipped or repeated: the steps of the final trajectory whose loss differs from the
  failure-free run's at the same step (a step's loss is a function of the samples it took),
  or that are missing;
- whether the final weights equal the failure-free run's (to 1e-9, float64).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from shardwise.bench.common import Bench
from shardwise.cluster.netns import set_link
from shardwise.procs import ranks_under
from shardwise.train.outputs import read_metrics

PERIOD_S, DURATION_S, SEED, REJOIN_S = 30.0, 300.0, 7, 5.0
JOB = ["--model.name", "mlp", "--model.hidden", "512,512", "--train.dtype", "float64", "--train.eval_every", "0",
       "--run.progress", "false", "--train.log_every", "1", "--train.checkpoint_every", "25"]  # fmt: skip


def _take_down(cluster, host: int, launcher: int) -> float:
    """The host's link down and its ranks killed; the time it happened."""
    set_link(cluster, host, up=False)
    theirs = subprocess.run(["ip", "netns", "pids", cluster.namespace(host)], capture_output=True, text=True).stdout
    at = time.time()
    ours = set(ranks_under(launcher).values())
    for pid in map(int, theirs.split()):
        if pid in ours:
            os.kill(pid, signal.SIGKILL)
    return at


def _job(b: Bench, out: Path, steps: int, nproc: str, recovery: str = "peer") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "shardwise", "train", *JOB, "--train.steps", str(steps), "--nproc", nproc]
    cmd += ["--cluster", f"emulated:{b.placement.cluster.name}", "--out", str(out), "--max-restarts", "50"]
    cmd += ["--train.rejoin_timeout_s", str(REJOIN_S), "--train.recovery", recovery]
    stdout = open(f"{out}.stdout", "w")  # noqa: SIM115 -- the child holds it; rank 0 says where it went on from
    return subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True)


def run(b: Bench) -> None:
    cluster = b.placement.cluster
    if cluster is None:
        b.console.print("elastic: needs the emulated cluster (--links 1gbit or 10gbit); skipped on loopback")
        return
    hosts = cluster.hosts
    steps = _steps_for(b, hosts)
    b.console.print(f"[bold]elastic[/]: {hosts} hosts, a seeded host down every {PERIOD_S:g} s for "
                    f"{DURATION_S:g} s, back {PERIOD_S / 2:g} s later; {steps} steps ({b.link})")  # fmt: skip
    reference = _job(b, b.work / "elastic-reference", steps, str(hosts))
    if reference.wait() != 0:
        raise RuntimeError(f"the run without failures failed: {reference.stderr.read()[-2000:]}")
    for recovery in ("peer", "disk"):
        _elastic(b, recovery, steps)


def _elastic(b: Bench, recovery: str, steps: int) -> None:
    """The job losing hosts on the seeded schedule, going on from memory or disk; reported."""
    cluster, rng = b.placement.cluster, random.Random(SEED)
    out = b.work / f"elastic-{recovery}"
    job, lines = _job(b, out, steps, f"1:{cluster.hosts}", recovery), []
    reading = threading.Thread(target=lambda: lines.extend(job.stderr), daemon=True)
    reading.start()
    losses, started = [], time.monotonic()
    while job.poll() is None and time.monotonic() - started < DURATION_S:
        time.sleep(max(0.0, started + PERIOD_S * (len(losses) + 1) - time.monotonic()))
        logged = read_metrics(out / "metrics.jsonl")
        if job.poll() is not None or not logged:
            continue
        host = rng.randrange(cluster.hosts)
        last = logged[-1]["step"]  # (a resumed run's metrics.jsonl is cut back to its checkpoint)
        losses.append({"host": host, "at": _take_down(cluster, host, job.pid), "step": last})
        time.sleep(PERIOD_S / 2)
        set_link(cluster, host, up=True)
    code = job.wait()
    reading.join(timeout=10)
    _report(b, out, b.work / "elastic-reference", losses, lines, code, steps, recovery)


def _went_on_from(lines: list[str], said: str) -> list[tuple[int, bool]]:
    """The step the job went on from after each loss, and whether from the survivors' memory
    (rank 0 says it), else the checkpoint the launcher names (its line says which, after a
    loss, not after growing back)."""
    said_re = re.compile(r"going on from step (\d+) in the survivors' memory \((?:step (\d+) on disk|no checkpoint)")
    taken = {int(m.group(2) or -1): int(m.group(1)) for m in map(said_re.search, said.splitlines()) if m}
    out = []
    for line in lines:
        if "going on with" not in line:
            continue
        disk = re.search(r"from (?:the memory of .*, else )?step-0*(\d+)", line)
        on_disk = int(disk.group(1)) if disk else -1  # (matched to rank 0's line by the checkpoint it names)
        memory = taken.get(on_disk) if "the memory of" in line else None
        out.append((memory, True) if memory is not None else (max(on_disk, 0), False))
    return out


def _steps_for(b: Bench, hosts: int) -> int:
    """Steps the full job takes in about DURATION_S here, from a short run of it."""
    probe = _job(b, b.work / "elastic-probe", 60, str(hosts))
    if probe.wait() != 0:
        raise RuntimeError(f"the probe run failed: {probe.stderr.read()[-2000:]}")
    records = read_metrics(b.work / "elastic-probe" / "metrics.jsonl")
    per_step = (records[-1]["time_unix"] - records[9]["time_unix"]) / (len(records) - 10)
    return int(1.2 * DURATION_S / per_step)


def _report(b: Bench, out: Path, ref: Path, losses: list[dict], lines: list[str], code: int, steps: int,
            recovery: str) -> None:  # fmt: skip
    import torch
    from safetensors.torch import load_file

    records, want = (
        read_metrics(out / "metrics.jsonl"),
        {r["step"]: r["loss"] for r in read_metrics(ref / "metrics.jsonl")},
    )
    resumed = _went_on_from(lines, Path(f"{out}.stdout").read_text())
    recoveries, lost = [], []
    for loss, (start, _) in zip(losses, resumed, strict=False):
        after = [r for r in records if r["time_unix"] > loss["at"]]
        if after:
            recoveries.append(after[0]["time_unix"] - loss["at"])
        lost.append(max(0, loss["step"] - start))
    final = {}
    for r in records:  # the last word on each step: a step done again replaces its first try
        final[r["step"]] = r["loss"]
    wrong = sum(1 for s in range(1, steps + 1) if s not in final or abs(final[s] - want.get(s, float("nan"))) > 1e-9)
    same = code == 0
    if same:
        a, c = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
        same = a.keys() == c.keys() and all(torch.allclose(a[k], c[k], rtol=1e-9, atol=1e-12) for k in a)
    how = (f"{len(losses)} losses of a seeded host every {PERIOD_S:g} s on {b.placement.cluster.hosts} hosts, "
           f"going on from {'memory' if recovery == 'peer' else 'disk'}")  # fmt: skip
    tail = f", from {'memory' if recovery == 'peer' else 'disk'}"
    if recoveries:
        b.record("elastic", "recovery, s (loss to the first step after it)" + tail, recoveries, unit="s", how=how)
        less = [r - REJOIN_S for r in recoveries]
        b.record("elastic", f"recovery less the {REJOIN_S:g} s rejoin wait, s" + tail, less, unit="s", how=how)
    b.record("elastic", "steps done again, per loss" + tail, lost or [0], unit="count", how=how)
    if recovery == "peer":
        memory = [float(sum(m for _, m in resumed))]
        b.record("elastic", "losses gone on from the survivors' memory" + tail, memory, unit="count", how=how)
    b.record("elastic", "steps whose samples differ from the failure-free run's" + tail, [wrong], unit="count",
             how=how)  # fmt: skip
    b.record("elastic", "final weights equal the failure-free run's (1 = yes)" + tail, [float(same)], unit="count",
             how=how)  # fmt: skip
    b.console.print(f"the elastic job ({recovery}) ended with exit {code}; its launcher's last lines:\n"
                    + "".join(lines[-40:]))  # fmt: skip
