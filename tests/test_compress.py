"""Gradient compression: each method against plain torch arithmetic written here, error
feedback carrying exactly what was not sent, and training under it."""

import dataclasses
import json
import math

import pytest
import torch
from parity import train_summary, train_weights, with_data

from shardwise.bench.compression import WARMUP, auto_sides, median_time, steps_to, time_to_target
from shardwise.comm.compress import CompressionSettings, Compressor, Entry
from shardwise.comm.topk import largest
from shardwise.config import ParallelConfig
from shardwise.topology import ParallelDims

SHAPES = {"w": (64, 32), "b": (7,)}
STEPS = 6


def _grad(rank: int, step: int) -> torch.Tensor:
    """Rank `rank`'s flat gradient at `step`: the matrix, then the vector (heavy-tailed, as
    gradients are, so top-k has something to choose)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    n = sum(math.prod(s) for s in SHAPES.values())
    return torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4


def _entries() -> list[Entry]:
    out, offset = [], 0
    for name, shape in SHAPES.items():
        out.append(Entry(name, offset, shape))
        offset += math.prod(shape)
    return out


def _run(settings: dict, *, group) -> dict:
    """Every step's applied average on this rank, its residual at the end, its bytes."""
    import torch.distributed as dist

    comp = Compressor(CompressionSettings(**settings), group)
    rank = dist.get_rank(group)
    applied = []
    for step in range(STEPS):
        applied.append(comp.average(_grad(rank, step).clone(), _entries()).clone())
        comp.end_step()
    residual = torch.cat([comp.residuals.get(e.name, torch.zeros(e.shape)).reshape(-1) for e in _entries()])
    return {"applied": applied, "residual": residual, "bytes": comp.bytes_sent}


def _exact(step: int, world: int) -> torch.Tensor:
    return sum(_grad(r, step) for r in range(world)) / world


@pytest.mark.parametrize("method", ["int8", "topk", "powersgd"])
def test_error_feedback_loses_nothing_it_only_delays(pool, method):
    """sum over steps of what was applied + the ranks' mean residual == sum of the exact
    averages: what compression held back is still owed, none of it dropped."""
    world = 2
    out = pool.run(_run, {"method": method, "topk_ratio": 0.05, "powersgd_rank": 1}, ranks=[0, 1])
    for step in range(STEPS):  # every rank applies the same average
        assert torch.equal(out[0]["applied"][step], out[1]["applied"][step])
    applied = sum(out[0]["applied"])
    owed = sum(o["residual"] for o in out) / world
    exact = sum(_exact(s, world) for s in range(STEPS))
    assert torch.allclose(applied + owed, exact, atol=1e-5), (applied + owed - exact).abs().max()
    assert (applied - exact).abs().max() > 1e-3  # lossy: without the residual the sums would part


def test_int8_and_topk_send_what_plain_torch_computes(pool):
    """The first step (no residual yet) against the quantisation and the selection done by
    hand: int8 with one scale per block of 1024 entries (the last one short), top-k by
    magnitude; and the bytes each sends."""
    n = sum(math.prod(s) for s in SHAPES.values())
    grads = [_grad(r, 0) for r in range(2)]

    def int8(g):
        out = []
        for block in g.split(1024):
            scale = block.abs().max() / 127
            out.append(torch.round(block / scale).clamp(-127, 127) * scale)
        return torch.cat(out)

    def topk(g, k):
        keep = torch.zeros_like(g)
        index = g.abs().argsort(descending=True)[:k]
        keep[index] = g[index]
        return keep

    got = pool.run(_run, {"method": "int8"}, ranks=[0, 1])[0]
    assert torch.allclose(got["applied"][0], (int8(grads[0]) + int8(grads[1])) / 2, atol=1e-6)
    assert n == 2055 and got["bytes"] == STEPS * (3 * 1024 + 3 * 4)  # a byte per entry of 3 blocks, 3 scales
    k = math.ceil(0.1 * n)
    got = pool.run(_run, {"method": "topk", "topk_ratio": 0.1}, ranks=[0, 1])[0]
    assert torch.allclose(got["applied"][0], (topk(grads[0], k) + topk(grads[1], k)) / 2, atol=1e-6)
    assert got["bytes"] == STEPS * k * 8  # a float32 value and an int32 index each


def test_powersgd_is_one_power_step_done_by_hand(pool):
    """Two steps of rank 2 against the algorithm written out in plain torch: the mean of the
    ranks' matrices (with their residuals) times Q, orthonormalised, Q = M^T P, the average
    P Q^T; the second step starts from the first's Q (warm start); the vector goes whole."""
    import zlib

    got = pool.run(_run, {"method": "powersgd", "powersgd_rank": 2}, ranks=[0, 1])
    q = torch.randn(32, 2, generator=torch.Generator().manual_seed(zlib.crc32(b"w")))
    owed = [torch.zeros(64, 32), torch.zeros(64, 32)]
    for step in range(2):
        mats = [_grad(r, step)[: 64 * 32].view(64, 32) + owed[r] for r in range(2)]
        mean = (mats[0] + mats[1]) / 2
        p = torch.linalg.qr(mean @ q, mode="reduced").Q
        q = mean.t() @ p
        approx = p @ q.t()
        owed = [m - approx for m in mats]
        want = torch.cat([approx.reshape(-1), _exact(step, 2)[64 * 32 :]])
        assert torch.allclose(got[0]["applied"][step], want, atol=1e-5), step
        assert (approx - mean).abs().max() > 1e-2  # rank 2 of a 64 x 32 matrix: lossy


def _run_nonfinite(method: str, *, group) -> dict:
    """Step 2's gradient on rank 1 is NaN in one entry: the loop skips such a step."""
    import torch.distributed as dist

    comp = Compressor(CompressionSettings(method, powersgd_rank=1, topk_ratio=0.05), group)
    rank, applied, finite, qs, verdicts = dist.get_rank(group), [], [], [], []
    for step in range(STEPS):
        g = _grad(rank, step).clone()
        if step == 2 and rank == 1:
            g[3] = float("nan")
        out = comp.average(g, _entries()).clone()
        applied.append(out)
        finite.append(bool(torch.isfinite(out).all()))
        qs.append(comp.q["w"].clone() if method == "powersgd" else None)
        comp.end_step()
        verdicts.append(comp.take_verdict())
        assert comp.take_verdict() is None  # taken once: a later step without one looks again
    residual = torch.cat([comp.residuals[e.name].reshape(-1) for e in _entries()])
    return {"applied": applied, "finite": finite, "residual": residual, "qs": qs, "verdicts": verdicts}


@pytest.mark.parametrize("method", ["int8", "topk", "powersgd"])
def test_a_non_finite_step_leaves_the_residuals_and_factors_as_they_were(pool, method):
    """A NaN on one rank makes that step's average NaN everywhere (the loop skips it); the
    residuals and PowerSGD's Q stay as they were, so later steps are finite again and the
    error-feedback sum holds over the steps that counted."""
    out = pool.run(_run_nonfinite, method, ranks=[0, 1])
    assert out[0]["finite"] == [s != 2 for s in range(STEPS)] == out[1]["finite"]
    # the compressor's word, which spares the loop its own pass over the gradients: the same
    assert out[0]["verdicts"] == out[0]["finite"] == out[1]["verdicts"]
    _step_2_counts_for_nothing(out, method)


def _step_2_counts_for_nothing(out: list[dict], method: str) -> torch.Tensor:
    """PowerSGD's Q after step 2 is the one after step 1, and what was applied on the other
    steps plus the ranks' mean residual is the sum of their exact averages; the mean residual."""
    if method == "powersgd":
        assert torch.equal(out[0]["qs"][2], out[0]["qs"][1])
    counted = [s for s in range(STEPS) if s != 2]
    applied = sum(out[0]["applied"][s] for s in counted)
    owed = (out[0]["residual"] + out[1]["residual"]) / 2
    exact = sum(_exact(s, 2) for s in counted)
    assert torch.allclose(applied + owed, exact, atol=1e-5), (applied + owed - exact).abs().max()
    return owed


def _run_skipped(method: str, then: str, *, group) -> dict:
    """The matrix and the vector in two buckets, as DDP hands them over; at step 2 rank 1's
    vector is NaN, so the loop skips the step and tells the compressor. From step 2 on the
    method is `then` (auto's trial keeping another: a lossless one settles the residuals)."""
    import dataclasses

    import torch.distributed as dist

    comp = Compressor(CompressionSettings(method, powersgd_rank=1, topk_ratio=0.05), group)
    rank, applied, qs = dist.get_rank(group), [], []
    buckets = [[e] for e in _entries()]
    for step in range(STEPS):
        if step == 2:
            comp.settings = dataclasses.replace(comp.settings, method=then)
        g = _grad(rank, step).clone()
        if step == 2 and rank == 1:
            g[-1] = float("nan")
        out = []
        for (e,) in buckets:
            flat = g[e.offset : e.offset + e.numel].clone()
            if comp.unsettled(flat):
                comp.settle(flat, [Entry(e.name, 0, e.shape)])
            out.append(comp.average(flat, [Entry(e.name, 0, e.shape)]).clone())
        comp.end_step()
        applied.append(torch.cat(out))
        if not bool(torch.isfinite(applied[-1]).all()):
            comp.skipped()
        qs.append(comp.q["w"].clone() if "w" in comp.q else None)
    residual = torch.cat([comp.residuals.get(e.name, torch.zeros(e.shape)).reshape(-1) for e in _entries()])
    return {"applied": applied, "residual": residual, "qs": qs, "owes": sorted(comp.residuals)}


@pytest.mark.parametrize("method, then", [("int8", "int8"), ("topk", "topk"), ("powersgd", "powersgd"),
                                          ("topk", "none")])  # fmt: skip
def test_a_skipped_step_takes_back_what_its_finite_buckets_did_to_the_residuals(pool, method, then):
    """A step skipped for one bucket's NaN leaves every residual (and PowerSGD's Q) as it
    was before the step, the finite bucket's too, so the error-feedback sum holds over the
    steps applied; a residual settled into the skipped step is still owed and settled by
    the next one."""
    out = pool.run(_run_skipped, method, then, ranks=[0, 1])
    finite = [bool(torch.isfinite(a).all()) for a in out[0]["applied"]]
    assert finite == [s != 2 for s in range(STEPS)]
    assert bool(torch.isfinite(out[0]["applied"][2][: 64 * 32]).all())  # the matrix's bucket was finite
    owed = _step_2_counts_for_nothing(out, method)
    if then == "none":
        assert out[0]["owes"] == [] and owed.abs().max() == 0  # settled by step 3


def test_half_precision_is_the_half_precision_sum(pool):
    """bf16: each rank's halved gradient in bfloat16, added in bfloat16 (as gloo adds them)."""
    got = pool.run(_run, {"method": "bf16"}, ranks=[0, 1])[0]
    halves = [_grad(r, 0).to(torch.bfloat16) / 2 for r in range(2)]
    assert torch.equal(got["applied"][0], (halves[0] + halves[1]).float())
    assert got["residual"].abs().max() == 0  # rounding, not dropping: no residual kept


MLP = {"model.name": "mlp", "model.hidden": "64", "train.steps": "60", "train.batch_size": "32"}


@pytest.mark.parametrize("exact", [{"comm.warmup_steps": "8"}, {"comm.min_bucket_bytes": str(2**20)}])
def test_warm_up_steps_and_small_buckets_average_exactly_as_ddp_does(pool, exact):
    """While warming up, and on a bucket under comm.min_bucket_bytes (here the MLP's one
    bucket), the hook runs DDP's own all-reduce: bit-identical weights to no compression."""
    plain = pool.run(train_weights, with_data({**MLP, "train.steps": "8"}), ranks=[0, 1])[0]
    held = {**MLP, "train.steps": "8", "comm.compression": "topk"} | exact
    held = pool.run(train_weights, with_data(held), ranks=[0, 1])[0]
    assert plain.keys() == held.keys()
    assert all(torch.equal(plain[k], held[k]) for k in plain)


def test_every_method_trains_under_data_parallelism(pool):
    """Each method trains the digits MLP on dp=2 to within two points of uncompressed
    training, and the compressed ones send fewer bytes (each rank's count, in the summary)."""
    results = {}
    for method in ["none", "bf16", "int8", "topk", "powersgd"]:
        o = {**MLP, "comm.compression": method, "comm.topk_ratio": "0.05", "comm.warmup_steps": "5"}
        results[method] = pool.run(train_summary, with_data(o), ranks=[0, 1])[0]
    base = results["none"]["val_accuracy"]
    assert base > 0.85 and "compression" not in results["none"]
    for method, summary in results.items():
        assert summary["val_accuracy"] > base - 0.02, (method, summary["val_accuracy"], base)
    sent = {m: s["compression"]["ratio"] for m, s in results.items() if m != "none"}
    assert 0.5 < sent["bf16"] < 0.55  # half the bytes after the warm-up's 5 of 60 steps
    assert sent["int8"] < 0.35 and sent["topk"] < 0.2 and sent["powersgd"] < 0.3, sent


def _saved(overrides: dict, out: str, *, group) -> None:
    from pathlib import Path

    from parity import BASE

    from shardwise.config import load_config
    from shardwise.job import run

    Path(out).mkdir(parents=True, exist_ok=True)
    run(load_config(None, {**BASE, **with_data(overrides)}), group=group, out_dir=Path(out))


def test_a_checkpoint_owes_the_mean_residual_and_another_world_takes_it(pool, tmp_path):
    """Saved on tp 2 x dp 2 with top-k: each tensor's owed gradient, whole, is the mean of the
    data-parallel ranks' residuals (their tensor-parallel pieces joined, checked here by
    hand from the ranks' own records); a resume on 2 ranks without tp trains on from it."""
    from shardwise.checkpoint.store import read_checkpoint

    o = {**MLP, "train.steps": "6", "train.checkpoint_every": "6", "parallel.tp": "2"}
    o |= {"comm.compression": "topk", "comm.topk_ratio": "0.05"}
    pool.run(_saved, o, str(tmp_path / "a"), ranks=[0, 1, 2, 3])
    folder = tmp_path / "a" / "checkpoints" / "step-00000006"
    tensors = read_checkpoint(folder).tensors
    # ranks 0 and 2 hold tp piece 0, ranks 1 and 3 piece 1 (dp is the outer axis)
    name = "head.0.weight"  # column-parallel: cut along its rows
    pieces = [
        (tensors[f"comm/rank{a}/residual/{name}"] + tensors[f"comm/rank{b}/residual/{name}"]) / 2
        for a, b in [(0, 2), (1, 3)]
    ]
    assert torch.allclose(tensors[f"comm/residual/{name}"], torch.cat(pieces, dim=0), atol=1e-7)
    assert tensors[f"comm/residual/{name}"].abs().max() > 0
    resumed = {**o, "train.steps": "9", "train.checkpoint_every": "3", "parallel.tp": "1", "run.resume": str(folder)}
    pool.run(_saved, resumed, str(tmp_path / "a"), ranks=[0, 1])
    assert (tmp_path / "a" / "checkpoints" / "step-00000009").is_dir()


def _saved_with_fault(overrides: dict, out: str, faults: str, *, group) -> None:
    from pathlib import Path

    from parity import BASE

    from shardwise.config import load_config
    from shardwise.job import JobContext, run

    Path(out).mkdir(parents=True, exist_ok=True)
    run(load_config(None, {**BASE, **with_data(overrides)}), group=group, out_dir=Path(out),
        context=JobContext(faults=faults))  # fmt: skip


def _weights_with_fault(overrides: dict, faults: str, *, group) -> dict:
    from parity import BASE

    from shardwise.config import load_config
    from shardwise.job import JobContext, run

    return run(
        load_config(None, {**BASE, **with_data(overrides)}), group=group, context=JobContext(faults=faults)
    ).state_dict


@pytest.mark.parametrize("method", ["powersgd", "int8"])
def test_the_loop_skips_a_step_on_the_compressors_word(pool, method):
    """dp 2: rank 1's loss is inf at step 3, so its gradients are NaN and rank 0's loss is
    finite. Rank 0 does not look at its averaged gradients (the compressor judged every
    bucket) and must still skip the step: both ranks end with the same finite weights."""
    o = {**MLP, "train.steps": "5", "comm.compression": method}
    weights = pool.run(_weights_with_fault, o, "1:3:inf-loss", ranks=[0, 1])
    for key, t in weights[0].items():
        assert bool(torch.isfinite(t).all()) and torch.equal(t, weights[1][key]), key


def test_the_loop_takes_back_the_residuals_of_a_step_it_skips(pool, tmp_path):
    """tp 2 x dp 2 with top-k; rank 3's loss is inf at step 6 (its gradients NaN), so one
    data-parallel pair averages NaN and the other finite gradients, and every rank skips
    the step. Each rank's residuals saved after step 6 are those saved after step 5."""
    from shardwise.checkpoint.store import read_checkpoint

    o = {**MLP, "train.steps": "6", "train.checkpoint_every": "1", "parallel.tp": "2"}
    o |= {"comm.compression": "topk", "comm.topk_ratio": "0.05"}
    pool.run(_saved_with_fault, o, str(tmp_path), "3:5:inf-loss", ranks=[0, 1, 2, 3])
    before, after = (read_checkpoint(tmp_path / "checkpoints" / f"step-{s:08d}").tensors for s in (5, 6))
    owed = [k for k in before if "/residual/" in k and k.startswith("comm/rank")]
    assert len(owed) >= 4 and owed == [k for k in after if "/residual/" in k and k.startswith("comm/rank")]
    for key in owed:
        assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[k], read_checkpoint(tmp_path / "checkpoints" / "step-00000004").tensors[k])
               for k in owed)  # fmt: skip


@pytest.mark.parametrize("n, k", [(2**17, 1311), (2**20, 100), (2**18, 2000), (1000, 10)])  # the last: plain topk
def test_the_sampled_threshold_picks_exactly_torchs_top_k(n, k):
    """Top-k over a bucket goes through a sampled threshold first: the set it picks is
    torch.topk's, on heavy-tailed magnitudes and on many equal small ones."""
    g = torch.Generator().manual_seed(n + k)
    x = (torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4).abs()
    x[: n // 3] = 1e-3  # a third tied at one small value, as clipped or quantised gradients are
    want = set(torch.topk(x, k).indices.tolist())
    assert set(largest(x, k).tolist()) == want
    bad = n // 2 + 1  # not in the strided sample: a small gradient's entry gone bad
    x[bad] = float("nan")
    assert bad in set(largest(x, k).tolist())  # sent, so the average says so


def test_time_to_target_counts_the_warm_up_at_the_uncompressed_step(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 20, "val_accuracy": 0.9}, {"step": 10, "loss": 1.0}, {"step": 40, "val_accuracy": 0.96}]
    rows.append({"step": 60, "val_accuracy": 0.97})
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert steps_to(metrics, 0.95) == (40, 0.97)
    assert steps_to(metrics, 0.99) == (None, 0.97)
    assert WARMUP == 10  # the bench's warm-up: 10 steps at none's 0.2 s, then 30 at the method's 0.05 s
    assert time_to_target(40, 0.05, 0.2) == pytest.approx(10 * 0.2 + 30 * 0.05)
    assert time_to_target(None, 0.05, 0.2) is None
    # auto's trial: its steps after the warm-up at each candidate's time, then the kept method's
    assert time_to_target(40, 0.05, 0.2, [0.1] * 10) == pytest.approx(10 * 0.2 + 10 * 0.1 + 20 * 0.05)
    assert time_to_target(15, 0.05, 0.2, [0.1] * 10) == pytest.approx(10 * 0.2 + 5 * 0.1)
    # over seeds, the median time: a seed that never reaches the target is slower than any
    # that does, and where the median seed never does, the method never does
    assert median_time([(40, [], 0.05), (None, [], 0.05), (60, [], 0.05)], 0.2) == pytest.approx(2 + 50 * 0.05)
    assert median_time([(40, [], 0.05), (None, [], 0.05), (None, [], 0.05)], 0.2) is None
    # auto: each seed with its own trial and the step of the method it kept (3.0, 6.0 and 3.0 s)
    runs = [(20, [0.1] * 10, 0.05), (40, [0.3] * 10, 0.05), (50, [], 0.025)]
    assert median_time(runs, 0.2) == pytest.approx(2 + 40 * 0.025)
    # priced at the side of the method each run kept: auto's own where its timed runs kept it
    assert auto_sides(["topk", "powersgd", "topk"], "topk") == ["auto", "powersgd rank 4", "auto"]
    assert auto_sides(["topk", "powersgd", "topk"], "powersgd") == ["topk 1%", "auto", "topk 1%"]
    assert auto_sides(["fp16", "bf16", "bf16"], "bf16") == ["auto", "auto", "auto"]  # no fp16 side: auto's


def test_auto_weighs_the_bytes_saved_against_the_compute_spent(monkeypatch):
    """Each method's collectives by hand on a link with no per-message cost (a ring of 2
    ranks sends half a tensor's bytes each way), and the choice: none where the link is
    fast, a compressor where it is slow."""
    from shardwise.comm.cost import Link
    from shardwise.plan import compression
    from shardwise.plan.compression import bucket_plan, choose, collective_seconds, shortlist

    def method_seconds(*args) -> dict[str, float]:  # each method's averaging, bucket by bucket
        return {method: seconds for method, (seconds, _) in bucket_plan(*args).items()}

    link, shapes = Link.from_rate(8e9), [(64, 32), (64,)]  # a byte a nanosecond; 2112 entries
    beta = link.beta_s_per_byte

    def comm(method: str, **kw) -> float:
        return collective_seconds(shapes, CompressionSettings(method, **kw), link, 2)

    assert comm("none") == pytest.approx(4 * 2112 * beta)  # all-reduce: 2 (n - 1) / n of 4 bytes each
    assert comm("bf16") == pytest.approx(2 * 2112 * beta)
    # a link measured to sum fp16 at 3x float32's cost a byte prices fp16 so (bf16: not measured)
    link = dataclasses.replace(link, collectives={"all_reduce_fp16": (0.0, 3.0)})
    assert comm("fp16") == pytest.approx(3 * 2 * 2112 * beta) and comm("bf16") == pytest.approx(2 * 2112 * beta)
    link = Link.from_rate(8e9)
    assert comm("int8") == pytest.approx((3 * 1024 + 3 * 4) * beta)  # the other rank's 3 blocks and scales
    assert comm("topk", topk_ratio=0.01) == pytest.approx(2 * 22 * 4 * beta)  # k = 22 values, 22 indices
    # rank 4: P is 64 x 4 and Q 32 x 4 for the matrix; the vector goes whole with the Ps
    assert comm("powersgd", powersgd_rank=4) == pytest.approx(4 * (64 * 4 + 64) * beta + 4 * 32 * 4 * beta)
    big = [(2048, 2048), (2048,)]
    fast = method_seconds(big, CompressionSettings(), Link.from_rate(1e13), 2)
    slow = method_seconds(big, CompressionSettings(warmup_steps=10), Link.from_rate(1e8), 2)  # warm-up aside
    assert choose(fast)[0] == "none" and choose(slow)[0] in ("topk", "powersgd"), (fast, slow)
    # the compute is the compressing code's, whatever warm-up the run asks for (its one
    # bucket's compute timed with no warm-up: 1 s here, a warm-up's path 0)
    monkeypatch.setattr(compression, "compute_seconds", lambda b, s, dp: 0.0 if s.warmup_steps else 1.0)
    slow_priced = method_seconds(big, CompressionSettings(warmup_steps=10), Link.from_rate(1e8), 2)
    own = slow_priced["powersgd"] - collective_seconds(big, CompressionSettings("powersgd"), Link.from_rate(1e8), 2)
    assert own == pytest.approx(1.0), own
    assert choose(slow)[1].startswith(f"{choose(slow)[0]}: ")
    # a method replaces none only where it saves its margin: a lossless one a tenth of none's
    # time, a lossy one a third (it may also need more steps, which no prediction sees)
    assert choose({"none": 1.0, "bf16": 0.95, "topk": 1.5})[0] == "none"
    assert choose({"none": 1.0, "bf16": 0.85, "topk": 0.7})[0] == "bf16"
    assert choose({"none": 1.0, "bf16": 0.85, "topk": 0.55})[0] == "topk"
    # a lossy method is judged against the fastest lossless one: it risks accuracy, they do not
    assert choose({"none": 1.0, "bf16": 0.85, "topk": 0.6})[0] == "bf16"
    # priced as whole steps, a compute-bound model's averaging is a small part of its step:
    # top-k's fewer bytes (on the averaging alone, a fifth of none's) save a sixth of a step
    averaging = {"none": 4.6e-3, "bf16": 2.4e-3, "topk": 0.9e-3, "powersgd": 1.6e-3}
    steps = {"none": 16.2e-3, "bf16": 14.1e-3, "topk": 13.8e-3, "powersgd": 14.5e-3}
    assert choose(averaging)[0] == "topk"
    best, line = choose(averaging, steps)
    assert best == "bf16" and line.startswith(
        "bf16: 14.1 ms a step predicted (ms: topk 13.8, powersgd 14.5, none 16.2)"
    )
    assert line.endswith("; topk does not save its margin (a third of bf16's time), the least to be worth it")
    # the run times the methods within a quarter of the choice that save their margin too,
    # and the fastest lossless one (the lossy ones' baseline) where a lossy candidate's
    # margin over it is a close call (top-k's 52 ms, a quarter slower, would not be under
    # a third below bf16's 90); nothing where none is best
    assert shortlist(steps, best) == ["bf16", "none"]
    close = {"none": 160e-3, "bf16": 90e-3, "topk": 52e-3, "powersgd": 48e-3, "int8": 85e-3}
    assert shortlist(close, choose(averaging, close)[0]) == ["powersgd", "topk", "bf16"]
    clear = close | {"topk": 40e-3, "powersgd": 38e-3}  # clear by far (the MLP at 1 Gbit/s): no bf16
    assert shortlist(clear, choose(averaging, clear)[0]) == ["powersgd", "topk"]
    assert shortlist({"none": 1.0, "bf16": 0.95, "topk": 0.9}, "none") == ["none"]


def _ddp_bucket_sizes(cap_mb: float | None, *, group) -> list[int]:
    """The entries of each bucket DDP hands its communication hook, on its third step (after
    the rebuild that follows the first), for the MLP 64-1024-1024-10."""
    from torch import nn
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    kw = {} if cap_mb is None else {"bucket_cap_mb": cap_mb}
    ddp = DistributedDataParallel(model, process_group=group, **kw)
    seen: list[tuple[int, int]] = []

    def hook(_state, bucket):
        seen.append((bucket.index(), bucket.buffer().numel()))
        return default_hooks.allreduce_hook(group, bucket)

    ddp.register_comm_hook(None, hook)
    for _ in range(3):
        seen.clear()
        ddp(torch.randn(4, 64)).sum().backward()
    return [n for _, n in sorted(seen)]


@pytest.mark.parametrize("cap_mb", [None, 8])
def test_the_cost_models_buckets_are_ddps_own(pool, cap_mb):
    """The cost model prices each of DDP's buckets: the same buckets torch's DDP makes, by
    default (a first bucket of 1 MiB, then 25 MiB) and with a cap named."""
    from torch import nn

    from shardwise.plan.compression import ddp_buckets, rank_shapes

    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    caps = {} if cap_mb is None else {"first": int(cap_mb * 2**20), "cap": int(cap_mb * 2**20)}
    predicted = [sum(math.prod(s) for s in b) for b in ddp_buckets(rank_shapes(model, 1), **caps)]
    assert pool.run(_ddp_bucket_sizes, cap_mb, ranks=[0, 1])[0] == predicted
    assert len(predicted) == (2 if cap_mb is None else 1)  # (by default, the first bucket is closed at 1 MiB)


@pytest.mark.parametrize("methods", [["powersgd"], ["topk", "powersgd"], ["none"], ["bf16", "powersgd"]])
def test_a_method_that_averages_in_the_hook_runs_in_buckets_as_large_as_the_rest(pool, methods):
    """DDP's small first bucket starts an all-reduce early, beside the rest of the backward;
    a method that averages in the hook (the lossy ones) overlaps nothing there, so its run's
    first bucket is as large as the rest: the MLP 64-1024-1024-10 (4.2 MB of gradients) in
    one bucket, not two, as the cost model's buckets say. A run whose trial holds a lossless
    method, or none, keeps DDP's own."""
    from torch import nn

    from shardwise.parallel.data import bucket_caps
    from shardwise.plan.compression import ddp_buckets, rank_shapes

    o = {**MLP, "model.hidden": "1024,1024", "train.steps": "3", "comm.compression": methods[0]}  # rebuilt at 2
    o |= {"comm.candidates": ",".join(methods)} if len(methods) > 1 else {}
    sizes = pool.run(train_summary, with_data(o), ranks=[0, 1])[0]["ddp_bucket_bytes"]
    model = nn.Sequential(nn.Linear(64, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 10))
    predicted = [
        4 * sum(math.prod(s) for s in b) for b in ddp_buckets(rank_shapes(model, 1), **bucket_caps(methods, None))
    ]
    assert sizes == predicted
    assert len(sizes) == (1 if methods[0] != "none" and "bf16" not in methods else 2), sizes


def test_a_bucket_where_the_method_costs_more_than_it_saves_goes_whole(monkeypatch):
    """Per bucket, by hand, on a link of a byte a nanosecond with the method's compute set to
    half a millisecond a bucket: top-k pays on the 1 MiB matrix's bucket (21 us of
    all-gathers and its compute against 1.05 ms of all-reduce) and not on the vector's (256
    ns whole), so buckets under 257 bytes go whole, and are priced whole."""
    from shardwise.comm.cost import Link
    from shardwise.plan import compression

    monkeypatch.setattr(compression, "compute_seconds", lambda shapes, s, dp: 0.0 if s.method == "none" else 5e-4)
    link, shapes = Link.from_rate(8e9), [(64,), (512, 512)]  # DDP's buckets: the matrix (1 MiB), the vector
    beta = link.beta_s_per_byte
    mib = 2**20  # parallel.bucket_mb = 1: DDP's own buckets, which top-k would otherwise take in one
    plan = compression.bucket_plan(shapes, CompressionSettings(topk_ratio=0.01), link, 2, named=mib)
    assert plan["none"] == (pytest.approx(4 * (512 * 512 + 64) * beta), 0)
    k = math.ceil(0.01 * 512 * 512)  # values and indices, 4 bytes each, gathered from 2 ranks
    assert plan["topk"] == (pytest.approx(8 * k * beta + 5e-4 + 4 * 64 * beta), 4 * 64 + 1)
    least, why = compression.whole_below(plan, ["topk"], shapes, named=mib)
    assert least == 257 and why == (
        "; 1 of DDP's 2 buckets go whole (those under 257 bytes): there topk would take longer than a plain all-reduce"
    )
    assert compression.whole_below(plan, ["topk", "none"], shapes, named=mib)[0] == 257
    assert compression.whole_below(plan, ["none"], shapes, named=mib) == (0, "")
    assert compression.bucket_plan(shapes, CompressionSettings(topk_ratio=0.01), link, 2)["topk"][1] == 0  # one bucket
    # 4 ranks on 2 cores compress at once: each bucket's compute takes twice as long, as the
    # model's own passes do there (for the planner's step: world / cores of the layout's dims)
    shared = compression.bucket_plan(shapes, CompressionSettings(topk_ratio=0.01), link, 2, named=mib, stretch=2.0)
    assert shared["topk"][0] == pytest.approx(plan["topk"][0] + 5e-4) and shared["none"] == plan["none"]
    model, dims = torch.nn.Linear(512, 512, bias=False), ParallelDims.resolve(ParallelConfig(), 4)
    priced = compression.averaging(model, CompressionSettings("topk", 0.01), link, 4)
    assert priced(dims, 2.0) == pytest.approx(priced(dims, 1.0) + 5e-4)


def test_a_compressor_averages_a_bucket_under_its_least_size_whole():
    """Under top-k with min_bucket_bytes above the vector's bucket: the matrix's bucket goes
    through top-k, the vector's whole (its exact average), with what it owed added in."""
    from shardwise.plan.compression import DryCompressor

    comp = DryCompressor(CompressionSettings("topk", topk_ratio=0.05, min_bucket_bytes=4 * 64 * 32), world=2)
    matrix, vector = Entry("w", 0, (64, 32)), Entry("b", 0, (7,))
    g = _grad(0, 0)
    sent = comp.average(g[: 64 * 32].clone(), [matrix])
    assert not torch.equal(sent, g[: 64 * 32]) and "w" in comp.residuals  # compressed, its residual kept
    comp.residuals["b"] = torch.full((7,), 0.5)  # owed by a bucket it was once in (DDP's rebuild, say)
    small = g[64 * 32 :].clone()
    assert torch.equal(comp.average(small.clone(), [vector]), small + 0.5)  # the dry run: its own average
    assert "b" not in comp.residuals


def test_auto_is_chosen_by_the_launcher_in_one_line_and_saved_as_chosen(tmp_path):
    import cli_fork

    argv = ["train", "--nproc", "2", "--model.name", "mlp"]
    argv += ["--comm.compression", "auto", "--train.steps", "4", "--run.progress", "false", "--out", "run"]
    done = cli_fork.run(argv, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("comm.compression auto: "))
    chosen = line.removeprefix("comm.compression auto: ").split(":")[0]
    assert " ms a step predicted (ms: " in line  # the cost model priced whole steps
    assert chosen in ("none", "bf16", "fp16", "int8", "topk", "powersgd")
    assert f'compression = "{chosen}"' in (tmp_path / "run" / "config.toml").read_text()


def test_the_model_check_predicts_the_method_the_trial_kept(monkeypatch):
    """The launcher predicts each candidate's step; the run's model check sets the one its
    trial kept beside the measured step (the launcher's own choice where it kept none of them)."""
    import json

    from shardwise.train.outputs import PREDICTED_ENV, model_check

    def figures(step_s: float) -> dict:
        return {"step_s": step_s, "load_s": 0.0, "compute_s": 0.0, "comm_s": 0.0, "bubble_s": 0.0, "peak_bytes": 1.0}

    sent = figures(0.040) | {"by_method": {"powersgd": figures(0.040), "topk": figures(0.032)}}
    monkeypatch.setenv(PREDICTED_ENV, json.dumps(sent))
    check = model_check({"step_time_s": 0.036, "compression": {"method": "topk"}})["model_check"]
    assert check["predicted"] == figures(0.032) and check["step_ratio"] == pytest.approx(0.036 / 0.032)
    check = model_check({"step_time_s": 0.036, "compression": {"method": "none"}})["model_check"]
    assert check["predicted"] == figures(0.040)


def test_a_peer_recovery_takes_the_trials_decision_from_a_survivor(monkeypatch):
    """The state a replica serves its peers holds auto's trial once decided (the agreed
    medians, the same on every rank), and a rank that starts from it keeps that method
    rather than the launcher's; mid-trial it holds none (each rank's medians are its own)."""
    from torch import nn

    from shardwise.checkpoint.state import decided_trial, load_compression
    from shardwise.comm import trial

    clock = {"now": 0.0}
    monkeypatch.setattr(trial.time, "perf_counter", lambda: clock["now"])
    settings = CompressionSettings("topk", 0.05, 4, 0, ("topk", "none"))
    survivor = Compressor(settings, None)
    for step in range(2 * trial.STEPS_EACH):
        assert decided_trial(survivor) == {}
        clock["now"] += {"topk": 0.05, "none": 0.02}[survivor.trial.method(step)]
        survivor.end_step()
    assert survivor.trial.chosen == "none" and set(decided_trial(survivor)) == {"comm/trial"}
    started = Compressor(settings, None)
    load_compression(started, nn.Linear(2, 2), {}, decided_trial(survivor), rank=1, same=True)
    started.steps = 2 * trial.STEPS_EACH
    assert started.method == "none" and started.trial.medians == survivor.trial.medians


def test_another_layout_takes_its_piece_of_the_mean_residual():
    """Resumed on another layout, each rank's residual is its cut of the saved mean (here a
    split of a tensor's rows over two pieces, as tensor parallelism cuts a column-parallel
    layer); on the same layout, its own."""
    from torch import nn

    from shardwise.checkpoint.state import load_compression

    class Rows:  # a split's `local`: this rank's rows of the whole
        def local(self, whole):
            return whole[2:].clone()

    model = nn.Linear(3, 2)  # this rank's piece of a 4 x 3 weight: rows 2 and 3
    whole = torch.arange(12.0).view(4, 3)
    tensors = {"comm/residual/weight": whole, "comm/residual/bias": torch.tensor([5.0, 6.0])}
    tensors |= {"comm/rank1/residual/weight": torch.ones(2, 3), "comm/rank1/q/weight": torch.ones(3, 1)}
    comp = Compressor(CompressionSettings("topk"), None)
    load_compression(comp, model, {"weight": Rows()}, tensors, rank=1, same=False)
    assert torch.equal(comp.residuals["weight"], whole[2:]) and torch.equal(
        comp.residuals["bias"], tensors["comm/residual/bias"]
    )
    assert comp.q == {}  # PowerSGD's factors start afresh on another layout
    load_compression(comp, model, {"weight": Rows()}, tensors, rank=1, same=True)
    assert torch.equal(comp.residuals["weight"], torch.ones(2, 3)) and torch.equal(comp.q["weight"], torch.ones(3, 1))
    # the same layout, but this rank's saved residuals are of parameters it no longer holds
    # (a pipeline cut elsewhere): the mean residuals, by name
    moved = {k.replace("/weight", "/head.weight"): v for k, v in tensors.items() if "rank1" in k}
    load_compression(comp, model, {"weight": Rows()}, tensors | moved, rank=1, same=True)
    assert torch.equal(comp.residuals["weight"], whole[2:])


def test_residuals_follow_their_parameters_from_bucket_to_bucket():
    """A parameter that moves between buckets (DDP's rebuild; a stage's parameters without a
    gradient one step) keeps its residual: over buckets {w, b}, {w}, {w, b} the sum holds
    for w. (Two ranks that send alike, by a dry run: every average is this rank's own.)"""
    from shardwise.plan.compression import DryCompressor

    comp = DryCompressor(CompressionSettings("topk", topk_ratio=0.05), world=2)
    both, alone = _entries(), _entries()[:1]
    applied, total = torch.zeros(64 * 32), torch.zeros(64 * 32)
    for step, entries in enumerate([both, alone, both, alone]):
        n = sum(e.numel for e in entries)
        g = _grad(0, step)[:n].clone()
        total += g[: 64 * 32]
        applied += comp.average(g, entries)[: 64 * 32]
    assert torch.allclose(applied + comp.residuals["w"].reshape(-1), total, atol=1e-5)


def test_torchs_powersgd_hook_runs_on_gloo_as_the_bench_yardstick(tmp_path):
    """The compression bench's yardstick: torch's own hook, each bucket waited for, trains 2
    gloo ranks past its first compressed steps, run as the bench runs it. The model's 4 MiB
    of gradients make two DDP buckets (the first is 1 MiB): unwaited, the hook hangs or
    mismatches collectives (and the ranks are stopped at the timeout)."""
    import json
    import sys

    from shardwise.cluster.placement import placement_for, run_ranks
    from shardwise.procs import free_port

    out = tmp_path / "t.json"
    argv = [sys.executable, "-m", "shardwise.bench.torch_ddp_reference", "--steps", "8", "--batch-size", "16"]
    argv += ["--model", "mlp", "--hidden", "1024,1024", "--powersgd", "2", "--out", str(out)]
    run_ranks(argv, 2, placement_for("local"), free_port(), timeout_s=60)
    assert json.loads(out.read_text())["step_time_s"] > 0


def _trial(periods: dict[str, float], *, group) -> dict:
    """Steps through a trial of top-k then none (one warm-up step first), this rank's clock
    advancing by `periods[method]` a step; what ran, the decision, what was owed."""
    import torch.distributed as dist

    from shardwise.comm import trial

    rank = dist.get_rank(group)
    clock = {"now": 0.0}
    real = trial.time.perf_counter
    trial.time.perf_counter = lambda: clock["now"]
    try:
        comp = Compressor(CompressionSettings("topk", 0.05, 4, 1, ("topk", "none")), group)
        ran, applied = [], []
        for step in range(1 + 2 * trial.STEPS_EACH + 2):
            ran.append(comp.method if step >= 1 else "warm-up")
            applied.append(comp.average(_grad(rank, step).clone(), _entries()).clone())
            clock["now"] += periods[rank][ran[-1]] if ran[-1] != "warm-up" else 1.0
            comp.end_step()
        again = trial.Trial(("topk", "none"), 1, None)
        again.load(comp.trial.state())
        out = {"ran": ran, "applied": applied, "owed": dict(comp.residuals), "summary": comp.summary(), "again": again}
        # each step's seconds its number: the kept method's steps (11 and 12) have the median 11.5,
        # whether the times start at step 0 or, resumed, at step 5
        times = [float(s) for s in range(len(ran))]
        out["kept_step_s"] = [comp.summary(times[first:], first)["trial"]["kept_step_s"] for first in (0, 5)]
        spares = [f"spare of {'+'.join(key)}" for key in comp._res._spares]
        return out | {"owes": comp.owes, "buffers": sorted(comp._buffers) + spares}
    finally:
        trial.time.perf_counter = real


@pytest.mark.parametrize(
    "periods, kept",
    [
        # rank 0 alone would keep top-k, rank 1 alone none, the least of all top-k
        ({0: {"topk": 0.010, "none": 0.030}, 1: {"topk": 0.050, "none": 0.040}}, "none"),
        # top-k faster, but not by the third of none's step a lossy method must save
        ({0: {"topk": 0.030, "none": 0.040}, 1: {"topk": 0.030, "none": 0.040}}, "none"),
        ({0: {"topk": 0.020, "none": 0.040}, 1: {"topk": 0.010, "none": 0.030}}, "topk"),
    ],
)
def test_auto_trial_keeps_the_fastest_on_the_slowest_rank_that_saves_its_margin(pool, periods, kept):
    """Each candidate runs STEPS_EACH steps after the warm-up, its first not counted; the
    ranks keep the least of the slowest rank's medians among the methods that save their
    margin of none's; what top-k's steps left owed is added to the first step of none, so
    what was applied plus what is still owed sums to the exact averages."""
    from shardwise.comm.trial import STEPS_EACH

    out = pool.run(_trial, periods, ranks=[0, 1])
    ran = out[0]["ran"]
    assert ran == ["warm-up"] + ["topk"] * STEPS_EACH + ["none"] * STEPS_EACH + [kept] * 2
    slowest = {m: max(periods[0][m], periods[1][m]) for m in ("topk", "none")}
    trial = out[0]["summary"]["trial"]
    assert trial["step_s"] == pytest.approx(slowest) and trial["chosen"] == kept
    assert out[0]["summary"]["method"] == kept and out[1]["summary"]["trial"] == trial
    assert out[0]["again"].chosen == kept and out[0]["again"].medians == trial["step_s"]  # as a checkpoint keeps it
    assert out[0]["kept_step_s"] == [11.5, 11.5] and trial["kept_step_s"] is None  # (no times given)
    assert bool(out[0]["owed"]) == (kept == "topk")  # none settled what top-k's steps owed
    # a checkpoint holds residuals only while some are owed; a kept none keeps no buffers
    assert out[0]["owes"] == out[1]["owes"] == (kept == "topk")
    assert out[0]["buffers"] == ([] if kept == "none" else ["work", "spare of w+b"])
    steps = range(len(ran))
    exact = sum(_exact(s, 2) for s in steps)
    for rank in (0, 1):
        assert torch.equal(sum(out[0]["applied"]), sum(out[rank]["applied"]))
    applied_and_owed = sum(out[0]["applied"]) + torch.cat(
        [sum(o["owed"].get(e.name, torch.zeros(e.shape)) for o in out).reshape(-1) / 2 for e in _entries()]
    )
    assert torch.allclose(applied_and_owed, exact, atol=1e-5), (applied_and_owed - exact).abs().max()
    assert not torch.allclose(sum(out[0]["applied"][: 1 + STEPS_EACH]), sum(_exact(s, 2) for s in range(6)), atol=1e-3)


def test_auto_trial_runs_through_ddps_hook_and_the_summary_says_what_it_kept(pool):
    """Under DDP (the hook hands each bucket to the method of the step): top-k, then DDP's
    own all-reduce for none, 5 steps each after a warm-up of 2, then the faster for the
    rest; the summary gives both medians and the method kept, and the run still trains."""
    from shardwise.comm.methods import fair

    o = {**MLP, "train.steps": "30", "comm.compression": "topk", "comm.candidates": "topk,none"}
    o |= {"comm.warmup_steps": "2", "comm.topk_ratio": "0.05"}
    summary = pool.run(train_summary, with_data(o), ranks=[0, 1])[0]
    trial = summary["compression"]["trial"]
    assert trial["candidates"] == ["topk", "none"] and set(trial["step_s"]) == {"topk", "none"}
    times = trial["step_s"]
    kept = fair(times)  # top-k must save a third of none's step
    assert trial["chosen"] == min(kept, key=kept.get) == summary["compression"]["method"]
    assert all(0 < t < 1 for t in trial["step_s"].values()) and summary["val_accuracy"] > 0.5
    # the bytes follow the schedule: 2 + 5 steps whole (warm-up, none), 5 of top-k (5% of the
    # entries, values and indices: a tenth of the bytes), then the kept method's 18
    whole, topk = 7 + 18 * (trial["chosen"] == "none"), 5 + 18 * (trial["chosen"] == "topk")
    assert summary["compression"]["ratio"] == pytest.approx((whole + 0.1 * topk) / 30, rel=0.02)


def test_a_method_is_kept_only_where_it_saves_its_margin():
    """A lossless method a tenth of none's step; a lossy one a third of the fastest lossless
    method's (the measured convnet case: top-k's step under fp16's, but not by a third);
    with no lossless method timed, the lossy ones are compared with each other only."""
    from shardwise.comm.methods import fair

    assert fair({"topk": 0.030, "fp16": 0.040, "none": 0.080}) == {"fp16": 0.040, "none": 0.080}
    assert fair({"topk": 0.020, "fp16": 0.040, "none": 0.080}) == {"topk": 0.020, "fp16": 0.040, "none": 0.080}
    assert fair({"bf16": 0.095, "none": 0.100}) == {"none": 0.100}
    assert fair({"topk": 0.030, "powersgd": 0.020}) == {"topk": 0.030, "powersgd": 0.020}
    # the base is a lossless method that saves its own margin: here none, not bf16
    assert fair({"topk": 0.065, "bf16": 0.095, "none": 0.100}) == {"topk": 0.065, "none": 0.100}


def test_a_trial_resumed_midway_keeps_what_it_had_timed(monkeypatch):
    """A checkpoint mid-trial holds this rank's median of each candidate timed so far; the
    resumed trial times the rest and decides on all of them."""
    from shardwise.comm import trial

    clock = {"now": 0.0}
    monkeypatch.setattr(trial.time, "perf_counter", lambda: clock["now"])

    def run(t: trial.Trial, steps: range, seconds: dict[str, float]) -> None:
        for step in steps:
            clock["now"] += seconds[t.method(step)]
            t.step_ended(step)

    first = trial.Trial(("topk", "none"), 0, None)
    run(first, range(trial.STEPS_EACH + 1), {"topk": 0.02, "none": 0.05})  # top-k's steps, one of none's
    again = trial.Trial(("topk", "none"), 0, None)
    again.load(first.state())
    assert again.chosen is None and again.periods["topk"] == [pytest.approx(0.02)]
    run(again, range(trial.STEPS_EACH + 1, 2 * trial.STEPS_EACH), {"topk": 0.02, "none": 0.05})
    assert again.chosen == "topk" and again.medians == pytest.approx({"topk": 0.02, "none": 0.05})
    # a resume that names other candidates (as many) takes none of it: times are by name
    other = trial.Trial(("powersgd", "none"), 0, None)
    other.load(again.state())
    assert other.chosen is None and other.periods == {"powersgd": [], "none": []}
    same = trial.Trial(("topk", "none"), 0, None)
    same.load(again.state())
    assert same.chosen == "topk"


def test_the_compression_bench_reports_and_keeps_what_its_figures_come_from(tmp_path):
    """The bench's whole report on made-up runs (no processes): each method's time to the
    target is the median over the seeds of its steps x its step; auto's runs are priced at
    its timed runs' step after their trial where they kept the same method, else at the
    side of the method each kept; none runs twice; bench.json's `runs` holds what the
    figures come from."""
    import io
    import json

    from rich.console import Console

    from shardwise.bench import compression
    from shardwise.bench.common import Bench

    reach_at = {"none": [90, 100, 90], "topk": [115, 165, 65], "auto": [100, 125, 85]}
    step_s = {"none": 0.160, "topk": 0.035, "powersgd": 0.040}
    kept, timed = {0: "powersgd", 1: "topk", 2: "topk"}, []

    class Made(Bench):
        def train(self, args, name, *, steps=0, env=None, nproc=None, eval_every=0):
            method = args[args.index("--comm.compression") + 1]
            if "accuracy" not in name and method == "auto":  # its trial's steps in the median too
                timed.append((name, steps))
                return {"step_time_s": 0.5, "compression": {"method": "topk", "trial": {"kept_step_s": 0.030}}}
            if "accuracy" not in name:
                timed.append((name, steps))
                return {"step_time_s": step_s.get(method, 0.1)}
            seed = int(args[args.index("--train.seed") + 1])
            reach = reach_at.get(method, [200, 200, 200])[seed]
            out = self.work / name.replace(" ", "_")
            out.mkdir(parents=True)
            rows = [{"step": s, "val_accuracy": 0.96 if s >= reach else 0.5} for s in range(5, 301, 5)]
            (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
            trial = {"candidates": ["topk", "powersgd"], "step_s": {"topk": 0.04, "powersgd": 0.05}}
            summary = {"compression": {"method": kept[seed], "trial": trial}} if method == "auto" else {}
            (out / "summary.json").write_text(json.dumps(summary))
            return summary

        def reference(self, module, nproc, args, name):
            return {"step_time_s": 0.070}

    b = Made("1gbit", None, 5, tmp_path, Console(file=io.StringIO()), options={"cases": "mlp:2"})
    b.placement = type("P", (), {"cluster": None})()
    compression.run(b)
    got = {r["measure"]: r for r in b.results}
    none_time = 10 * 0.160 + 80 * 0.160  # the median seed's 90 steps
    topk = 10 * 0.160 + 105 * 0.035  # its median seed: 115 steps
    assert got["mlp, 2 ranks topk 1%: time to target, none / method"]["median"] == pytest.approx(none_time / topk)
    # auto's seeds: 100 steps, PowerSGD kept (its side's 40 ms); 125 (the median run) and 85,
    # top-k, as auto's timed runs kept: at their 30 ms a step after the trial
    trial = 5 * 0.04 + 5 * 0.05
    auto = got["mlp, 2 ranks auto: time to target, none / method"]["median"]
    assert auto == pytest.approx(none_time / (10 * 0.16 + trial + 105 * 0.030))
    assert got["mlp, 2 ranks none again: time to target, none / method"]["median"] == pytest.approx(1.0)
    # each side 5 times, 40 steps; auto's 10 more, for the trial its accuracy runs made
    assert sorted({steps for name, steps in timed if "-auto-" in name}) == [compression.TIMED + 10]
    again = sum("-none-again-" in name for name, _ in timed)
    assert again == sum("-none-" in name and "again" not in name for name, _ in timed) == 5
    (kept_runs,) = b.runs
    assert kept_runs["auto_timed_kept"] == ["topk"] * 5
    assert [r["kept"] for r in kept_runs["auto"]] == ["powersgd", "topk", "topk"]
    assert [r["steps"] for r in kept_runs["seeds"]["topk 1%"]] == [115, 165, 65]
    assert kept_runs["step_s"]["none"] == [0.160] * 5
