"""The communication cost formulas, against cases computed by hand."""

from __future__ import annotations

import dataclasses

import pytest

from shardwise.comm.cost import (
    Link,
    all_gather,
    all_reduce,
    beside,
    bytes_sent_all_reduce,
    calibrate,
    reduce_scatter,
)

GBIT = Link.from_rate(1e9, alpha_s=50e-6)  # 1 Gbit/s, 50 us a message


def test_one_message_is_latency_plus_bytes_over_the_rate():
    assert GBIT.beta_s_per_byte == pytest.approx(8e-9)
    assert GBIT.send(1_000_000) == pytest.approx(50e-6 + 8e-3)  # 1 MB at 1 Gbit/s: 8 ms


def test_ring_collectives_by_hand():
    n = 4_000_000  # bytes
    # 4 ranks: 3 steps of 1 MB each, for each phase
    assert reduce_scatter(GBIT, 4, n) == pytest.approx(3 * (50e-6 + 8e-3))
    assert all_gather(GBIT, 4, n) == pytest.approx(3 * (50e-6 + 8e-3))
    assert all_reduce(GBIT, 4, n) == pytest.approx(6 * (50e-6 + 8e-3))
    # 2 ranks, no latency: each sends half the message twice, the whole message in all
    assert all_reduce(Link.from_rate(1e9), 2, n) == pytest.approx(n * 8 / 1e9)
    assert bytes_sent_all_reduce(4, n) == pytest.approx(6e6) and bytes_sent_all_reduce(1, n) == 0.0


def test_one_rank_communicates_nothing():
    assert all_reduce(GBIT, 1, 10**9) == reduce_scatter(GBIT, 1, 10**9) == 0.0


# -- each strategy's formula -----------------------------------------------------------
NOLAT = Link.from_rate(8e9)  # 1 GB/s, no latency: 1 ns a byte


def test_data_parallel_sync_by_hand():
    from shardwise.parallel.data import DDP_BUCKET_BYTES, sync_seconds

    mb = 10**6
    # one bucket: nothing to overlap, the whole ring all-reduce: 2 x (n-1)/n x bytes
    assert sync_seconds(NOLAT, 4, 8 * mb, backward_s=1.0, shard="none") == pytest.approx(2 * 0.75 * 8e-3)
    # four buckets, a long backward: only the last bucket's all-reduce shows
    grad = 4 * DDP_BUCKET_BYTES
    assert sync_seconds(NOLAT, 2, grad, backward_s=10.0, shard="none") == pytest.approx(DDP_BUCKET_BYTES * 1e-9)
    # no backward to hide behind: all of it
    assert sync_seconds(NOLAT, 2, grad, backward_s=0.0, shard="none") == pytest.approx(grad * 1e-9)
    # DDP's own buckets, in the order it launches them: 2 MB of the last layers first, then
    # 6 MB; the first runs beside the backward of the layers left (3/4 of it): 2 ms of it
    # beside 1.5 ms, then the last bucket's 6 ms
    uneven = {"shard": "none", "buckets": [1.0, 3.0]}
    assert sync_seconds(NOLAT, 2, 8 * mb, backward_s=2e-3, **uneven) == pytest.approx(6e-3 + 0.5e-3)
    assert sync_seconds(NOLAT, 2, 8 * mb, backward_s=1.0, **uneven) == pytest.approx(6e-3)
    assert sync_seconds(NOLAT, 2, 0.0, backward_s=1.0, shard="none") == 0.0  # a model without weights
    # ZeRO-1 (parallel/zero.py): DDP's all-reduce, then an all-gather of the stepped slices
    assert sync_seconds(NOLAT, 4, 8 * mb, backward_s=1.0, shard="optimizer") == pytest.approx(3 * 0.75 * 8e-3)
    # FSDP2: two all-gathers and a reduce-scatter of the parameters, beside 1.5 x the backward
    hides_none = dataclasses.replace(NOLAT, overlap=0.0)
    assert sync_seconds(hides_none, 4, 8 * mb, backward_s=1.0, shard="full") == pytest.approx(3 * 0.75 * 8e-3)
    assert sync_seconds(NOLAT, 4, 8 * mb, backward_s=1.0, shard="full") == 0.0  # all hidden
    assert sync_seconds(NOLAT, 4, 8 * mb, backward_s=4e-3, shard="full") == pytest.approx(18e-3 - 6e-3)
    assert sync_seconds(NOLAT, 1, 8 * mb, backward_s=0.0, shard="full") == 0.0
    # and their copies into fresh memory, at 0.1 ns a byte (0.8 ms a pass over 8 MB):
    # ZeRO-1 2 + 1/4 passes; FSDP2 2 x (2 + 1/4) + 1 + 2/4 = 6
    copy = {"copy_s_per_byte": 1e-10}
    zero = sync_seconds(NOLAT, 4, 8 * mb, backward_s=1.0, shard="optimizer", **copy)
    assert zero == pytest.approx(18e-3 + 2.25 * 0.8e-3)
    fsdp = sync_seconds(hides_none, 4, 8 * mb, backward_s=1.0, shard="full", **copy)
    assert fsdp == pytest.approx(18e-3 + 6 * 0.8e-3)
    # FSDP2 runs its three collectives once per unit: 5 units pay 5 x 3 calls at 1 ms each
    per_call = Link(0.0, 1e-9, {"all_gather": (1e-3, 1.0), "reduce_scatter": (1e-3, 1.0)}, overlap=0.0)
    one = sync_seconds(per_call, 4, 8 * mb, backward_s=1.0, shard="full")
    assert one == pytest.approx(3 * 1e-3 + 3 * 0.75 * 8e-3)
    assert sync_seconds(per_call, 4, 8 * mb, backward_s=1.0, shard="full", units=5) == pytest.approx(one + 12e-3)
    # the bytes hide beside the backward where the link says so, each call's own cost does
    # not, and a call costs at least what a small exchange between computing ranks does (sync_s)
    hides_all = dataclasses.replace(per_call, overlap=1.0)
    assert sync_seconds(hides_all, 4, 8 * mb, backward_s=1.0, shard="full") == pytest.approx(3e-3)
    waits = dataclasses.replace(hides_all, sync_s=2e-3)
    assert sync_seconds(waits, 4, 8 * mb, backward_s=1.0, shard="full", units=5) == pytest.approx(5 * 3 * 2e-3)
    assert sync_seconds(NOLAT, 4, 8 * mb, backward_s=1.0, shard="none", **copy) == pytest.approx(12e-3)  # DDP: none
    # a link where compute beside a collective slows it by half again (measured overlap -0.5):
    # the three buckets issued during a long backward cost 1.5 x their time
    slowed = dataclasses.replace(NOLAT, overlap=-0.5)
    each = DDP_BUCKET_BYTES * 1e-9
    assert sync_seconds(slowed, 2, grad, backward_s=10.0, shard="none") == pytest.approx(each + 1.5 * 3 * each)


def test_a_calibrated_collective_is_its_per_call_cost_plus_a_factor_on_the_ring():
    link = Link(0.0, 1e-9, {"all_gather": (1e-3, 3.0)})
    # 2 ranks, 8 MB: the ring sends 4 MB (4 ms); measured 3 x that plus 1 ms a call
    assert all_gather(link, 2, 8e6) == pytest.approx(1e-3 + 3 * 4e-3)
    assert all_reduce(link, 2, 8e6) == pytest.approx(8e-3)  # not calibrated: the ring
    assert all_gather(link, 1, 8e6) == 0.0
    # half-precision entries: their own calibration where measured (gloo sums fp16 at several
    # times float32's cost per byte on a CPU), else float32's
    half = Link(0.0, 1e-9, {"all_reduce": (1e-3, 2.0), "all_reduce_fp16": (1e-3, 6.0)})
    assert all_reduce(half, 2, 8e6, "fp16") == pytest.approx(1e-3 + 6 * 8e-3)
    assert all_reduce(half, 2, 8e6, "bf16") == all_reduce(half, 2, 8e6) == pytest.approx(1e-3 + 2 * 8e-3)


def test_calibration_recovers_the_cost_it_was_measured_from():
    base = Link(50e-6, 1e-9)
    sizes = (2**16, 2**24, 2**26)

    def measured(per_call: float, factor: float, sent: float) -> list[tuple[float, float]]:
        return [(n, per_call + factor * sent * n * 1e-9) for n in sizes]

    timed = {
        "all_reduce": measured(2e-3, 2.5, 2 * 3 / 4),  # 4 ranks: 2 (n - 1) / n of the bytes
        "all_gather": measured(0.5e-3, 4.0, 3 / 4),
        "reduce_scatter": measured(0.0, 6.0, 3 / 4),
        "all_reduce_fp16": measured(1e-3, 7.0, 2 * 3 / 4),  # an all-reduce's bytes, fp16's rate
    }
    link = calibrate(base, 4, timed, overlap=-0.25)
    assert link.collectives["all_reduce"] == pytest.approx((2e-3, 2.5))
    assert link.collectives["all_gather"] == pytest.approx((0.5e-3, 4.0))
    assert link.collectives["reduce_scatter"] == pytest.approx((0.0, 6.0), abs=1e-12)
    assert link.collectives["all_reduce_fp16"] == pytest.approx((1e-3, 7.0))
    assert link.overlap == -0.25 and (link.alpha_s, link.beta_s_per_byte) == (50e-6, 1e-9)
    # the factor comes from the two largest sizes: a cheap small size does not bend it
    timed["all_reduce"][0] = (2**16, 1e-6)
    assert calibrate(base, 4, timed, 0.0).collectives["all_reduce"][1] == pytest.approx(2.5)


def test_compute_beside_a_collective_hides_its_measured_share():
    assert beside(dataclasses.replace(NOLAT, overlap=0.5), 4e-3, 1.0) == pytest.approx(2e-3)
    assert beside(dataclasses.replace(NOLAT, overlap=0.5), 4e-3, 2e-3) == pytest.approx(3e-3)  # only while both run
    assert beside(dataclasses.replace(NOLAT, overlap=-1.0), 4e-3, 1.0) == pytest.approx(8e-3)


def test_model_parallel_formulas_by_hand():
    from shardwise.parallel.ps_protocol import ps_seconds
    from shardwise.parallel.spatial import halo_seconds
    from shardwise.parallel.tensor import tp_seconds
    from shardwise.parallel.vertical import vertical_seconds

    # tp 2: per pair, an all-reduce of the column layer's input gradient (1 MB) and of the
    # row layer's output (2 MB): on 2 ranks each sends 2 (n - 1) / n = all of each: 3 MB
    pair = [("column", 1e6, 4e6, 0.0), ("row", 4e6, 2e6, 0.0)]
    assert tp_seconds(NOLAT, 2, pair) == pytest.approx(3e-3)
    # the input gradient's 1 ms beside a 0.4 ms weight gradient: 0.6 ms waited for; beside
    # 2 ms, none; the model's first layer (no input gradient) none either
    assert tp_seconds(NOLAT, 2, [("column", 1e6, 4e6, 4e-4), pair[1]]) == pytest.approx(2.6e-3)
    assert tp_seconds(NOLAT, 2, [("column", 1e6, 4e6, 2e-3), pair[1]]) == pytest.approx(2e-3)
    assert tp_seconds(NOLAT, 2, [("column", 0.0, 4e6, 0.0), pair[1]]) == pytest.approx(2e-3)
    # a wide odd last layer also gathers its 1 MB output (each rank receives the half it
    # lacks: 0.5 ms); a narrow one, computed whole, has no collective
    assert tp_seconds(NOLAT, 2, [("column+gather", 0.0, 1e6, 0.0)]) == pytest.approx(0.5e-3)
    assert tp_seconds(NOLAT, 2, [("whole", 1e6, 1e6, 0.0)]) == 0.0
    assert vertical_seconds(NOLAT, 4, 4e6) == pytest.approx(2 * 3 * 1e-3)
    # spatial 2: 1 MB of halo rows in 3 windows and two norms' 1 KB, each exchanged forward
    # and backward, each exchange at least the link's latency, or what one costs computing ranks
    assert halo_seconds(GBIT, 2, 1e6, 3, 1e3, 2) == pytest.approx(2 * 5 * GBIT.alpha_s + 2 * 1.001e6 * 8e-9)
    busy = dataclasses.replace(GBIT, sync_s=2e-3)
    assert halo_seconds(busy, 2, 1e6, 3, 1e3, 2) == pytest.approx(2 * 5 * 2e-3 + 2 * 1.001e6 * 8e-9)
    assert halo_seconds(GBIT, 1, 1e6, 3, 1e3, 2) == 0.0
    # 3 workers through 2 servers: each server's link carries 3 x half the parameters, each way
    assert ps_seconds(NOLAT, 2, 3, 4e6) == pytest.approx(2 * 3 * 2e-3)
    # and the copies: 2 passes over the model on a worker, 2 x 3 + 2 over each server's half
    assert ps_seconds(NOLAT, 2, 3, 4e6, copy_s_per_byte=1e-10) == pytest.approx(12e-3 + (2 + 8 / 2) * 4e-4)
    # pushes in half precision: half the bytes one way, the weights whole the other
    assert ps_seconds(NOLAT, 2, 3, 4e6, push_half=True) == pytest.approx(3 * 1e-3 + 3 * 2e-3)
    # colocated on 4 ranks: each keeps its own quarter, and sends and takes the other 3
    # quarters (1 MB, 1 ms each) as pushes, then again as replies
    assert ps_seconds(NOLAT, 4, 4, 4e6, colocated=True) == pytest.approx(2 * 3 * 1e-3)


def test_pipeline_schedules_played_out_by_hand():
    from shardwise.parallel.pipeline_cost import BACKWARD, FORWARD, pipeline_seconds, schedule_order

    # torch's 1F1B: stage 0 of 3 warms up with 3 forwards, the last stage with 1
    f, b = FORWARD, BACKWARD
    assert schedule_order("1f1b", 3, 0, 4) == [(f, 0), (f, 1), (f, 2), (b, 0), (f, 3), (b, 1), (b, 2), (b, 3)]
    assert schedule_order("1f1b", 3, 2, 4) == [(f, 0), (b, 0), (f, 1), (b, 1), (f, 2), (b, 2), (f, 3), (b, 3)]
    assert schedule_order("gpipe", 2, 1, 2) == [(f, 0), (f, 1), (b, 0), (b, 1)]
    # equal stages of 1 + 1 ms, a core each: the textbook (M + P - 1) slots, P - 1 of them idle
    for schedule in ("gpipe", "1f1b"):
        step = pipeline_seconds([1e-3] * 3, [1e-3] * 3, 4, NOLAT, [0.0, 0.0], schedule)
        assert (step.step_s, step.compute_s, step.bubble_s) == pytest.approx((12e-3, 8e-3, 4e-3))
    # one micro-batch through 2 stages, 1 MB (1 ms) each way: 1 + 1 + 2 + 1 + 1 ms
    step = pipeline_seconds([1e-3] * 2, [1e-3] * 2, 1, NOLAT, [1e6])
    assert (step.step_s, step.compute_s, step.comm_s, step.bubble_s) == pytest.approx((6e-3, 2e-3, 2e-3, 2e-3))
    # a transfer starts once its receiver has posted the receive, just before the task that
    # needs it: 2 stages (0.5 ms forward, 1 ms backward), 2 micro-batches of 1 MB (1 ms).
    # GPipe: stage 0's F0 [0, 0.5], F1 [0.5, 1]; F0's transfer [0.5, 1.5]; stage 1's F0
    # [1.5, 2]; F1's transfer [2, 3] (not [1, 2]: stage 1 was computing); F1 [3, 3.5], B0
    # [3.5, 4.5], B1 [4.5, 5.5]; B0's transfer [4.5, 5.5], stage 0's B0 [5.5, 6.5]; B1's
    # transfer [6.5, 7.5]; B1 [7.5, 8.5]
    step = pipeline_seconds([0.5e-3] * 2, [1e-3] * 2, 2, NOLAT, [1e6], "gpipe")
    assert (step.step_s, *step.ends_s) == pytest.approx((8.5e-3, 8.5e-3, 5.5e-3))
    # 2 stages (1 ms forward, 2 backward), 2 micro-batches, each stage on 2 ranks, 2 cores:
    # where both stages compute, each goes at half speed; in the fill and the drain, full.
    # GPipe: F0 on stage 0 [0, 1]; F1 | F0 [1, 3]; stage 1's F1 [3, 4], B0 [4, 6];
    # B1 | B0 [6, 10]; stage 0's B1 [10, 12]
    step = pipeline_seconds([1e-3] * 2, [2e-3] * 2, 2, NOLAT, [0.0], "gpipe", ranks_per_stage=2, cores=2)
    assert (step.step_s, step.compute_s, step.bubble_s) == pytest.approx((12e-3, 9e-3, 3e-3))
    # (one stretch of ranks / cores = 2 for every slot would say (M + P - 1) x 3 x 2 = 18 ms)
    # 1F1B: F0 [0, 1]; F1 | F0 [1, 3]; stage 1's B0 [3, 5]; B0 | F1 [5, 7]; B0 | B1 [7, 9];
    # stage 1's B1 [9, 10]; stage 0's B1 [10, 12]
    step = pipeline_seconds([1e-3] * 2, [2e-3] * 2, 2, NOLAT, [0.0], "1f1b", ranks_per_stage=2, cores=2)
    assert (step.step_s, step.compute_s) == pytest.approx((12e-3, 9e-3))


def test_schedules_of_several_stages_a_rank_played_out():
    from shardwise.parallel.pipeline_cost import (
        BACKWARD,
        FORWARD,
        WEIGHT,
        held_peak,
        ideal_bubble,
        pipeline_seconds,
        rank_orders,
    )

    # torch's interleaved 1F1B, 2 ranks x 2 stages, 4 micro-batches: rank 0's order as torch's
    # schedule object lists it (0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3)
    listed = "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3".split()
    assert rank_orders("interleaved", 2, 2, 4)[0] == tuple((int(a[1] == "B"), int(a[0]), int(a[2])) for a in listed)
    # each schedule's own bubble: the textbook formulas, P ranks, V stages a rank, M micro-batches
    for schedule in ("gpipe", "1f1b"):
        for p, m in ((2, 4), (3, 4), (4, 8)):
            assert ideal_bubble(schedule, p, 1, m) == pytest.approx((p - 1) / (m + p - 1))
    for p, v, m in ((2, 2, 4), (2, 2, 8), (4, 2, 8), (2, 3, 4)):
        assert ideal_bubble("interleaved", p, v, m) == pytest.approx((p - 1) / (v * m + p - 1))
    # the weights' gradients fill the zero-bubble schedules' bubble: well under interleaved 1F1B's
    for schedule in ("zero-bubble", "zbv"):
        assert ideal_bubble(schedule, 2, 2, 4) < 0.5 * ideal_bubble("interleaved", 2, 2, 4)
    # activations kept: 1F1B's warm-up (P - r micro-batches), GPipe's all; interleaved rank 0
    # holds 5 stage-micro-batches of half its layers at once (F0 F1 of both stages, then F2)
    assert [held_peak(rank_orders("1f1b", 3, 1, 6)[r], {r: 1.0}) for r in range(3)] == [3, 2, 1]
    assert held_peak(rank_orders("gpipe", 2, 1, 4)[1], {1: 1.0}) == 4
    assert held_peak(rank_orders("interleaved", 2, 2, 4)[0], {0: 0.5, 2: 0.5}) == 2.5
    assert held_peak(rank_orders("zbv", 2, 2, 4)[0], {0: 0.5, 3: 0.5}) == 2
    # where the backward is split, a micro-batch's activations go only with its weights' gradient
    f, b, w = FORWARD, BACKWARD, WEIGHT
    assert held_peak(((f, 0, 0), (b, 0, 0), (f, 0, 1), (w, 0, 0), (b, 0, 1), (w, 0, 1)), {0: 1.0}) == 2
    assert held_peak(((f, 0, 0), (b, 0, 0), (f, 0, 1), (b, 0, 1)), {0: 1.0}) == 1
    assert all(k == FORWARD for k, _, _ in rank_orders("zbv", 2, 2, 4)[0][:3])
    # zbv's V: stages 1 and 2 are both rank 1's, so what passes between them costs nothing
    free = pipeline_seconds([1e-3] * 4, [2e-3] * 4, 4, NOLAT, [0.0, 0.0, 0.0], "zbv", virtual=2)
    costly = pipeline_seconds([1e-3] * 4, [2e-3] * 4, 4, NOLAT, [0.0, 1e7, 0.0], "zbv", virtual=2)
    assert costly.step_s == pytest.approx(free.step_s) and costly.comm_s == 0.0
    looped = pipeline_seconds([1e-3] * 4, [2e-3] * 4, 4, NOLAT, [0.0, 1e7, 0.0], "interleaved", virtual=2)
    assert looped.comm_s > 0.0  # interleaved's stage 1 is rank 1's, stage 2 rank 0's
    # the runtime's cost per action lies on each rank's path: one micro-batch through 2 stages
    # runs F0, F1, B1, B0 one after the other, 4 actions of 0.5 ms more
    plain = pipeline_seconds([1e-3] * 2, [1e-3] * 2, 1, NOLAT, [0.0])
    assert pipeline_seconds([1e-3] * 2, [1e-3] * 2, 1, NOLAT, [0.0], action_s=0.5e-3).step_s == pytest.approx(
        plain.step_s + 4 * 0.5e-3
    )


def test_a_collective_costs_its_mean_without_the_slowest_tenth():
    from shardwise.cluster.probe import expected

    assert expected([1.0] * 9 + [100.0]) == pytest.approx(1.0)  # a stall of the machine left out
    assert expected([1.0] * 8 + [4.0] * 2) == pytest.approx(12 / 9)  # wake-ups counted, unlike a median
