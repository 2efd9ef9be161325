"""Each rank holds only what its layout gives it: split layers, feature columns, shards."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from parity import train_summary
from torch import nn

from shardwise.comm.collectives import column_linear
from shardwise.config import DataConfig, ModelConfig
from shardwise.data.features import split_features
from shardwise.data.sources import load_source
from shardwise.errors import ShardwiseError
from shardwise.models import build_model
from shardwise.parallel.part import Part
from shardwise.parallel.tensor import ColumnParallelLinear, apply_tensor_parallel, plan_tensor_parallel
from shardwise.topology import ParallelDims, RankMesh


def _split_shapes(hidden: list[int], classes: int, *, group) -> dict[str, tuple]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", hidden=hidden), (1, 8, 8), classes)
    splits = apply_tensor_parallel(Part(model), RankMesh.single("tp", group)).splits
    return {name: (tuple(p.shape), name in splits) for name, p in model.named_parameters()}


@pytest.mark.parametrize("tp, hidden, classes", [(2, [128, 64], 10), (3, [30, 7], 100), (4, [30, 7], 100)])
def test_tensor_parallel_rank_holds_its_share_of_each_split_layer(pool, tp, hidden, classes):
    full = {
        n: tuple(p.shape)
        for n, p in build_model(ModelConfig(name="mlp", hidden=hidden), (1, 8, 8), classes).named_parameters()
    }
    per_rank = pool.run(_split_shapes, hidden, classes, ranks=list(range(tp)))
    for name, shape in full.items():
        shapes = [r[name][0] for r in per_rank]
        if per_rank[0][name][1]:  # split: the pieces tile the full tensor along one dim
            dim = next(d for d in range(len(shape)) if shapes[0][d] != shape[d] or tp == 1)
            assert sum(s[dim] for s in shapes) == shape[dim], name
            assert max(s[dim] for s in shapes) == -(-shape[dim] // tp), name  # 1/N, rounded up
        else:  # the row layer's bias, added once after the sum, and a narrow last layer stay whole
            assert all(s == shape for s in shapes), name
    # 3 weights and 2 column biases; 10 classes: the last layer whole, 2 weights and 1 bias
    assert sum(r[1] for r in per_rank[0].values()) == (5 if classes > 64 else 3)


def _column_both_ways(shape: tuple[int, ...], bf16: bool, *, group) -> list[bool]:
    """A column layer's output and gradients (input, weight, bias) by `column_linear` and by
    autograd's own F.linear, its input gradient then summed over the group: equal, bit for
    bit?"""
    torch.manual_seed(0)
    layer = ColumnParallelLinear(nn.Linear(shape[-1], 6), group, gather_output=False)
    x = torch.randn(shape)
    results = []
    for mine in (True, False):
        x_, w, b = (t.detach().clone().requires_grad_() for t in (x, layer.weight, layer.bias))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = column_linear(x_, w, b, group) if mine else F.linear(x_, w, b)
        (y.float() * torch.linspace(-1, 2, y.numel()).reshape(y.shape)).sum().backward()
        if not mine:
            dist.all_reduce(x_.grad, group=group)
        results.append((y, x_.grad, w.grad, b.grad))
    return [torch.equal(a, b) for a, b in zip(*results, strict=True)]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_column_layer_overlapped_backward_is_autograds_own(pool, bf16):
    """The column layer's own backward, which all-reduces the input gradient beside the
    weight gradient's product, computes what autograd computes, under autocast too, for a
    batch of rows and of sequences."""
    for shape in [(5, 12), (2, 3, 12)]:
        for rank_result in pool.run(_column_both_ways, shape, bf16, ranks=[0, 1]):
            assert rank_result == [True] * 4, (shape, rank_result)


def test_tensor_parallel_plan_pairs_and_refusals():
    head = build_model(ModelConfig(name="mlp", hidden=[16, 8]), (1, 8, 8), 65).head
    assert plan_tensor_parallel(head, 2) == {"0": "column", "2": "row", "4": "column+gather"}
    assert plan_tensor_parallel(head, 2, skip={"0"}) == {"2": "column", "4": "row"}
    narrow = build_model(ModelConfig(name="mlp", hidden=[16, 8]), (1, 8, 8), 64).head
    assert plan_tensor_parallel(narrow, 2) == {"0": "column", "2": "row"}  # 8 -> 64 computed whole
    with pytest.raises(ShardwiseError, match=r"layer head.2 \(Linear 16->8\) has 8 output features, fewer than tp=9"):
        plan_tensor_parallel(head, 9, skip={"0"})


def test_topology_grid_and_refusals():
    dims = ParallelDims.resolve(_parallel(tp=2, vertical=2), 8)
    assert (dims.dp, dims.vertical, dims.tp) == (2, 2, 2) and dims.layout == "dp=2 x vertical=2 x tp=2"
    assert dims.coords(5) == {"dp": 1, "pp": 0, "spatial": 0, "vertical": 0, "tp": 1}
    assert dims.peers(5, "tp") == [4, 5] and dims.peers(5, "vertical") == [5, 7] and dims.peers(5, "dp") == [1, 5]
    with pytest.raises(
        ShardwiseError, match=r"dp=3 x pp=1 x spatial=1 x tp=2 x vertical=1 = 6 does not equal the world size 4"
    ):
        ParallelDims.resolve(_parallel(dp=3, tp=2), 4)


def test_colocated_parameter_server_grid_and_refusals(tmp_path, capfd):
    dims = ParallelDims.resolve(_parallel(mode="ps", colocate=True), 3)
    assert (dims.dp, dims.servers, dims.first_worker, dims.colocated) == (3, 3, 0, True)
    assert ParallelDims.resolve(_parallel(mode="ps", servers=2), 3).first_worker == 2
    for kw, world, message in [
        ({"servers": 2}, 3, "parallel.servers: =2 with parallel.colocate=true: every one of the 3 ranks is one"),
        ({"dp": 2}, 3, "parallel.dp: =2 with parallel.colocate=true"),
        ({}, 1, "parallel.colocate: =true needs at least 2 ranks (--nproc), got 1"),
    ]:
        with pytest.raises(ShardwiseError, match=f"^{re.escape(message)}"):
            ParallelDims.resolve(_parallel(mode="ps", colocate=True, **kw), world)
    from shardwise.config import load_config
    from shardwise.preflight import layout_fits

    def slow(worker: int, **more: str):
        keys = {"parallel.mode": "ps", "ps.slow_worker": str(worker), "ps.slow_factor": "2", **more}
        return layout_fits(load_config(None, {"train.batch_size": "48", **keys}), 3)

    assert slow(0, **{"parallel.colocate": "true"}).colocated  # rank 0 is a worker too
    with pytest.raises(ShardwiseError, match=r"^ps.slow_worker: =3: not a worker, those are ranks 0 to 2"):
        slow(3, **{"parallel.colocate": "true"})
    with pytest.raises(ShardwiseError, match=r"^ps.slow_worker: =0: not a worker, those are ranks 1 to 2"):
        slow(0)
    from refusals import refused_in_one_line

    refused_in_one_line(
        tmp_path, capfd, {"parallel.colocate": "true"}, "parallel.colocate: =true needs parallel.mode=ps"
    )
    refused_in_one_line(tmp_path, capfd, {"ps.colocate": "true"}, "ps.colocate: moved to parallel.colocate")


def _parallel(**kw):
    from shardwise.config import ParallelConfig

    return ParallelConfig(**kw)


def test_vertical_rank_holds_and_reads_only_its_columns(tmp_path):
    """A rank's data equal its columns of the whole set, and do not change when every
    other column of the file is replaced by NaN: it never reads them."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 2, 3, 4)).astype(np.float32)
    y = rng.integers(0, 3, 120)
    parts = split_features((2, 3, 4), 3, unit="row", split="contiguous")
    full = load_source(DataConfig(name="npz", path=_npz(tmp_path / "full.npz", x, y)), seed=0)
    for k, own in enumerate(parts):
        poisoned = x.reshape(120, -1).copy()
        poisoned[:, np.setdiff1d(np.arange(24), own)] = np.nan
        path = _npz(tmp_path / f"poisoned{k}.npz", poisoned.reshape(x.shape), y)
        mine = load_source(DataConfig(name="npz", path=path), seed=0, features=own)
        assert mine.x_train.shape == (96, len(own)) and np.isfinite(mine.x_train).all()
        np.testing.assert_array_equal(mine.x_train, full.x_train.reshape(96, -1)[:, own])
        np.testing.assert_array_equal(mine.y_train, full.y_train)


def _npz(path, x, y) -> str:
    np.savez(path, x=x, y=y)
    return str(path)


def test_feature_split_units_and_balance():
    assert [len(p) for p in split_features((1, 8, 8), 3, unit="feature", split="contiguous")] == [22, 21, 21]
    channels = split_features((3, 2, 2), 2, unit="channel", split="contiguous")
    assert [list(p) for p in channels] == [list(range(8)), list(range(8, 12))]
    cost = [1 + i // 8 for i in range(64)]  # row r costs 8 (r + 1)
    rows = split_features((1, 8, 8), 3, unit="row", split="balanced", cost=cost)
    contiguous = split_features((1, 8, 8), 3, unit="row", split="contiguous")
    loads = [sum(cost[i] for i in p) for p in rows]
    assert sorted(np.concatenate(rows)) == list(range(64))
    assert max(loads) < max(sum(cost[i] for i in p) for p in contiguous)  # 104 < 120
    assert max(loads) <= 4 / 3 * sum(cost) / 3  # Graham's bound for largest-first
    with pytest.raises(ShardwiseError, match="parallel.feature_cost: has 3 entries, the samples have 64 features"):
        split_features((1, 8, 8), 2, unit="feature", split="balanced", cost=[1, 2, 3])


@pytest.mark.parametrize("shard, dp", [("full", 2), ("full", 4), ("optimizer", 4)])
def test_sharding_divides_what_each_rank_holds(pool, shard, dp):
    overrides = {"model.name": "mlp", "model.hidden": "256,128", "parallel.shard": shard, "train.steps": "2"}
    one = pool.run(train_summary, overrides, ranks=[0])[0]["memory"][0]
    rows = pool.run(train_summary, overrides, ranks=list(range(dp)))[0]["memory"]
    kinds = ("parameters", "gradients", "optimizer") if shard == "full" else ("optimizer",)
    for kind in kinds:
        size = one[f"{kind}_bytes"]
        held = [r[f"{kind}_bytes"] for r in rows]
        assert sum(held) == pytest.approx(size, rel=0.01), kind  # nothing lost or doubled
        assert max(held) <= size / dp * 1.05, (kind, held)  # 1/N each


def _mesh_facts(*, group):
    dims = ParallelDims.resolve(_parallel(tp=2), torch.distributed.get_world_size(group))
    mesh = RankMesh.build(dims, group)
    try:
        names = [name.split("@")[0] for name in mesh.mesh.mesh_dim_names]
        total = torch.tensor([float(torch.distributed.get_rank())])
        torch.distributed.all_reduce(total, group=mesh.device_mesh("tp").get_group())
        return names, list(mesh.mesh.get_coordinate()), [mesh.coords["dp"], mesh.coords["tp"]], total.item()
    finally:
        mesh.close()


def test_one_device_mesh_with_named_axes(pool):
    """dp=2 x tp=2 is one 2-D torch DeviceMesh; its tp sub-group joins neighbouring ranks."""
    facts = pool.run(_mesh_facts)
    for rank, (names, coordinate, coords, total) in enumerate(facts):
        assert names == ["dp", "tp"] and coordinate == coords == [rank // 2, rank % 2]
        assert total == {0: 1, 1: 1, 2: 5, 3: 5}[rank]  # ranks 0+1, 2+3
