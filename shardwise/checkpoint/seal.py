"""Checkpoint files encrypted at rest: AES-256-GCM (library: cryptography), one key.

A sealed file is `SEALED` (a marker), then chunks of up to 64 MiB, each a fresh 96-bit
random nonce, its length and its ciphertext with a 16-byte tag. A checkpoint file's name
and step, the chunk's index and whether it is the last are the associated data: a file
moved to another name or another checkpoint, or cut short, fails its tag; and the manifest
(plain text, signed where a key signs it) lists each file's size and the SHA-256 of its
ciphertext, with `"sealed"` naming the cipher. Every file but the manifest and its
signature is sealed: the shards, state.json (the index of tensor names) and config.toml.

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
SEALED = b"shardwise-sealed-2\n"
CHUNK = 64 << 20  # bytes sealed under one nonce (AES-GCM in cryptography takes under 2 GiB at once)
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


def seal(data: bytes, key: bytes, label: str) -> bytes:
    """`data` sealed: the marker, then each chunk of up to CHUNK bytes as its nonce, its
    ciphertext's length and the ciphertext with its tag; a chunk's associated data is
    `label`, its index and whether it is the last (so chunks cannot be dropped, reordered or
    moved to another file)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aes, out = AESGCM(key), [SEALED]
    starts = range(0, max(len(data), 1), CHUNK)
    for i, start in enumerate(starts):
        nonce = os.urandom(NONCE_BYTES)
        sealed = aes.encrypt(nonce, data[start : start + CHUNK], _aad(label, i, i == len(starts) - 1))
        out += [nonce, len(sealed).to_bytes(4, "big"), sealed]
    return b"".join(out)


def _aad(label: str, index: int, last: bool) -> bytes:
    return f"{label}|{index}|{int(last)}".encode()


def unseal(data: bytes, key: bytes, label: str, where: Path, field: str = "checkpoint.encrypt_key") -> bytes:
    """The plain bytes of a file sealed under `label` (at `where`), or one line: a wrong key, a
    changed, cut or moved file (GCM's tags) cannot be told apart, and are not."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not data.startswith(SEALED):
        raise ShardwiseError(field, f"{where}: not a sealed file ({CIPHER})")
    aes, at, i, out = AESGCM(key), len(SEALED), 0, []
    wrong = ShardwiseError(field, f"{where} cannot be decrypted with this key (the wrong key, or a file changed, "
                           "cut or moved)")  # fmt: skip
    while True:
        size = int.from_bytes(data[at + NONCE_BYTES : at + NONCE_BYTES + 4], "big")
        nonce, body = data[at : at + NONCE_BYTES], data[at + NONCE_BYTES + 4 : at + NONCE_BYTES + 4 + size]
        at += NONCE_BYTES + 4 + size
        last = at >= len(data)
        try:
            out.append(aes.decrypt(nonce, body, _aad(label, i, last)))
        except (InvalidTag, ValueError):  # (ValueError: a nonce or body cut short)
            raise wrong from None
        if last:
            return b"".join(out)
        i += 1


def checkpoint_label(name: str, step: int) -> str:
    """What a checkpoint file is sealed under: its name and its step (a file of another
    checkpoint, moved in with a manifest rewritten to match, fails its tag)."""
    return f"{name}|step={step}"


def opened(manifest: dict, name: str, data: bytes, key_path: str, folder: Path) -> bytes:
    """A checked file's bytes as the reader needs them: decrypted where the manifest says the
    checkpoint is sealed. With a key given, an unsealed checkpoint is refused: files in the
    clear put where sealed ones were would otherwise be taken."""
    if not manifest.get("sealed"):
        if key_path:
            raise ShardwiseError("checkpoint.encrypt_key", f"{folder} is not encrypted, though a key is given: "
                                 "resume it without checkpoint.encrypt_key if it was written so")  # fmt: skip
        return data
    if not key_path:
        raise ShardwiseError("checkpoint.encrypt_key", f"{folder} is encrypted ({manifest['sealed']}): name its key "
                             "file")  # fmt: skip
    return unseal(data, load_key(key_path), checkpoint_label(name, manifest["step"]), folder / name)


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
