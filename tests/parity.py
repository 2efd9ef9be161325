"""Shared by the parity tests: train on the pool, compare with one process.

The invariant: a layout with global batch B ends with the same weights as one
process with batch B (fp32, rtol 1e-5 / atol 1e-6), after 12 optimizer steps.
"""

from __future__ import annotations

import functools

import torch

from shardwise.config import load_config
from shardwise.worker import run

TOL = {"rtol": 1e-5, "atol": 1e-6}
BASE = {
    "train.steps": "12",
    "train.batch_size": "48",
    "train.warmup_steps": "3",
    "train.log_every": "4",
    "train.eval_every": "0",
    "run.progress": "false",
}
LR = {"sgd": "0.05", "adamw": "0.003"}


def train_weights(overrides: dict[str, str], *, group) -> dict[str, torch.Tensor]:
    return run(load_config(None, {**BASE, **overrides}), group=group).state_dict


def train_summary(overrides: dict[str, str], *, group) -> dict:
    return run(load_config(None, {**BASE, **overrides}), group=group).summary


def initial_weights(overrides: dict[str, str], *, group) -> dict[str, torch.Tensor]:
    return run(load_config(None, {**BASE, **overrides, "train.lr": "1e-30"}), group=group).state_dict


@functools.cache
def _reference(pool, key: tuple) -> dict[str, torch.Tensor]:
    return pool.run(train_weights, dict(key), ranks=[0])[0]


def reference(pool, overrides: dict[str, str]) -> dict[str, torch.Tensor]:
    """One process, same config except the layout keys."""
    layout_keys = ("parallel.", "ps.", "data.vertical", "data.feature_cost")
    single = {k: v for k, v in overrides.items() if not k.startswith(layout_keys)}
    return _reference(pool, tuple(sorted(single.items())))


def assert_all_ranks_match(reference_state, rank_states):
    for rank, state in enumerate(rank_states):
        assert state.keys() == reference_state.keys()
        for name in state:
            where = f"rank {rank} {name}"
            torch.testing.assert_close(state[name], reference_state[name], **TOL, msg=lambda m, w=where: f"{w}: {m}")


def check_layout(pool, overrides: dict[str, str], nproc: int) -> None:
    states = pool.run(train_weights, overrides, ranks=list(range(nproc)))
    assert_all_ranks_match(reference(pool, overrides), states)
