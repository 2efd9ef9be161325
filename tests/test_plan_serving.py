"""The serving cost model (`--parallel.layout auto` for `shardwise serve`) on a profile
written by hand: each layout's batch time, interval, rate and held weights computed here
term by term, and the choice for a latency target and a memory budget."""

from __future__ import annotations

import pytest

from shardwise.comm.cost import Link
from shardwise.config import ParallelConfig
from shardwise.errors import ShardwiseError
from shardwise.plan.profile import LayerProfile, ModelProfile
from shardwise.plan.serving import Served, choose, served, serving_layouts
from shardwise.plan.space import ModelShape


def _layer(name: str, kind: str, params: int, out: int, inp: int, forward: float) -> LayerProfile:
    return LayerProfile(name, kind, 0.0, 3 * forward, params, out, inp, forward_per_sample_s=forward)


# an MLP head: Linear (256 bytes in, 400 out), ReLU, Linear (40 out); forwards 100 and 50 us a sample
PROFILE = ModelProfile(
    {},
    (
        _layer("head.0", "linear", 4000, 400, 256, 1e-4),
        _layer("head.1", "other", 0, 400, 400, 0.0),
        _layer("head.2", "linear", 800, 40, 400, 5e-5),
    ),
)
LINK = Link(1e-4, 1e-9, overlap=0.0)  # 100 us a message, 1 ns a byte
BATCH, WAIT, CLASSES = 32, 5e-3, 10


def _served(world: int, **layout) -> Served:
    return served(ParallelConfig(**layout), world, PROFILE, LINK, cores=8, max_batch=BATCH, max_wait_s=WAIT,
                  classes=CLASSES)  # fmt: skip


def send(n_bytes: float) -> float:
    return 1e-4 + 1e-9 * n_bytes


# with ranks behind the front: the batch to rank 0 (256 bytes a sample) and the probabilities back
HOP = send(256 * 32) + send(8 * 10 * 32)


def test_each_layouts_batch_by_hand():
    one = _served(1)
    assert one.batch_s == pytest.approx(32 * 1.5e-4) and one.interval_s == one.batch_s and one.held_bytes == 4800
    # dp=2:
    dp = _served(2, dp=2)
    # rank 0 sends a header (100 us: a message's latency) and the batch (256 bytes a sample);
    # 16 samples each; the probabilities (10 float64 a sample) gathered: one ring step of half
    assert dp.batch_s == pytest.approx(HOP + 1e-4 + send(256 * 32) + 16 * 1.5e-4 + send(8 * 10 * 32 / 2))
    assert dp.held_bytes == 4800 and dp.rate == pytest.approx(32 / dp.batch_s)  # one batch at a time
    # tp=2: each Linear halved on all 32 samples; the row layer's output (40 bytes a sample)
    # all-reduced: two ring steps of half of it; nothing to gather over one replica
    tp = _served(2, tp=2)
    assert tp.batch_s == pytest.approx(HOP + 1e-4 + send(256 * 32) + 32 * 1.5e-4 / 2 + 2 * send(40 * 32 / 2))
    assert tp.held_bytes == 2400
    # pp=2: stages (Linear, ReLU) and (Linear), 3.2 and 1.6 ms a batch, the first sending its
    # 400 bytes a sample on; a batch a stage in flight: one every slowest hop
    pp = _served(2, pp=2, microbatches=2)
    first = 32 * 1e-4 + send(400 * 32)
    assert pp.batch_s == pytest.approx(HOP + first + 32 * 5e-5) and pp.interval_s == pytest.approx(HOP + first)
    assert pp.held_bytes == 4000 and pp.rate == pytest.approx(32 / (HOP + first))
    assert pp.worst_s == pytest.approx(WAIT + pp.interval_s + pp.batch_s)
    assert dp.worst_s == pytest.approx(WAIT + dp.interval_s + dp.batch_s) and dp.interval_s == dp.batch_s
    # ranks beyond the cores wait their turn: the compute stretches
    crowded = served(ParallelConfig(dp=2), 2, PROFILE, LINK, cores=1, max_batch=BATCH, max_wait_s=WAIT,
                     classes=CLASSES)  # fmt: skip
    assert crowded.batch_s - dp.batch_s == pytest.approx(16 * 1.5e-4)


def test_each_exchange_costs_at_least_what_a_small_one_costs_computing_ranks():
    """The link's sync_s (1 ms here) floors each exchange: the header's and the batch's
    broadcast, the gather, a tensor-parallel pair's all-reduce (the MLP head: one pair, no odd
    layer); a pipeline's sends, between a stage that waits and one that computes, do not."""
    slow = Link(1e-4, 1e-9, overlap=0.0, sync_s=1e-3)

    def on(world: int, **layout) -> Served:
        return served(ParallelConfig(**layout), world, PROFILE, slow, cores=8, max_batch=BATCH, max_wait_s=WAIT,
                      classes=CLASSES)  # fmt: skip

    assert on(2, dp=2).batch_s == pytest.approx(HOP + 2e-3 + 16 * 1.5e-4 + 1e-3)
    assert on(2, tp=2).batch_s == pytest.approx(HOP + 2e-3 + 32 * 1.5e-4 / 2 + 1e-3)
    assert on(2, pp=2, microbatches=2).batch_s == pytest.approx(_served(2, pp=2, microbatches=2).batch_s)


def test_the_front_adds_to_every_batch_and_takes_a_core_where_none_is_spare():
    """The front's 2 ms a batch: on every batch's time; at full load beside ranks with a core
    to spare (the interval at least the front's time), out of the ranks' time without."""
    front = 2e-3

    def at(world: int, cores: int, **layout) -> Served:
        return served(ParallelConfig(**layout), world, PROFILE, LINK, cores=cores, max_batch=BATCH, max_wait_s=WAIT,
                      classes=CLASSES, front_s=front)  # fmt: skip

    one = at(1, 2)
    assert one.batch_s == pytest.approx(32 * 1.5e-4 + front) and one.interval_s == pytest.approx(32 * 1.5e-4)
    assert at(1, 1).interval_s == pytest.approx(32 * 1.5e-4 + front)
    tiny = Link(1e-7, 1e-12, overlap=0.0)  # the ranks' exchanges and the front's hop all but free
    alone = served(ParallelConfig(), 1, PROFILE, tiny, cores=2, max_batch=1, max_wait_s=WAIT, classes=CLASSES,
                   front_s=front)  # fmt: skip
    assert alone.interval_s == pytest.approx(front)  # a forward of 150 us: the front sets the pace
    pp = at(2, 2, pp=2, microbatches=2)
    first = 32 * 1e-4 + send(400 * 32)
    assert pp.batch_s == pytest.approx(front + HOP + first + 32 * 5e-5)
    assert pp.interval_s == pytest.approx(first + front + HOP)  # two ranks on two cores: none spare


def _option(name: str, rate: float, worst: float, held: float = 1.0) -> Served:
    interval = 32 / rate
    return Served(ParallelConfig(), name, worst - 0.005 - interval, interval, held, 32, 0.005)


def test_the_choice_is_the_highest_rate_within_the_target():
    fast, quick = _option("dp=2", 2000, 0.050), _option("tp=2", 1000, 0.020)
    assert choose([fast, quick], 0.0, None)[0] is fast  # no target
    best, text = choose([fast, quick], 0.030, None)
    assert best is quick and "within serve.p99_ms = 30; the highest rate of 1 within it, of 2 serving layouts" in text
    assert choose([fast, quick], 0.060, None)[0] is fast
    best, text = choose([fast, quick], 0.010, None)  # none within: the one that waits least, said so
    assert best is quick and "no layout is within serve.p99_ms = 10, this one waits least" in text
    assert text.startswith("tp=2 (predicted ") and "1,000 samples a second" in text


def test_the_line_says_where_one_process_would_serve_as_many():
    from shardwise.plan.serving import alone_would

    chosen = _option("dp=2", 2000, 0.050)
    assert alone_would(_option("one", 2100, 0.03), chosen, None) == (
        "; one process would serve 2,100 samples a second (--nproc 1)"
    )
    assert alone_would(_option("one", 1900, 0.03), chosen, None) == ""  # the ranks serve more
    assert alone_would(_option("one", 2100, 0.03, held=2.0), chosen, 1.5) == ""  # its weights do not fit


def test_a_memory_budget_drops_layouts_and_none_fitting_is_one_line():
    big, small = _option("dp=2", 2000, 0.050, held=3 * 2**20), _option("tp=2", 1000, 0.020, held=2**20)
    assert choose([big, small], 0.0, 2 * 2**20)[0] is small
    with pytest.raises(ShardwiseError) as e:
        choose([big, small], 0.0, 0.5 * 2**20)
    assert str(e.value) == (
        "serve.memory_per_rank: no serving layout of these ranks holds under 0.5 MiB a rank: the least is tp=2, "
        "1.0 MiB (more ranks: --nproc)"
    )


def _cfg(**settings: str):
    from shardwise.config import load_config

    return load_config(None, {"model.name": "mlp", "train.batch_size": "32", **settings})


def test_serving_layouts_leave_out_sharding_servers_and_mixed_pipelines():
    layouts = serving_layouts(_cfg(), 4, ModelShape())
    names = {(c.dp, c.tp, c.pp, c.spatial, c.vertical, c.microbatches) for c in layouts}
    assert (None, 1, 4, 1, 1, 4) in names  # a pipeline alone, a batch a stage, once
    assert all(pp in (1, 4) for _, _, pp, _, _, _ in names)  # no dp=2 x pp=2
    assert (None, 2, 1, 1, 1, None) in names and (None, 1, 1, 1, 1, None) in names  # dp2 x tp2; dp=4
    assert all(c.mode == "allreduce" and c.shard == "none" for c in layouts)
    assert len(layouts) == len(names)
    # only what a start accepts: a batch of 6 splits over neither 4 replicas nor 4 micro-batches
    from shardwise.topology import ParallelDims

    small = [ParallelDims.resolve(c, 4) for c in serving_layouts(_cfg(**{"train.batch_size": "6"}), 4, ModelShape())]
    assert all(d.dp < 4 and d.pp == 1 for d in small) and "tp=4" in {d.layout for d in small}
    # a convnet is cut by input columns only with parallel.vertical_unit = channel: none offered
    convnet = serving_layouts(_cfg(**{"model.name": "convnet"}), 2, ModelShape())
    assert all(c.vertical == 1 for c in convnet) and any(c.tp == 2 for c in convnet)


def test_a_pipeline_served_one_batch_at_a_time_is_no_faster_than_its_stages_in_turn():
    pipelined = _served(2, pp=2, microbatches=2)
    alone = served(ParallelConfig(pp=2, microbatches=2), 2, PROFILE, LINK, cores=8, max_batch=BATCH,
                   max_wait_s=WAIT, classes=CLASSES, pipelined=False)  # fmt: skip
    spread = 1e-4 + send(256 * 32)  # broadcast to the other stage, as the other layouts are
    assert alone.interval_s == alone.batch_s == pytest.approx(spread + pipelined.batch_s)
    # cut where the serving ranks cut (each stage's first layer): everything in the first stage but the last layer
    cut = served(ParallelConfig(pp=2, microbatches=2), 2, PROFILE, LINK, cores=8, max_batch=BATCH,
                 max_wait_s=WAIT, classes=CLASSES, cut=[0, 2, 3])  # fmt: skip
    assert cut.batch_s == pytest.approx(pipelined.batch_s) and cut.held_bytes == 4000
    elsewhere = served(ParallelConfig(pp=2, microbatches=2), 2, PROFILE, LINK, cores=8, max_batch=BATCH,
                       max_wait_s=WAIT, classes=CLASSES, cut=[0, 1, 3])  # fmt: skip
    assert elsewhere.interval_s == pytest.approx(HOP + 32 * 1e-4 + send(400 * 32))  # the ReLU moved: same hop here
    assert elsewhere.held_bytes == 4000


def test_the_serving_pipeline_is_cut_where_the_ranks_cut_it():
    """size_cut by hand: a 64-4096-64-4096-10 MLP (Flatten, then Linear and ReLU in turn) has
    three Linear layers of 1 MiB of weights, each used once a sample, and a last of 160 KiB:
    two stages balance as the first two against the last two (2 MiB against 1.16)."""
    from shardwise.plan.serving import size_cut

    cfg = _cfg(**{"model.hidden": "4096,64,4096", "data.name": "synthetic", "data.shape": "64"})
    assert size_cut(cfg, 2) == [0, 5, 8]  # Flatten, Linear, ReLU, Linear, ReLU | Linear, ReLU, Linear


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_a_latency_target_out_of_range_is_one_line(value):
    from shardwise.config import load_config

    with pytest.raises(ShardwiseError, match=r"^serve.p99_ms: must be between 0 \(no target\) and 3600000, got "):
        load_config(None, {"serve.p99_ms": value})


def test_bench_serve_auto_serves_each_layout_as_it_was_predicted():
    """The --parallel.* flags `bench serve-auto` serves a predicted layout with load back to it."""
    from shardwise.bench.serve_auto import layout_args
    from shardwise.config import load_config

    for world in (2, 4):
        for layout in serving_layouts(_cfg(), world, ModelShape()):
            args = layout_args(layout)
            named = {args[i].removeprefix("--"): args[i + 1] for i in range(0, len(args), 2)}
            cfg = load_config(None, {"model.name": "mlp", **named})
            assert cfg.parallel == layout, (layout, args)
