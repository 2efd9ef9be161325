"""Nothing a run receives is unpickled: every layout trains, writes a checkpoint and
resumes from it with pickle's loaders made to raise in every rank.

Unpickling bytes that come from a peer or a file runs whatever code they name,
so shardwise loads only safetensors and JSON, and sends only tensors (no
`*_object` collective, no torch.load). The guard replaces pickle.loads, load,
Unpickler (Python's and the C accelerator's) and torch.load (with its
weights-only unpickler) in every module that holds them, torch.distributed's
own aliases included, for the length of the run.
"""

from __future__ import annotations

import _pickle
import contextlib
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from parity import BASE, with_data

from shardwise.config import load_config
from shardwise.job import run


class Unpickled(AssertionError):
    pass


def _refuse(*args, **kwargs):
    raise Unpickled("something was unpickled during the run")


class _RefusingUnpickler:
    def __init__(self, *args, **kwargs):
        _refuse()


@contextlib.contextmanager
def no_unpickling():
    """pickle's loaders raise, wherever a module keeps a reference to them."""
    import torch._weights_only_unpickler as weights_only

    loaders = [pickle.loads, pickle.load, _pickle.loads, _pickle.load, pickle._loads, pickle._load]
    loaders += [torch.load, torch.serialization.load, weights_only.load]  # torch.load unpickles, even weights_only
    classes = [pickle.Unpickler, _pickle.Unpickler, pickle._Unpickler, weights_only.Unpickler]
    replacement = {id(f): _refuse for f in loaders} | {id(c): _RefusingUnpickler for c in classes}
    patched = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            if id(value) in replacement and (value in loaders or value in classes):
                patched.append((namespace, name, value))
                namespace[name] = replacement[id(value)]
    try:
        yield len(patched)
    finally:
        for namespace, name, value in patched:
            namespace[name] = value


def _guarded_run(overrides: dict[str, str], out: str, *, group) -> int:
    """Train 4 steps with a checkpoint at 2, then resume from it to 4, all under the guard."""
    Path(out).mkdir(parents=True, exist_ok=True)
    config = {**BASE, **with_data(overrides), "train.steps": "4", "train.checkpoint_every": "2"}
    with no_unpickling() as patched:
        run(load_config(None, config), group=group, out_dir=Path(out))
        checkpoint = Path(out) / "checkpoints" / "step-00000002"
        run(load_config(None, {**config, "run.resume": str(checkpoint)}), group=group)
    return patched


LAYOUTS = {
    "dp 2": ({"model.name": "mlp"}, 2),
    "tp 2 x shard full": ({"model.name": "mlp", "parallel.tp": "2", "parallel.shard": "full"}, 4),
    "vertical 2": ({"model.name": "mlp", "parallel.vertical": "2"}, 2),
    "pp 2 x dp 2": ({"model.name": "mlp", "parallel.pp": "2", "parallel.dp": "2"}, 4),
    "pp 3 gpipe": ({"model.name": "mlp", "parallel.pp": "3", "parallel.schedule": "gpipe"}, 3),
    "spatial 2": ({"model.name": "convnet", "model.channels": "8,16", "parallel.spatial": "2"}, 2),
    "shard optimizer": ({"model.name": "mlp", "parallel.shard": "optimizer"}, 2),
    "ps 2 + 2": ({"model.name": "mlp", "parallel.mode": "ps", "parallel.servers": "2"}, 4),
    "async ps 1 + 2": ({"model.name": "mlp", "parallel.mode": "ps", "ps.asynchronous": "true"}, 3),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_runs_saves_and_resumes_without_unpickling(pool, tmp_path, layout):
    overrides, nproc = LAYOUTS[layout]
    patched = pool.run(_guarded_run, overrides, str(tmp_path / "run"), ranks=list(range(nproc)))
    # at least pickle.loads, pickle.Unpickler and torch.distributed's alias were replaced
    assert all(n >= 3 for n in patched), patched


def _object_collective(*, group) -> str:
    with no_unpickling():
        try:
            dist.broadcast_object_list([{"a": 1}], group_src=0, group=group)
        except Unpickled as e:
            return str(e)
    return "nothing caught"


def test_the_guard_catches_an_object_collective(pool):
    """Not vacuous: torch's *_object collectives unpickle what they receive, and the guard
    stops them (on the receiving rank)."""
    assert pool.run(_object_collective, ranks=[0, 1])[1] == "something was unpickled during the run"


def test_the_guard_catches_torch_load(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.pt")
    with no_unpickling(), pytest.raises(Unpickled):
        torch.load(tmp_path / "weights.pt")
    with no_unpickling(), pytest.raises(Unpickled):
        torch.load(tmp_path / "weights.pt", weights_only=True)
    assert torch.equal(torch.load(tmp_path / "weights.pt")["w"], torch.ones(2))  # restored afterwards
