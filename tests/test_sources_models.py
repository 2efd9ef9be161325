import os

import numpy as np
import pytest
import torch

from shardwise.config import DataConfig, ModelConfig
from shardwise.data.sources import CIFAR_RECORD, load_source
from shardwise.errors import ShardwiseError
from shardwise.models import build_model


def write_cifar(folder, counts, seed=0):
    """CIFAR-10 binary format: per record a label byte, then 3072 pixel bytes (R, G, B planes)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    for name, n in counts.items():
        records = rng.integers(0, 256, (n, CIFAR_RECORD), dtype=np.uint8)
        records[:, 0] = np.arange(n) % 10
        records.tofile(folder / name)
    return folder


def test_cifar_binary_reader(tmp_path):
    folder = write_cifar(tmp_path / "cifar", {"data_batch_1.bin": 30, "data_batch_2.bin": 20, "test_batch.bin": 10})
    ds = load_source(DataConfig(name="cifar10", path=str(folder)), seed=0)
    assert ds.x_train.shape == (50, 3, 32, 32) and ds.x_val.shape == (10, 3, 32, 32)
    assert ds.x_train.dtype == np.float32 and ds.num_classes == 10
    assert list(ds.y_train[:12]) == [*range(10), 0, 1]
    assert abs(float(ds.x_train.mean())) < 1e-3  # standardised with training statistics


def test_cifar_pixel_layout(tmp_path):
    folder = tmp_path / "cifar"
    folder.mkdir()
    record = np.zeros((2, CIFAR_RECORD), dtype=np.uint8)
    record[0, 0], record[0, 1 + 1024 + 5] = 7, 255  # green plane, row 0, column 5
    record.tofile(folder / "data_batch_1.bin")
    record.tofile(folder / "test_batch.bin")
    ds = load_source(DataConfig(name="cifar10", path=str(folder)), seed=0)
    assert ds.y_train[0] == 7
    assert ds.x_train[0, 1, 0, 5] == ds.x_train[0, 1].max() and ds.x_train[0, 1, 0, 5] > ds.x_train[0, 1, 0, 4]


def test_cifar_wrong_size_names_file(tmp_path):
    folder = write_cifar(tmp_path / "cifar", {"data_batch_1.bin": 3})
    with open(folder / "data_batch_1.bin", "ab") as f:
        f.write(b"xx")
    with pytest.raises(
        ShardwiseError, match=r"data\.path: data_batch_1\.bin has 9221 bytes, not a multiple of the 3073"
    ):
        load_source(DataConfig(name="cifar10", path=str(folder)), seed=0)


def test_npz_source(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32)
    y = np.arange(40) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_source(DataConfig(name="npz", path=str(tmp_path / "d.npz"), val_fraction=0.25), seed=0)
    assert ds.x_train.shape == (30, 5) and ds.x_val.shape == (10, 5) and ds.num_classes == 4
    np.savez(tmp_path / "bad.npz", a=x)
    with pytest.raises(ShardwiseError, match="must hold arrays 'x' and 'y'"):
        load_source(DataConfig(name="npz", path=str(tmp_path / "bad.npz")), seed=0)


def test_synthetic_and_digits_shapes():
    ds = load_source(DataConfig(name="synthetic", samples=100, shape=[2, 4, 4], classes=3), seed=1)
    assert ds.in_shape == (2, 4, 4) and ds.num_classes == 3 and len(ds.y_train) + len(ds.y_val) == 100
    again = load_source(DataConfig(name="synthetic", samples=100, shape=[2, 4, 4], classes=3), seed=1)
    assert np.array_equal(ds.x_train, again.x_train)
    digits = load_source(DataConfig(), seed=0)
    assert digits.in_shape == (1, 8, 8) and len(digits.y_train) + len(digits.y_val) == 1797


@pytest.mark.parametrize("name", ["mlp", "convnet", "resnet"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_models_forward_and_know_nothing_of_parallelism(name, shape):
    model = build_model(ModelConfig(name=name, channels=[8, 16, 16]), shape, 10)
    assert model(torch.randn(4, *shape)).shape == (4, 10)
    assert hasattr(model, "features") and hasattr(model, "head")


def test_default_convnet_is_five_conv_three_fc():
    model = build_model(ModelConfig(), (1, 8, 8), 10)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 5
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 3


def test_conv_model_on_tabular_data_refused():
    with pytest.raises(ShardwiseError, match=r"model\.name: convnet needs images"):
        build_model(ModelConfig(name="convnet"), (20,), 3)


def test_the_validation_split_is_scikit_learns_and_later_processes_skip_importing_it(tmp_path, monkeypatch):
    """The digits read from scikit-learn's own file and split by its stratified
    train_test_split; the split's rows kept in the cache, so a later process loads the
    data without importing scikit-learn at all."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from shardwise.config import load_config

    probe = (
        "import sys; from shardwise.config import load_config; from shardwise.data import load_source; "
        "d = load_source(load_config(None, {}).data, seed=0); print(len(d.y_val), 'sklearn' in sys.modules)"
    )
    env = {**os.environ, "SHARDWISE_CACHE": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True) for _ in range(2)]
    assert [r.stdout.split()[1] for r in runs] == ["True", "False"], [r.stderr[-500:] for r in runs]
    assert list(tmp_path.glob("split-*.npz"))
    cfg = load_config(None, {})
    bunch = load_digits()
    x = bunch.data.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0
    _, _, y_train, y_val = train_test_split(
        x, bunch.target, test_size=cfg.data.val_fraction, random_state=0, stratify=bunch.target
    )
    monkeypatch.setenv("SHARDWISE_CACHE", str(tmp_path))
    data = load_source(cfg.data, seed=0)
    assert np.array_equal(data.y_train, y_train) and np.array_equal(data.y_val, y_val)
