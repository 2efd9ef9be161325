"""Checkpoints: bit-exact resume, resharding between layouts, safe loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from parity import BASE, LR, TOL

from shardwise.checkpoint.manifest import latest_checkpoint
from shardwise.checkpoint.store import read_checkpoint
from shardwise.config import load_config
from shardwise.job import run

# a constant rate after warm-up: a run of K steps and one of 2K agree on the first K
RUN = {**BASE, "train.schedule": "constant", "train.deterministic": "true", "model.name": "mlp"}


def _train(overrides: dict[str, str], out: str, *, group) -> dict[str, torch.Tensor]:
    Path(out).mkdir(parents=True, exist_ok=True)
    return run(load_config(None, {**RUN, **overrides}), group=group, out_dir=Path(out)).state_dict


def _resume(overrides: dict[str, str], out: str, checkpoint: str, *, group) -> dict[str, torch.Tensor]:
    return _train({**overrides, "run.resume": checkpoint}, out, group=group)


LAYOUTS = {
    "dp 2 sgd": ({}, 2),
    "dp 2 adamw": ({"train.optimizer": "adamw", "train.lr": LR["adamw"]}, 2),
    "tp 2": ({"parallel.tp": "2"}, 2),
    "tp 2 x shard full": (
        {"parallel.tp": "2", "parallel.dp": "2", "parallel.shard": "full", "train.optimizer": "adamw"},
        4,
    ),
    "vertical 2": ({"parallel.vertical": "2"}, 2),
    "pp 2 x dp 2": ({"parallel.pp": "2", "parallel.dp": "2", "train.optimizer": "adamw", "train.lr": LR["adamw"]}, 4),
    "shard optimizer": ({"parallel.shard": "optimizer", "train.optimizer": "adamw", "train.lr": LR["adamw"]}, 2),
    "shard full": ({"parallel.shard": "full", "train.optimizer": "adamw", "train.lr": LR["adamw"]}, 2),
    "spatial 2": ({"model.name": "convnet", "model.channels": "8,16", "parallel.spatial": "2"}, 2),
    "parameter server 2 + 2": ({"parallel.mode": "ps", "parallel.servers": "2", "train.optimizer": "adamw"}, 4),
    "parameter server colocated on 3": ({"parallel.mode": "ps", "parallel.colocate": "true"}, 3),
    # error feedback's residuals and PowerSGD's factors come back with the weights
    "dp 2 topk": ({"comm.compression": "topk", "comm.topk_ratio": "0.05"}, 2),
    "tp 2 x dp 2 powersgd": ({"parallel.tp": "2", "comm.compression": "powersgd", "comm.powersgd_rank": "2"}, 4),
    "pp 2 x dp 2 int8": ({"parallel.pp": "2", "parallel.dp": "2", "comm.compression": "int8"}, 4),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_resume_continues_bit_exactly(pool, tmp_path, name):
    overrides, nproc = LAYOUTS[name]
    ranks = list(range(nproc))
    whole = pool.run(_train, {**overrides, "train.steps": "12"}, str(tmp_path / "whole"), ranks=ranks)
    pool.run(_train, {**overrides, "train.steps": "6", "train.checkpoint_every": "3"}, str(tmp_path / "a"), ranks=ranks)
    checkpoint = latest_checkpoint(tmp_path / "a" / "checkpoints")
    assert checkpoint is not None and checkpoint.name == "step-00000006"
    resumed = pool.run(_resume, {**overrides, "train.steps": "12"}, str(tmp_path / "a"), str(checkpoint), ranks=ranks)
    for rank, state in enumerate(resumed):
        for key in state:
            assert torch.equal(state[key], whole[rank][key]), f"{name}: rank {rank} {key} differs after resuming"


ADAMW = {"train.optimizer": "adamw", "train.lr": LR["adamw"]}


def test_checkpoint_of_four_ranks_loads_on_one_two_and_three(pool, tmp_path):
    """Weights load exactly; the optimizer state too, seen through the next steps: AdamW's
    moments and step count decide them, and they match the saving layout's own continuation.
    (test_reshard.py runs the whole matrix of layouts against a plain loop.)"""
    steps = {"train.steps": "6", "train.checkpoint_every": "6"}
    pool.run(_train, {**ADAMW, **steps}, str(tmp_path / "saved"), ranks=[0, 1, 2, 3])
    checkpoint = str(tmp_path / "saved" / "checkpoints" / "step-00000006")
    weights = {
        k.removeprefix("model/"): v for k, v in read_checkpoint(Path(checkpoint)).tensors.items() if "model/" in k
    }
    # the saving layout trained on without a stop: its optimizer state never left memory
    reference = pool.run(_train, {**ADAMW, "train.steps": "9"}, str(tmp_path / "ref"), ranks=[0, 1, 2, 3])[0]
    for n in (1, 2, 3):
        layout = {**ADAMW, "train.steps": "6"}
        loaded = pool.run(_resume, layout, str(tmp_path / f"at{n}"), checkpoint, ranks=list(range(n)))
        for state in loaded:
            assert all(torch.equal(state[k], weights[k]) for k in weights), f"weights differ on {n} ranks"
        continued = pool.run(
            _resume, {**layout, "train.steps": "9"}, str(tmp_path / f"on{n}"), checkpoint, ranks=list(range(n))
        )
        for key in reference:
            torch.testing.assert_close(continued[0][key], reference[key], **TOL, msg=f"4 -> {n}: {key}")


def _cut_by(overrides: dict[str, str], out: str, *, group) -> tuple[str, list]:
    Path(out).mkdir(parents=True, exist_ok=True)
    summary = run(load_config(None, {**RUN, **overrides}), group=group, out_dir=Path(out)).summary
    return summary["pipeline"]["cut_by"], [row["first_layer"] for row in summary["pipeline"]["cut"]]


def test_a_deterministic_run_cuts_its_pipeline_by_size_not_by_the_clock(pool, tmp_path):
    """A cut by measured time can differ between a run and its resume (and a per-stage int8
    scale then gives other numbers); train.deterministic cuts by the layers' sizes."""
    pp = {"parallel.pp": "2", "train.steps": "2"}
    sized = pool.run(_cut_by, pp, str(tmp_path / "sized"), ranks=[0, 1])[0]
    timed = pool.run(_cut_by, {**pp, "train.deterministic": "false"}, str(tmp_path / "timed"), ranks=[0, 1])[0]
    # the MLP 64-128-64-10: its first two linear layers weigh alike, the last little: 1 | 2 + 3
    assert sized == ("multiply-adds", [0, 3]) and timed[0] == "measured cost"
