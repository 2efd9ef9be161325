"""What a resumed run trusts, and what `shardwise verify` says.

A run folder is writable by whoever can write the disk; a checkpoint is covered
by its manifest and, when signed, by the signature. So a resumed run takes its
trust settings (`[checkpoint]`) only from the command line or the user's own
config, its other settings from the config saved inside the verified
checkpoint, and nothing from the run folder's config.toml. It never writes into
a checkpoint, and it loads exactly the bytes it checked.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import cli_fork
import pytest
import torch
from safetensors.torch import load_file

from shardwise.checkpoint import manifest as manifest_module
from shardwise.checkpoint.manifest import keygen, verify, write_manifest
from shardwise.checkpoint.store import read_checkpoint, save_checkpoint
from shardwise.errors import ShardwiseError

JOB = ["--model.name", "mlp", "--model.hidden", "32", "--train.steps", "6", "--train.checkpoint_every", "3"]
JOB += ["--train.eval_every", "0", "--run.progress", "false", "--train.deterministic", "true"]
JOB += ["--train.schedule", "constant"]


def shardwise(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The command in a process of its own, forked with torch imported (cli_fork.py)."""
    return cli_fork.run(list(args), env={**os.environ, "SHARDWISE_FAULT": ""}, timeout=timeout)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def signed_run(tmp_path_factory) -> tuple[Path, Path]:
    """A run of 6 steps, checkpoints at 3 and 6 signed with a fresh key; its keys folder."""
    root = tmp_path_factory.mktemp("trust")
    keygen(root / "keys")
    done = shardwise("train", "--nproc", "1", *JOB, "--out", str(root / "run"),
                     "--checkpoint.sign_key", str(root / "keys" / "shardwise.key"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    return root / "run", root / "keys"


@pytest.fixture
def run_copy(signed_run, tmp_path) -> Path:
    shutil.copytree(signed_run[0], tmp_path / "run")
    return tmp_path / "run"


def test_verify_says_what_it_checked(signed_run, tmp_path):
    run, keys = signed_run
    pub = str(keys / "shardwise.pub")
    ok = shardwise("verify", str(run), "--key", pub, "--require-signature")
    assert ok.returncode == 0 and ok.stdout.rstrip().endswith("signature verified"), ok.stdout + ok.stderr
    unchecked = shardwise("verify", str(run))
    assert unchecked.returncode == 0 and "signed, but the signature was NOT checked (give --key)" in unchecked.stdout
    assert one_line_error(shardwise("verify", str(run), "--require-signature")).startswith(
        "shardwise: key: --require-signature needs --key"
    )
    unsigned = tmp_path / "unsigned"
    shutil.copytree(run / "checkpoints" / "step-00000006", unsigned)
    (unsigned / "manifest.sig").unlink()
    assert shardwise("verify", str(unsigned)).stdout.rstrip().endswith("; unsigned")
    assert one_line_error(shardwise("verify", str(unsigned), "--require-signature", "--key", pub)) == (
        f"shardwise: checkpoint: {unsigned} is unsigned (no manifest.sig) and --require-signature is set"
    )


def test_a_resumed_run_takes_nothing_from_the_run_folder(run_copy, signed_run):
    """The run folder's config.toml says: no verify key, sign with another key, a rate of
    1000. None of it counts: the key comes from the command line, the rest from the
    checkpoint, and the run goes on exactly as the uninterrupted one."""
    keys = signed_run[1]
    keygen(run_copy.parent / "other")
    text = (run_copy / "config.toml").read_text()
    text = text.replace('verify_key = ""', f'verify_key = "{run_copy.parent / "other" / "shardwise.pub"}"')
    text = text.replace("lr = 0.05", "lr = 1000.0")
    (run_copy / "config.toml").write_text(text)
    shutil.rmtree(run_copy / "checkpoints" / "step-00000006")
    done = shardwise("train", "--resume", str(run_copy), "--nproc", "1",
                     "--checkpoint.verify_key", str(keys / "shardwise.pub"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout and "step 3" in done.stdout
    resolved = tomllib.loads((run_copy / "config.toml").read_text())
    assert resolved["train"]["lr"] == 0.05 and resolved["model"]["hidden"] == [32]
    assert resolved["checkpoint"] == {"sign_key": "", "verify_key": str(keys / "shardwise.pub"), "encrypt_key": ""}
    # deterministic: the same weights as the run that was never interrupted
    got, want = load_file(str(run_copy / "model.safetensors")), load_file(str(signed_run[0] / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_config_inside_a_checkpoint_is_covered_by_its_manifest(run_copy, signed_run):
    inside = run_copy / "checkpoints" / "step-00000006" / "config.toml"
    inside.write_text(inside.read_text().replace("hidden = [32]", "hidden = [64]"))
    done = shardwise("train", "--resume", str(run_copy), "--nproc", "1",
                     "--checkpoint.verify_key", str(signed_run[1] / "shardwise.pub"))  # fmt: skip
    assert one_line_error(done) == f"shardwise: checkpoint: {inside}: SHA-256 differs from the manifest"


def test_resume_from_a_checkpoint_folder_never_writes_into_it(run_copy, tmp_path):
    """Given the checkpoint folder itself: without --out the run goes on in the run folder
    that holds it, with --out in a new folder; both with the checkpoint's own config."""
    checkpoint = run_copy / "checkpoints" / "step-00000003"
    before = sorted(p.name for p in checkpoint.iterdir())
    done = shardwise("train", "--resume", str(checkpoint), "--nproc", "1")
    assert done.returncode == 0, done.stderr
    assert "is signed, but its signature is not checked" in done.stdout
    assert sorted(p.name for p in checkpoint.iterdir()) == before
    verify(checkpoint)
    assert tomllib.loads((run_copy / "config.toml").read_text())["model"]["hidden"] == [32]
    elsewhere = tmp_path / "elsewhere"
    done = shardwise("train", "--resume", str(checkpoint), "--nproc", "2", "--out", str(elsewhere))
    assert done.returncode == 0, done.stderr
    assert load_file(str(elsewhere / "model.safetensors"))["head.0.weight"].shape == (32, 64)
    verify(checkpoint)
    inside = checkpoint / "sub"
    assert one_line_error(shardwise("train", "--resume", str(checkpoint), "--out", str(inside))).startswith(
        f"shardwise: out: '{inside}' is inside the checkpoint"
    )


def test_a_shard_that_is_not_safetensors_is_one_line(run_copy):
    """An unsigned checkpoint whose manifest matches a shard that is not safetensors."""
    checkpoint = run_copy / "checkpoints" / "step-00000006"
    shard = checkpoint / "shard-00000.safetensors"
    shard.write_bytes(b"\xff" * 64)
    (checkpoint / "manifest.sig").unlink()
    (checkpoint / "manifest.json").unlink()
    write_manifest(checkpoint, step=6)
    done = shardwise("train", "--resume", str(run_copy), "--nproc", "1", "--train.steps", "12")  # steps left to run
    assert one_line_error(done).startswith(f"shardwise: rank 0: checkpoint: {shard}: not a valid safetensors file")


def test_a_file_swapped_after_its_check_is_not_loaded(signed_run, tmp_path, monkeypatch):
    """The moment a shard's hash is known to match, it is swapped for another file: what
    loads is the bytes that were checked, never the swapped file."""
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(signed_run[0] / "checkpoints" / "step-00000006", checkpoint)
    shard = checkpoint / "shard-00000.safetensors"
    genuine = {k: v.clone() for k, v in load_file(str(shard)).items()}  # load_file maps the file
    from safetensors.torch import save_file

    forged = tmp_path / "forged.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in genuine.items()}, str(forged))
    real_sha256 = hashlib.sha256
    shard_sha256 = real_sha256(shard.read_bytes()).hexdigest()

    class SwapAfterHashing:
        def __init__(self, *args):
            self.inner = real_sha256(*args)

        def update(self, data):
            self.inner.update(data)

        def hexdigest(self):
            digest = self.inner.hexdigest()
            if digest == shard_sha256:
                shutil.copyfile(forged, shard)  # the swap, right after the shard's check
            return digest

    monkeypatch.setattr(manifest_module.hashlib, "sha256", SwapAfterHashing)
    loaded = read_checkpoint(checkpoint, verify_key=str(signed_run[1] / "shardwise.pub")).tensors
    assert shard.read_bytes() == forged.read_bytes()  # the swap did happen
    for name, value in genuine.items():
        assert torch.equal(loaded[name], value), f"{name}: loaded the swapped file"


class _CrashAt:
    def __init__(self, point: str):
        self.point = point

    def maybe_fail_at(self, point: str) -> None:
        if point == self.point:
            raise KeyboardInterrupt(point)  # the process dies here


def test_writing_a_step_again_never_leaves_it_missing(tmp_path):
    """step-N written again (a run resumed from an older checkpoint) replaces the old one
    atomically: a crash in the middle leaves a complete step-N, old or new."""
    tensors = {"model/w": torch.ones(3)}
    meta = {"world_size": 1, "layout": "dp=1", "schedule_step": 2}
    save_checkpoint(tmp_path, 2, tensors, meta=meta, group=None, config_text="[train]\n")
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(
            tmp_path, 2, {"model/w": torch.zeros(3)}, meta=meta, group=None, faults=_CrashAt("checkpoint-replace")
        )
    read_checkpoint(tmp_path / "step-00000002")  # complete: the manifest matches every file


def test_a_signed_checkpoint_copied_to_another_step_is_refused(signed_run, tmp_path):
    """The signature covers the step: an old signed checkpoint put in as the newest one
    (a rollback) does not verify."""
    rolled = tmp_path / "checkpoints" / "step-00000009"
    shutil.copytree(signed_run[0] / "checkpoints" / "step-00000003", rolled)
    with pytest.raises(ShardwiseError, match="holds step 3, the folder is step-00000009"):
        verify(rolled, verify_key=str(signed_run[1] / "shardwise.pub"))


def test_a_restart_goes_back_to_the_checkpoint_it_resumed_not_to_a_newer_old_one(run_copy):
    """Resumed from step 3 of a run that has a step 6, with another rate: a rank dies at
    step 5, before the resumed run writes anything. The restart must start from step 3
    again; the old step 6 belongs to the trajectory the user left."""
    checkpoint = run_copy / "checkpoints" / "step-00000003"
    env = {**os.environ, "SHARDWISE_FAULT": "0:4:exit"}
    args = ["train", "--resume", str(checkpoint), "--nproc", "1", "--train.lr", "0.01", "--max-restarts", "1"]
    done = cli_fork.run(args, env=env)
    assert done.returncode == 0, done.stderr
    assert f"restart 1 of 1 from {checkpoint}" in done.stderr, done.stderr


def _edit_saved_config(run: Path, old: str, new: str) -> None:
    """Change the last checkpoint's config.toml and write its manifest again, unsigned."""
    inside = run / "checkpoints" / "step-00000006"
    (inside / "config.toml").write_text((inside / "config.toml").read_text().replace(old, new))
    (inside / "manifest.sig").unlink()
    (inside / "manifest.json").unlink()
    write_manifest(inside, step=6)


def test_resume_overrides_are_checked_against_the_checkpoints_config(run_copy):
    """An override that is valid only with the saved config (fixed shards need a fixed
    partition) is taken; the trust settings were read without it."""
    from shardwise.cli import _resume_config

    _edit_saved_config(run_copy, 'partition = "shuffle"', 'partition = "stratified"')
    cfg, out, resuming = _resume_config(None, run_copy, {"data.shards": "2"})
    assert cfg.data.partition == "stratified" and cfg.data.shards == 2 and resuming and out == run_copy


def test_a_crash_between_the_fallback_renames_leaves_the_old_step(tmp_path, monkeypatch):
    """Where the file system cannot exchange two folders, the old step-N is moved aside
    before the new one moves in: a crash between the two leaves it aside, and it is what
    loads for step N."""
    from shardwise.checkpoint import store
    from shardwise.checkpoint.manifest import latest_checkpoint

    meta = {"world_size": 1, "layout": "dp=1", "schedule_step": 2}
    save_checkpoint(tmp_path, 2, {"model/w": torch.ones(3)}, meta=meta, group=None)
    monkeypatch.setattr(store, "_exchange", lambda a, b: False)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(
            tmp_path, 2, {"model/w": torch.zeros(3)}, meta=meta, group=None, faults=_CrashAt("checkpoint-aside")
        )
    assert not (tmp_path / "step-00000002").exists()
    found = latest_checkpoint(tmp_path)
    assert found == tmp_path / ".old-step-00000002"
    assert torch.equal(read_checkpoint(found).tensors["model/w"], torch.ones(3))
    save_checkpoint(tmp_path, 2, {"model/w": torch.zeros(3)}, meta=meta, group=None)  # the next write goes through
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002"]


def test_a_checkpoint_cannot_choose_the_code_a_resume_imports(run_copy):
    """A checkpoint whose config names a model by import path is resumed only where the
    user names the same path (or verifies the checkpoint's signature with their key)."""
    from shardwise.cli import _resume_config

    _edit_saved_config(run_copy, 'name = "mlp"', 'name = "examples.digits_model:build"')
    with pytest.raises(ShardwiseError, match="names code to import, examples.digits_model:build"):
        _resume_config(None, run_copy, {})
    cfg, _, _ = _resume_config(None, run_copy, {"model.name": "examples.digits_model:build"})
    assert cfg.model.name == "examples.digits_model:build"
