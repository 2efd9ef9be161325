"""What a training step costs on N ranks beyond its model's work and its collectives: the
engine's own loop (Python, the per-step agreement on finite gradients, the optimizer and
scheduler calls, the small collectives' wake-ups).

Measured once per placement and rank count by running the engine itself: a tiny model (an
MLP with 8 hidden units on the digits, data parallel over every rank) whose compute takes
microseconds trains STEPS steps through the launcher, and its median step, less what the
cost model predicts for that model and layout, is the overhead every step of every layout
pays. Cached beside the link (`files.cache_dir`).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from shardwise.files import cache_dir, write_atomic

VERSION = 1
STEPS = 30
TINY = {"model.name": "mlp", "model.hidden": "8", "data.name": "digits"}


def loop_overhead(cluster: str, nproc: int, predicted_tiny_s) -> float:
    """Seconds a step of the engine's loop costs on `nproc` ranks placed by `cluster`,
    beyond the model and its collectives. `predicted_tiny_s(cfg)`: the cost model's step for
    the tiny run's config (the caller's model, so the two never disagree on what is counted)."""
    from shardwise.cluster.placement import placement_for

    placement = placement_for(cluster)
    path = cache_dir() / f"loop-{re.sub(r'[^A-Za-z0-9]+', '-', placement.describe(nproc))}.json"
    found = json.loads(path.read_text()) if path.is_file() else {}
    if found.get("version") == VERSION:
        return found["overhead_s"]
    cfg = _tiny_config(nproc)
    measured = _run_tiny(cfg, nproc, placement)
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


def _tiny_config(nproc: int):
    from shardwise.config import load_config

    settings = {**TINY, "train.batch_size": str(2 * nproc), "train.steps": str(STEPS), "train.eval_every": "0"}
    return load_config(None, {**settings, "train.log_every": str(STEPS), "run.progress": "false"})


def _run_tiny(cfg, nproc: int, placement) -> float:
    """The tiny run's median step (seconds), trained by the launcher as any job is."""
    from shardwise.errors import ShardwiseError
    from shardwise.launch import launch

    with tempfile.TemporaryDirectory(prefix="shardwise-loop-") as tmp:
        out = Path(tmp) / "run"
        status = launch(cfg, nproc=nproc, out=out, placement=placement, quiet=True)
        if status != 0:
            raise ShardwiseError(
                "plan", f"measuring the training loop's own cost on {nproc} ranks failed (exit {status})"
            )
        return json.loads((out / "summary.json").read_text())["step_time_s"]
