"""`shardwise serve RUN --nproc N --parallel.*`: the model cut into a layout across ranks,
rank 0 serving; every layout's answers equal `shardwise predict`'s in one process."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import cli_fork
import httpx
import numpy as np
import pytest

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
