"""What a training step costs on N ranks beyond its model's work and its collectives: the
engine's own loop (Python, the per-step agreement on finite gradients, the optimizer and
scheduler calls, the small collectives' wake-ups).

Measured once per placement and rank count by running the engine itself: a tiny model (an
MLP with 8 hidden units on the digits, data parallel over every rank) whose compute takes
microseconds trains STEPS steps by `shardwise train`, in a process of its own as a user
would run it, and its median step, less what the cost model predicts for that model and
layout, is the overhead every step of every layout pays. Cached beside the link
(`files.cache_dir`). The tiny run's own prediction counts no overhead (MEASURING_ENV): it is
what is being measured.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from shardwise.files import cache_dir, write_atomic

VERSION = 1
STEPS = 30
TINY = {"model.name": "mlp", "model.hidden": "8", "data.name": "digits"}
MEASURING_ENV = "SHARDWISE_MEASURING_LOOP"  # set in the tiny run: its prediction adds no overhead


def loop_overhead(cluster: str, nproc: int, predicted_tiny_s) -> float:
    """Seconds a step of the engine's loop costs on `nproc` ranks placed by `cluster`,
    beyond the model and its collectives. `predicted_tiny_s(cfg)`: the cost model's step for
    the tiny run's config (the caller's model, so the two never disagree on what is counted)."""
    from shardwise.cluster.placement import placement_for

    if os.environ.get(MEASURING_ENV):
        return 0.0
    placement = placement_for(cluster)
    path = cache_dir() / f"loop-{re.sub(r'[^A-Za-z0-9]+', '-', placement.describe(nproc))}.json"
    found = json.loads(path.read_text()) if path.is_file() else {}
    if found.get("version") == VERSION:
        return found["overhead_s"]
    cfg = _tiny_config(nproc)
    measured = _run_tiny(nproc, cluster)
    predicted = predicted_tiny_s(cfg)
    found = {
        "version": VERSION,
        "step_s": measured,
        "predicted_s": predicted,
        "overhead_s": max(0.0, measured - predicted),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(found))
    return found["overhead_s"]


def _settings(nproc: int) -> dict[str, str]:
    steps = str(STEPS)
    return {**TINY, "train.batch_size": str(2 * nproc), "train.steps": steps, "train.eval_every": "0"} | {
        "train.log_every": steps,
        "run.progress": "false",
    }


def _tiny_config(nproc: int):
    from shardwise.config import load_config

    return load_config(None, _settings(nproc))


def _run_tiny(nproc: int, cluster: str) -> float:
    """The tiny run's median step (seconds), trained by `shardwise train` as any job is."""
    from shardwise.errors import ShardwiseError

    with tempfile.TemporaryDirectory(prefix="shardwise-loop-") as tmp:
        out = Path(tmp) / "run"
        flags = [f"--{key}={value}" for key, value in _settings(nproc).items()]
        command = [sys.executable, "-m", "shardwise", "train", f"--nproc={nproc}", f"--cluster={cluster}"]
        done = subprocess.run(
            [*command, f"--out={out}", *flags],
            env={**os.environ, MEASURING_ENV: "1"},
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise ShardwiseError(
                "plan",
                f"measuring the training loop's own cost on {nproc} ranks failed (exit {done.returncode}): {last}",
            )
        return json.loads((out / "summary.json").read_text())["step_time_s"]
