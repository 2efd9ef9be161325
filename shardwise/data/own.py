"""Your own data, named by an import path `package.module:function` in data.name.

The function gets data.options as keywords and returns the samples, in one of two forms:

- a mapping like an .npz file: arrays `x` (samples, channels first) and `y` (integer
  labels from 0), optionally `x_val` and `y_val` (else data.val_fraction of x is held
  out, stratified by label) and `classes` (a name for each label);
- a pair `(train, val)`, each either `(x, y)` arrays or a map-style dataset (anything
  with `len()` whose items are `(sample, label)`, e.g. a torch Dataset); `val` may be
  None.

Samples are taken as they come: the function does its own scaling (shardwise
standardises only its built-in sources). A map-style dataset is read whole, once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shardwise.errors import ShardwiseError
from shardwise.own_code import call_own

KEY = "data.name"


def load_own(path: str, options: dict[str, Any]) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """x, y (and x_val, y_val where given) as checked arrays, and the class names if given."""
    got = call_own(path, KEY, "**data.options", **options)
    if isinstance(got, Mapping):
        if "x" not in got or "y" not in got:
            raise ShardwiseError(KEY, f"{path} returned a mapping without 'x' and 'y' (keys: {sorted(got)})")
        arrays = {k: got[k] for k in ("x", "y", "x_val", "y_val") if got.get(k) is not None}
        names = got.get("classes")
    elif isinstance(got, tuple) and len(got) == 2:
        arrays = _split_pair(path, "train", got[0], "x", "y")
        if got[1] is not None:
            arrays |= _split_pair(path, "validation", got[1], "x_val", "y_val")
        names = None
    else:
        raise ShardwiseError(
            KEY, f"{path} returned {type(got).__name__}: expected a mapping with x and y, or a pair (train, val)"
        )
    checked = {k: _array(path, k, v) for k, v in arrays.items()}
    if ("x_val" in checked) != ("y_val" in checked):
        raise ShardwiseError(KEY, f"{path} returned only one of x_val and y_val")
    for x, y in (("x", "y"), ("x_val", "y_val")):
        if x in checked:
            _check_pair(path, x, checked[x], y, checked[y])
    if "x_val" in checked and checked["x_val"].shape[1:] != checked["x"].shape[1:]:
        raise ShardwiseError(
            KEY, f"{path}: x_val samples have shape {checked['x_val'].shape[1:]}, x {checked['x'].shape[1:]}"
        )
    return checked, _names(path, names, checked)


def _split_pair(path: str, which: str, part: Any, x_key: str, y_key: str) -> dict[str, Any]:
    if isinstance(part, tuple) and len(part) == 2:
        return {x_key: part[0], y_key: part[1]}
    if hasattr(part, "__len__") and hasattr(part, "__getitem__"):
        items = [part[i] for i in range(len(part))]
        if not items:
            raise ShardwiseError(KEY, f"{path}: the {which} dataset is empty")
        if not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
            raise ShardwiseError(KEY, f"{path}: the {which} dataset's items must be (sample, label) pairs")
        return {x_key: np.stack([_numpy(s) for s, _ in items]), y_key: np.array([int(lab) for _, lab in items])}
    raise ShardwiseError(
        KEY, f"{path}: the {which} part is {type(part).__name__}, not (x, y) arrays or a map-style dataset"
    )


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _array(path: str, key: str, value: Any) -> np.ndarray:
    array = _numpy(value)
    if key.startswith("y"):
        if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
            got = f"{array.dtype} {array.shape}"
            raise ShardwiseError(KEY, f"{path}: {key} must be one integer label per sample, got {got}")
        if len(array) and array.min() < 0:
            raise ShardwiseError(KEY, f"{path}: {key} holds the label {array.min()}; labels count from 0")
        return array.astype(np.int64)
    if array.ndim < 2 or not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        got = f"{array.dtype} {array.shape}"
        raise ShardwiseError(KEY, f"{path}: {key} must be real samples of shape (N, ...), got {got}")
    if not np.isfinite(array).all():
        raise ShardwiseError(KEY, f"{path}: {key} holds values that are not finite (NaN or infinity)")
    return array.astype(np.float32)


def _check_pair(path: str, x_key: str, x: np.ndarray, y_key: str, y: np.ndarray) -> None:
    if len(x) != len(y):
        raise ShardwiseError(KEY, f"{path}: {x_key} has {len(x)} samples but {y_key} has {len(y)}")
    if len(x) == 0:
        raise ShardwiseError(KEY, f"{path}: {x_key} holds no samples")


def _names(path: str, names: Any, arrays: dict[str, np.ndarray]) -> list[str] | None:
    if names is None:
        return None
    names = [str(n) for n in names]
    top = max(int(arrays[k].max()) for k in ("y", "y_val") if k in arrays)
    if len(names) <= top:
        raise ShardwiseError(KEY, f"{path}: {len(names)} class names, but the labels go up to {top}")
    return names
