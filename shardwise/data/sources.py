"""Data sources: the bundled digits, seeded synthetic data, CIFAR-10 binary batches, NumPy .npz.

A source returns float32 samples (channels first) and int64 labels, split into
training and validation. :func:`check_source` runs in the launcher before any
worker starts: it finds the user's mistakes (a missing folder, a file of the
wrong size) from file metadata alone, so nothing is written for bad input.
Only NumPy arrays without pickle and raw bytes are ever read.

With `features` (vertical partitioning) a rank keeps only those input
columns: file sources (npz stored uncompressed, CIFAR-10) are memory-mapped and
only the rank's columns are copied out; the bundled digits and the generated
synthetic data are made whole and sliced at once. Standardisation
statistics of a channel split across ranks are completed by a sum over the
vertical group (`reduce_stats`), never by reading other ranks' columns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardwise.config import DataConfig
from shardwise.config_sections import TEXT_DATA
from shardwise.data.own import load_own
from shardwise.errors import ShardwiseError
from shardwise.files import atomic_path, cache_dir
from shardwise.own_code import is_import_path

CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte, then 32x32 red, green, blue planes
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SPLIT_SEED = 0  # the validation split does not move with train.seed

# adds the other vertical ranks' (count, sum, sum of squares) per channel to this rank's
StatsReduce = Callable[[np.ndarray], np.ndarray]


@dataclass
class Dataset:
    """Samples of shape `in_shape`, or with `features` set only those flat input columns
    (shaped (N, k), or (N, channels, H, W) when whole channels were taken)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    in_shape: tuple[int, ...]
    features: np.ndarray | None = None
    # how a raw sample became an input (saved with the weights, so `predict` does the same):
    # in_shape, classes (a name per label), divide_by, raw_range, standardize {per, mean, std}
    preprocess: dict = dataclasses.field(default_factory=dict)


def take_rows(dataset: Dataset, start: int, end: int) -> Dataset:
    """Only rows [start, end) of every image (a spatial rank's band)."""
    return dataclasses.replace(
        dataset,
        x_train=np.ascontiguousarray(dataset.x_train[:, :, start:end]),
        x_val=np.ascontiguousarray(dataset.x_val[:, :, start:end]),
    )


def local_shape(features: np.ndarray | None, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a rank's samples take: whole channels of an image stay (channels, H, W),
    any other choice of columns is flat."""
    if features is None:
        return in_shape
    if len(in_shape) == 3:
        plane = in_shape[1] * in_shape[2]
        channels = features[::plane] // plane
        whole = (channels[:, None] * plane + np.arange(plane)).reshape(-1)
        if len(features) == len(whole) and np.array_equal(features, whole):
            return (len(channels), in_shape[1], in_shape[2])
    return (len(features),)


def take_features(x: np.ndarray, features: np.ndarray | None, in_shape: tuple[int, ...]) -> np.ndarray:
    """Copy out the flat columns `features` of samples `x` (memory-mapped arrays too)."""
    if features is None:
        return np.ascontiguousarray(x)
    cols = np.ascontiguousarray(x.reshape(len(x), -1)[:, features])
    return cols.reshape(len(x), *local_shape(features, in_shape))


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
    """Fail fast on a data setting that cannot work, reading metadata only (of a database:
    its table's columns, their types and values, `data/sql.py` `inspect`)."""
    if cfg.name == "sql":
        from shardwise.data.sql import inspect

        inspect(cfg)
    elif cfg.name in TEXT_DATA:
        from shardwise.data.text import check_text_source

        check_text_source(cfg)
    elif cfg.name == "cifar10":
        _cifar_files(Path(cfg.path))
    elif cfg.name == "npz":
        path = Path(cfg.path)
        if not path.is_file():
            raise ShardwiseError("data.path", f"no such file {str(path)!r}")
        from shardwise.checkpoint.seal import is_sealed, load_key

        if cfg.encrypt_key:
            load_key(cfg.encrypt_key, "data.encrypt_key")
        elif is_sealed(path):
            raise ShardwiseError("data.encrypt_key", f"{cfg.path} is encrypted (AES-256-GCM): name its key file")


def _read_cifar(files: list[Path], features: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Samples (only the columns `features` of them) and labels, from memory-mapped records."""
    in_shape = (3, 32, 32)
    records = [np.memmap(f, dtype=np.uint8, mode="r").reshape(-1, CIFAR_RECORD) for f in files]
    cols = np.arange(1, CIFAR_RECORD) if features is None else 1 + features
    x = np.concatenate([np.asarray(r[:, cols]) for r in records])
    y = np.concatenate([np.asarray(r[:, 0]) for r in records]).astype(np.int64)
    return x.reshape(len(x), *local_shape(features, in_shape)), y


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float) -> tuple[np.ndarray, ...]:
    """scikit-learn's stratified train/validation split (x_train, x_val, y_train, y_val)."""
    train, val = split_indices(y, val_fraction)
    return x[train], x[val], y[train], y[val]


def split_indices(y: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the training and the validation set: scikit-learn's `train_test_split`
    stratified by `y`, which depends on the labels, the fraction and the seed only. Kept in
    the machine's cache (`files.cache_dir`) by those, so that the ranks of a run, and every
    later run, skip importing scikit-learn (nearly a second a process)."""
    digest = hashlib.sha256(y.tobytes() + str((y.dtype.str, val_fraction, SPLIT_SEED)).encode()).hexdigest()[:20]
    path = cache_dir() / f"split-{digest}.npz"
    try:
        with np.load(path) as found:
            return found["train"], found["val"]
    except (OSError, KeyError, ValueError):
        pass
    from sklearn.model_selection import train_test_split

    try:
        train, val = train_test_split(np.arange(len(y)), test_size=val_fraction, random_state=SPLIT_SEED, stratify=y)
    except ValueError as e:  # a class of one sample, or fewer held out than there are classes
        counts = np.bincount(y)
        raise ShardwiseError(
            "data.val_fraction",
            f"={val_fraction} of {len(y)} samples, {len(counts)} classes (the smallest has "
            f"{counts.min()}), split stratified by class: {e}",
        ) from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, train=train, val=val)
    except OSError:  # a read-only cache: split again next time
        pass
    return train, val


def _standardize(
    x_train: np.ndarray,
    x_val: np.ndarray,
    in_shape: tuple[int, ...],
    features: np.ndarray | None,
    reduce_stats: StatsReduce | None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Standardise with training statistics: per channel for images, per feature
    otherwise (also returned as the record `predict` applies). A vertical rank holds
    only some pixels of a channel, so it sums count, sum and sum of squares over its
    own columns and `reduce_stats` adds the other ranks' sums: the same statistics as
    one process."""
    cols = np.arange(math.prod(in_shape)) if features is None else features
    if len(in_shape) == 3:
        plane, num_groups = in_shape[1] * in_shape[2], in_shape[0]
        group_of = cols // plane
    else:
        group_of, num_groups = cols, math.prod(in_shape)
    flat = x_train.reshape(len(x_train), -1).astype(np.float64)
    stats = np.stack(
        [
            np.bincount(group_of, weights=np.full(len(cols), float(len(flat))), minlength=num_groups),
            np.bincount(group_of, weights=flat.sum(axis=0), minlength=num_groups),
            np.bincount(group_of, weights=(flat * flat).sum(axis=0), minlength=num_groups),
        ]
    )
    if reduce_stats is not None:
        stats = reduce_stats(stats)
    count = np.maximum(stats[0], 1.0)
    whole_mean = stats[1] / count
    whole_std = np.sqrt(np.maximum(stats[2] / count - whole_mean * whole_mean, 0.0)) + 1e-6
    mean, std = whole_mean[group_of], whole_std[group_of]

    def apply(x: np.ndarray) -> np.ndarray:
        return ((x.reshape(len(x), -1) - mean) / std).astype(np.float32).reshape(x.shape)

    record = {"per": "channel" if len(in_shape) == 3 else "feature", "mean": whole_mean.tolist()}
    return apply(x_train), apply(x_val), record | {"std": whole_std.tolist()}


def preprocess_record(in_shape, classes: list[str], *, divide_by=1.0, raw_range=None, standardize=None) -> dict:
    """What `predict` needs to turn a raw sample into this run's input: float32 samples
    divided by `divide_by`, then standardised (float64 statistics), as the source did."""
    record = {"in_shape": list(in_shape), "classes": classes, "divide_by": divide_by}
    if raw_range is not None:
        record["raw_range"] = list(raw_range)  # what an image file's 0..255 pixels map onto
    return record | ({"standardize": standardize} if standardize is not None else {})


def numbered(n: int) -> list[str]:
    return [str(i) for i in range(n)]


def _digits(cfg: DataConfig, features: np.ndarray | None, reduce_stats: StatsReduce | None) -> Dataset:
    pixels, labels = _digits_file()
    in_shape = (1, 8, 8)
    x = take_features(pixels.reshape(-1, *in_shape).astype(np.float32) / 16.0, features, in_shape)
    x_tr, x_va, y_tr, y_va = _split(x, labels, cfg.val_fraction)
    x_tr, x_va, stats = _standardize(x_tr, x_va, in_shape, features, reduce_stats)
    record = preprocess_record(in_shape, numbered(10), divide_by=16.0, raw_range=(0, 16), standardize=stats)
    return Dataset(x_tr, y_tr, x_va, y_va, 10, in_shape, features, record)


def _digits_file() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (what `load_digits` returns as data and target), read
    from its file without importing scikit-learn; through `load_digits` where the file is
    not where this version keeps it."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    where = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if where is not None and where.is_file():
        table = np.loadtxt(where, delimiter=",")
        return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target.astype(np.int64)


def _synthetic(cfg: DataConfig, seed: int, features: np.ndarray | None, reduce_stats: StatsReduce | None) -> Dataset:
    """Gaussian clusters around one random prototype per class; learnable, any shape."""
    rng = np.random.default_rng(seed)
    in_shape = tuple(cfg.shape)
    dim = int(np.prod(in_shape))
    prototypes = rng.standard_normal((cfg.classes, dim), dtype=np.float32)
    y = rng.integers(0, cfg.classes, cfg.samples, dtype=np.int64)
    x = prototypes[y] + 2.0 * rng.standard_normal((cfg.samples, dim), dtype=np.float32)
    x = take_features(x.reshape(-1, *in_shape), features, in_shape)
    x_tr, x_va, y_tr, y_va = _split(x, y, cfg.val_fraction)
    x_tr, x_va, stats = _standardize(x_tr, x_va, in_shape, features, reduce_stats)
    record = preprocess_record(in_shape, numbered(cfg.classes), standardize=stats)
    return Dataset(x_tr, y_tr, x_va, y_va, cfg.classes, in_shape, features, record)


def _cifar10(cfg: DataConfig, features: np.ndarray | None, reduce_stats: StatsReduce | None) -> Dataset:
    train, test = _cifar_files(Path(cfg.path))
    x, y = _read_cifar(train, features)
    if test is not None:
        x_tr, y_tr, (x_va, y_va) = x, y, _read_cifar([test], features)
    else:
        x_tr, x_va, y_tr, y_va = _split(x, y, cfg.val_fraction)
    x_tr, x_va = x_tr.astype(np.float32) / 255.0, x_va.astype(np.float32) / 255.0
    x_tr, x_va, stats = _standardize(x_tr, x_va, (3, 32, 32), features, reduce_stats)
    record = preprocess_record((3, 32, 32), CIFAR_CLASSES, divide_by=255.0, raw_range=(0, 255), standardize=stats)
    return Dataset(x_tr, y_tr, x_va, y_va, 10, (3, 32, 32), features, record)


ARRAY_KEYS = ("x", "y", "x_val", "y_val")


def from_arrays(cfg: DataConfig, arrays: dict, classes: list | None, features: np.ndarray | None) -> Dataset:
    """A data set from arrays x, y (and x_val, y_val) taken as they are (npz, your own data)."""
    x, y = arrays["x"], np.asarray(arrays["y"]).astype(np.int64)
    in_shape = tuple(x.shape[1:])
    x = take_features(x, features, in_shape).astype(np.float32)
    if "x_val" in arrays and "y_val" in arrays:
        x_tr, y_tr = x, y
        x_va = take_features(arrays["x_val"], features, in_shape).astype(np.float32)
        y_va = np.asarray(arrays["y_val"]).astype(np.int64)
    else:
        x_tr, x_va, y_tr, y_va = _split(x, y, cfg.val_fraction)
    num_classes = int(max(y_tr.max(), y_va.max())) + 1
    if classes is not None:
        num_classes = max(num_classes, len(classes))
    names = [str(c) for c in classes] if classes is not None else numbered(num_classes)
    record = preprocess_record(in_shape, names)
    return Dataset(x_tr, y_tr, x_va, y_va, num_classes, in_shape, features, record)


def source_shape(cfg: DataConfig) -> tuple[int, ...]:
    """The shape of one sample, from metadata only (vertical ranks need it before loading)."""
    if cfg.name == "digits":
        return (1, 8, 8)
    if cfg.name == "synthetic":
        return tuple(cfg.shape)
    if cfg.name == "cifar10":
        return (3, 32, 32)
    if cfg.name == "sql":
        from shardwise.data.sql import feature_names

        return (len(feature_names(cfg)),)
    if cfg.name in TEXT_DATA:
        from shardwise.data.tfidf import vocabulary_size

        return (vocabulary_size(cfg),)
    if is_import_path(cfg.name):
        return tuple(load_own(cfg.name, cfg.options)[0]["x"].shape[1:])
    from shardwise.data.npz import npz_archive, npz_member

    archive, path = npz_archive(cfg)
    with archive:
        return tuple(npz_member(archive, path, "x").shape[1:])


def load_source(
    cfg: DataConfig, *, seed: int, features: np.ndarray | None = None, reduce_stats: StatsReduce | None = None
) -> Dataset:
    """The data set, or with `features` only those flat input columns of it
    (`reduce_stats` then completes the standardisation statistics)."""
    check_source(cfg)
    if cfg.name == "digits":
        return _digits(cfg, features, reduce_stats)
    if cfg.name == "synthetic":
        return _synthetic(cfg, seed, features, reduce_stats)
    if cfg.name == "cifar10":
        return _cifar10(cfg, features, reduce_stats)
    if cfg.name == "sql":  # whole, in one process (plan, evaluate); a run's ranks read as they train
        from shardwise.data.sql_whole import load_table

        return load_table(cfg)
    if cfg.name in TEXT_DATA:
        from shardwise.data.tfidf import text_dataset

        return text_dataset(cfg, features=features, reduce_stats=reduce_stats)
    if is_import_path(cfg.name):
        arrays, classes = load_own(cfg.name, cfg.options)
        return from_arrays(cfg, arrays, classes, features)
    from shardwise.data.npz import read_npz

    return read_npz(cfg, features)
