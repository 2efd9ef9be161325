import dataclasses
import subprocess
import sys
import tomllib

import pytest

from shardwise.cli import TEST_AIDS
from shardwise.config import SECTIONS, Config, all_keys, field_docs, load_config
from shardwise.config_toml import to_toml
from shardwise.errors import ShardwiseError


def test_every_field_is_documented():
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section}.{f.name} has no docstring"


def test_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nsteps = 7\nlr = 1\n[model]\nname = "mlp"\nhidden = [5, 6]\n')
    cfg = load_config(path, {"train.steps": "9", "parallel.dp": "2", "run.progress": "false"})
    assert cfg.train.steps == 9 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.name == "mlp" and cfg.model.hidden == [5, 6]
    assert cfg.parallel.dp == 2 and cfg.run.progress is False


def test_resolved_toml_round_trips(tmp_path):
    cfg = load_config(None, {"model.hidden": "3,4", "data.partition": "kmeans", "parallel.dp": "2"})
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
    assert tomllib.loads(path.read_text())["model"]["hidden"] == [3, 4]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.stepz": "3"}, "train.stepz: unknown config key (did you mean train.steps?)"),
        ({"train.steps": "ten"}, "train.steps: expected int, got 'ten'"),
        (
            {"model.name": "vgg"},
            "model.name: unknown model 'vgg': a built-in (mlp, convnet, resnet, bag) or an import path "
            "package.module:function",
        ),
        ({"train.lr": "-1"}, "train.lr: must be positive, got -1.0"),
        ({"data.val_fraction": "1.5"}, "data.val_fraction: must be between 0 and 1, got 1.5"),
        ({"data.name": "cifar10"}, "data.path: is required for data.name=cifar10"),
        ({"data.shards": "4"}, "data.shards: =4 needs a fixed data.partition, not shuffle"),
        ({"comm.topk_ratio": "0"}, "comm.topk_ratio: must be in (0, 1], got 0.0"),
        ({"comm.powersgd_rank": "0"}, "comm.powersgd_rank: must be >= 1, got 0"),
        ({"comm.min_bucket_bytes": "-1"}, "comm.min_bucket_bytes: must be >= 0, got -1"),
        (
            {"comm.compression": "topk", "parallel.shard": "full"},
            "comm.compression: =topk with parallel.shard=full: FSDP2 reduce-scatters its gradients uncompressed;"
            " use parallel.shard=none or optimizer",
        ),
        (
            {"comm.compression": "int8", "parallel.mode": "ps"},
            "comm.compression: =int8 with parallel.mode=ps: a parameter server's pushes go whole or in half "
            "precision (name bf16 or fp16): error feedback would keep residuals on its workers, which its "
            "checkpoints do not hold",
        ),
        (
            {"comm.compression": "bf16", "parallel.mode": "ps", "comm.warmup_steps": "5"},
            "comm.warmup_steps: =5 with parallel.mode=ps: a parameter server's pushes are rounded from the first step",
        ),
        (
            {"comm.compression": "zip"},
            "comm.compression: expected one of none, bf16, fp16, int8, topk, powersgd, auto, got 'zip'",
        ),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ShardwiseError) as err:
        load_config(None, overrides)
    assert str(err.value) == message


def test_wrong_type_in_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nsteps = "many"\n')
    with pytest.raises(ShardwiseError, match="train.steps: expected int, got 'many'"):
        load_config(path)


def test_help_lists_every_key_with_default():
    out = subprocess.run(
        [sys.executable, "-m", "shardwise", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    flat = " ".join(out.split())
    defaults = Config()
    for key in all_keys():
        assert (f"--{key}" in flat) != (key in TEST_AIDS), key  # test aids are accepted, not listed
    assert f"(default: {defaults.train.steps})" in flat
    assert "Global batch: samples per optimizer step" in flat


def test_moved_layout_keys_name_their_new_place_and_old_checkpoints_still_resume(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[ps]\nservers = 2\n")
    with pytest.raises(ShardwiseError, match=r"^ps.servers: moved to parallel.servers"):
        load_config(path)
    # a checkpoint's config.toml written before the move: its keys are taken at their new place
    text = '[model]\nname = "mlp"\n[data]\nvertical = 2\nvertical_unit = "row"\n[ps]\nservers = 3\n'
    cfg = load_config(None, resumed=text)
    assert (cfg.parallel.vertical, cfg.parallel.vertical_unit, cfg.parallel.servers) == (2, "row", 3)
