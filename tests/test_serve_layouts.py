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
    """The MLP trained from a file of its own, removed before anything serves: serving needs
    the run, not its training data."""
    folder = tmp_path_factory.mktemp("layouts")
    digits = __import__("sklearn.datasets").datasets.load_digits()
    np.savez(folder / "digits.npz", x=digits.data.reshape(-1, 1, 8, 8), y=digits.target)
    made = {}
    mlp = ["--model.name", "mlp", "--model.hidden", "32,16", "--data.name", "npz", "--data.path",
           str(folder / "digits.npz")]  # fmt: skip
    for name, args in {"mlp": mlp, "convnet": []}.items():
        done = cli_fork.run(["train", "--nproc", "1", *args, "--train.steps", "30", "--run.progress", "false",
                             "--out", str(folder / name)])  # fmt: skip
        assert done.returncode == 0, done.stderr
        made[name] = folder / name
    (folder / "digits.npz").unlink()
    x = digits.data[:37].reshape(-1, 1, 8, 8)
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


def test_auto_serves_the_layout_the_cost_model_chooses_for_a_latency_target(runs, tmp_path):
    """--parallel.layout auto: the choice said in one line before serving, with the target it
    was chosen for; the ranks serve that layout (GET /v1/model names it) with one process's
    predictions. A degree named beside auto is one line, exit 2."""
    made, x, want = runs
    env = {**os.environ, "SHARDWISE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "shardwise", "serve", str(made["mlp"]), "--nproc", "2",
                             "--parallel.layout", "auto", "--serve.p99_ms", "1000", "--serve.port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)  # fmt: skip
    try:
        said = [proc.stdout.readline()]
        while "http://127.0.0.1:" not in said[-1]:  # the line that says it serves
            assert said[-1] or proc.poll() is None, proc.stderr.read()
            said.append(proc.stdout.readline())
        chosen = [line for line in said if line.startswith("parallel.layout auto: ")]
        assert len(chosen) == 1 and "within serve.p99_ms = 1000; the highest rate of" in chosen[0], said
        layout = chosen[0].removeprefix("parallel.layout auto: ").split(" (")[0]
        url = re.search(r"(http://127\.0\.0\.1:\d+)/", said[-1]).group(1)
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/v1/model").json()["layout"].startswith(f"{layout} on 2 ranks")
            whole = client.post("/v1/predict", json={"inputs": x.tolist()}).json()
        np.testing.assert_allclose(np.asarray(whole["probabilities"]), want["mlp"], rtol=1e-5, atol=1e-7)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, proc.stderr.read()
    refused = cli_fork.run(["serve", str(made["mlp"]), "--nproc", "2", "--parallel.layout", "auto",
                            "--parallel.tp", "2"])  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "shardwise: parallel.tp: =2 with parallel.layout=auto: the planner chooses the layout; name one or the other"
    )


def test_sigterm_while_the_ranks_start_stops_them(runs):
    """SIGTERM after the ranks are started, before the front serves: the ranks are stopped
    (none is left waiting for its peers), one line, exit 0."""
    made, _, _ = runs
    proc = subprocess.Popen([sys.executable, "-m", "shardwise", "serve", str(made["mlp"]), "--nproc", "2",
                             "--parallel.dp", "2", "--serve.port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    try:
        deadline, ranks = time.monotonic() + 60, {}
        while len(ranks) < 2 and time.monotonic() < deadline:
            ranks = ranks_under(proc.pid)
            time.sleep(0.02)
        assert len(ranks) == 2, proc.stderr.read() if proc.poll() is not None else "no ranks"
        proc.send_signal(signal.SIGTERM)  # the ranks still import torch and meet: seconds before serving
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = proc.stdout.read(), proc.stderr.read()
    assert code == 0 and "serving" not in out and err.strip().endswith("shardwise serve: stopped before serving"), err
    for pid in ranks.values():
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text(), pid


@pytest.mark.parametrize("layout", [["--parallel.dp", "2"], ["--parallel.pp", "2"]], ids=["dp2", "pp2 pipelined"])
def test_a_failed_rank_is_503_at_once_then_the_ranks_restart_and_serve_again(runs, layout):
    """A rank stopped mid-batch, then killed: the batch in flight gets 503 within seconds;
    the front answers 503 (and /healthz says so) until the restarted ranks connect, then the
    same predictions; a failure beyond serve.max_restarts stops the server, exit 1. Under a
    pipeline the rank stopped is the last stage, which answers the front itself."""
    made, x, want = runs
    proc = subprocess.Popen([sys.executable, "-m", "shardwise", "serve", str(made["mlp"]), "--nproc", "2", *layout,
                             "--serve.port", "0", "--serve.max_restarts", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    try:
        url = re.search(r"(http://127\.0\.0\.1:\d+)/", proc.stdout.readline()).group(1)
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.post("/v1/predict", json={"inputs": x.tolist()}).status_code == 200
            ranks = ranks_under(proc.pid)
            assert sorted(ranks) == [0, 1], ranks
            os.kill(ranks[1], signal.SIGSTOP)  # the next batch waits on it (dp: rank 0's broadcast; pp: the last stage)
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
            again = ranks_under(proc.pid)
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


def test_a_pipeline_keeps_a_batch_a_stage_in_flight_within_a_memory_budget(runs):
    """pp = 2 under a weight budget one process exceeds (refused in one line, exit 2): batches
    of one sample from concurrent clients go through the stages a batch a stage, and each
    answer is its own sample's (the answers come back in the order the batches went in)."""
    made, x, want = runs
    whole = sum(t.nbytes for t in __import__("safetensors.numpy").numpy.load_file(
        str(made["convnet"] / "model.safetensors")).values())  # fmt: skip
    budget = ["--serve.memory_per_rank", f"{0.9 * whole / 1024:.1f}KiB"]
    alone = subprocess.run([sys.executable, "-m", "shardwise", "serve", str(made["convnet"]), "--serve.port", "0",
                            *budget], capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert alone.returncode == 2 and alone.stderr.count("\n") == 1, alone.stderr
    assert alone.stderr.startswith("shardwise: serve.memory_per_rank") and "one process" in alone.stderr, alone.stderr
    proc = subprocess.Popen([sys.executable, "-m", "shardwise", "serve", str(made["convnet"]), "--nproc", "2",
                             "--parallel.pp", "2", "--serve.port", "0", "--serve.max_batch", "1",
                             "--serve.max_wait_ms", "0", *budget], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "serving" in line, proc.stderr.read()
        url = re.search(r"(http://127\.0\.0\.1:\d+)/", line).group(1)
        answers: dict[int, np.ndarray] = {}
        with httpx.Client(base_url=url, timeout=60) as client:
            about = client.get("/v1/model").json()
            assert 0 < about["largest_rank_weight_bytes"] <= 0.9 * whole, (about, whole)

            def ask(rows: range) -> None:
                for i in rows:
                    r = client.post("/v1/predict", json={"inputs": x[i : i + 1].tolist()})
                    answers[i] = np.asarray(r.json()["probabilities"][0])

            askers = [threading.Thread(target=ask, args=(range(k, len(x), 6),)) for k in range(6)]
            for t in askers:
                t.start()
            for t in askers:
                t.join(timeout=120)
            metrics = client.get("/metrics").text
        assert sorted(answers) == list(range(len(x))), sorted(answers)
        by_itself = float(re.search(r'shardwise_batches_in_flight_bucket\{le="1.0"\} (\S+)', metrics).group(1))
        batches = float(re.search(r"shardwise_batches_in_flight_count (\S+)", metrics).group(1))
        assert batches == len(x) and by_itself < batches, metrics  # some batches were sent with another in the pipeline
        np.testing.assert_allclose(np.stack([answers[i] for i in range(len(x))]), want["convnet"], rtol=1e-5,
                                   atol=1e-7)  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, proc.stderr.read()
