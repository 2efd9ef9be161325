"""Parameter server: synchronous runs against one process, asynchronous runs against
their own contract (k = 0 is lock-step, the staleness bound holds, accuracy stays
within a point of synchronous), and workers that die."""

from __future__ import annotations

import json
import os
import subprocess

import cli_fork
import pytest
import torch
from parity import (
    BASE,
    LR,
    TOL,
    assert_all_ranks_match,
    check_layout,
    plain_train,
    reference,
    train_summary,
    train_weights,
    with_data,
)

from shardwise.config import load_config
from shardwise.job import JobContext, run, set_up
from shardwise.ranges import even_bounds
from shardwise.topology import ParallelDims, RankMesh

PS = {"parallel.mode": "ps"}


def test_slices_tile_the_vector_evenly():
    for total, servers in [(10, 3), (7, 7), (100, 1), (5, 2)]:
        bounds = even_bounds(total, servers)
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        sizes = [hi - lo for lo, hi in bounds]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("servers", [1, 2])
@pytest.mark.parametrize("model, optimizer", [("convnet", "sgd"), ("mlp", "adamw")])
def test_synchronous_ps_trains_like_one_process(pool, servers, model, optimizer):
    # AdamW divides by the root of tiny second moments: on the convnet that turns
    # summation-order rounding into 1e-6 differences, for any data-parallel layout
    overrides = {**PS, "parallel.servers": str(servers), "model.name": model, "train.optimizer": optimizer}
    overrides["train.lr"] = LR[optimizer]
    check_layout(pool, overrides, nproc=servers + 2)


@pytest.mark.parametrize("nproc", [2, 3])
def test_colocated_ps_trains_like_one_process(pool, nproc):
    """Every rank a worker and the server of one slice (3 ranks: slices of unequal length);
    the servers clip the whole gradient together."""
    overrides = {**PS, "parallel.colocate": "true", "model.name": "mlp", "train.optimizer": "adamw"}
    overrides |= {"train.lr": LR["adamw"], "train.clip_norm": "0.5", "train.grad_accum": "2"}
    check_layout(pool, overrides, nproc=nproc)


def test_colocated_staleness_never_exceeds_the_bound(pool):
    overrides = {**PS, "parallel.colocate": "true", "ps.asynchronous": "true", "ps.staleness": "2"}
    overrides |= {"ps.slow_worker": "2", "ps.slow_factor": "10", "model.name": "mlp", "train.steps": "30"}
    summary = pool.run(train_summary, overrides, ranks=[0, 1, 2])[0]["ps"]
    seen = [int(k) for k, n in summary["staleness_histogram"].items() for _ in range(n)]
    assert len(seen) == summary["updates"] >= 3 * 30 and max(seen) == 2
    steps = summary["steps_by_worker"]
    assert steps["0"] > steps["2"] and steps["1"] > steps["2"]


def test_a_push_in_half_precision_packs_its_bytes_and_rounds_as_a_cast_does():
    from shardwise.parallel.ps_protocol import PushCodec

    for dtype in (torch.float32, torch.float64):
        for half in (torch.bfloat16, torch.float16):
            codec = PushCodec(dtype, half)
            for n in (1, 7, 8, 1001):
                grad = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(n))
                packed = codec.encode(grad)
                elem = packed.element_size()
                assert packed.dtype == dtype and packed.numel() == codec.words(n) == -(-2 * n // elem)
                assert torch.equal(codec.decode(packed, n), grad.to(half).to(dtype))
    whole = PushCodec.for_method(torch.float32, "none")
    assert whole.words(5) == 5 and whole.encode(torch.ones(5)).numel() == 5


@pytest.mark.parametrize("method, half", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_pushes_are_the_plain_loop_with_each_workers_gradient_rounded(pool, method, half):
    """A synchronous server takes each worker's gradient as the worker rounded it: the run
    is the plain loop whose step averages the workers' rounded gradients (not the plain
    loop itself: the rounding shows)."""
    overrides = with_data({**PS, "parallel.servers": "1", "comm.compression": method})
    states = pool.run(train_weights, overrides, ranks=[0, 1, 2])
    expected = plain_train(overrides, push=(2, half))[0]
    assert_all_ranks_match(expected, states)
    with pytest.raises(AssertionError):  # the rounding shows beyond the tolerance
        assert_all_ranks_match(reference(overrides), states)
    assert pool.run(train_summary, overrides, ranks=[0, 1, 2])[0]["ps"]["pushes"] == str(half).removeprefix("torch.")


def test_synchronous_ps_clips_the_whole_gradient_across_servers(pool):
    overrides = {**PS, "parallel.servers": "2", "train.clip_norm": "0.5", "train.grad_accum": "2"}
    check_layout(pool, overrides, nproc=4)


def test_asynchronous_with_no_staleness_is_the_synchronous_schedule(pool):
    # plain SGD: W steps of g_i / W on a clock add up to the one synchronous step
    plain = {**PS, "parallel.servers": "2", "train.momentum": "0"}
    sync = pool.run(train_weights, plain, ranks=[0, 1, 2, 3])
    asynchronous = pool.run(train_weights, {**plain, "ps.asynchronous": "true"}, ranks=[0, 1, 2, 3])
    assert_all_ranks_match(sync[0], asynchronous)
    summary = pool.run(train_summary, {**plain, "ps.asynchronous": "true"}, ranks=[0, 1, 2, 3])[0]
    assert summary["ps"]["staleness_histogram"] == {"0": 24}


@pytest.mark.parametrize("bound", [1, 3])
def test_staleness_never_exceeds_the_bound(pool, bound):
    # worker rank 3 ten times slower (its sleep, not the shared cores, sets its pace): the others run
    # ahead until the bound stops them
    overrides = {
        **PS,
        "ps.asynchronous": "true",
        "ps.staleness": str(bound),
        "ps.slow_worker": "3",
        "ps.slow_factor": "10",
        "model.name": "mlp",
        "train.steps": "30",
        "train.batch_size": "48",
    }
    summary = pool.run(train_summary, overrides, ranks=[0, 1, 2, 3])[0]["ps"]
    seen = [int(k) for k, n in summary["staleness_histogram"].items() for _ in range(n)]
    assert len(seen) == summary["updates"] >= 3 * 30
    assert max(seen) <= bound
    assert max(seen) == bound  # the straggler makes the bound bite
    steps = summary["steps_by_worker"]
    assert steps["1"] > steps["3"] and steps["2"] > steps["3"]  # the others did the straggler's share


def test_asynchronous_accuracy_within_a_point_of_synchronous(pool):
    digits = {
        **PS,
        "model.name": "mlp",
        "train.steps": "300",
        "train.batch_size": "48",
        "train.eval_every": "0",
        "train.warmup_steps": "20",
        "data.val_fraction": "0.5",  # 899 validation samples: a point is 9 of them, not 3.6
    }
    sync = pool.run(train_summary, digits, ranks=[0, 1, 2, 3])[0]
    stale = {**digits, "ps.asynchronous": "true", "ps.staleness": "2", "ps.slow_factor": "2"}
    asynchronous = pool.run(train_summary, stale, ranks=[0, 1, 2, 3])[0]
    assert sync["val_accuracy"] > 0.9
    assert abs(asynchronous["val_accuracy"] - sync["val_accuracy"]) <= 0.01, (sync, asynchronous)
    assert asynchronous["ps"]["max_staleness"] >= 1


def _train(tmp_path, *args, fault: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SHARDWISE_FAULT": fault}
    cmd = ["train", "--nproc", "4", "--out", str(tmp_path / "run"), *args]
    base = ["--parallel.mode", "ps", "--model.name", "mlp", "--train.steps", "30", "--train.batch_size", "48"]
    cmd += [*base, "--run.progress", "false"]
    return cli_fork.run(cmd, env=env, timeout=120)


def test_asynchronous_servers_carry_on_without_a_dead_worker(tmp_path):
    done = _train(tmp_path, "--ps.asynchronous", "true", "--ps.staleness", "1", fault="2:4:exit")
    assert done.returncode == 0, done.stderr
    assert "rank 2 (a worker) failed (exit 3)" in done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [(x["rank"], x["step"]) for x in summary["ps"]["lost_workers"]] == [(2, 4)]
    assert summary["ps"]["updates"] >= 3 * 30  # the live workers made up the lost one's share
    assert summary["ps"]["steps_by_worker"]["2"] == 4


@pytest.mark.parametrize("mode", ["false", "true"])
def test_a_colocated_job_ends_naming_the_dead_rank(tmp_path, mode):
    """A colocated rank that dies takes its slice of the weights with it: even asynchronous,
    the job ends, naming it."""
    done = _train(tmp_path, "--parallel.colocate", "true", "--ps.asynchronous", mode, fault="1:4:exit")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == "shardwise: rank 1 failed (exit 3): exited with status 3"


def test_a_colocated_servers_error_is_its_ranks_error(tmp_path):
    """A server's own failure (here: a step whose gradient is not finite, with one allowed)
    reaches its worker on the same rank, which ends the job with it, not a hang."""
    done = _train(tmp_path, "--parallel.colocate", "true", "--train.max_bad_steps", "1", fault="1:3:nan")
    assert done.returncode == 1
    assert (
        "train.max_bad_steps: 1 steps in a row with a non-finite loss or gradient (the last at step 4)" in done.stderr
    )


def test_ranges_of_many_tensors_read_and_write_in_one_pass():
    from shardwise.comm.flat import read_range, write_range

    tensors = [torch.arange(6.0).view(2, 3), torch.arange(6.0, 10.0), torch.arange(10.0, 16.0).view(3, 2).t()]
    like = [torch.zeros_like(t) for t in tensors]
    out = torch.empty(7)
    read_range([tensors[0], None, tensors[2]], like, 4, 11, out)  # across all three, the middle one missing
    assert out.tolist() == [4.0, 5.0, 0.0, 0.0, 0.0, 0.0, 10.0]
    write_range(torch.arange(100.0, 107.0), 4, tensors)  # the last one strided: written all the same
    assert tensors[0].flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 100.0, 101.0]
    assert tensors[1].tolist() == [102.0, 103.0, 104.0, 105.0] and tensors[2].reshape(-1)[0].item() == 106.0


def test_synchronous_job_ends_naming_the_dead_worker(tmp_path):
    done = _train(tmp_path, fault="3:4:exit")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == "shardwise: rank 3 failed (exit 3): exited with status 3"


def test_final_weights_are_the_servers_on_every_rank(pool):
    states = pool.run(train_weights, {**PS, "parallel.servers": "2", "ps.asynchronous": "true", "ps.staleness": "2"})
    for state in states[1:]:
        for name in state:
            torch.testing.assert_close(state[name], states[0][name], **TOL)


def _with_fault(spec: str, overrides: dict[str, str], *, group):
    result = run(load_config(None, {**BASE, **overrides}), group=group, context=JobContext(faults=spec))
    return result.summary, result.state_dict


def test_asynchronous_servers_drop_a_non_finite_gradient(pool):
    """Worker rank 2's input turns NaN at its step 5: that one gradient is dropped and
    counted, and the weights every rank ends with are finite."""
    overrides = {**PS, "ps.asynchronous": "true", "ps.staleness": "1", "model.name": "mlp"}
    results = pool.run(_with_fault, "2:4:nan", overrides, ranks=[0, 1, 2])
    summary = results[0][0]
    assert summary["ps"]["skipped_updates"] == 1 and summary["skipped_steps"] == [5]
    assert summary["ps"]["updates"] >= 2 * 12
    assert all(torch.isfinite(v).all() for v in results[0][1].values())


@pytest.mark.parametrize("colocate, optimizer, slots", [("false", "sgd", 1), ("true", "adamw", 2)])
def test_each_server_keeps_its_slice_and_its_state_only(pool, colocate, optimizer, slots):
    """Between them the servers hold every parameter once, each with the optimizer's state
    for it (SGD's momentum, AdamW's two moments and a step count), and nothing more."""
    overrides = {**PS, "parallel.servers": "2", "model.name": "mlp", "train.optimizer": optimizer}
    if colocate == "true":
        overrides = {**PS, "parallel.colocate": "true", "model.name": "mlp", "train.optimizer": optimizer}
    summary = pool.run(train_summary, overrides, ranks=[0, 1, 2, 3])[0]
    params = sum(t.numel() for t in reference(overrides).values())
    ps = summary["ps"]
    assert sum(ps["slice_bytes"]) == 4 * params and len(ps["slice_bytes"]) == (4 if colocate == "true" else 2)
    steps = 4 if optimizer == "adamw" else 0  # AdamW's step count: one float32 a server
    extra = [held - (1 + slots) * piece for held, piece in zip(ps["server_bytes"], ps["slice_bytes"], strict=True)]
    assert extra == [steps] * len(extra)


def _set_up_by_role(overrides: dict[str, str], *, group):
    cfg = load_config(None, {**BASE, **overrides})
    mesh = RankMesh.build(ParallelDims.resolve(cfg.parallel, torch.distributed.get_world_size(group)), group)
    try:
        setup = set_up(cfg, mesh, device=torch.device("cpu"))
        return setup.data is not None, sorted({p.device.type for p in setup.model.parameters()})
    finally:
        mesh.close()


def test_only_the_first_server_holds_the_whole_model_and_data(pool):
    """Server 1 holds only its slice: no data set, and the model on the meta device (names
    and shapes); server 0 scores the weights, the workers train: they hold both."""
    roles = pool.run(_set_up_by_role, {**PS, "parallel.servers": "2", "model.name": "mlp"}, ranks=[0, 1, 2, 3])
    assert roles == [(True, ["cpu"]), (False, ["meta"]), (True, ["cpu"]), (True, ["cpu"])]


def test_a_servers_scorer_holds_no_weights_between_evaluations():
    """The model a server scores with lives on the meta device but while it scores, so a
    server keeps its slice alone; its scores are a plain forward's of the weights it was
    handed."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from shardwise.train.ps_loop import score_flat

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    data = SimpleNamespace(device=torch.device("cpu"), val_batches=lambda: [(x[:12], y[:12]), (x[12:], y[12:])])
    run = score_flat(model, data)
    assert all(p.is_meta for p in model.parameters())
    weights = torch.randn(sum(p.numel() for p in model.parameters()))
    got = run(weights)
    assert all(p.is_meta for p in model.parameters())
    w1, b1, w2, b2 = weights.split([30, 5, 15, 3])
    logits = F.linear(F.relu(F.linear(x, w1.view(5, 6), b1)), w2.view(3, 5), b2)
    assert got["val_accuracy"] == pytest.approx((logits.argmax(1) == y).double().mean().item())
    assert got["val_loss"] == pytest.approx(F.cross_entropy(logits.double(), y).item(), rel=1e-5)
