"""A checkpoint's manifest: every file with its size and SHA-256, optionally signed.

`manifest.json` is written last, after every other file of the checkpoint is
written and fsynced; `manifest.sig` holds an Ed25519 signature of its exact
bytes (library: cryptography). Verification names the first thing that
differs: the signature, a missing or changed file, or anything in the folder
the manifest does not list. The manifest covers every file of the checkpoint,
the run's config among them, so a signature vouches for all of it.

Two ways to check: `verify` streams each file through SHA-256 (the CLI's
check, and the launcher's before any worker starts), and `read_verified`
reads each file once into memory and hashes those very bytes, which are then
the ones loaded: a file swapped between the check and the read cannot slip in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from shardwise.errors import ShardwiseError
from shardwise.files import write_atomic

MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
STEP_DIR = re.compile(r"^step-(\d+)$")
# a step-N moved aside while a new step-N takes its place, where the file system cannot
# exchange two folders atomically: complete, and the one to read if step-N is missing
ASIDE_DIR = re.compile(r"^\.old-step-(\d+)$")
FORMAT = "shardwise-checkpoint-2"  # 2: the run's config inside, the schedule position in state.json


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, *, step: int, sign_key: str = "", sealed: str = "") -> None:
    """List every file of `folder` (already fsynced) in manifest.json; sign it if a key is
    given. `sealed`: the cipher every file is encrypted with (checkpoint/seal.py)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name not in (MANIFEST, SIGNATURE))
    manifest = {
        "format": FORMAT,
        "step": step,
        "files": [{"name": p.name, "size": p.stat().st_size, "sha256": sha256(p)} for p in files],
    } | ({"sealed": sealed} if sealed else {})
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    write_atomic(folder / MANIFEST, data)
    if sign_key:
        write_atomic(folder / SIGNATURE, load_private_key(sign_key).sign(data))


def is_signed(folder: Path) -> bool:
    return (folder / SIGNATURE).is_file()


def _checked_manifest(folder: Path, verify_key: str) -> dict:
    """The manifest, its signature checked against `verify_key` (if given) and its form
    checked, and nothing in the folder that it does not list."""
    where = "checkpoint"
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ShardwiseError(where, f"{manifest_path}: no manifest (an incomplete or foreign folder)")
    data = manifest_path.read_bytes()
    if verify_key:
        signature = folder / SIGNATURE
        if not signature.is_file():
            raise ShardwiseError(where, f"{signature}: missing; the checkpoint is unsigned and a verify key is set")
        from cryptography.exceptions import InvalidSignature

        try:
            load_public_key(verify_key).verify(signature.read_bytes(), data)
        except InvalidSignature:
            raise ShardwiseError(where, f"{manifest_path}: the signature does not match {verify_key}") from None
    try:
        manifest = json.loads(data)
        listed = {f["name"]: f for f in manifest["files"]}
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, this shardwise reads {FORMAT!r}")
        for name, entry in listed.items():
            if "/" in name or name in ("", ".", "..") or not isinstance(entry["size"], int):
                raise ValueError(f"entry {name!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise ShardwiseError(where, f"{manifest_path}: not a valid manifest ({e})") from None
    # the signature covers the step: a signed checkpoint copied to another step-N is refused
    named = folder_step(folder.name)
    if named is not None and named != manifest.get("step"):
        raise ShardwiseError(where, f"{manifest_path}: holds step {manifest.get('step')}, the folder is {folder.name}")
    for path in sorted(folder.iterdir()):
        if path.name not in listed and path.name not in (MANIFEST, SIGNATURE):
            raise ShardwiseError(where, f"{path}: not in the manifest")
    for name in sorted(listed):
        if not (folder / name).is_file():
            raise ShardwiseError(where, f"{folder / name}: listed in the manifest but missing")
    return manifest


def _check_file(path: Path, entry: dict, size: int, digest: str) -> None:
    if size != entry["size"]:
        raise ShardwiseError("checkpoint", f"{path}: {size} bytes, the manifest says {entry['size']}")
    if digest != entry["sha256"]:
        raise ShardwiseError("checkpoint", f"{path}: SHA-256 differs from the manifest")


def verify(folder: Path, *, verify_key: str = "") -> dict:
    """The manifest of `folder` if every check passes; else ShardwiseError naming the file."""
    manifest = _checked_manifest(folder, verify_key)
    for entry in manifest["files"]:
        path = folder / entry["name"]
        _check_file(path, entry, path.stat().st_size, sha256(path))
    return manifest


def verified_files(folder: Path, *, verify_key: str = "", only: set[str] | None = None):
    """The manifest, then (name, bytes) of every file it lists (or of those named in
    `only`), one at a time, each checked as read: a caller that loads each file before
    taking the next holds one file's bytes at a time."""
    manifest = _checked_manifest(folder, verify_key)
    yield manifest
    for entry in manifest["files"]:
        if only is not None and entry["name"] not in only:
            continue
        path = folder / entry["name"]
        data = path.read_bytes()
        _check_file(path, entry, len(data), hashlib.sha256(data).hexdigest())
        yield entry["name"], data


def read_verified(folder: Path, *, verify_key: str = "", only: set[str] | None = None) -> tuple[dict, dict[str, bytes]]:
    """The manifest and the checked bytes of the files it lists (or of those named in `only`)."""
    files = verified_files(folder, verify_key=verify_key, only=only)
    manifest = next(files)
    return manifest, dict(files)


def keygen(folder: Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair: folder/shardwise.key (private, mode 600) and folder/shardwise.pub."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / "shardwise.key", folder / "shardwise.pub"
    for path in (private, public):
        if path.exists():
            raise ShardwiseError("keygen", f"{path} exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def _read_key(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ShardwiseError(field, f"cannot read {path!r}: {e.strerror}") from None


def load_private_key(path: str):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(_read_key(path, "checkpoint.sign_key"), password=None)
    except (ValueError, TypeError) as e:
        raise ShardwiseError("checkpoint.sign_key", f"{path!r} is not a PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ShardwiseError("checkpoint.sign_key", f"{path!r} is not an Ed25519 key")
    return key


def load_public_key(path: str):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(_read_key(path, "checkpoint.verify_key"))
    except (ValueError, TypeError) as e:
        raise ShardwiseError("checkpoint.verify_key", f"{path!r} is not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ShardwiseError("checkpoint.verify_key", f"{path!r} is not an Ed25519 key")
    return key


def folder_step(name: str) -> int | None:
    """The step a checkpoint folder's name says (`step-N`, or `.old-step-N` set aside), or None."""
    named = STEP_DIR.match(name) or ASIDE_DIR.match(name)
    return int(named.group(1)) if named else None


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def latest_checkpoint(root: Path, *, since: float | None = None) -> Path | None:
    """The newest step-N folder under `root` that has a manifest (a complete write), or
    the `.old-step-N` set aside for it where step-N itself is missing; with `since`, only
    those whose manifest was written at that time or later (by this job)."""
    if not root.is_dir():
        return None
    found: dict[int, Path] = {}
    for p in sorted(root.iterdir(), key=lambda p: p.name.startswith(".")):  # step-N before its .old- twin
        step = folder_step(p.name)
        if step is not None and (p / MANIFEST).is_file() and step not in found:
            if since is None or (p / MANIFEST).stat().st_mtime >= since:
                found[step] = p
    return found[max(found)] if found else None


def find_checkpoint(path: Path) -> Path:
    """`path` itself if it is a checkpoint, else the newest complete one in its checkpoints/ folder."""
    if (path / MANIFEST).is_file():
        return path
    found = latest_checkpoint(path / "checkpoints")
    if found is None:
        raise ShardwiseError("resume", f"no complete checkpoint in {str(path)!r} or its checkpoints/ folder")
    return found
