"""What a training step costs on N ranks beyond its model's work and its collectives: the
engine's own loop (Python, the optimizer and scheduler calls, the small collectives'
wake-ups; not the agreement on finite gradients, which its data-parallel tiny run does not
make and the model prices where a layout does: `plan/model.py`); and the memory a rank takes beyond its
model's (the communication library's buffers, code first run while training).

Measured once per placement and rank count by running the engine itself: a tiny model (an
MLP with 8 hidden units on the digits, data parallel over every rank) whose compute takes
microseconds trains STEPS steps by `shardwise train`, in a process of its own as a user
would run it, and its median step and peak memory, less what the cost model predicts for
that model and layout, are the overheads every step and every rank of every layout pay. Cached beside the link
(`files.cache_dir`). The tiny run's own prediction counts no overhead (MEASURING_ENV): it is
what is being measured.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from shardwise.files import cache_dir, write_atomic
from shardwise.procs import FAULT_ENV

VERSION = 6  # of this measurement; a cached one is also remeasured when the profile or the link probe changes
STEPS = 30
TIMEOUT_S = 300
TINY = {"model.name": "mlp", "model.hidden": "8", "data.name": "digits"}
MEASURING_ENV = "SHARDWISE_MEASURING_LOOP"  # set in the tiny run: its prediction adds no overhead
MICROBATCHES = 8  # the tiny pipeline's (`pipeline_action`)
# runs of the tiny pipeline, the median taken: one run's median step moved between 4.5 and
# 31 ms from one run to the next on 2 loopback ranks here (its ranks wait on each other 16
# times a step, each wait as long as the scheduler makes it)
PIPELINE_RUNS = 3


def loop_overhead(cluster: str, nproc: int) -> tuple[float, float]:
    """Seconds a step of the engine's loop costs on `nproc` ranks placed by `cluster`, and
    bytes a rank holds, beyond the model and its collectives: the tiny run's measured step
    and peak less what the cost model predicted for it (its summary has both)."""
    from shardwise.cluster.placement import placement_for
    from shardwise.cluster.probe import LINK_VERSION
    from shardwise.plan.profile import VERSION as PROFILE_VERSION

    if os.environ.get(MEASURING_ENV):
        return 0.0, 0.0
    placement = placement_for(cluster)
    path = cache_dir() / f"loop-{re.sub(r'[^A-Za-z0-9]+', '-', placement.describe(nproc))}.json"
    found = json.loads(path.read_text()) if path.is_file() else {}
    version = [VERSION, PROFILE_VERSION, LINK_VERSION]  # the prediction it is taken from depends on both
    if found.get("version") != version:
        check = _run_tiny(nproc, cluster)
        found = {
            "version": version,
            "step_s": check["measured_step_s"],
            "predicted_s": check["predicted"]["step_s"],
            "peak_bytes": check["measured_peak_bytes"],
            "predicted_peak_bytes": check["predicted"]["peak_bytes"],
        }
        found["overhead_s"] = max(0.0, found["step_s"] - found["predicted_s"])
        found["overhead_bytes"] = max(0.0, found["peak_bytes"] - found["predicted_peak_bytes"])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(found))
    return found["overhead_s"], found["overhead_bytes"]


def pipeline_action(cluster: str) -> float:
    """Seconds each forward or backward a pipeline rank runs costs beyond its arithmetic and
    the transfers the model prices: torch's schedule runtime, a send or receive posted and
    waited on, the stage's bookkeeping. Measured as the loop's cost is: a tiny model (four
    Linear layers of 8 units) on pp = 2 under 1F1B with 8 micro-batches of 2 samples, whose
    measured step (the median of PIPELINE_RUNS runs) less its predicted step and the loop's
    own cost on 2 ranks is spread over the 2 x 8 forwards and backwards each rank runs.
    Cached beside the loop's."""
    from shardwise.cluster.placement import placement_for
    from shardwise.cluster.probe import LINK_VERSION
    from shardwise.plan.profile import VERSION as PROFILE_VERSION

    if os.environ.get(MEASURING_ENV):
        return 0.0
    name = re.sub(r"[^A-Za-z0-9]+", "-", placement_for(cluster).describe(2))
    path = cache_dir() / f"pipeline-{name}.json"
    found = json.loads(path.read_text()) if path.is_file() else {}
    version = [VERSION, PROFILE_VERSION, LINK_VERSION]
    if found.get("version") != version:
        settings = {**TINY, "model.hidden": "8,8,8", "parallel.pp": "2", "parallel.microbatches": str(MICROBATCHES)}
        settings = {**_settings(2), **settings, "train.batch_size": str(2 * MICROBATCHES)}
        checks = [_run_tiny(2, cluster, settings) for _ in range(PIPELINE_RUNS)]
        steps = [check["measured_step_s"] for check in checks]
        loop_s, _ = loop_overhead(cluster, 2)
        found = {"version": version, "steps_s": steps, "step_s": statistics.median(steps)}
        found["predicted_s"] = statistics.median(check["predicted"]["step_s"] for check in checks)
        found["loop_s"] = loop_s
        found["action_s"] = max(0.0, found["step_s"] - found["predicted_s"] - loop_s) / (2 * MICROBATCHES)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(found))
    return found["action_s"]


def _settings(nproc: int) -> dict[str, str]:
    steps = str(STEPS)
    return {**TINY, "train.batch_size": str(2 * nproc), "train.steps": steps, "train.eval_every": "0"} | {
        "train.log_every": steps,
        "run.progress": "false",
    }


def _run_tiny(nproc: int, cluster: str, settings: dict[str, str] | None = None) -> dict:
    """The tiny run's measured and predicted step and peak (its summary's `model_check`),
    trained by `shardwise train` as any job is."""
    from shardwise.errors import ShardwiseError

    with tempfile.TemporaryDirectory(prefix="shardwise-loop-") as tmp:
        out = Path(tmp) / "run"
        flags = [f"--{key}={value}" for key, value in (settings or _settings(nproc)).items()]
        command = [sys.executable, "-m", "shardwise", "train", f"--nproc={nproc}", f"--cluster={cluster}"]
        # a session of its own, so that a run over time is stopped with its ranks
        proc = subprocess.Popen(
            [*command, f"--out={out}", *flags],
            # the tiny run injects none of the faults meant for the run it measures for
            env={**{k: v for k, v in os.environ.items() if k != FAULT_ENV}, MEASURING_ENV: "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            _, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise ShardwiseError(
                "plan", f"measuring the training loop's own cost on {nproc} ranks took over {TIMEOUT_S} s"
            ) from None
        if proc.returncode != 0:
            last = (stderr.strip().splitlines() or ["no message"])[-1]
            raise ShardwiseError(
                "plan",
                f"measuring the training loop's own cost on {nproc} ranks failed (exit {proc.returncode}): {last}",
            )
        check = json.loads((out / "summary.json").read_text())["model_check"]
        if "measured_peak_bytes" not in check:
            why = check.get("none", "no memory measured")
            raise ShardwiseError("plan", f"measuring the training loop's own cost on {nproc} ranks: {why}")
        return check
