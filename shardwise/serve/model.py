"""The served model: a finished run's weights and preprocessing record, a request's inputs
turned into the run's inputs (as `shardwise predict` does), and a batch's probabilities.

A request names its samples one of two ways: `inputs`, raw samples as nested arrays shaped
like the run's (the values its source read: digits' 0..16, an npz's values), or `images`,
base64-encoded image files (PNG, JPEG, ...), converted to the run's channels and size and
their 0..255 pixels mapped onto the source's range. Anything else is a `RequestError`: a
status and one line, never a traceback.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shardwise.config import Config
from shardwise.data.inputs import image_pixels, prepare
from shardwise.errors import ShardwiseError

MAX_IMAGE_PIXELS = 4096 * 4096  # an image file that says it is larger is refused (a decompression bomb)


RESTARTING = "the model's ranks are restarting after a failure; try again shortly"  # (503)


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServedModel:
    name: str
    forward: Callable[[np.ndarray], np.ndarray]  # prepared inputs -> class probabilities (float64)
    record: dict  # the preprocessing record saved with the weights
    about: dict  # what GET /v1/model says
    ready: Callable[[], bool] = lambda: True  # False: predictions are refused at once (503), /healthz says so
    in_flight: int = 1  # batches the forward may be given at once (from as many threads)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.record["in_shape"])

    @property
    def classes(self) -> list[str]:
        return list(self.record["classes"])


def load_served(run: str | Path, texts: dict[str, str]) -> ServedModel:
    from shardwise.parallel.splits import local_bytes
    from shardwise.scoring import open_run, run_model, run_record

    folder, cfg = open_run(run, texts)
    record = run_record(folder)
    model = run_model(folder, cfg, tuple(record["in_shape"]), len(record["classes"]))
    held = local_bytes([*model.parameters(), *model.buffers()])
    check_memory(cfg.serve.memory_per_rank, held, "one process")
    dtype = getattr(torch, cfg.train.dtype)

    @torch.no_grad()
    def forward(x: np.ndarray) -> np.ndarray:
        return torch.softmax(model(torch.from_numpy(x).to(dtype)).double(), dim=1).numpy()

    about = describe(folder, cfg, record, parameters=sum(p.numel() for p in model.parameters()), held=held)
    return ServedModel(cfg.model.name, forward, record, about)


def check_memory(budget: str, held: float, layout: str) -> None:
    """One line where the largest rank's weights (`held` bytes) exceed serve.memory_per_rank."""
    from shardwise.config_check import parse_bytes

    if budget and held > parse_bytes(budget, "serve.memory_per_rank"):
        raise ShardwiseError("serve.memory_per_rank", f"={budget}: under {layout} the largest rank holds "
                             f"{_size(held)} of weights; cut the model further "
                             "(--nproc N --parallel.pp N)")  # fmt: skip


def _size(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def describe(folder: Path, cfg, record: dict, *, parameters: int, held: float, layout: str = "one process") -> dict:
    """What GET /v1/model says of a run's model (`held`: the bytes of weights and buffers its
    largest rank holds)."""
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    return {
        "name": cfg.model.name,
        "run": str(folder.resolve()),
        "input_shape": list(record["in_shape"]),
        "classes": list(record["classes"]),
        "layout": layout,
        "parameters": parameters,
        "largest_rank_weight_bytes": held,
        "val_accuracy": summary.get("val_accuracy"),
        "data": cfg.data.name,
    }


def request_inputs(served: ServedModel, payload) -> np.ndarray:
    """The prepared inputs a request's JSON names (RequestError where it cannot)."""
    if not isinstance(payload, dict) or len(payload.keys() & {"inputs", "images"}) != 1:
        raise RequestError(400, 'expected a JSON object with one of "inputs" (nested arrays) or "images" (base64)')
    if "images" in payload:
        return prepare(_images(served, payload["images"]), served.record, from_images=True)
    try:
        x = np.asarray(payload["inputs"], dtype=np.float64)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise RequestError(422, '"inputs" must be nested arrays of numbers, all rows the same shape') from None
    if x.ndim == len(served.in_shape):  # one sample
        x = x[None]
    if x.ndim < 1 or tuple(x.shape[1:]) != served.in_shape or len(x) == 0:
        raise RequestError(
            422, f'"inputs" has shape {list(x.shape)}; a sample of this model is {list(served.in_shape)}'
        )
    if not np.isfinite(x).all():
        raise RequestError(422, '"inputs" holds a value that is not a finite number')
    return prepare(x, served.record, from_images=False)


def _images(served: ServedModel, images) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # a larger one is refused before it is decoded

    shape = served.in_shape
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise RequestError(422, f'"images" need a model of images; this one takes samples shaped {list(shape)}')
    if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
        raise RequestError(422, '"images" must be a non-empty list of base64-encoded image files')
    samples = []
    for k, text in enumerate(images):
        try:
            data = base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
            samples.append(image_pixels(io.BytesIO(data), shape))
        except (binascii.Error, ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise RequestError(422, f"images[{k}] is not a base64-encoded image file ({type(e).__name__})") from None
    return np.stack(samples)


def answer(served: ServedModel, probs: np.ndarray) -> dict:
    classes = served.classes
    rows = [[p if math.isfinite(p) else None for p in row] for row in probs.tolist()]
    return {"labels": [classes[i] for i in probs.argmax(axis=1)], "probabilities": rows, "classes": classes}


def serving_config(cfg: Config, run_folder: Path, record: dict, stand_in: Path) -> Config:
    """The run's config as the serving ranks take it: its weights, no training, and in place
    of its data a stand-in written to `stand_in` (.npz): random samples of the recorded
    shape, every class twice at least and a training batch in all, one a class for
    validation. The ranks build the layout from it; the front prepares the requests' inputs
    with the run's record. So serving needs neither the training files nor the database."""
    from shardwise.config import DataConfig

    classes, shape = len(record["classes"]), tuple(record["in_shape"])
    rng = np.random.default_rng(0)
    n = max(2 * classes, cfg.train.batch_size)  # (a training batch's worth: the layout is cut for one)
    y = np.arange(n, dtype=np.int64) % classes
    np.savez(stand_in, x=rng.standard_normal((n, *shape), dtype=np.float32), y=y,
             x_val=rng.standard_normal((classes, *shape), dtype=np.float32), y_val=y[:classes])  # fmt: skip
    # a pipeline cut by its layers' sizes, not the clock: the same cut, and the same weights a
    # rank, every start (serve.memory_per_rank is checked against it)
    train = dataclasses.replace(cfg.train, steps=0, grad_accum=1, deterministic=True)
    weights = str((run_folder / "model.safetensors").resolve())
    return dataclasses.replace(cfg, train=train, data=DataConfig(name="npz", path=str(stand_in)),
                               model=dataclasses.replace(cfg.model, weights=weights))  # fmt: skip
