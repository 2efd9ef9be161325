"""A finished run's weights at work in this process: `evaluate` (loss and accuracy on a
data source) and `predict` (class probabilities for new inputs, by the preprocessing
record saved in model.safetensors' metadata).

A run folder is read as a checkpoint is: its config is the default, the caller's
settings win, and code it names (a model's or a data source's import path) runs only
where the caller names the same path.
"""

from __future__ import annotations

import json
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


def predict(run: str | Path, inputs: str | Path, out: str | Path, texts: dict[str, str]) -> dict:
    """Class probabilities of the run's model for `inputs` (an .npz's raw samples `x`, or a
    folder of images), written to `out` (.csv: a row per input; .npz: arrays); what was done."""
    from shardwise.data.inputs import prepare, read_inputs

    out = Path(out)
    if out.suffix not in (".csv", ".npz"):
        raise ShardwiseError("out", f"{str(out)!r}: write predictions to a .csv or an .npz file")
    folder, cfg = open_run(run, texts)
    record = preprocess_of(folder / "model.safetensors")
    if not record:
        why = "holds no preprocessing record (saved before records were kept): train it again to predict"
        raise ShardwiseError("run", f"{folder}/model.safetensors {why}")
    names, raw = read_inputs(Path(inputs), tuple(record["in_shape"]))
    x = torch.from_numpy(prepare(raw, record, from_images=Path(inputs).is_dir()))
    model = run_model(folder, cfg, tuple(record["in_shape"]), len(record["classes"]))
    dtype = getattr(torch, cfg.train.dtype)
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(b.to(dtype)), dim=1) for b in x.split(512)]).double().numpy()
    _write_predictions(out, names, probs, record["classes"])
    return {"inputs": len(names), "out": str(out), "classes": record["classes"]}


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
