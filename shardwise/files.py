"""Writing files so that a reader never sees half of one: the one way the project
writes its outputs, configs and checkpoint manifests (no torch here: the launcher
uses it too)."""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success fsync it and rename it into place
    (a crash leaves the old file or the new one, never a mix; the temporary is removed)."""
    # created as open() makes any file (the mode the umask gives), not 0600 as mkstemp would
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}"
    open(tmp, "xb").close()
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: Path, data: str | bytes) -> None:
    """`path` holds `data`, all of it or (after a crash) whatever it held before."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (so a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cache_dir() -> Path:
    """Where measurements and derived data are kept between runs: $SHARDWISE_CACHE, else
    $XDG_CACHE_HOME/shardwise (~/.cache/shardwise), shared by every run on this machine."""
    if os.environ.get("SHARDWISE_CACHE"):
        return Path(os.environ["SHARDWISE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shardwise"
