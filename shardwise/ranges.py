"""Cutting `total` consecutive items into `parts` near-equal runs: the one rule every
strategy uses (image rows for spatial bands, features of a tensor-parallel layer,
the flat parameter vector for parameter servers). The first `total % parts` runs
get one item more, as numpy's array_split does."""

from __future__ import annotations


def even_bounds(total: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of each of `parts` contiguous runs over `total` items."""
    base, extra = divmod(total, parts)
    bounds, lo = [], 0
    for k in range(parts):
        hi = lo + base + (k < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def even_sizes(total: int, parts: int) -> list[int]:
    """The length of each run of :func:`even_bounds`."""
    return [hi - lo for lo, hi in even_bounds(total, parts)]
