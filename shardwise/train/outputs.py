"""What a run leaves in its output folder (rank 0 only), every file written atomically.

config.toml (written by the launcher), metrics.jsonl, curves.png,
model.safetensors and summary.json.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

from shardwise.config import Config
from shardwise.config_check import parse_bytes
from shardwise.files import atomic_path, write_atomic
from shardwise.jsonsafe import dumps
from shardwise.topology import ParallelDims
from shardwise.train.loop import LoopResult


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, dumps(obj, indent=2) + "\n")


PREPROCESS_KEY = "shardwise.preprocess"  # the metadata key of the preprocessing record


def save_model(path: Path, state_dict: dict[str, torch.Tensor], preprocess: dict | None = None) -> None:
    """Full, unsharded weights under the model's own parameter names; the preprocessing
    that made the inputs (a JSON record in the file's metadata) goes with them."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = {PREPROCESS_KEY: dumps(preprocess)} if preprocess else None
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def plot_curves(path: Path, records: list[dict], title: str) -> None:
    # a Figure without pyplot, its margins set by hand (pyplot's import and tight_layout
    # were half a second of every run's end)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.13, top=0.83, wspace=0.25)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
    evals = [r for r in records if "val_loss" in r]
    ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="loss")
    ax_loss.legend()
    ax_acc.plot([r["step"] for r in evals], [100 * r["val_accuracy"] for r in evals], "o-", color="tab:green")
    ax_acc.set(xlabel="step", ylabel="%", title="validation accuracy", ylim=(0, 100))
    ax_acc.grid(alpha=0.3)
    fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


class MetricsLog:
    """metrics.jsonl, one line per logged step, flushed as it goes."""

    def __init__(self, path: Path, *, from_step: int = 0):
        """A resumed run keeps the lines of the steps before `from_step`."""
        kept = []
        if from_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= from_step]
        self._file = open(path, "w")
        self._file.writelines(line + "\n" for line in kept)

    def write(self, record: dict) -> None:
        """One line, stamped with the time it was written (UTC, ISO 8601, and in seconds
        since the epoch: `time_unix`); the record gets the stamp too."""
        now = time.time()
        stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(timespec="milliseconds")
        record.setdefault("time", stamp)
        record.setdefault("time_unix", round(now, 3))
        self._file.write(dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def new_run_dir(root: Path, model: str) -> Path:
    """A fresh folder `root/<date>-<time>-<model>[-n]` (not created); a model named by an
    import path is tagged with its function's name."""
    base = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{model.rpartition(':')[2]}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def run_summary(
    cfg: Config,
    dims: ParallelDims,
    result: LoopResult,
    state: dict[str, torch.Tensor],
    *,
    backend: str,
    device: str,
    launch_time: float,
    placement: dict,
) -> dict:
    """What every run's summary.json holds, whatever its layout; callers add their layout's own keys.
    `placement`: where the ranks ran (see `describe_hosts`)."""
    warm = result.step_times[min(5, len(result.step_times) - 1) :] or [float("nan")]
    loads = result.load_times[min(5, len(result.load_times) - 1) :]  # none on a parameter server
    t = cfg.train
    return {
        **result.final_eval,
        "train_loss": result.records[-1]["loss"],
        "steps": t.steps,
        "global_batch": t.batch_size,
        "world_size": dims.world_size,
        "layout": dims.layout,
        "backend": backend,
        "device": device,
        **placement,
        "model": cfg.model.name,
        "parameters": sum(v.numel() for v in state.values()),
        "samples_per_s": t.batch_size * len(result.step_times) / max(result.train_s, 1e-9),
        "step_time_s": statistics.median(warm),
        **({"load_time_s": statistics.median(loads)} if loads else {}),
        "train_s": result.train_s,
        "wall_s": time.time() - launch_time,
    }


PREDICTED_ENV = "SHARDWISE_PREDICTED"  # the launcher's cost-model prediction for the ranks, JSON


def model_check(summary: dict, budget: str = "") -> dict:
    """The cost model's predicted step time and peak memory beside the measured ones, and
    measured / predicted. The measured peak of a rank: the parameters it holds plus what
    its resident memory grew by while training (gradients, optimizer state, activations,
    buffers); the largest rank's. With a memory budget named (`budget`, train.memory_per_rank,
    what the planner planned within), whether that peak went over it. None where the
    launcher made no prediction (torchrun)."""
    text = os.environ.get(PREDICTED_ENV)
    if not text:
        return {"model_check": {"none": "started without shardwise's launcher: no prediction"}}
    predicted = json.loads(text)
    if "none" in predicted:
        return {"model_check": predicted}
    # comm.compression = auto: the prediction for the method its trial kept
    kept = summary.get("compression", {}).get("method")
    predicted = predicted.pop("by_method", {}).get(kept, predicted)
    # and the steps that method ran: those after the trial, where there was one
    measured = summary.get("compression", {}).get("trial", {}).get("kept_step_s") or summary["step_time_s"]
    check = {"predicted": predicted, "measured_step_s": measured}
    if "load_time_s" in summary:
        check["measured_load_s"] = summary["load_time_s"]
    check["step_ratio"] = measured / predicted["step_s"] if predicted["step_s"] > 0 else None
    peaks = [
        r["parameters_bytes"] + r["rss_peak_bytes"] - r["rss_start_bytes"]
        for r in summary.get("memory", [])
        if "rss_peak_bytes" in r
    ]
    if peaks:
        check["measured_peak_bytes"] = max(peaks)
        check["memory_ratio"] = max(peaks) / predicted["peak_bytes"] if predicted["peak_bytes"] > 0 else None
        if budget:
            check["budget_bytes"] = parse_bytes(budget, "train.memory_per_rank")
            check["over_budget"] = max(peaks) > check["budget_bytes"]
    return {"model_check": check}


def describe_hosts(hostnames: list[str], launcher_said: str | None = None) -> dict:
    """`placement` in words (the launcher's own words where it gave them: they name an
    emulated cluster's links) and `hosts`: each host's ranks, as the ranks reported them."""
    hosts: dict[str, list[int]] = {}
    for rank, name in enumerate(hostnames):
        hosts.setdefault(name, []).append(rank)
    if launcher_said:
        text = launcher_said
    elif len(hosts) == 1:
        text = f"{len(hostnames)} process(es) on one host, {hostnames[0]}"
    else:
        listed = ", ".join(f"{name} (ranks {', '.join(map(str, ranks))})" for name, ranks in hosts.items())
        text = f"{len(hostnames)} processes on {len(hosts)} hosts: {listed}"
    return {"placement": text, "hosts": hosts}


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl, a number written as null (not finite) read back as NaN."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: float("nan") if v is None else v for k, v in r.items()} for r in records]


def write_run(
    out_dir: Path, cfg: Config, dims: ParallelDims, state: dict, records: list[dict], summary: dict, preprocess: dict
) -> None:
    """The run's weights (with the preprocessing record), curves and summary. The curves
    show the whole history in metrics.jsonl (a resumed run's earlier steps too), else this
    run's records."""
    save_model(out_dir / "model.safetensors", state, preprocess)
    history = read_metrics(out_dir / "metrics.jsonl") or records
    plot_curves(out_dir / "curves.png", history, f"{cfg.model.name} on {cfg.data.name}, {dims.layout}")
    write_json(out_dir / "summary.json", summary)
