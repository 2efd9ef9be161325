"""Checkpoints encrypted at rest (checkpoint.encrypt_key): every file sealed with AES-256-GCM,
readable by the cryptography package's own AESGCM with the key and the file's name; a resume
on another number of ranks ends with the uninterrupted run's weights; no key, a wrong key, or
files moved between names are refused in one line."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import cli_fork
import pytest
import torch

RUN = ["--model.name", "mlp", "--model.hidden", "24", "--train.steps", "8", "--train.warmup_steps", "2",
       "--run.progress", "false", "--train.eval_every", "0"]  # fmt: skip
SEALED = b"shardwise-sealed-2\n"


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sealed")
    done = cli_fork.run(["keygen", "--encryption", "--out", str(folder)])
    assert done.returncode == 0, done.stderr
    key = folder / "shardwise.aes"
    done = cli_fork.run(["train", "--nproc", "2", *RUN, "--train.checkpoint_every", "4", "--checkpoint.encrypt_key",
                         str(key), "--out", str(folder / "run")])  # fmt: skip
    assert done.returncode == 0, done.stderr
    return folder, key, folder / "run" / "checkpoints" / "step-00000004"


def _decrypt(key_file, label: str, data: bytes) -> bytes:
    """Opened by the cryptography package alone (a file of one chunk): the marker, a 12-byte
    nonce, the ciphertext's length, the ciphertext and its tag; the associated data the
    documented label, chunk 0, the last."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    body = data[len(SEALED) :]
    assert int.from_bytes(body[12:16], "big") == len(body) - 16
    return AESGCM(bytes.fromhex(key_file.read_text().strip())).decrypt(body[:12], body[16:], f"{label}|0|1".encode())


def test_every_file_is_sealed_and_opens_with_the_key_alone(sealed):
    from safetensors.torch import load

    _, key, step = sealed
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and len(key.read_text().strip()) == 64
    manifest = json.loads((step / "manifest.json").read_text())
    assert manifest["sealed"] == "AES-256-GCM"
    names = sorted(f["name"] for f in manifest["files"])
    assert names == ["config.toml", "shard-00000.safetensors", "shard-00001.safetensors", "state.json"]
    for name in names:
        data = (step / name).read_bytes()
        assert data.startswith(SEALED) and b"[model]" not in data and b'"index"' not in data
    state = json.loads(_decrypt(key, "state.json|step=4", (step / "state.json").read_bytes()))
    assert state["step"] == 4
    shard = load(_decrypt(key, "shard-00000.safetensors|step=4", (step / "shard-00000.safetensors").read_bytes()))
    assert any(name.startswith("model/") for name in shard)
    assert b'name = "mlp"' in _decrypt(key, "config.toml|step=4", (step / "config.toml").read_bytes())
    done = cli_fork.run(["verify", str(step)])  # the manifest covers the ciphertext: no key needed
    assert done.returncode == 0 and "4 files match the manifest" in done.stdout, done.stderr


def test_a_resume_on_another_number_of_ranks_ends_with_the_uninterrupted_weights(sealed, tmp_path):
    from safetensors.torch import load_file

    folder, key, step = sealed
    done = cli_fork.run(["train", "--resume", str(step), "--nproc", "1", "--checkpoint.encrypt_key", str(key),
                         "--train.checkpoint_every", "2", "--out", str(tmp_path / "resumed")])  # fmt: skip
    assert done.returncode == 0, done.stderr
    written_steps = sorted((tmp_path / "resumed" / "checkpoints").glob("step-*"))
    assert [p.name for p in written_steps] == ["step-00000006", "step-00000008"]
    for written in written_steps:  # the resumed run's own: sealed too
        assert json.loads((written / "manifest.json").read_text())["sealed"] == "AES-256-GCM"
    whole = folder / "run" / "model.safetensors"  # the sealed run went on to step 8 itself
    got, want = load_file(str(tmp_path / "resumed" / "model.safetensors")), load_file(str(whole))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_no_key_or_a_wrong_key_is_one_line(sealed, tmp_path):
    _, _, step = sealed
    done = cli_fork.run(["train", "--resume", str(step), "--out", str(tmp_path / "a")])
    assert done.returncode == 2
    assert done.stderr.strip() == f"shardwise: checkpoint.encrypt_key: {step} is encrypted (AES-256-GCM): name its " \
                                  "key file"  # fmt: skip
    cli_fork.run(["keygen", "--encryption", "--out", str(tmp_path / "other")])
    done = cli_fork.run(["train", "--resume", str(step), "--checkpoint.encrypt_key",
                         str(tmp_path / "other" / "shardwise.aes"), "--out", str(tmp_path / "b")])  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == f"shardwise: checkpoint.encrypt_key: {step / 'config.toml'} cannot be decrypted " \
                                  "with this key (the wrong key, or a file changed, cut or moved)"  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_files_moved_between_names_are_refused_though_the_manifest_is_rewritten(sealed, tmp_path):
    """An unsigned manifest can be rewritten by whoever can write the folder; the name bound
    into each file's tag still refuses a shard swapped for another."""
    import shutil

    from shardwise.checkpoint.store import read_checkpoint
    from shardwise.errors import ShardwiseError

    _, key, step = sealed
    moved = tmp_path / "step-00000004"
    shutil.copytree(step, moved)
    a, b = moved / "shard-00000.safetensors", moved / "shard-00001.safetensors"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    manifest = json.loads((moved / "manifest.json").read_text())
    for entry in manifest["files"]:
        data = (moved / entry["name"]).read_bytes()
        entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (moved / "manifest.json").write_text(json.dumps(manifest))
    read_checkpoint(step, encrypt_key=str(key))  # the original opens
    with pytest.raises(ShardwiseError, match="shard-00000.safetensors cannot be decrypted with this key"):
        read_checkpoint(moved, encrypt_key=str(key))
    # step 8's files put in step 4's place, its manifest rewritten to say step 4
    later = tmp_path / "later" / "step-00000004"
    shutil.copytree(step.parent / "step-00000008", later)
    manifest = json.loads((later / "manifest.json").read_text())
    manifest["step"] = 4
    (later / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardwiseError, match="cannot be decrypted with this key"):
        read_checkpoint(later, encrypt_key=str(key))
    # files in the clear where sealed ones were: with a key given, refused
    plain = tmp_path / "plain" / "step-00000004"
    shutil.copytree(step, plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    for entry in manifest["files"]:
        data = _decrypt(key, f"{entry['name']}|step=4", (plain / entry["name"]).read_bytes())
        (plain / entry["name"]).write_bytes(data)
        entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    del manifest["sealed"]
    (plain / "manifest.json").write_text(json.dumps(manifest))
    read_checkpoint(plain)  # a plain checkpoint, read as one
    with pytest.raises(ShardwiseError, match="is not encrypted, though a key is given"):
        read_checkpoint(plain, encrypt_key=str(key))


def test_a_key_is_never_overwritten(sealed):
    folder, key, _ = sealed
    before = key.read_text()
    done = cli_fork.run(["keygen", "--encryption", "--out", str(folder)])
    assert done.returncode == 2 and "exists: a key is never overwritten" in done.stderr
    assert key.read_text() == before


def test_a_sealed_npz_trains_as_the_plain_one_and_needs_its_key(sealed, tmp_path):
    """`shardwise seal` a data file; data.encrypt_key reads it; the weights are the plain
    file's; the sealed file holds none of the plain bytes; no key or a wrong one is one line."""
    import numpy as np
    from safetensors.torch import load_file
    from sklearn.datasets import load_digits

    folder, key, _ = sealed
    bunch = load_digits()
    np.savez(tmp_path / "d.npz", x=bunch.data.reshape(-1, 1, 8, 8)[:400], y=bunch.target[:400])
    done = cli_fork.run(["seal", str(tmp_path / "d.npz"), "--key", str(key)])
    assert done.returncode == 0, done.stderr
    sealed_file = tmp_path / "d.npz.sealed"
    plain = (tmp_path / "d.npz").read_bytes()
    assert plain[40:400] not in sealed_file.read_bytes()
    assert _decrypt(key, "shardwise-data", sealed_file.read_bytes()) == plain  # the cryptography package's own
    runs = {}
    for name, extra in (("plain", ["--data.path", str(tmp_path / "d.npz")]),
                        ("sealed", ["--data.path", str(sealed_file), "--data.encrypt_key", str(key)])):  # fmt: skip
        done = cli_fork.run(["train", "--nproc", "1", *RUN, "--data.name", "npz", *extra, "--out",
                             str(tmp_path / name)])  # fmt: skip
        assert done.returncode == 0, done.stderr
        runs[name] = load_file(str(tmp_path / name / "model.safetensors"))
    for name in runs["plain"]:
        torch.testing.assert_close(runs["sealed"][name], runs["plain"][name], rtol=0, atol=0)
    args = ["train", *RUN, "--data.name", "npz", "--data.path", str(sealed_file), "--out", str(tmp_path / "x")]
    done = cli_fork.run(args)
    assert done.returncode == 2
    assert done.stderr.strip() == f"shardwise: data.encrypt_key: {sealed_file} is encrypted (AES-256-GCM): name " \
                                  "its key file"  # fmt: skip
    done = cli_fork.run([*args, "--data.encrypt_key", str(tmp_path / "other.aes")])
    assert done.returncode == 2 and "data.encrypt_key: cannot read the key file" in done.stderr
