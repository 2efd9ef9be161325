"""Your own data, named by an import path: a rank trains on exactly the arrays the
function returns (the plain loop on the same arrays as the reference); the datasets
form reads the same; what cannot work is one line."""

from __future__ import annotations

import numpy as np
import pytest
from parity import assert_all_ranks_match, reference, train_weights
from refusals import refused_in_one_line

from shardwise.config import load_config
from shardwise.data import load_source
from shardwise.errors import ShardwiseError

OWN = {"data.name": "examples.digits_data:load", "data.options": '{"val_every": 4}'}
MODEL = {"model.name": "mlp", "model.hidden": "32"}


@pytest.fixture(scope="module")
def as_npz(tmp_path_factory):
    """The example's arrays written to an .npz: what the plain loop reads."""
    from examples.digits_data import load

    arrays = load(val_every=4)
    path = tmp_path_factory.mktemp("own") / "digits.npz"
    np.savez(path, **{k: arrays[k] for k in ("x", "y", "x_val", "y_val")})
    return {"data.name": "npz", "data.path": str(path)}


@pytest.mark.parametrize("layout", [{}, {"parallel.vertical": "2"}], ids=["dp", "vertical"])
def test_own_data_trains_like_the_plain_loop_on_its_arrays(pool, as_npz, layout):
    states = pool.run(train_weights, {**OWN, **MODEL, **layout}, ranks=[0, 1])
    assert_all_ranks_match(reference({**as_npz, **MODEL}), states)


def _data(name: str, **options) -> dict:
    return load_config(None, {"data.name": name, "data.options": __import__("json").dumps(options)}).data


def test_datasets_read_as_the_arrays(tmp_path, monkeypatch):
    """`(train, val)` of map-style datasets (torch's TensorDataset here) gives the same
    samples as the arrays; the class names come from the mapping's `classes`."""
    (tmp_path / "ownsets.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "from examples.digits_data import load\n"
        "def sets():\n"
        "    a = load()\n"
        "    pair = lambda x, y: TensorDataset(torch.from_numpy(x), torch.from_numpy(y))\n"
        "    return pair(a['x'], a['y']), pair(a['x_val'], a['y_val'])\n"
        "def bad_labels():\n"
        "    return {'x': [[1.0], [2.0]], 'y': [0.5, 1.0]}\n"
        "def short():\n"
        "    return {'x': [[1.0], [2.0]], 'y': [0]}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    arrays = load_source(_data("examples.digits_data:load"), seed=0)
    sets = load_source(_data("ownsets:sets"), seed=0)
    for key in ("x_train", "y_train", "x_val", "y_val"):
        np.testing.assert_array_equal(getattr(sets, key), getattr(arrays, key))
    assert arrays.preprocess["classes"][3] == "three" and sets.preprocess["classes"][3] == "3"
    assert arrays.in_shape == (1, 8, 8) and arrays.num_classes == 10
    with pytest.raises(ShardwiseError, match=r"data.name: ownsets:bad_labels: y must be one integer label"):
        load_source(_data("ownsets:bad_labels"), seed=0)
    with pytest.raises(ShardwiseError, match=r"data.name: ownsets:short: x has 2 samples but y has 1"):
        load_source(_data("ownsets:short"), seed=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data.name": "nosuch.data:load"}, "data.name: nosuch.data:load: no module 'nosuch.data'"),
        ({"data.name": "examples.digits_data:nothing"}, "examples.digits_data has no function 'nothing'"),
        ({"data.name": "builtins:dict"}, "data.name: builtins:dict returned a mapping without 'x' and 'y'"),
        ({"data.name": "builtins:list"}, "data.name: builtins:list returned list: expected a mapping with x and y"),
        (
            {**OWN, "data.options": '{"colour": 1}'},
            "data.name: examples.digits_data:load(**data.options) raised TypeError: load() got an unexpected",
        ),
        ({"data.name": "digits", "data.options": '{"a": 1}'}, "data.options: are for your own data's function"),
        ({"data.name": "my data"}, "data.name: unknown data 'my data': a built-in source (digits, synthetic"),
    ],
    ids=["no module", "no function", "no arrays", "wrong type", "function fails", "options of a built-in", "neither"],
)
def test_data_that_cannot_work_is_one_line(tmp_path, capfd, overrides, message):
    refused_in_one_line(tmp_path, capfd, overrides, message)


def test_a_saved_data_path_runs_only_where_named(tmp_path):
    """Scoring a run folder whose config names data code follows it only where the caller names it."""
    from shardwise.config_toml import to_toml
    from shardwise.config_trust import check_code_trust

    cfg = load_config(None, OWN)
    (tmp_path / "config.toml").write_text(to_toml(cfg))
    with pytest.raises(ShardwiseError, match="data.name: .* names code to import, examples.digits_data:load"):
        check_code_trust(cfg, tmp_path, path=None, overrides={})
    check_code_trust(cfg, tmp_path, path=None, overrides={"data.name": OWN["data.name"]})
