"""New inputs for `predict`: an .npz of raw samples or a folder of images, turned into
a run's inputs by the preprocessing record saved with its weights (the scale, the
standardisation statistics, the shape), so nothing is derived again from the data.

A raw sample is what the run's source read before its own preprocessing: digits'
0..16 intensities, CIFAR-10's bytes, an npz's or your function's values as they are.
An image file's 0..255 pixels are mapped onto the source's `raw_range` (digits: 0..16)
after conversion to the run's channels (grey or RGB) and size.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from shardwise.errors import ShardwiseError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def read_inputs(path: Path, in_shape: tuple[int, ...], key: str = "input") -> tuple[list[str], np.ndarray]:
    """(names, raw samples): an .npz's array `x` (names: row numbers) or every image file of
    a folder, sorted by name, as (N, channels, H, W) pixel values 0..255."""
    if path.is_dir():
        return _images(path, in_shape, key)
    if not path.is_file():
        raise ShardwiseError(key, f"no such file or folder {str(path)!r}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise ShardwiseError(key, f"{path} holds no array 'x' (found {sorted(archive.files)})")
            x = np.asarray(archive["x"])
    except (zipfile.BadZipFile, ValueError, OSError):
        raise ShardwiseError(key, f"{path} is neither an .npz file nor a folder of images") from None
    if x.ndim < 1 or not np.issubdtype(x.dtype, np.number) or tuple(x.shape[1:]) != tuple(in_shape):
        raise ShardwiseError(key, f"{path}: x has shape {x.shape} ({x.dtype}); the run's samples are {tuple(in_shape)}")
    return [str(i) for i in range(len(x))], x


def _images(folder: Path, in_shape: tuple[int, ...], key: str) -> tuple[list[str], np.ndarray]:
    from PIL import UnidentifiedImageError

    if len(in_shape) != 3 or in_shape[0] not in (1, 3):
        raise ShardwiseError(key, f"{folder} is a folder of images, but the run's samples have shape {in_shape}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ShardwiseError(key, f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    samples = []
    for f in files:
        try:
            samples.append(image_pixels(f, in_shape))
        except (UnidentifiedImageError, OSError) as e:
            raise ShardwiseError(key, f"{f}: not a readable image ({e})") from None
    return [f.name for f in files], np.stack(samples)


def image_pixels(source, in_shape: tuple[int, ...]) -> np.ndarray:
    """An image file (a path or a file object) as (channels, H, W) pixel values 0..255, in
    the run's channels (grey or RGB) and size; PIL's errors are the caller's to name."""
    from PIL import Image

    channels, height, width = in_shape
    with Image.open(source) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def prepare(x: np.ndarray, record: dict, *, from_images: bool) -> np.ndarray:
    """Raw samples as the run's inputs, by its preprocessing record: the same operations
    in the same precision as the source applied (so the validation inputs come out equal)."""
    x = x.astype(np.float32)
    if from_images and "raw_range" in record:
        low, high = record["raw_range"]
        x = (low + x * ((high - low) / 255.0)).astype(np.float32)
    x = x / record.get("divide_by", 1.0)
    stats = record.get("standardize")
    if stats:
        in_shape = record["in_shape"]
        columns = np.arange(x.reshape(len(x), -1).shape[1])
        group_of = columns // (in_shape[1] * in_shape[2]) if stats["per"] == "channel" else columns
        mean, std = np.asarray(stats["mean"])[group_of], np.asarray(stats["std"])[group_of]
        x = ((x.reshape(len(x), -1) - mean) / std).astype(np.float32).reshape(x.shape)
    return x
