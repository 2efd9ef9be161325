"""Data sources: the bundled digits, seeded synthetic data, CIFAR-10 binary batches, NumPy .npz.

A source returns float32 samples (channels first) and int64 labels, split into
training and validation. :func:`check_source` runs in the launcher before any
worker starts: it finds the user's mistakes (a missing folder, a file of the
wrong size) from file metadata alone, so nothing is written for bad input.
Only NumPy arrays without pickle and raw bytes are ever read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardwise.config import DataConfig
from shardwise.errors import ShardwiseError

CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte, then 32x32 red, green, blue planes
SPLIT_SEED = 0  # the validation split does not move with train.seed


@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _cifar_files(path: Path) -> tuple[list[Path], Path | None]:
    if not path.is_dir():
        raise ShardwiseError("data.path", f"no such directory {str(path)!r}")
    train = sorted(path.glob("data_batch_*.bin"))
    if not train:
        raise ShardwiseError("data.path", f"{str(path)!r} holds no CIFAR-10 data_batch_*.bin files")
    test = path / "test_batch.bin"
    for f in [*train, test] if test.exists() else train:
        size = f.stat().st_size
        if size == 0 or size % CIFAR_RECORD:
            raise ShardwiseError(
                "data.path", f"{f.name} has {size} bytes, not a multiple of the {CIFAR_RECORD}-byte CIFAR-10 record"
            )
    return train, test if test.exists() else None


def check_source(cfg: DataConfig) -> None:
    """Fail fast on a data setting that cannot work, reading metadata only."""
    if cfg.name == "cifar10":
        _cifar_files(Path(cfg.path))
    elif cfg.name == "npz":
        path = Path(cfg.path)
        if not path.is_file():
            raise ShardwiseError("data.path", f"no such file {str(path)!r}")


def _read_cifar(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    raw = np.concatenate([np.fromfile(f, dtype=np.uint8).reshape(-1, CIFAR_RECORD) for f in files])
    return raw[:, 1:].reshape(-1, 3, 32, 32), raw[:, 0].astype(np.int64)


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    return tuple(train_test_split(x, y, test_size=val_fraction, random_state=SPLIT_SEED, stratify=y))


def _standardize(x_train: np.ndarray, x_val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel standardisation with statistics of the training split."""
    axes = (0, *range(2, x_train.ndim)) if x_train.ndim > 2 else (0,)
    mean = x_train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x_train.std(axis=axes, keepdims=True, dtype=np.float64) + 1e-6
    return ((x_train - mean) / std).astype(np.float32), ((x_val - mean) / std).astype(np.float32)


def _digits(cfg: DataConfig) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0
    x_tr, x_va, y_tr, y_va = _split(x, bunch.target.astype(np.int64), cfg.val_fraction)
    x_tr, x_va = _standardize(x_tr, x_va)
    return Dataset(x_tr, y_tr, x_va, y_va, 10)


def _synthetic(cfg: DataConfig, seed: int) -> Dataset:
    """Gaussian clusters around one random prototype per class; learnable, any shape."""
    rng = np.random.default_rng(seed)
    dim = int(np.prod(cfg.shape))
    prototypes = rng.standard_normal((cfg.classes, dim), dtype=np.float32)
    y = rng.integers(0, cfg.classes, cfg.samples, dtype=np.int64)
    x = prototypes[y] + 2.0 * rng.standard_normal((cfg.samples, dim), dtype=np.float32)
    x_tr, x_va, y_tr, y_va = _split(x.reshape(-1, *cfg.shape), y, cfg.val_fraction)
    x_tr, x_va = _standardize(x_tr, x_va)
    return Dataset(x_tr, y_tr, x_va, y_va, cfg.classes)


def _cifar10(cfg: DataConfig) -> Dataset:
    train, test = _cifar_files(Path(cfg.path))
    x, y = _read_cifar(train)
    if test is not None:
        x_tr, y_tr, (x_va, y_va) = x, y, _read_cifar([test])
    else:
        x_tr, x_va, y_tr, y_va = _split(x, y, cfg.val_fraction)
    x_tr, x_va = _standardize(x_tr.astype(np.float32) / 255.0, x_va.astype(np.float32) / 255.0)
    return Dataset(x_tr, y_tr, x_va, y_va, 10)


def _npz(cfg: DataConfig) -> Dataset:
    with np.load(cfg.path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    if "x" not in arrays or "y" not in arrays:
        raise ShardwiseError("data.path", f"{cfg.path} must hold arrays 'x' and 'y', found {sorted(arrays)}")
    x, y = arrays["x"].astype(np.float32), arrays["y"].astype(np.int64)
    if len(x) != len(y):
        raise ShardwiseError("data.path", f"{cfg.path}: x has {len(x)} samples but y has {len(y)}")
    if "x_val" in arrays and "y_val" in arrays:
        x_tr, y_tr = x, y
        x_va, y_va = arrays["x_val"].astype(np.float32), arrays["y_val"].astype(np.int64)
    else:
        x_tr, x_va, y_tr, y_va = _split(x, y, cfg.val_fraction)
    return Dataset(x_tr, y_tr, x_va, y_va, int(max(y_tr.max(), y_va.max())) + 1)


def load_source(cfg: DataConfig, *, seed: int) -> Dataset:
    check_source(cfg)
    if cfg.name == "digits":
        return _digits(cfg)
    if cfg.name == "synthetic":
        return _synthetic(cfg, seed)
    if cfg.name == "cifar10":
        return _cifar10(cfg)
    return _npz(cfg)
