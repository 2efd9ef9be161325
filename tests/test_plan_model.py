"""The cost model on a profile written by hand: each layout's step and memory computed
here from the same numbers, term by term."""

from __future__ import annotations

import dataclasses

import pytest

from shardwise.comm.cost import Link
from shardwise.config import ParallelConfig
from shardwise.plan.model import Setting, predict
from shardwise.plan.profile import LayerProfile, ModelProfile

NOLAT = Link(0.0, 1e-9, overlap=0.0)  # 1 ns a byte; compute hides no communication
LAYERS = (
    LayerProfile("features.0", "conv", 0.0, 1e-4, 1000, 400, 256, 64, 0),
    LayerProfile("features.1", "other", 0.0, 0.0, 0, 400, 400),
    LayerProfile("head.0", "linear", 0.0, 2e-4, 4000, 200, 400),
    LayerProfile("head.1", "other", 0.0, 0.0, 0, 200, 200),
    LayerProfile("head.2", "linear", 0.0, 1e-4, 800, 40, 200),
)
PROFILE = ModelProfile({}, LAYERS)
PARAMS = 5800
OUTPUTS = 400 + 400 + 200 + 200 + 40  # bytes a sample leaves for the backward
# where ranks hold different gradients, the loop's agreement on finite ones: a 4-byte
# all-reduce, on 2 ranks of NOLAT 4 ns
AGREE = 4e-9


def _setting(cores: int = 8) -> Setting:
    return Setting(PROFILE, NOLAT, batch=64, cores=cores, optimizer_slots=1)


def test_loading_is_each_ranks_share_of_the_batch():
    """T_load: every rank takes its data-parallel share of the batch (a pipeline's and a
    tensor-parallel group's ranks each take it whole), workers of a parameter server too;
    the step is load + compute + communication + bubble."""
    loading = dataclasses.replace(_setting(), load_fixed_s=1e-4, load_s_per_sample=1e-5)
    for cfg, world, share in [
        (ParallelConfig(), 2, 32),
        (ParallelConfig(dp=4), 4, 16),
        (ParallelConfig(tp=2), 2, 64),
        (ParallelConfig(dp=2, pp=2, microbatches=2), 4, 32),
        (ParallelConfig(mode="ps", servers=1), 3, 32),
    ]:
        with_load, without = predict(cfg, world, loading), predict(cfg, world, _setting())
        assert with_load.load_s == pytest.approx(1e-4 + share * 1e-5), cfg
        assert with_load.step_s - without.step_s == pytest.approx(with_load.load_s), cfg
        parts = with_load.load_s + with_load.compute_s + with_load.comm_s + with_load.bubble_s
        assert with_load.step_s == pytest.approx(parts)
    # ranks beyond the cores wait their turn to load, as to compute
    crowded = dataclasses.replace(loading, cores=2)
    assert predict(ParallelConfig(dp=4), 4, crowded).load_s == pytest.approx(2 * (1e-4 + 16 * 1e-5))


def test_a_compressors_bytes_add_to_the_peak_where_it_averages():
    """compressor_bytes by hand (8 MiB of gradients in 25 MiB buckets, 2 ranks), and the
    model's peak: it adds what the compressor holds where data-parallel ranks average
    through it, and nothing on one rank or under FSDP2."""
    from shardwise.comm.compress import CompressionSettings, compressor_bytes

    mib = 2**20

    def held(method: str, world: int = 2, bucket: float = 25 * mib, **kw) -> float:
        return compressor_bytes(CompressionSettings(method, **kw), 8 * mib, bucket, world) / mib

    assert held("none") == 0 and held("bf16") == 4  # a bucket's half-precision copy
    assert held("powersgd") == 16  # the residuals and each bucket's spare (the last step's, kept a step)
    assert held("int8") == 16 + 8 + 2 + 2 * 2  # and a working copy, this rank's bytes, both ranks'
    assert held("topk", topk_ratio=0.01) == pytest.approx(16 + 8 + 2 * 0.01 * 8 * 2)
    assert held("int8", bucket=2 * mib) == 16 + 2 + 0.5 + 2 * 0.5  # smaller buckets: smaller working buffers
    assert held("int8", world=1) == 0
    # the model's peak adds exactly that, for the gradient bytes the rank averages: DDP's
    # buckets on dp, a stage's whole gradient on a pipeline; nothing where nothing averages
    from shardwise.parallel.data import DDP_BUCKET_BYTES

    int8 = CompressionSettings("int8")
    compressed = dataclasses.replace(_setting(), compression=int8)

    def added(cfg: ParallelConfig, world: int) -> float:
        return predict(cfg, world, compressed).memory_bytes - predict(cfg, world, _setting()).memory_bytes

    assert added(ParallelConfig(), 2) == pytest.approx(compressor_bytes(int8, PARAMS, DDP_BUCKET_BYTES, 2))
    assert added(ParallelConfig(dp=4), 4) == pytest.approx(compressor_bytes(int8, PARAMS, DDP_BUCKET_BYTES, 4))
    assert 0 < added(ParallelConfig(dp=2, pp=2, microbatches=2), 4) < added(ParallelConfig(), 2)  # a stage's share
    for cfg, world in [(ParallelConfig(shard="full"), 2), (ParallelConfig(tp=2), 2)]:
        assert added(cfg, world) == 0


def test_data_parallel():
    p = predict(ParallelConfig(), 2, _setting())
    assert p.compute_s == pytest.approx(32 * 4e-4)  # 32 samples a rank, the whole model
    assert p.comm_s == pytest.approx(PARAMS * 1e-9)  # one bucket, 2 ranks: the whole gradient sent once
    # weights, gradients, momentum; the activations; DDP's buckets rebuilt beside the gradients
    assert p.memory_bytes == pytest.approx(3 * PARAMS + 32 * OUTPUTS + PARAMS)
    full = predict(ParallelConfig(shard="full"), 2, _setting())
    # half of each; the largest unit (head.0) regathered with its gradient, the next prefetched
    assert full.memory_bytes == pytest.approx(3 * PARAMS / 2 + 32 * OUTPUTS + 4 * 4000 + 2 * 1000)
    assert full.comm_s == pytest.approx(3 * PARAMS / 2 * 1e-9 + AGREE)


def test_the_update_runs_on_the_parameters_a_rank_updates():
    timed = Setting(dataclasses.replace(PROFILE, update_s_per_byte=1e-6), NOLAT, batch=64, cores=8)
    for cfg, updated in (
        (ParallelConfig(), PARAMS),  # every replica steps the whole model
        (ParallelConfig(shard="optimizer"), PARAMS / 2),  # its half of the flat parameters
        (ParallelConfig(shard="full"), PARAMS / 2),
        (ParallelConfig(tp=2), 1000 + 4800 / 2),  # the features whole, the head's half
    ):
        base = predict(cfg, 2, _setting())
        assert predict(cfg, 2, timed).compute_s - base.compute_s == pytest.approx(updated * 1e-6), cfg
    # a parameter server's step waits for its servers to update their slices
    ps = ParallelConfig(mode="ps", servers=2)
    assert predict(ps, 4, timed).compute_s - predict(ps, 4, _setting()).compute_s == pytest.approx(PARAMS / 2 * 1e-6)


def test_the_engines_own_step_cost_is_paid_by_every_layout():
    slow = dataclasses.replace(_setting(), step_overhead_s=2e-3)
    for cfg, world in ((ParallelConfig(), 2), (ParallelConfig(tp=2), 2), (ParallelConfig(pp=2), 2),
                       (ParallelConfig(mode="ps", servers=1), 2)):  # fmt: skip
        assert predict(cfg, world, slow).step_s - predict(cfg, world, _setting()).step_s == pytest.approx(2e-3), cfg


def test_each_strategys_passing_buffers_and_the_largest_stage_set_the_peak():
    zero = predict(ParallelConfig(shard="optimizer"), 2, _setting())
    # the backward (activations and DDP's rebuild) outweighs the step's joined slice and gathered copies
    assert zero.memory_bytes == pytest.approx(2.5 * PARAMS + 32 * OUTPUTS + PARAMS)
    # a pipeline of 2 stages, 4 micro-batches of 16, cut between layers with weights: the
    # features (1e-4 s a sample) | the head (3e-4 s), as the head with the features' ReLU
    # would cost as much. Under 1F1B the first stage keeps 2 micro-batches for its backward,
    # the last 1; under GPipe both keep all 4. Each also holds its weights, gradients and
    # momentum and its largest layer's fresh gradient before it is summed
    first, last = 3 * 1000 + 1000, 3 * 4800 + 4000
    pipe = predict(ParallelConfig(pp=2, microbatches=4), 2, _setting())
    assert pipe.memory_bytes == pytest.approx(max(first + 32 * (400 + 400), last + 16 * (200 + 200 + 40)))
    gpipe = predict(ParallelConfig(pp=2, microbatches=4, schedule="gpipe"), 2, _setting())
    assert gpipe.memory_bytes == pytest.approx(max(first + 64 * (400 + 400), last + 64 * (200 + 200 + 40)))
    # 8 micro-batches of 8 under 1F1B: still 2 and 1 in flight
    eight = predict(ParallelConfig(pp=2, microbatches=8), 2, _setting())
    assert eight.memory_bytes == pytest.approx(max(first + 16 * (400 + 400), last + 8 * (200 + 200 + 40)))
    # the evaluation at the end: 50 samples a rank, the input and two outputs at a time
    evaluated = predict(ParallelConfig(), 2, dataclasses.replace(_setting(), val_samples=100))
    assert evaluated.memory_bytes == pytest.approx(3 * PARAMS + 50 * (256 + 400 + 400))
    # 1100 samples: 550 a rank, in two forwards of 275 (not one of 512 and one of 38)
    many = predict(ParallelConfig(), 2, dataclasses.replace(_setting(), val_samples=1100))
    assert many.memory_bytes == pytest.approx(3 * PARAMS + 275 * (256 + 400 + 400))
    # and the engine's own bytes, on every rank of every layout
    more = dataclasses.replace(_setting(), rank_overhead_bytes=1e6)
    for cfg in (ParallelConfig(), ParallelConfig(tp=2), ParallelConfig(pp=2), ParallelConfig(shard="full")):
        assert predict(cfg, 2, more).memory_bytes - predict(cfg, 2, _setting()).memory_bytes == pytest.approx(1e6)


def test_measured_pass_memory_replaces_the_count_of_outputs():
    measured = dataclasses.replace(
        PROFILE, train_fixed_bytes=7000, train_bytes_per_sample=2000, eval_bytes_per_sample=900
    )
    setting = dataclasses.replace(_setting(), profile=measured, val_samples=100)
    # dp=2: the set-up kept; 32 samples' passes and DDP's rebuild outweigh the evaluation's 50
    p = predict(ParallelConfig(), 2, setting)
    assert p.memory_bytes == pytest.approx(3 * PARAMS + 7000 + max(32 * 2000 + PARAMS, 50 * 900))
    # a pipeline stage takes its share of the per-sample bytes by its layers' outputs; with
    # dp = 1 it evaluates all 100 validation samples. The first stage (2 micro-batches of 16
    # in flight) holds the most
    pipe = predict(ParallelConfig(pp=2, microbatches=4), 2, setting)
    share = (400 + 400) / OUTPUTS
    assert pipe.memory_bytes == pytest.approx(3 * 1000 + 7000 + max(32 * 2000 * share + 1000, 100 * 900 * share))


def test_an_evaluation_peaks_at_the_largest_measured_layer_a_rank_runs():
    """Each layer's measured evaluation peak (the model's input alive): a rank evaluating
    the layers it holds peaks at the largest of theirs; a later pipeline stage holds its own
    input instead of the model's; a band holds its share, and a layer that takes rows from
    a neighbour the window it assembles too (a copy of its input's band)."""
    peaks = (700, 500, 650, 300, 250)
    layers = tuple(dataclasses.replace(x, eval_bytes_per_sample=e) for x, e in zip(LAYERS, peaks, strict=True))
    layers = (dataclasses.replace(layers[0], exchanges=1), *layers[1:])
    measured = dataclasses.replace(PROFILE, layers=layers, train_bytes_per_sample=1, eval_bytes_per_sample=1000)
    setting = dataclasses.replace(_setting(), profile=measured, val_samples=1000)  # 2 forwards of 500 on 1 rank
    # one process: the largest layer's peak (not the whole pass's 1000, which is the fallback)
    assert predict(ParallelConfig(), 1, setting).memory_bytes == pytest.approx(3 * PARAMS + 500 * 700)
    # 2 stages: the head's is head.0's with its input (head.0's, 400 B) held in place of the
    # model's (256 B), above the first's (features.0's, 500 x 700 B)
    pipe = predict(ParallelConfig(pp=2, microbatches=4), 2, setting)
    assert pipe.memory_bytes == pytest.approx(3 * 4800 + 500 * (650 + 400 - 256))
    # 2 bands: features.0's half, and its window: half of its 256 B input
    bands = predict(ParallelConfig(spatial=2), 2, setting)
    assert bands.memory_bytes == pytest.approx(3 * PARAMS + 500 * (700 + 256) / 2)


def test_micro_batches_after_the_first_add_their_gradients_into_the_steps():
    adding = dataclasses.replace(_setting(), profile=dataclasses.replace(PROFILE, accumulate_s_per_byte=1e-6))
    p = predict(ParallelConfig(pp=2, microbatches=4), 2, adding)
    # 3 of the 4 micro-batches add a pass over the stage's parameters: the head's stage
    # (4800 bytes) takes 4.8 ms + 3/4 x 4.8 ms a micro-batch
    assert p.compute_s == pytest.approx(4 * (16 * 3e-4 + 0.75 * 4800 * 1e-6))


def test_accumulated_micro_batches_pay_each_pass_and_keep_one_micro_batch():
    timed = dataclasses.replace(PROFILE, accumulate_s_per_byte=1e-6, layers=tuple(
        dataclasses.replace(layer, fixed_s=1e-3) for layer in LAYERS))  # fmt: skip
    one, four = (dataclasses.replace(_setting(), profile=timed, grad_accum=g) for g in (1, 4))
    p1, p4 = predict(ParallelConfig(), 2, one), predict(ParallelConfig(), 2, four)
    # four passes of 8 samples: the samples' time as in one pass of 32, each layer's fixed
    # time four times, and three gradients added into the first
    assert p4.compute_s - p1.compute_s == pytest.approx(3 * 5 * 1e-3 + 3 * PARAMS * 1e-6)
    # activations of 8 samples, not 32, and a fresh gradient of the largest layer
    assert p1.memory_bytes - p4.memory_bytes == pytest.approx(24 * OUTPUTS - 4000)
    # tensor parallelism's all-reduces run once a micro-batch: the same bytes, four times
    # the calls; the row layer's all-reduce on 2 ranks waits 2 latencies (a ring's
    # reduce-scatter and all-gather); the column layer's, of its input gradient, runs
    # beside its weight gradient (a third of 1 ms + 8 x 0.2 ms on half the layer) and
    # adds nothing
    late = dataclasses.replace(four, link=Link(1e-4, 1e-9, overlap=0.0))
    tp1 = predict(ParallelConfig(tp=2), 2, dataclasses.replace(late, grad_accum=1))
    assert predict(ParallelConfig(tp=2), 2, late).comm_s - tp1.comm_s == pytest.approx(3 * 2 * 1e-4, rel=1e-3)


def test_tensor_parallel_halves_the_head():
    p = predict(ParallelConfig(tp=2), 2, _setting())
    assert p.compute_s == pytest.approx(64 * (1e-4 + 2e-4 / 2 + 1e-4 / 2))
    # one pair (head.0, head.2): its output all-reduced on 2 ranks; its input's gradient
    # too, beside head.0's weight gradient (a third of 64 x 0.2 ms, on half the layer:
    # 2.13 ms), which hides it (25.6 us) on this link, but not on one 100 times slower
    assert p.comm_s == pytest.approx(64 * 40 * 1e-9 + AGREE)
    slow = predict(ParallelConfig(tp=2), 2, dataclasses.replace(_setting(), link=Link(0.0, 1e-7, overlap=0.0)))
    assert slow.comm_s == pytest.approx(64 * 40 * 1e-7 + 64 * 400 * 1e-7 - 64 * 2e-4 / 6 + 100 * AGREE)
    assert p.memory_bytes == pytest.approx(3 * (1000 + 4800 / 2) + 64 * OUTPUTS)


def test_a_pipeline_runs_the_slowest_stage_and_waits_out_the_bubble():
    p = predict(ParallelConfig(pp=2, microbatches=4), 2, _setting())
    # 16 samples a micro-batch: the features (1.6 ms) on one stage, the head (4.8 ms) on the other
    slowest, other, transfer = 16 * 3e-4, 16 * 1e-4, 16 * 400 * 1e-9
    assert p.compute_s == pytest.approx(4 * slowest)
    assert p.bubble_s == pytest.approx(other)  # the features' stage fills and drains
    # the head's stage posts each activation's receive only after its last backward (gloo
    # sends into a posted receive), so each of the 4 arrives while it waits, and the last
    # gradient goes back: 4 + 1 transfers on the way
    assert p.comm_s == pytest.approx(5 * transfer + AGREE)


def test_more_ranks_than_cores_stretch_the_compute():
    assert predict(ParallelConfig(), 4, _setting(cores=2)).compute_s == pytest.approx(2 * 16 * 4e-4)
    assert predict(ParallelConfig(), 4, _setting(cores=4)).compute_s == pytest.approx(16 * 4e-4)
    # 2 workers and 2 servers on 2 cores: the servers wait while the workers compute
    assert predict(ParallelConfig(mode="ps", servers=2), 4, _setting(cores=2)).compute_s == pytest.approx(32 * 4e-4)
    # colocated, each of the 4 ranks is a worker: 4 compute at once on 2 cores
    colocated = ParallelConfig(mode="ps", colocate=True)
    assert predict(colocated, 4, _setting(cores=2)).compute_s == pytest.approx(2 * 16 * 4e-4)


def test_the_pipeline_is_cut_on_the_passes_as_the_engine_cuts_it():
    # per micro-batch of 16: 1, 3 and 3 ms; the first layer's 4000 bytes of weights add
    # 4 ms of accumulation a micro-batch. The engine profiles the passes alone and cuts
    # (first, second | third): max(4, 3) beats (first | second, third): max(1, 6)
    per_ms = [1e-3 / 16, 3e-3 / 16, 3e-3 / 16]
    layers = tuple(
        LayerProfile(name, "linear", 0.0, t, size, 40, 40)
        for name, t, size in zip(("features.0", "head.0", "head.1"), per_ms, (4000, 4, 4), strict=True)
    )
    acc = 4e-3 / (0.75 * 4000)
    setting = Setting(ModelProfile({}, layers, accumulate_s_per_byte=acc), NOLAT, batch=64, cores=8)
    p = predict(ParallelConfig(pp=2, microbatches=4), 2, setting)
    # the first stage takes 1 + 4 (its accumulation) + 3 ms a micro-batch, four micro-batches
    assert p.compute_s == pytest.approx(4 * (8e-3 + 0.75 * 4 * acc))


def test_fsdp_gathers_for_every_accumulated_micro_batch_and_keeps_whole_gradients():
    from shardwise.parallel.data import sync_seconds

    four = dataclasses.replace(_setting(), grad_accum=4)
    p = predict(ParallelConfig(shard="full"), 2, four)
    # each of 4 micro-batches gathers every unit for its forward and its backward, one
    # reduce-scatter after the last: 8 + 1 passes over half the bytes on 2 ranks
    assert p.comm_s == pytest.approx(9 * PARAMS / 2 * 1e-9 + AGREE)
    # its half of the weights and momentum, the whole gradient (summed unsharded until the
    # last micro-batch); 8 samples' activations and the largest unit regathered with its
    # gradient, the next prefetched
    assert p.memory_bytes == pytest.approx(PARAMS / 2 + PARAMS + PARAMS / 2 + 8 * OUTPUTS + 4 * 4000 + 2 * 1000)
    # the collectives run beside all four passes' compute (one pass's backward is 2/3 of 8
    # samples at 4e-4 s each), on a link slow enough that not all of them hide
    hiding = Link(0.0, 1e-6, overlap=1.0)
    slow = predict(ParallelConfig(shard="full"), 2, dataclasses.replace(four, link=hiding))
    expected = sync_seconds(hiding, 2, PARAMS, backward_s=8 * 4e-4 * 2 / 3, shard="full", units=3, passes=4)
    assert slow.comm_s == pytest.approx(expected + 1000 * AGREE) and 0 < expected  # the flag at 1 us a byte


def test_a_pipelines_stages_average_their_own_gradients_after_the_drain():
    """dp x pp: each stage all-reduces its own gradients in one flat buffer (a copy in, a
    copy out) once its own last backward ends, beside no compute. 1F1B, 2 micro-batches of
    16 (the features' stage: no forward, 1.6 ms backward; the head's: 4.8 ms; 6.4 us a
    transfer): the head's stage ends at 9.6128 ms, stage 0 at 11.2192."""
    from shardwise.comm.cost import all_reduce

    copying = dataclasses.replace(_setting(), profile=dataclasses.replace(PROFILE, copy_s_per_byte=1e-9))
    layout = ParallelConfig(pp=2, dp=2, microbatches=2)
    free = predict(layout, 4, dataclasses.replace(copying, averaging=lambda dims, stretch: 0.0))  # averaging nothing
    # the head's 4800 bytes are averaged during stage 0's last backward: stage 0's 1000 end the step
    plain = predict(layout, 4, copying)
    assert plain.comm_s - free.comm_s == pytest.approx(all_reduce(NOLAT, 2, 1000) + 2 * 1000 * 1e-9)
    # a slow averaging (58 ms for the whole model, 48 for the head's share): the head's ends it
    slow = predict(layout, 4, dataclasses.replace(copying, averaging=lambda dims, stretch: 58e-3))
    assert slow.comm_s - free.comm_s == pytest.approx(9.6128e-3 + 48e-3 - 11.2192e-3)


def test_a_named_compression_method_replaces_the_all_reduce_where_gradients_are_averaged():
    """With comm.compression named, a data-parallel layout pays the method's averaging time
    (its collectives and compute, measured per layout) instead of DDP's all-reduce; a
    pipeline's stage its share; FSDP2, a parameter server and dp = 1 average nothing through it."""
    seen = []

    def averaging(dims, stretch):
        seen.append((dims.dp, dims.tp))
        return 1e-3

    compressed = dataclasses.replace(_setting(), averaging=averaging)
    dp = predict(ParallelConfig(), 2, compressed)
    assert dp.comm_s == pytest.approx(1e-3)  # not PARAMS * 1e-9: the all-reduce is gone
    zero = predict(ParallelConfig(shard="optimizer"), 2, compressed)
    plain_zero = predict(ParallelConfig(shard="optimizer"), 2, _setting())
    assert zero.comm_s == pytest.approx(1e-3 + plain_zero.comm_s - PARAMS * 1e-9)  # then its all-gather
    pipe, plain_pipe = (predict(ParallelConfig(pp=2, dp=2), 4, s) for s in (compressed, _setting()))
    # each stage averages its share as its own schedule ends: the head's (4800 of the 5800
    # bytes) is done before stage 0's last backward, so stage 0's (1000) adds to the step
    assert pipe.comm_s - plain_pipe.comm_s == pytest.approx(1e-3 * 1000 / PARAMS - 1000 * 1e-9)
    for cfg, world in ((ParallelConfig(shard="full"), 2), (ParallelConfig(mode="ps", servers=1), 2),
                       (ParallelConfig(tp=2), 2)):  # fmt: skip
        assert predict(cfg, world, compressed) == predict(cfg, world, _setting()), cfg
    assert seen == [(2, 1), (2, 1), (2, 1)]
    # its compute shares the cores as the passes do: 4 ranks on 2 cores take it twice as long
    stretches = []
    shared = dataclasses.replace(_setting(cores=2), averaging=lambda dims, stretch: stretches.append(stretch) or 1e-3)
    for world in (4, 2):
        predict(ParallelConfig(), world, shared)
    assert stretches == [2.0, 1.0]


def test_a_spatial_cut_sums_the_bands_weight_gradients_once_a_step():
    """Each band holds its share of the features' weight gradients: one all-reduce of
    their bytes a step, on top of the halos (a feature stack without weights has none)."""
    weightless = dataclasses.replace(PROFILE, layers=(dataclasses.replace(LAYERS[0], param_bytes=0), *LAYERS[1:]))
    cut = predict(ParallelConfig(spatial=2), 2, _setting())
    bare = predict(ParallelConfig(spatial=2), 2, dataclasses.replace(_setting(), profile=weightless))
    assert cut.comm_s - bare.comm_s == pytest.approx(1000 * 1e-9)  # a ring of 2 sends the bytes once


def test_checkpointing_adds_the_checkpointed_forwards_and_prices_its_memory():
    """train.activation_checkpointing = layers: the units with more than one layer (conv +
    activation, Linear + activation; not the classifier alone) run their forward again,
    split as the layout splits them, with their forward's communication (tp: the pair's row
    layer all-reduces its output again); the backward's activations are the profile's
    checkpointed bytes per sample."""

    def layer(name, kind, forward, params, out):
        return LayerProfile(name, kind, 0.0, 3 * forward, params, out, forward_per_sample_s=forward)

    layers = (
        layer("features.0", "conv", 4e-5, 1000, 400),
        layer("features.1", "other", 1e-6, 0, 400),
        layer("head.0", "linear", 8e-5, 4000, 200),  # tp: a column layer
        layer("head.1", "other", 1e-6, 0, 200),
        layer("head.2", "linear", 6e-5, 3000, 100),  # the pair's row layer: it all-reduces 100 B a sample
        layer("head.3", "other", 1e-6, 0, 100),
        layer("head.4", "linear", 3e-5, 800, 40),  # the classifier alone: not checkpointed, gathered under tp
    )
    profile = ModelProfile({}, layers, train_bytes_per_sample=5000.0, checkpointed_bytes_per_sample=2000.0)
    plain = dataclasses.replace(_setting(), profile=profile)
    checked = dataclasses.replace(plain, checkpointing=True)
    one, two = predict(ParallelConfig(), 1, plain), predict(ParallelConfig(), 1, checked)
    assert two.compute_s - one.compute_s == pytest.approx(64 * (4e-5 + 1e-6 + 8e-5 + 1e-6 + 6e-5 + 1e-6))
    assert two.comm_s == one.comm_s == 0.0
    assert one.memory_bytes - two.memory_bytes == pytest.approx(64 * (5000 - 2000))
    tp1, tp2 = predict(ParallelConfig(tp=2), 2, plain), predict(ParallelConfig(tp=2), 2, checked)
    # the head's Linear layers halved by tp
    assert tp2.compute_s - tp1.compute_s == pytest.approx(64 * (4e-5 + 1e-6 + 8e-5 / 2 + 1e-6 + 6e-5 / 2 + 1e-6))
    ring = 2 * (2 - 1) / 2 * 64 * 100 * 1e-9  # the row layer's output all-reduced again (ring, 1 ns a byte)
    assert tp2.comm_s - tp1.comm_s == pytest.approx(ring)
    ps = ParallelConfig(mode="ps", servers=1)  # one worker takes the whole batch, and runs its forwards again
    ps1, ps2 = predict(ps, 2, plain), predict(ps, 2, checked)
    assert ps2.compute_s - ps1.compute_s == pytest.approx(64 * (4e-5 + 1e-6 + 8e-5 + 1e-6 + 6e-5 + 1e-6))


def test_the_data_parallel_all_reduce_is_priced_in_ddps_buckets():
    """The profile's layers in DDP's buckets, as DDP launches them (the last layers first,
    that bucket closed at 1 MiB, the next at 25 MiB), and the exposed all-reduce is the
    last bucket's where the backward hides the rest."""
    from shardwise.plan.model import _ddp_bucket_bytes

    mib = 2**20
    sizes = [2 * mib, 0, 20 * mib, mib // 2]  # an input layer, an activation, a wide layer, the head
    layers = tuple(LayerProfile(f"l{i}", "linear", 0.0, 1.0, s, 40, 40) for i, s in enumerate(sizes))
    profile = ModelProfile({}, layers)
    assert _ddp_bucket_bytes(profile) == [20.5 * mib, 2 * mib]
    hides = Link(0.0, 1e-9, overlap=1.0)
    step = predict(ParallelConfig(dp=2), 2, Setting(profile, hides, batch=64, cores=8, optimizer_slots=1))
    assert step.comm_s == pytest.approx(2 * mib * 1e-9)  # 2 (n - 1) / n = 1 x the last bucket's bytes
    # parallel.bucket_mb = 1: every bucket, the first too, closes once it holds 1 MiB
    assert _ddp_bucket_bytes(profile, mib) == [mib // 2 + 20 * mib, 2 * mib]
    assert _ddp_bucket_bytes(profile, mib // 4) == [mib // 2, 20 * mib, 2 * mib]
    small = predict(
        ParallelConfig(dp=2, bucket_mb=0.25), 2, Setting(profile, hides, batch=64, cores=8, optimizer_slots=1)
    )
    assert small.comm_s == pytest.approx(2 * mib * 1e-9)  # the last bucket is the input layer's still


def test_ranks_holding_different_gradients_agree_on_their_finiteness_every_step():
    """The loop's all-reduce of one flag (train/loop.py all_finite), where the gradients are
    not equal on every rank once reduced: at least the link's sync_s, as every small exchange
    between ranks that compute (FSDP2's too: test_data_parallel). Data parallelism and ZeRO-1
    (equal gradients) have none."""
    waits = dataclasses.replace(_setting(), link=dataclasses.replace(NOLAT, sync_s=1e-3))
    for cfg, world in [(ParallelConfig(tp=2), 2), (ParallelConfig(vertical=2), 2),
                       (ParallelConfig(pp=2, microbatches=2), 2), (ParallelConfig(dp=2, tp=2), 4)]:  # fmt: skip
        assert predict(cfg, world, waits).comm_s - predict(cfg, world, _setting()).comm_s == pytest.approx(
            1e-3 - AGREE * (1.5 if world == 4 else 1), abs=1e-12
        ), cfg
    for cfg in (ParallelConfig(), ParallelConfig(shard="optimizer")):
        assert predict(cfg, 2, waits).comm_s == predict(cfg, 2, _setting()).comm_s, cfg
