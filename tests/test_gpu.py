"""CUDA paths: run where there is a GPU, skipped with the reason where there is none.

The invariant holds across devices: a run on a GPU ends with the weights of the
same run on the CPU (fp32, matrix products without TF32), a checkpoint written on
a GPU resumes on the CPU, and more ranks than GPUs on a machine run on the CPU
with gloo instead of failing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from shardwise.train.loop import all_finite, poisoned

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")

JOB = ["--model.name", "mlp", "--train.steps", "12", "--train.batch_size", "48", "--train.eval_every", "0"]
JOB += ["--run.progress", "false", "--train.deterministic", "true", "--train.checkpoint_every", "6"]
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}
TOL = {"rtol": 1e-4, "atol": 1e-5}


def shardwise(*args: str, env: dict[str, str] | None = None, fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "SHARDWISE_FAULT": fault}
    cmd = [sys.executable, "-m", "shardwise", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _train(out: Path, *args: str, env: dict[str, str] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    done = shardwise("train", *JOB, *args, "--out", str(out), env=env)
    assert done.returncode == 0, done.stderr
    return json.loads((out / "summary.json").read_text()), load_file(str(out / "model.safetensors"))


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")


@pytest.fixture(scope="module")
def on_cpu(tmp_path_factory) -> dict[str, torch.Tensor]:
    summary, weights = _train(tmp_path_factory.mktemp("cpu") / "run", "--nproc", "1", env=CPU_ONLY)
    assert summary["device"] == "cpu" and summary["backend"] == "gloo"
    return weights


def test_one_gpu_ends_with_the_weights_of_the_cpu(tmp_path, on_cpu):
    summary, weights = _train(tmp_path / "gpu", "--nproc", "1")
    assert summary["device"] == "cuda:0"
    assert "nccl" in summary["backend"]
    _assert_close(weights, on_cpu)


def test_a_checkpoint_written_on_a_gpu_resumes_on_the_cpu(tmp_path, on_cpu):
    out = tmp_path / "run"
    stopped = shardwise("train", *JOB, "--nproc", "1", "--out", str(out), fault="0:8:exit")
    assert stopped.returncode != 0 and [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000006"]
    done = shardwise("train", *JOB, "--nproc", "1", "--resume", str(out), env=CPU_ONLY)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "summary.json").read_text())["device"] == "cpu"
    _assert_close(load_file(str(out / "model.safetensors")), on_cpu)


def test_more_ranks_than_gpus_run_on_the_cpu(tmp_path, on_cpu):
    nproc = torch.cuda.device_count() + 1
    done = shardwise("train", *JOB, "--nproc", str(nproc), "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert f"{nproc} ranks on this machine and {nproc - 1} GPU(s): the ranks run on the CPU (gloo)" in done.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert summary["device"] == "cpu" and summary["backend"] == "gloo"
    if nproc == 2:  # global batch 48 split over 2 ranks: the one-process weights
        _assert_close(weights, on_cpu)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs on this machine")
def test_two_gpus_end_with_the_weights_of_one(tmp_path, on_cpu):
    summary, weights = _train(tmp_path / "run", "--nproc", "2")
    assert summary["device"] in ("cuda:0", "cuda:1") and "nccl" in summary["backend"]
    _assert_close(weights, on_cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_gradients_are_found_on_the_gpu(dtype):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to("cuda", dtype)
    x = torch.randn(16, 4, device="cuda", dtype=dtype)
    loss = poisoned(model(x).float().square().mean())
    loss.backward()
    assert all_finite(loss, model, None)
    model[2].bias.grad[1] = float("inf")
    assert not all_finite(loss, model, None)
    model.zero_grad()
    loss = poisoned(model(x).float().square().mean() + float("nan"))
    loss.backward()
    assert torch.isnan(model[0].weight.grad).all()
    assert not all_finite(loss, model, None)
