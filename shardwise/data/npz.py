"""NumPy .npz archives as a data source (np.savez: arrays x, y, and x_val, y_val, classes
where given), never unpickled: memory-mapped where a member is stored uncompressed, so a
vertical rank copies out only its columns; decrypted whole into memory where the file is
sealed (`shardwise seal`, data.encrypt_key)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from shardwise.config_sections import DataConfig
from shardwise.data.sources import ARRAY_KEYS, Dataset, from_arrays
from shardwise.errors import ShardwiseError


def npz_archive(cfg: DataConfig) -> tuple[zipfile.ZipFile, str | None]:
    """The .npz archive, and its path where its members may be memory-mapped: not where it
    is sealed (`shardwise seal`), which is decrypted whole into memory with data.encrypt_key."""
    from shardwise.checkpoint.seal import DATA_NAME, is_sealed, load_key, unseal

    try:
        if not is_sealed(Path(cfg.path)):
            return zipfile.ZipFile(cfg.path), cfg.path
        if not cfg.encrypt_key:
            raise ShardwiseError("data.encrypt_key", f"{cfg.path} is encrypted (AES-256-GCM): name its key file")
        key = load_key(cfg.encrypt_key, "data.encrypt_key")
        plain = unseal(Path(cfg.path).read_bytes(), key, DATA_NAME, Path(cfg.path), "data.encrypt_key")
        return zipfile.ZipFile(io.BytesIO(plain)), None
    except zipfile.BadZipFile:
        raise ShardwiseError("data.path", f"{cfg.path} is not an .npz archive") from None


def npz_member(archive: zipfile.ZipFile, path: str | None, name: str) -> np.ndarray:
    """Array `name` of the archive: memory-mapped where stored uncompressed (np.savez) in a
    file at `path`, so only the columns asked for are copied; read whole otherwise."""
    info = archive.getinfo(f"{name}.npy")
    if info.compress_type == zipfile.ZIP_STORED and path is not None:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local_header = f.read(30)
            # zip local file header: 30 bytes, then the name and an extra field of these lengths
            name_len = int.from_bytes(local_header[26:28], "little")
            extra_len = int.from_bytes(local_header[28:30], "little")
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            if not dtype.hasobject:
                order = "F" if fortran else "C"
                return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape, order=order)
    with archive.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def read_npz(cfg: DataConfig, features: np.ndarray | None) -> Dataset:
    archive, path = npz_archive(cfg)
    with archive:
        names = sorted(n.removesuffix(".npy") for n in archive.namelist())
        if "x" not in names or "y" not in names:
            raise ShardwiseError("data.path", f"{cfg.path} must hold arrays 'x' and 'y', found {names}")
        arrays = {k: npz_member(archive, path, k) for k in ARRAY_KEYS if k in names}
        classes = npz_member(archive, path, "classes").tolist() if "classes" in names else None
    if len(arrays["x"]) != len(arrays["y"]):
        raise ShardwiseError("data.path", f"{cfg.path}: x has {len(arrays['x'])} samples but y has {len(arrays['y'])}")
    return from_arrays(cfg, arrays, classes, features)
