"""Your own data, as shardwise takes it: a function that returns arrays (or datasets).

    shardwise train --data.name examples.digits_data:load --data.options '{"val_every": 5}'

The function gets `data.options` as keywords and returns a mapping like an .npz file:
`x` (samples, channels first), `y` (integer labels from 0), optionally `x_val` and
`y_val` (else data.val_fraction of x is held out) and `classes` (a name per label,
written into predictions). It may instead return `(train, val)`, each `(x, y)` arrays
or a map-style dataset of `(sample, label)` items. The samples are used as they come:
scale them here.
"""

from __future__ import annotations

import numpy as np

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load(*, val_every: int = 5) -> dict:
    """The bundled 8x8 digits, pixels scaled to [0, 1], every `val_every`-th sample held out."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    held = np.arange(len(x)) % val_every == 0
    y = bunch.target
    return {"x": x[~held], "y": y[~held], "x_val": x[held], "y_val": y[held], "classes": NAMES}
