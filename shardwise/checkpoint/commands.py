"""The `shardwise keygen` and `shardwise verify` command lines (torch-free)."""

from __future__ import annotations

import argparse
from pathlib import Path

from shardwise.errors import ShardwiseError


def add_parsers(sub) -> None:
    keygen = sub.add_parser("keygen", help="make an Ed25519 key pair for signing checkpoints (or, with "
                            "--encryption, an AES-256 key for encrypting them)")  # fmt: skip
    keygen.add_argument("--out", type=Path, default=Path("."), help="folder for shardwise.key and shardwise.pub")
    keygen.add_argument("--encryption", action="store_true",
                        help="write shardwise.aes instead: a 256-bit key for checkpoint.encrypt_key")  # fmt: skip
    sealer = sub.add_parser("seal", help="encrypt a data file (an .npz) with an AES-256 key, for data.encrypt_key")
    sealer.add_argument("file", type=Path, help="the file to encrypt (it is left as it is)")
    sealer.add_argument("--key", required=True, help="the key file (shardwise keygen --encryption)")
    sealer.add_argument("--out", type=Path, default=None, help="where the sealed copy goes (default: FILE.sealed)")
    verify = sub.add_parser("verify", help="check a checkpoint's files against its manifest and signature")
    verify.add_argument("path", type=Path, help="a checkpoint folder, or a run folder (its newest checkpoint)")
    verify.add_argument("--key", default="", help="the public key that must have signed the manifest")
    verify.add_argument(
        "--require-signature",
        action="store_true",
        help="refuse (exit 2) a checkpoint that is unsigned, or whose signature cannot be checked (no --key)",
    )


def run(args: argparse.Namespace) -> int:
    if args.command == "seal":
        from shardwise.checkpoint.seal import seal_file

        out = seal_file(args.file, args.key, args.out or args.file.with_name(args.file.name + ".sealed"))
        print(f"sealed {args.file} into {out} (AES-256-GCM): read it with data.path={out} data.encrypt_key={args.key}")
        return 0
    return _keygen(args) if args.command == "keygen" else _verify(args)


def _keygen(args: argparse.Namespace) -> int:
    from shardwise.checkpoint.manifest import keygen

    if args.encryption:
        from shardwise.checkpoint.seal import keygen as aes_keygen

        print(f"encryption key {aes_keygen(args.out)} (keep it secret, and safe: checkpoint.encrypt_key; a "
              "checkpoint sealed with it cannot be read without it)")  # fmt: skip
        return 0
    private, public = keygen(args.out)
    print(f"private key {private} (keep it secret; checkpoint.sign_key), public key {public} (checkpoint.verify_key)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from shardwise.checkpoint.manifest import find_checkpoint, is_signed, verify

    folder = find_checkpoint(args.path)
    if args.require_signature and not is_signed(folder):
        raise ShardwiseError("checkpoint", f"{folder} is unsigned (no manifest.sig) and --require-signature is set")
    if args.require_signature and not args.key:
        raise ShardwiseError("key", f"--require-signature needs --key, the public key to check {folder}'s signature")
    manifest = verify(folder, verify_key=args.key)
    if args.key:
        signed = "signature verified"
    elif is_signed(folder):
        signed = "signed, but the signature was NOT checked (give --key)"
    else:
        signed = "unsigned"
    print(f"{folder}: step {manifest['step']}, {len(manifest['files'])} files match the manifest; {signed}")
    return 0
