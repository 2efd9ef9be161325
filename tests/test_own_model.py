"""Your own model, named by an import path: it trains under every layout its structure
allows, against the plain loop built from the same function; what cannot work is one line."""

from __future__ import annotations

import pytest
from parity import check_layout
from refusals import refused_in_one_line

from shardwise.errors import ShardwiseError

OWN = {"model.name": "examples.digits_model:build", "model.options": '{"width": 32, "depth": 2}'}


@pytest.mark.parametrize(
    "layout",
    [{}, {"parallel.tp": "2"}, {"parallel.pp": "2"}, {"parallel.shard": "full"}],
    ids=["dp", "tp", "pp", "fsdp"],
)
def test_own_model_trains_like_one_process(pool, layout):
    check_layout(pool, {**OWN, **layout}, nproc=2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"model.name": "nosuch.module:build"},
            "model.name: nosuch.module:build: no module 'nosuch.module' (No module named 'nosuch')",
        ),
        ({"model.name": "examples.digits_model:nothing"}, "examples.digits_model has no function 'nothing'"),
        ({"model.name": "builtins:print"}, "model.name: builtins:print returned NoneType, not an nn.Module"),
        (
            {**OWN, "model.options": '{"colour": 1}'},
            "model.name: examples.digits_model:build(in_shape=(1, 8, 8), num_classes=10, **model.options) raised "
            "TypeError: build() got an unexpected keyword argument 'colour'",
        ),
        ({"model.name": "torch.nn:Identity", "parallel.tp": "2"}, "parallel.tp: Identity has no `head`"),
        ({"model.name": "torch.nn:Identity", "parallel.pp": "2"}, "parallel.pp: Identity is not a `features`"),
        (
            {"model.name": "torch.nn:Identity", "train.activation_checkpointing": "layers"},
            "train.activation_checkpointing: layers needs the model's layers as a `features` then a `head`",
        ),
        ({"model.name": "mlp", "model.options": '{"width": 3}'}, "model.options: are for your own model's function"),
        ({"model.name": "my model"}, "model.name: unknown model 'my model': a built-in (mlp, convnet, resnet, bag)"),
    ],
    ids=[
        "no module",
        "no function",
        "not a module",
        "function fails",
        "tp needs a head",
        "pp needs stacks",
        "checkpointing needs stacks",
        "options of a built-in",
        "neither",
    ],  # fmt: skip
)
def test_a_model_that_cannot_work_is_one_line(tmp_path, capfd, overrides, message):
    refused_in_one_line(tmp_path, capfd, overrides, message)


def test_model_options_round_trip_and_refuse_what_toml_cannot_hold():
    from shardwise.config import load_config
    from shardwise.config_toml import to_toml

    cfg = load_config(None, OWN)
    assert load_config(None, resumed=to_toml(cfg)).model.options == {"width": 32, "depth": 2}
    with pytest.raises(ShardwiseError, match="model.options: expected a table"):
        load_config(None, {**OWN, "model.options": '{"width": null}'})


def test_the_readme_command_runs_from_the_installed_script(tmp_path):
    """`shardwise` (the console script, whose own folder is first on its import path) finds
    a model module in the folder it runs from, as the README shows."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "shardwise"
    args = ["--model.options", '{"width": 96}', "--train.steps", "2", "--run.progress", "false"]
    done = subprocess.run(
        [str(script), "train", "--model.name", "examples.digits_model:build", *args, "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
