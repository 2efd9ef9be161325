"""Checkpoints move between layouts: a checkpoint saved under each of twelve layouts
resumes under each of them, and the next steps equal a plain PyTorch loop that goes
on from the same checkpoint's tensors (float64, to 1e-9).

The checkpoint holds whole tensors under the model's own names (`model/NAME`,
`optim/KEY/NAME`): whatever layout wrote it, the plain loop reads it with
safetensors and torch.optim alone. So the saving side (did every layout assemble
its pieces: tp slices inside FSDP shards, ZeRO-1 pieces, pipeline stages,
parameter-server slices?) and the loading side (does every layout cut them
again?) are each checked against something that is not shardwise.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from parity import LR, TOL64, dataset, plain_train
from safetensors.torch import load_file

from shardwise.config import load_config
from shardwise.job import run

CONFIG = {
    "train.dtype": "float64",
    "data.name": "npz",
    "data.path": dataset("images3"),
    "model.name": "convnet",
    "model.channels": "4,8",
    "model.hidden": "16",
    "train.optimizer": "adamw",
    "train.lr": LR["adamw"],
    "train.weight_decay": "0.01",
    "train.batch_size": "16",
    "train.warmup_steps": "2",
    "train.schedule": "cosine",
    "train.steps": "5",
    "train.log_every": "5",
    "train.eval_every": "0",
    "run.progress": "false",
}
SAVED_AT = 3
LAYOUTS = {
    "1 process": ({}, 1),
    "dp 2": ({}, 2),
    "tp 2": ({"parallel.tp": "2"}, 2),
    "tp 2 x dp 2": ({"parallel.tp": "2", "parallel.dp": "2"}, 4),
    "tp 2 x shard full": ({"parallel.tp": "2", "parallel.dp": "2", "parallel.shard": "full"}, 4),
    "vertical 2": ({"parallel.vertical": "2", "parallel.vertical_unit": "channel"}, 2),
    "pp 2": ({"parallel.pp": "2"}, 2),
    "pp 2 x dp 2": ({"parallel.pp": "2", "parallel.dp": "2"}, 4),
    "pp 2 zero-bubble": ({"parallel.pp": "2", "parallel.schedule": "zero-bubble"}, 2),  # 2 stages a rank
    "spatial 2": ({"parallel.spatial": "2"}, 2),
    "shard optimizer": ({"parallel.shard": "optimizer"}, 2),
    "shard full": ({"parallel.shard": "full"}, 2),
    "sync ps 1 + 2": ({"parallel.mode": "ps"}, 3),
    "sync ps colocated 2": ({"parallel.mode": "ps", "parallel.colocate": "true"}, 2),
}


def _save(overrides: dict[str, str], out: str, *, group) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, {**CONFIG, **overrides, "train.checkpoint_every": str(SAVED_AT)})
    run(cfg, group=group, out_dir=Path(out))


def _resume(overrides: dict[str, str], checkpoint: str, *, group) -> dict[str, torch.Tensor]:
    return run(load_config(None, {**CONFIG, **overrides, "run.resume": checkpoint}), group=group).state_dict


def _read(checkpoint: Path) -> dict:
    """The checkpoint's tensors and position, read with safetensors and json alone."""
    tensors: dict = {}
    for shard in sorted(checkpoint.glob("shard-*.safetensors")):
        tensors |= load_file(str(shard))
    state = json.loads((checkpoint / "state.json").read_text())
    return {**tensors, "step": state["step"], "schedule_step": state["schedule_step"]}


@pytest.fixture(scope="module")
def saved(pool, tmp_path_factory) -> dict[str, Path]:
    """One checkpoint at step 3 from each layout."""
    root = tmp_path_factory.mktemp("reshard")
    folders = {}
    for name, (overrides, nproc) in LAYOUTS.items():
        out = root / name.replace(" ", "-")
        pool.run(_save, overrides, str(out), ranks=list(range(nproc)))
        folders[name] = out / "checkpoints" / f"step-{SAVED_AT:08d}"
    return folders


@functools.cache
def _continued(checkpoint: Path) -> dict[str, torch.Tensor]:
    return plain_train(CONFIG, start=_read(checkpoint))[0]


@functools.cache
def _plain_at_save() -> dict[str, torch.Tensor]:
    optimizer: dict = {}
    weights, _ = plain_train(CONFIG, stop=SAVED_AT, optimizer_out=optimizer)
    return {f"model/{k}": v for k, v in weights.items()} | optimizer


@pytest.mark.parametrize("source", list(LAYOUTS))
def test_every_layout_saves_the_whole_state(saved, source):
    """What each layout wrote after three steps is what the plain loop holds then: the
    weights, and AdamW's step count and both moments of every parameter."""
    tensors = _read(saved[source])
    want = _plain_at_save()
    assert tensors["step"] == tensors["schedule_step"] == SAVED_AT
    assert {k for k in tensors if k.startswith(("model/", "optim/"))} == set(want)
    for name, value in want.items():
        torch.testing.assert_close(
            tensors[name].to(value.dtype), value, **TOL64, msg=lambda m, n=name: f"{source} {n}: {m}"
        )


@pytest.mark.parametrize("target", list(LAYOUTS))
@pytest.mark.parametrize("source", list(LAYOUTS))
def test_a_checkpoint_of_any_layout_resumes_under_any_other(pool, saved, source, target):
    overrides, nproc = LAYOUTS[target]
    states = pool.run(_resume, overrides, str(saved[source]), ranks=list(range(nproc)))
    want = _continued(saved[source])
    for rank, state in enumerate(states):
        for name in want:
            torch.testing.assert_close(
                state[name],
                want[name],
                **TOL64,
                msg=lambda m, r=rank, n=name: f"{source} -> {target}, rank {r} {n}: {m}",
            )
