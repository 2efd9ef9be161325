"""Shared by the parity tests: train on the pool, compare with a plain PyTorch loop.

The invariant: a layout with global batch B ends with the same weights as one
process with batch B: fp32 within rtol 1e-5 / atol 1e-6 after 12 steps where
no max-pool or ReLU near-tie flips, float64 within 1e-9 at any size.

The reference, :func:`plain_train`, shares no code with shardwise but the model
classes: it reads the arrays of an .npz file these tests write themselves,
takes each step's batch by the documented rule (a new seeded permutation of
the training set each epoch, step t the t-th block of B samples), and trains
with torch.nn, torch.optim, LambdaLR and torch.nn.utils.clip_grad_norm_.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shardwise.config import load_config
from shardwise.job import run
from shardwise.models.convnet import ConvNet
from shardwise.models.mlp import MLP
from shardwise.models.resnet import ResNet

TOL = {"rtol": 1e-5, "atol": 1e-6}
TOL64 = {"rtol": 1e-9, "atol": 1e-9}
BASE = {
    "train.steps": "12",
    "train.batch_size": "48",
    "train.warmup_steps": "3",
    "train.log_every": "4",
    "train.eval_every": "0",
    "run.progress": "false",
}
LR = {"sgd": "0.05", "adamw": "0.003"}
# shardwise's documented defaults (`shardwise train --help`) for what the plain loop reads;
# test_config checks that they still are
DEFAULTS = {
    "model.name": "convnet",
    "model.channels": "32,32,64,64,64",
    "model.hidden": "128,64",
    "model.norm": "group",
    "model.options": "{}",
    "train.lr": "0.05",
    "train.optimizer": "sgd",
    "train.momentum": "0.9",
    "train.weight_decay": "0.0",
    "train.adam_eps": "1e-08",
    "train.schedule": "cosine",
    "train.warmup_steps": "20",
    "train.step_every": "100",
    "train.step_gamma": "0.1",
    "train.clip_norm": "0.0",
    "train.seed": "0",
    "train.grad_accum": "1",
    "train.dtype": "float32",
}


# -- data sets written by the tests -------------------------------------------------
@functools.cache
def _data_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="shardwise-parity-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _standardized(x_train: np.ndarray, x_val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = x_train.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    return ((x_train - mean) / std).astype(np.float32), ((x_val - mean) / std).astype(np.float32)


@functools.cache
def dataset(kind: str) -> str:
    """The path of an .npz file (x, y, x_val, y_val): `digits` (scikit-learn's 8x8 digits,
    1 channel), `images3` (3 x 8 x 8 Gaussian classes), `classes82` (the same with 82
    classes) or `images32` (3 x 32 x 32, the size of CIFAR-10, Gaussian classes with some
    spatial structure)."""
    rng = np.random.default_rng(7)
    if kind == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        x = (bunch.data / 16.0).reshape(-1, 1, 8, 8)
        x_tr, x_va, y_tr, y_va = train_test_split(x, bunch.target, test_size=0.2, random_state=0, stratify=bunch.target)
    else:
        shape, n, n_val = ((3, 32, 32), 384, 96) if kind == "images32" else ((3, 8, 8), 480, 120)
        classes = 82 if kind == "classes82" else 10
        prototypes = rng.standard_normal((classes, *shape))
        if kind == "images32":  # smooth prototypes (neighbouring pixels agree, as in photographs), tinted
            prototypes = np.cumsum(np.cumsum(prototypes, axis=2), axis=3) / 8.0
            prototypes += rng.standard_normal((10, 3, 1, 1))
        y = rng.integers(0, classes, n + n_val)
        x = prototypes[y] + rng.standard_normal((n + n_val, *shape))
        x_tr, x_va, y_tr, y_va = x[:n], x[n:], y[:n], y[n:]
    x_tr, x_va = _standardized(x_tr, x_va)
    path = _data_dir() / f"{kind}.npz"
    np.savez(path, x=x_tr, y=y_tr.astype(np.int64), x_val=x_va, y_val=y_va.astype(np.int64))
    return str(path)


def with_data(overrides: dict[str, str]) -> dict[str, str]:
    """The tests' own digits file unless the overrides name a data source."""
    if "data.name" in overrides:
        return overrides
    return {**overrides, "data.name": "npz", "data.path": dataset("digits")}


# -- the plain PyTorch reference ----------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def plain_model(o: dict[str, str], in_shape: tuple[int, ...], classes: int) -> torch.nn.Module:
    name, hidden, channels = o["model.name"], _ints(o["model.hidden"]), _ints(o["model.channels"])
    if ":" in name:  # the user's own model: its function, imported here by plain Python
        module, _, function = name.partition(":")
        return getattr(importlib.import_module(module), function)(in_shape, classes, **json.loads(o["model.options"]))
    if name == "mlp":
        return MLP(in_shape, classes, hidden=hidden)
    if name == "bag":
        from text_corpus import PlainBag

        return PlainBag(in_shape[0], classes, hidden)
    if name == "convnet":
        return ConvNet(in_shape, classes, channels=channels, hidden=hidden, norm=o["model.norm"])
    return ResNet(in_shape, classes, widths=channels, norm=o["model.norm"])


def _factor(o: dict[str, str]):
    """The documented schedule: linear warm-up, then constant, step or cosine to zero."""
    steps, warmup = int(o["train.steps"]), int(o["train.warmup_steps"])

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        after = step - warmup
        if o["train.schedule"] == "step":
            return float(o["train.step_gamma"]) ** (after // int(o["train.step_every"]))
        if o["train.schedule"] == "cosine":
            span = max(1, steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(after, span) / span))
        return 1.0

    return factor


def plain_train(
    overrides: dict[str, str],
    *,
    start: dict | None = None,
    stop: int | None = None,
    skip: frozenset[int] = frozenset(),
    optimizer_out: dict | None = None,
    norms_out: list | None = None,
    push: tuple[int, torch.dtype] | None = None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train as `overrides` say with nothing but torch; the final weights and each step's
    loss. `start`: the tensors of a checkpoint (`model/NAME`, `optim/KEY/NAME`) and its
    `step` and `schedule_step`, to go on from; `stop`: end after this many steps of the
    configured `train.steps`; `skip`: 1-based steps to skip, as a run does when a step's
    gradient is not finite; `optimizer_out`: filled with the optimizer's state at the end,
    as `optim/KEY/NAME`; `norms_out`: filled with each step's gradient norm (before clipping);
    `push` (workers, dtype): the gradient is the mean of each worker's, over its slice of
    the batch, rounded to dtype, added up in worker order (a parameter server's half-
    precision pushes)."""
    o = {**DEFAULTS, **BASE, **with_data(overrides)}
    assert o["data.name"] == "npz" and o.get("data.partition", "shuffle") == "shuffle", o
    assert push is None or (o.get("train.precision") != "bf16" and o["train.grad_accum"] == "1"), o
    dtype = getattr(torch, o["train.dtype"])
    arrays = np.load(o["data.path"], allow_pickle=False)
    x_all = torch.from_numpy(arrays["x"]).to(dtype)
    y_all = torch.from_numpy(arrays["y"])
    classes = int(max(arrays["y"].max(), arrays["y_val"].max())) + 1
    torch.manual_seed(int(o["train.seed"]))
    model = plain_model(o, tuple(x_all.shape[1:]), classes).to(dtype)
    params = list(model.parameters())
    lr, wd = float(o["train.lr"]), float(o["train.weight_decay"])
    if o["train.optimizer"] == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr, eps=float(o["train.adam_eps"]), weight_decay=wd)
    else:
        optimizer = torch.optim.SGD(params, lr=lr, momentum=float(o["train.momentum"]), weight_decay=wd)
    first, schedule_at = 0, 0
    if start is not None:
        model.load_state_dict({k.removeprefix("model/"): v for k, v in start.items() if k.startswith("model/")})
        optim = [k.split("/", 2) for k in start if k.startswith("optim/")]
        for name, p in model.named_parameters():
            state = {key: start[f"optim/{key}/{name}"].clone() for _, key, of in optim if of == name}
            if state:
                optimizer.state[p] = state
        first, schedule_at = int(start["step"]), int(start["schedule_step"])
        for group in optimizer.param_groups:
            group["initial_lr"] = lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _factor(o), last_epoch=schedule_at - 1)
    n, batch, accum = len(y_all), int(o["train.batch_size"]), int(o["train.grad_accum"])
    seed, clip, per_epoch = int(o["train.seed"]), float(o["train.clip_norm"]), len(y_all) // batch
    losses = []
    for step in range(first, stop or int(o["train.steps"])):
        epoch, pos = divmod(step, per_epoch)
        idx = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n)[pos * batch : (pos + 1) * batch])
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for x, y in zip(x_all[idx].chunk(accum), y_all[idx].chunk(accum), strict=True):
            if o.get("train.precision") == "bf16":  # the forward under autocast, the loss in float32
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(x).float()
            else:
                logits = model(x)
            loss = F.cross_entropy(logits, y) / accum
            loss.backward()
            total += loss.item()
        if push is not None:
            _pushed_gradients(model, x_all[idx], y_all[idx], *push)
        losses.append(total)
        if norms_out is not None:
            norms_out.append(torch.nn.utils.get_total_norm([p.grad for p in params]).item())
        if step + 1 in skip:
            continue
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
    if optimizer_out is not None:
        for name, p in model.named_parameters():
            for key, value in optimizer.state.get(p, {}).items():
                optimizer_out[f"optim/{key}/{name}"] = value.detach().clone()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def _pushed_gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, workers: int, half) -> None:
    """The gradients a parameter server averages from half-precision pushes: each worker's
    slice of the batch, its gradient rounded to `half`, added up in worker order."""
    params, rounded = list(model.parameters()), []
    for xs, ys in zip(x.chunk(workers), y.chunk(workers), strict=True):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xs), ys).backward()
        rounded.append([p.grad.to(half).to(p.dtype) for p in params])
    for p, *grads in zip(params, *rounded, strict=True):
        p.grad = sum(grads[1:], grads[0]) / workers


@functools.cache
def _plain(key: tuple, skip: frozenset[int]) -> dict[str, torch.Tensor]:
    return plain_train(dict(key), skip=skip)[0]


def reference(overrides: dict[str, str], *, skip: frozenset[int] = frozenset()) -> dict[str, torch.Tensor]:
    """The plain loop's weights for the same config, whatever the layout keys say."""
    layout_keys = ("parallel.", "ps.")
    single = {k: v for k, v in with_data(overrides).items() if not k.startswith(layout_keys)}
    return _plain(tuple(sorted(single.items())), skip)


# -- shardwise on the pool ----------------------------------------------------------
def train_weights(overrides: dict[str, str], *, group) -> dict[str, torch.Tensor]:
    return run(load_config(None, {**BASE, **overrides}), group=group).state_dict


def train_summary(overrides: dict[str, str], *, group) -> dict:
    return run(load_config(None, {**BASE, **overrides}), group=group).summary


def initial_weights(overrides: dict[str, str], *, group) -> dict[str, torch.Tensor]:
    return run(load_config(None, {**BASE, **overrides, "train.lr": "1e-30"}), group=group).state_dict


@functools.cache
def _one_process(pool, key: tuple) -> dict[str, torch.Tensor]:
    return pool.run(train_weights, dict(key), ranks=[0])[0]


def one_process(pool, overrides: dict[str, str]) -> dict[str, torch.Tensor]:
    """shardwise on one process, same config except the layout keys (for what the plain
    loop does not do: fixed partitions)."""
    layout_keys = ("parallel.", "ps.")
    single = {k: v for k, v in overrides.items() if not k.startswith(layout_keys)}
    return _one_process(pool, tuple(sorted(single.items())))


def assert_all_ranks_match(reference_state, rank_states, tol: dict | None = None):
    for rank, state in enumerate(rank_states):
        assert state.keys() == reference_state.keys()
        for name in state:
            where = f"rank {rank} {name}"
            torch.testing.assert_close(
                state[name], reference_state[name], **(tol or TOL), msg=lambda m, w=where: f"{w}: {m}"
            )


def check_layout(pool, overrides: dict[str, str], nproc: int, tol: dict | None = None) -> None:
    """Every rank of the layout ends with the plain loop's weights."""
    overrides = with_data(overrides)
    states = pool.run(train_weights, overrides, ranks=list(range(nproc)))
    if tol is None and overrides.get("train.dtype") == "float64":
        tol = TOL64
    assert_all_ranks_match(reference(overrides), states, tol)
