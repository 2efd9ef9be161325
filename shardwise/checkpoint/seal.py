"""Checkpoint files encrypted at rest: AES-256-GCM (library: cryptography), one key.

A sealed file is `SEALED` (a marker), a fresh 96-bit random nonce, then the ciphertext with
its 16-byte tag. The file's own name is the associated data: a file moved to another
name in the folder fails its tag, and the manifest (plain text, signed where a key signs
it) lists each file's size and the SHA-256 of its ciphertext, with `"sealed"` naming the
cipher. Every file but the manifest and its signature is sealed: the shards, state.json
(the index of tensor names) and config.toml.

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


def load_key(path: str) -> bytes:
    """The 32-byte key in `path` (64 hex digits), or one line saying why not."""
    field = "checkpoint.encrypt_key"
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


def unseal(data: bytes, key: bytes, name: str, where: Path) -> bytes:
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
        raise ShardwiseError("checkpoint.encrypt_key", f"{where} cannot be decrypted with this key (the wrong key, "
                             "or a file changed or moved)") from None  # fmt: skip


def opened(manifest: dict, name: str, data: bytes, key_path: str, folder: Path) -> bytes:
    """A checked file's bytes as the reader needs them: decrypted where the manifest says the
    checkpoint is sealed (which then needs the key)."""
    if not manifest.get("sealed"):
        return data
    if not key_path:
        raise ShardwiseError("checkpoint.encrypt_key", f"{folder} is encrypted ({manifest['sealed']}): name its key "
                             "file")  # fmt: skip
    return unseal(data, load_key(key_path), name, folder / name)


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
