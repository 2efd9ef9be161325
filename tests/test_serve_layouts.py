"""`shardwise serve RUN --nproc N --parallel.*`: the model cut into a layout across ranks,
rank 0 serving; every layout's answers equal `shardwise predict`'s in one process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cli_fork
import httpx
import numpy as np
import pytest

from shardwise.procs import ranks_under

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("layouts")
    made = {}
    for name, args in {"mlp": ["--model.name", "mlp", "--model.hidden", "32,16"], "convnet": []}.items():
        done = cli_fork.run(["train", "--nproc", "1", *args, "--train.steps", "30", "--run.progress", "false",
                             "--out", str(folder / name)])  # fmt: skip
        assert done.returncode == 0, done.stderr
        made[name] = folder / name
    x = __import__("sklearn.datasets").datasets.load_digits().data[:37].reshape(-1, 1, 8, 8)
    np.savez(folder / "x.npz", x=x)
    for name, run in made.items():
        out = folder / f"{name}.npz"
        done = cli_fork.run(["predict", str(run), "--input", str(folder / "x.npz"), "--out", str(out)])
        assert done.returncode == 0, done.stderr
    return made, x, {name: np.load(folder / f"{name}.npz")["probabilities"] for name in made}


@pytest.mark.parametrize("model, layout", [
    ("mlp", ["--parallel.dp", "2"]),
    ("mlp", ["--parallel.vertical", "2"]),
    ("convnet", ["--parallel.tp", "2"]),
    ("convnet", ["--parallel.pp", "2"]),
    ("convnet", ["--parallel.spatial", "2"]),
], ids=["dp2", "vertical2", "tp2", "pp2", "spatial2"])  # fmt: skip
def test_every_layout_serves_one_processes_predictions(runs, model, layout):
    made, x, want = runs
    proc = subprocess.Popen([sys.executable, "-m", "shardwise", "serve", str(made[model]), "--nproc", "2", *layout,
                             "--serve.port", "0", "--serve.max_wait_ms", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    try:
        line = ""
        while "serving" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        url = re.search(r"(http://127\.0\.0\.1:\d+)/", line).group(1)
        with httpx.Client(base_url=url, timeout=60) as client:
            about = client.get("/v1/model").json()
            assert "on 2 ranks" in about["layout"], about
            whole = client.post("/v1/predict", json={"inputs": x.tolist()}).json()
            one = client.post("/v1/predict", json={"inputs": x[5:6].tolist()}).json()  # fewer samples than dp
        np.testing.assert_allclose(np.asarray(whole["probabilities"]), want[model], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(one["probabilities"][0]), want[model][5], rtol=1e-5, atol=1e-7)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, proc.stderr.read()


def test_a_failed_rank_is_503_at_once_then_the_ranks_restart_and_serve_again(runs):
    """A rank stopped mid-batch, then killed: the batch in flight gets 503 within seconds;
    the front answers 503 (and /healthz says so) until the restarted ranks connect, then the
    same predictions; a failure beyond serve.max_restarts stops the server, exit 1."""
    made, x, want = runs
    proc = subprocess.Popen([sys.executable, "-m", "shardwise", "serve", str(made["mlp"]), "--nproc", "2",
                             "--parallel.dp", "2", "--serve.port", "0", "--serve.max_restarts", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    try:
        url = re.search(r"(http://127\.0\.0\.1:\d+)/", proc.stdout.readline()).group(1)
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.post("/v1/predict", json={"inputs": x.tolist()}).status_code == 200
            ranks = {rank: pid for rank, (pid, _) in ranks_under(proc.pid).items()}
            assert sorted(ranks) == [0, 1], ranks
            os.kill(ranks[1], signal.SIGSTOP)  # rank 0's next broadcast waits on it
            answer, asking = {}, threading.Thread(target=lambda: answer.update(
                r=client.post("/v1/predict", json={"inputs": x[:3].tolist()}), at=time.monotonic()))  # fmt: skip
            asking.start()
            time.sleep(1.0)
            assert "r" not in answer  # in flight
            killed = time.monotonic()
            os.kill(ranks[1], signal.SIGKILL)
            asking.join(timeout=30)
            assert answer["r"].status_code == 503 and answer["at"] - killed < 5, (answer, answer["r"].text)
            assert answer["r"].json()["error"].startswith("a rank failed while this batch was in flight")
            codes = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                asked = time.monotonic()
                r = client.post("/v1/predict", json={"inputs": x.tolist()})
                codes.append(r.status_code)
                if r.status_code == 200:
                    break
                assert r.status_code == 503 and time.monotonic() - asked < 1, r.text  # at once, not queued
                assert client.get("/healthz").status_code in (503, 200)
                time.sleep(0.1)
            assert codes[-1] == 200, codes
            np.testing.assert_allclose(np.asarray(r.json()["probabilities"]), want["mlp"], rtol=1e-5, atol=1e-7)
            again = {rank: pid for rank, (pid, _) in ranks_under(proc.pid).items()}
            assert sorted(again) == [0, 1] and set(again.values()).isdisjoint(ranks.values()), (ranks, again)
            os.kill(again[0], signal.SIGKILL)  # a second failure: over serve.max_restarts = 1
            code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert code == 1, err
    assert "restart 1 of 1" in err and "the ranks are back; serving again" in err, err
    assert "rank 0 failed (exit -9)" in err and "after 1 restart" in err, err
