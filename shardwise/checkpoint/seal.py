"""Checkpoint files encrypted at rest: AES-256-GCM (library: cryptography), one key.

A sealed file is `SEALED` (a marker), a fresh 96-bit random nonce, then the ciphertext with
its 16-byte tag. The file's own name is the associated data: a file moved to another
name in the folder fails its tag, and the manifest (plain text, signed where a key signs
it) lists each file's size and the SHA-256 of its ciphertext, with `"sealed"` naming the
cipher. Every file but the manifest and its signature is sealed: the shards, state.json
(the index of tensor names) and config.toml.

A data file (an .npz) is sealed the same way by `shardwise seal` (its associated data a fixed
name, so the file may be renamed) and read with `data.encrypt_key`.

The key is a file of 64 hexadecimal digits (`shardwise keygen --encryption`), named by
`checkpoint.encrypt_key`; it is never saved in a checkpoint or a config (only its path).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from shardwise.errors import ShardwiseError

CIPHER = "AES-256-GCM"
SEALED = b"shardwise-sealed-1\n"
NONCE_BYTES = 12
KEY_FILE = "shardwise.aes"


def load_key(path: str, field: str = "checkpoint.encrypt_key") -> bytes:
    """The 32-byte key in `path` (64 hex digits), or one line (naming `field`) saying why not."""
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ShardwiseError(
            field, f"cannot read the key file {path!r} ({getattr(e, 'strerror', None) or e})"
        ) from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ShardwiseError(field, f"{path} must hold 64 hexadecimal digits (a 256-bit key: shardwise keygen "
                             "--encryption)")  # fmt: skip
    return key


def seal(data: bytes, key: bytes, name: str) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(NONCE_BYTES)
    return SEALED + nonce + AESGCM(key).encrypt(nonce, data, name.encode())


def unseal(data: bytes, key: bytes, name: str, where: Path, field: str = "checkpoint.encrypt_key") -> bytes:
    """The plain bytes of the sealed file `name` (at `where`), or one line: a wrong key or a
    changed or moved file (GCM's tag) cannot be told apart, and are not."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not data.startswith(SEALED):
        raise ShardwiseError("checkpoint", f"{where}: not a sealed file, though the manifest says {CIPHER}")
    body = data[len(SEALED) :]
    try:
        return AESGCM(key).decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], name.encode())
    except InvalidTag:
        raise ShardwiseError(field, f"{where} cannot be decrypted with this key (the wrong key, or a file changed "
                             "or moved)") from None  # fmt: skip


def opened(manifest: dict, name: str, data: bytes, key_path: str, folder: Path) -> bytes:
    """A checked file's bytes as the reader needs them: decrypted where the manifest says the
    checkpoint is sealed (which then needs the key)."""
    if not manifest.get("sealed"):
        return data
    if not key_path:
        raise ShardwiseError("checkpoint.encrypt_key", f"{folder} is encrypted ({manifest['sealed']}): name its key "
                             "file")  # fmt: skip
    return unseal(data, load_key(key_path), name, folder / name)


DATA_NAME = "shardwise-data"  # the associated data of a sealed data file (it may be renamed)


def is_sealed(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(SEALED)) == SEALED


def seal_file(source: Path, key_path: str, out: Path) -> Path:
    """`shardwise seal`: a copy of the data file `source`, sealed with the key, at `out`."""
    from shardwise.files import write_atomic

    if not source.is_file():
        raise ShardwiseError("file", f"no such file {str(source)!r}")
    if out.exists():
        raise ShardwiseError("out", f"{out} exists; not overwriting it")
    write_atomic(out, seal(source.read_bytes(), load_key(key_path, "key"), DATA_NAME))
    return out


def keygen(folder: Path) -> Path:
    """A new random key in FOLDER/shardwise.aes, readable by its owner only."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / KEY_FILE
    if path.exists():
        raise ShardwiseError("out", f"{path} exists: a key is never overwritten (checkpoints sealed with it)")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path
