"""`predict`: a finished run's model on new raw inputs, preprocessed by the record saved
with its weights, gives the classes the run's own validation gave; from an .npz and from a
folder of image files; bad input is one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cli_fork
import numpy as np
import pytest
import torch

import shardwise
from shardwise.data import load_source
from shardwise.data.inputs import prepare
from shardwise.scoring import preprocess_of, run_model

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"train.steps": 30, "train.eval_every": 0, "run.progress": False, "train.batch_size": 32}


def _classes(path: Path) -> np.ndarray:
    with open(path) as f:
        return np.array([int(row["predicted"]) for row in csv.DictReader(f)])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "run"
    return shardwise.run(shardwise.build_config({**QUICK, "model.name": "mlp"}), nproc=1, out=out)


def test_predict_on_the_raw_validation_digits_gives_the_runs_accuracy(digits_run, tmp_path):
    """The raw validation samples (0..16 intensities, as scikit-learn gives them) become the
    run's validation inputs bit for bit, and their predicted classes score what the run scored."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    _, x_val, _, y_val = train_test_split(
        bunch.data, bunch.target, test_size=0.2, random_state=0, stratify=bunch.target
    )
    raw = tmp_path / "raw.npz"
    np.savez(raw, x=x_val.reshape(-1, 1, 8, 8))
    record = preprocess_of(digits_run.weights)
    assert record["classes"] == [str(i) for i in range(10)] and record["in_shape"] == [1, 8, 8]
    loaded = load_source(shardwise.build_config({}).data, seed=0)
    np.testing.assert_array_equal(prepare(x_val.reshape(-1, 1, 8, 8), record, from_images=False), loaded.x_val)

    out = tmp_path / "p.csv"
    done = cli_fork.run(["predict", str(digits_run.out), "--input", str(raw), "--out", str(out)], cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"inputs": len(y_val), "out": str(out)}
    predicted = _classes(out)
    assert (predicted == y_val).mean() == digits_run.summary["val_accuracy"]
    cfg = shardwise.build_config({"model.name": "mlp"})
    model = run_model(digits_run.out, cfg, (1, 8, 8), 10)
    with torch.no_grad():
        assert np.array_equal(model(torch.from_numpy(loaded.x_val)).argmax(1).numpy(), predicted)
    shardwise.api.predict(digits_run.out, raw, tmp_path / "p.npz")
    with np.load(tmp_path / "p.npz") as saved:
        assert np.array_equal(saved["predicted"], predicted)
        np.testing.assert_allclose(saved["probabilities"].sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "layout", [{"parallel.dp": 2}, {"parallel.tp": 2}, {"parallel.pp": 2, "parallel.dp": 1}], ids=["dp", "tp", "pp"]
)
def test_predict_under_a_layout_gives_the_same_probabilities(digits_run, tmp_path, layout):
    """The weights cut as the layout cuts the model, on 2 ranks: the classes one process
    predicts, the probabilities to float32 rounding."""
    np.savez(tmp_path / "raw.npz", x=np.arange(30 * 64).reshape(30, 1, 8, 8) % 17)
    shardwise.api.predict(digits_run.out, tmp_path / "raw.npz", tmp_path / "one.npz")
    shardwise.api.predict(digits_run.out, tmp_path / "raw.npz", tmp_path / "cut.npz", layout, nproc=2)
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "cut.npz") as cut:
        assert np.array_equal(one["predicted"], cut["predicted"]) and list(cut["input"]) == list(one["input"])
        np.testing.assert_allclose(cut["probabilities"], one["probabilities"], rtol=1e-4, atol=1e-6)
    assert not list(tmp_path.glob("shardwise-score-*"))


def _cifar_folder(folder: Path, n_train: int, n_test: int) -> np.ndarray:
    """CIFAR-10 binary batches of learnable random images; the test images' bytes."""
    rng = np.random.default_rng(3)
    folder.mkdir()
    prototypes = rng.integers(0, 256, (10, 3 * 32 * 32))

    def records(n: int) -> np.ndarray:
        labels = rng.integers(0, 10, n)
        noise = rng.integers(-40, 41, (n, 3 * 32 * 32))
        pixels = np.clip(prototypes[labels] + noise, 0, 255)
        return np.concatenate([labels[:, None], pixels], axis=1).astype(np.uint8)

    records(n_train).tofile(folder / "data_batch_1.bin")
    test = records(n_test)
    test.tofile(folder / "test_batch.bin")
    return test[:, 1:].reshape(-1, 3, 32, 32)


def test_predict_on_a_folder_of_images_reads_them_as_the_run_read_its_bytes(tmp_path):
    """CIFAR-10's test images written as PNG files: the same inputs and the same classes as
    the raw bytes in an .npz, and the class names of CIFAR-10."""
    from PIL import Image

    test = _cifar_folder(tmp_path / "cifar", 256, 24)
    settings = {
        **QUICK,
        "train.steps": 6,
        "model.name": "mlp",
        "data.name": "cifar10",
        "data.path": str(tmp_path / "cifar"),
    }
    run = shardwise.run(shardwise.build_config(settings), nproc=1, out=tmp_path / "run")
    images = tmp_path / "images"
    images.mkdir()
    for i, pixels in enumerate(test):
        Image.fromarray(pixels.transpose(1, 2, 0)).save(images / f"{i:03d}.png")
    np.savez(tmp_path / "raw.npz", x=test)
    shardwise.api.predict(run.out, images, tmp_path / "from_images.csv")
    shardwise.api.predict(run.out, tmp_path / "raw.npz", tmp_path / "from_bytes.csv")
    assert np.array_equal(_classes(tmp_path / "from_images.csv"), _classes(tmp_path / "from_bytes.csv"))
    with open(tmp_path / "from_images.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["input"] == "000.png" and "p_airplane" in rows[0] and len(rows) == 24
    record = preprocess_of(run.weights)
    loaded = load_source(shardwise.build_config(settings).data, seed=0)
    from shardwise.data.inputs import read_inputs

    names, pixels = read_inputs(images, (3, 32, 32))
    np.testing.assert_array_equal(prepare(pixels, record, from_images=True), loaded.x_val)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "NOPE", "--out", "OUT/p.csv"], "input: no such file or folder"),
        (["--input", "RAW", "--out", "OUT/p.txt"], "out: 'OUT/p.txt': write predictions to a .csv or an .npz file"),
        (["--input", "WRONG", "--out", "OUT/p.csv"], "input: WRONG: x has shape (3, 4) (float64); the run's samples"),
        (["--input", "EMPTY", "--out", "OUT/p.csv"], "input: EMPTY holds no image files"),
    ],
    ids=["missing", "suffix", "shape", "no images"],
)
def test_bad_input_is_one_line(digits_run, tmp_path, args, message):
    np.savez(tmp_path / "raw.npz", x=np.zeros((2, 1, 8, 8)))
    np.savez(tmp_path / "wrong.npz", x=np.zeros((3, 4)))
    (tmp_path / "empty").mkdir()
    where = {"RAW": tmp_path / "raw.npz", "WRONG": tmp_path / "wrong.npz", "EMPTY": tmp_path / "empty"}
    where |= {"NOPE": tmp_path / "nope.npz", "OUT": tmp_path}
    for key, value in where.items():
        args, message = [a.replace(key, str(value)) for a in args], message.replace(key, str(value))
    done = cli_fork.run(["predict", str(digits_run.out), *args], cwd=ROOT)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
    assert not list(tmp_path.glob("p.*"))
