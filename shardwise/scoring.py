"""A finished run's weights at work in this process: `evaluate` (loss and accuracy on a
data source) and `predict` (class probabilities for new inputs, by the preprocessing
record saved in model.safetensors' metadata).

A run folder is read as a checkpoint is: its config is the default, the caller's
settings win, and code it names (a model's or a data source's import path) runs only
where the caller names the same path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shardwise.config import Config, load_config
from shardwise.config_trust import check_code_trust
from shardwise.errors import ShardwiseError
from shardwise.files import atomic_path, write_atomic
from shardwise.train.outputs import PREPROCESS_KEY


def open_run(run: str | Path, texts: dict[str, str]) -> tuple[Path, Config]:
    """The run folder and its config with the caller's settings on top."""
    folder = Path(run)
    if not (folder / "config.toml").is_file() or not (folder / "model.safetensors").is_file():
        raise ShardwiseError("run", f"{str(folder)!r} is not a finished run folder (config.toml, model.safetensors)")
    cfg = load_config(None, texts, resumed=(folder / "config.toml").read_text())
    check_code_trust(cfg, folder, path=None, overrides=texts)
    return folder, cfg


def preprocess_of(weights: Path) -> dict:
    """The preprocessing record saved with the weights ({} for weights saved without one)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        text = (f.metadata() or {}).get(PREPROCESS_KEY)
    return json.loads(text) if text else {}


def run_record(folder: Path) -> dict:
    """The run's preprocessing record; one line where its weights were saved without one."""
    record = preprocess_of(folder / "model.safetensors")
    if not record:
        why = "holds no preprocessing record (saved before records were kept): train it again"
        raise ShardwiseError("run", f"{folder}/model.safetensors {why}")
    return record


def run_model(folder: Path, cfg: Config, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The run's model with its final weights, in evaluation mode."""
    from shardwise.checkpoint.resume import load_model_file
    from shardwise.models import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, tuple(in_shape), num_classes).to(getattr(torch, cfg.train.dtype))
    load_model_file(model, folder / "model.safetensors", key="run")
    return model.eval()


def evaluate(run: str | Path, texts: dict[str, str]) -> dict[str, float]:
    """{"val_loss", "val_accuracy"} of the run's weights on its validation set (or the data
    `texts` names), in this process."""
    from shardwise.data import build_rank_data, load_source
    from shardwise.train.evaluate import evaluate as score_model

    folder, cfg = open_run(run, texts)
    dataset = load_source(cfg.data, seed=cfg.train.seed)
    data = build_rank_data(
        cfg.data, dataset, global_batch=cfg.train.batch_size, grad_accum=cfg.train.grad_accum, dp_rank=0, dp=1,
        seed=cfg.train.seed, device=torch.device("cpu"), dtype=getattr(torch, cfg.train.dtype),
    )  # fmt: skip
    return score_model(run_model(folder, cfg, dataset.in_shape, dataset.num_classes), data, group=None)


@dataclass
class NewInputs:
    """New inputs prepared as the run's training data was, and where their predictions go."""

    folder: Path
    cfg: Config
    record: dict  # the preprocessing record saved with the weights
    names: list[str]  # an input's row number, or its image file's name
    x: np.ndarray  # float32, the run's inputs
    out: Path


def new_inputs(run: str | Path, inputs: str | Path, out: str | Path, texts: dict[str, str]) -> NewInputs:
    """Read `inputs` (an .npz's raw samples `x`, or a folder of images) and prepare them by
    the preprocessing record saved in the run's model.safetensors."""
    from shardwise.data.inputs import prepare, read_inputs

    out = Path(out)
    if out.suffix not in (".csv", ".npz"):
        raise ShardwiseError("out", f"{str(out)!r}: write predictions to a .csv or an .npz file")
    folder, cfg = open_run(run, texts)
    record = run_record(folder)
    names, raw = read_inputs(Path(inputs), tuple(record["in_shape"]))
    return NewInputs(folder, cfg, record, names, prepare(raw, record, from_images=Path(inputs).is_dir()), out)


def predict(new: NewInputs) -> np.ndarray:
    """Class probabilities (float64) of the run's model for the inputs, in this process."""
    model = run_model(new.folder, new.cfg, tuple(new.record["in_shape"]), len(new.record["classes"]))
    dtype = getattr(torch, new.cfg.train.dtype)
    with torch.no_grad():
        batches = torch.from_numpy(new.x).split(512)
        return torch.cat([torch.softmax(model(b.to(dtype)).double(), dim=1) for b in batches]).numpy()


def write_predictions(new: NewInputs, probs: np.ndarray) -> dict:
    """`out`: .csv (a row per input: its name, the class, its name, each probability) or
    .npz (arrays); what was written."""
    _write_predictions(new.out, new.names, probs, new.record["classes"])
    return {"inputs": len(new.names), "out": str(new.out), "classes": new.record["classes"]}


def _write_predictions(out: Path, names: list[str], probs: np.ndarray, classes: list[str]) -> None:
    predicted = probs.argmax(axis=1)
    if out.suffix == ".npz":
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.savez(f, input=np.array(names), predicted=predicted, probabilities=probs, classes=np.array(classes))
        return
    import csv
    import io

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["input", "predicted", "name", *(f"p_{c}" for c in classes)])
    for name, k, row in zip(names, predicted, probs, strict=True):
        writer.writerow([name, int(k), classes[k], *(f"{p:.6g}" for p in row)])
    write_atomic(out, text.getvalue())
