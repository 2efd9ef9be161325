"""`shardwise serve RUN --nproc N --parallel.layout auto`: the serving layout the cost model
predicts answers the most samples a second within the latency target `serve.p99_ms`.

A serving layout runs forward passes only, a batch of up to `serve.max_batch` samples at a
time, from the profile's forward times (`plan/model.py` `forward_pass`: each layer's forward
split as the layout splits it, with the forward's communication inside the layers). Its
figures, for a full batch:

- **a batch's time** (`batch_s`), from the front handing it to rank 0 to the answer: under
  an all-reduce layout, rank 0 sends each other rank in turn a header and the batch (two
  broadcasts), every rank runs the forward of its share (its 1/dp of the samples, its cut of the
  layers), and the probabilities are gathered over the data-parallel ranks; under a pipeline
  alone (`pp` = N, served a batch a stage, serve/stages.py), the stages' forwards in turn,
  each handing its activations to the next;
- **the interval** between batches at full load (`interval_s`): a batch's time, or a
  pipeline's slowest stage with its send (the others work on the batches behind and ahead);
- **the rate**, max_batch / interval samples a second;
- **the worst wait** of a request at full load: the batching wait (`serve.max_wait_ms`),
  the interval for the batch ahead of it to move on, then its own batch's time;
- **the front**: what the HTTP front and its client add to every batch, measured on this
  machine with no model behind it (`plan/front.py`), and, with ranks, the batch's hop to rank
  0 and the probabilities' back. Both add to a batch's time; at full load the hop adds to
  the interval, and the front works beside the ranks where a core is left over (the
  interval is at least the front's time) and takes its time out of theirs where none is.

Layouts are those `shardwise plan` enumerates for N ranks without what serving leaves out
(no sharding of data-parallel replicas, no parameter server, a pipeline only alone), each
accepted by the checks a start makes; a pipeline is cut as the serving ranks cut it (by the
layers' multiply-adds), and with serve.pipelined false is one batch at a time. A layout
whose largest rank holds more weights than `serve.memory_per_rank` is dropped. The choice:
the highest rate among the layouts whose worst wait is within `serve.p99_ms` (0: no target,
the highest rate); where none is within it, the one with the least worst wait, said so. Not
modelled: the cores the clients take, where they run on the same machine.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from shardwise.comm.cost import Link, all_gather, between_compute
from shardwise.config import Config, ParallelConfig
from shardwise.errors import ShardwiseError
from shardwise.parallel.pipeline import cut_units, units_of
from shardwise.plan.memory import held_params
from shardwise.plan.model import core_stretch, forward_pass
from shardwise.plan.profile import ModelProfile, tp_parts
from shardwise.plan.space import ModelShape, layouts
from shardwise.topology import ParallelDims

PROBABILITY_BYTES = 8  # a class's probability, as the ranks send it back (float64)


@dataclass(frozen=True)
class Served:
    config: ParallelConfig
    layout: str
    batch_s: float  # a full batch through the layout
    interval_s: float  # between full batches at full load
    held_bytes: float  # the weights the largest rank holds
    max_batch: int
    max_wait_s: float

    @property
    def rate(self) -> float:
        """Samples a second at full load."""
        return self.max_batch / self.interval_s

    @property
    def worst_s(self) -> float:
        """A request's longest time at full load: the batching wait, the batch ahead moving
        on, its own batch."""
        return self.max_wait_s + self.interval_s + self.batch_s


def serving_layouts(cfg: Config, nproc: int, shape: ModelShape) -> list[ParallelConfig]:
    """The layouts of `nproc` ranks the serving config `cfg` can start with: `plan`'s for its
    batch, less sharding, parameter servers and pipelines with other axes, each accepted by
    the checks a start makes; a pipeline once (serving never splits a batch into its
    micro-batches: the fewest the checks accept)."""
    from shardwise.config_check import validate
    from shardwise.preflight import layout_fits

    found, seen = [], set()
    for layout in layouts(nproc, batch=cfg.train.batch_size, shape=shape):
        dims = ParallelDims.resolve(layout, nproc)
        if layout.mode != "allreduce" or layout.shard != "none":
            continue
        if dims.pp > 1 and (dims.pp != nproc or layout.schedule != ParallelConfig().schedule):
            continue
        key = (dims.tp, dims.pp, dims.spatial, dims.vertical)
        if key in seen:
            continue
        try:
            candidate = dataclasses.replace(cfg, parallel=layout)
            validate(candidate)
            layout_fits(candidate, nproc)
        except ShardwiseError:
            continue
        seen.add(key)
        found.append(layout)
    return found


def _time_cut(profile: ModelProfile, stages: int, samples: float) -> list[int]:
    """Each stage's first layer and the end, balancing the layers' forward times."""
    times = [layer.forward_seconds(samples) for layer in profile.layers]
    has_params = [layer.param_bytes > 0 for layer in profile.layers]
    return cut_units(times, units_of(has_params), stages) + [len(times)]


def size_cut(cfg: Config, stages: int) -> list[int]:
    """Each stage's first layer and the end as the serving ranks cut a pipeline: balancing
    the layers' multiply-adds (serving_config sets train.deterministic)."""
    import torch

    from shardwise.data import load_source
    from shardwise.models import build_model
    from shardwise.parallel.pipeline import layer_units, multiply_adds, profile_layers

    dataset = load_source(cfg.data, seed=cfg.train.seed)
    model = build_model(cfg.model, dataset.in_shape, dataset.num_classes)
    costs = profile_layers(model, torch.from_numpy(dataset.x_train[:1]).float(), repeats=1)
    return cut_units([multiply_adds(c) for c in costs], layer_units(model), stages) + [len(costs)]


def served(
    cfg: ParallelConfig, nproc: int, profile: ModelProfile, link: Link, *, cores: int, max_batch: int,
    max_wait_s: float, classes: int, cut: list[int] | None = None, pipelined: bool = True,
    front_s: float = 0.0,
) -> Served:  # fmt: skip
    """A serving layout's figures for full batches of `max_batch` samples; a pipeline cut at
    `cut` (each stage's first layer and the end; None: balancing the forward times), a batch a
    stage in flight unless not `pipelined` (serve.pipelined); `front_s`: the front's own time
    a batch (`plan/front.py`)."""
    ranks = _ranks(cfg, nproc, profile, link, cores=cores, max_batch=max_batch, max_wait_s=max_wait_s,
                   classes=classes, cut=cut, pipelined=pipelined)  # fmt: skip
    hop = 0.0
    if nproc > 1:  # the batch to rank 0 and its probabilities back (at least a message each)
        in_bytes = profile.layers[0].in_bytes_per_sample * max_batch
        hop = link.send(in_bytes) + link.send(PROBABILITY_BYTES * classes * max_batch)
    # the front parses the next batch while the ranks work where a core is spare; the hop is
    # the ranks' own time (rank 0 takes a batch once it has answered the one before)
    spare = cores > nproc
    interval = max(ranks.interval_s + hop, front_s) if spare else ranks.interval_s + hop + front_s
    return dataclasses.replace(ranks, batch_s=ranks.batch_s + hop + front_s, interval_s=interval)


def _ranks(
    cfg: ParallelConfig, nproc: int, profile: ModelProfile, link: Link, *, cores: int, max_batch: int,
    max_wait_s: float, classes: int, cut: list[int] | None, pipelined: bool,
) -> Served:  # fmt: skip
    """`served`'s figures of the ranks alone: from rank 0 taking the batch to the answer."""
    dims = ParallelDims.resolve(cfg, nproc)
    stretch = core_stretch(nproc, cores)
    # each exchange between ranks that compute between exchanges: as a spatial cut's
    floor = between_compute(link, link.alpha_s)
    in_bytes = profile.layers[0].in_bytes_per_sample * max_batch
    spread = (nproc - 1) * (floor + max(floor, link.send(in_bytes)))  # rank 0 sends each rank a header, the batch
    if dims.pp > 1:  # a pipeline alone
        cut = cut or _time_cut(profile, dims.pp, max_batch)
        stages = [range(a, b) for a, b in zip(cut, cut[1:], strict=False)]
        times = [sum(profile.layers[i].forward_seconds(max_batch) for i in s) * stretch for s in stages]
        sends = [link.send(profile.layers[s[-1]].out_bytes_per_sample * max_batch) for s in stages[:-1]] + [0.0]
        hops = [t + x for t, x in zip(times, sends, strict=True)]
        held = max(held_params(profile, dims, s) for s in stages)
        if not pipelined:  # one batch through every stage at a time, broadcast as under the other layouts
            return Served(cfg, dims.layout, spread + sum(hops), spread + sum(hops), held, max_batch, max_wait_s)
        return Served(cfg, dims.layout, sum(hops), max(hops), held, max_batch, max_wait_s)
    samples = math.ceil(max_batch / dims.dp)  # a batch smaller than dp is padded to one a rank
    compute, comm = forward_pass(profile, dims, link, samples)
    comm = max(comm, _exchanges(profile, dims) * floor)
    gather = max(floor, all_gather(link, dims.dp, PROBABILITY_BYTES * classes * max_batch)) if dims.dp > 1 else 0.0
    batch_s = spread + compute * stretch + comm + gather
    return Served(cfg, dims.layout, batch_s, batch_s, held_params(profile, dims), max_batch, max_wait_s)


def _exchanges(profile: ModelProfile, dims: ParallelDims) -> int:
    """The collectives inside a forward's layers: a tensor-parallel pair's all-reduce and a
    wide odd last layer's gather; vertical partitioning's partial sums (a spatial cut's halos
    and norms count their own, `halo_seconds`)."""
    parts = tp_parts(profile, dims).values()
    return sum(part in ("row", "column+gather") for part in parts) + (dims.vertical > 1)


def choose(options: list[Served], p99_s: float, budget: float | None) -> tuple[Served, str]:
    """The layout to serve with, and the one line that says why."""
    fitting = [o for o in options if budget is None or o.held_bytes <= budget]
    if not fitting:
        least = min(options, key=lambda o: o.held_bytes)
        raise ShardwiseError(
            "serve.memory_per_rank",
            f"no serving layout of these ranks holds under {budget / 2**20:,.1f} MiB a rank: the least is "
            f"{least.layout}, {least.held_bytes / 2**20:,.1f} MiB (more ranks: --nproc)",
        )
    within = [o for o in fitting if not p99_s or o.worst_s <= p99_s]
    pool = within or fitting
    best = max(pool, key=lambda o: o.rate) if within else min(pool, key=lambda o: o.worst_s)
    text = (
        f"{best.layout} (predicted {1e3 * best.batch_s:.1f} ms a batch of {best.max_batch}, one every "
        f"{1e3 * best.interval_s:.1f} ms: {best.rate:,.0f} samples a second; at full load a request waits at "
        f"most {1e3 * best.worst_s:.1f} ms"
    )
    if not p99_s:
        text += "; the highest rate"
    elif within:
        text += f", within serve.p99_ms = {1e3 * p99_s:g}; the highest rate of {len(within)} within it"
    else:
        text += f": no layout is within serve.p99_ms = {1e3 * p99_s:g}, this one waits least"
    return best, text + f", of {len(fitting)} serving layouts)"


def predicted_serving(cfg: Config, *, nproc: int, cluster: str, classes: int, front_s: float) -> list[Served]:
    """Every serving layout of `nproc` ranks for the serving config `cfg` (serve/model.py
    `serving_config`), predicted from the model's profile and the link, measured as `plan`
    measures them (and cached alike), and the front's time a batch (`front_s`,
    `plan/front.py`); with `nproc` 1, one process."""
    from shardwise.plan.command import measured_link, measured_profile

    profile, shape, _, _ = measured_profile(cfg)
    link = measured_link(cluster, max(2, nproc))
    s = cfg.serve
    options = []
    for layout in serving_layouts(cfg, nproc, shape) if nproc > 1 else [ParallelConfig()]:
        cut = size_cut(cfg, layout.pp) if layout.pp > 1 else None
        options.append(served(layout, nproc, profile, link, cores=len(os.sched_getaffinity(0)),
                              max_batch=s.max_batch, max_wait_s=s.max_wait_ms / 1e3, classes=classes, cut=cut,
                              pipelined=s.pipelined, front_s=front_s))  # fmt: skip
    return options


def alone_would(alone: Served, best: Served, budget: float | None) -> str:
    """What the line adds where one process (whose weights fit) is predicted to serve at least
    as many samples a second as the layout chosen: the ranks would buy nothing."""
    if alone.rate < best.rate or (budget is not None and alone.held_bytes > budget):
        return ""
    return f"; one process would serve {alone.rate:,.0f} samples a second (--nproc 1)"


def choose_serving_layout(cfg: Config, *, nproc: int, cluster: str, record: dict) -> dict:
    """parallel.layout = auto for serving: predict every serving layout (`predicted_serving`),
    print the choice in one line and set it in `cfg`. The chosen layout's figures."""
    from shardwise.config_check import parse_bytes
    from shardwise.plan.front import front_seconds

    s = cfg.serve
    front_s = front_seconds(record, s.max_batch, s.max_wait_ms)
    classes = len(record["classes"])
    options = predicted_serving(cfg, nproc=nproc, cluster=cluster, classes=classes, front_s=front_s)
    budget = parse_bytes(s.memory_per_rank, "serve.memory_per_rank") if s.memory_per_rank else None
    best, text = choose(options, s.p99_ms / 1e3, budget)
    alone = predicted_serving(cfg, nproc=1, cluster=cluster, classes=classes, front_s=front_s)[0]
    print(f"parallel.layout auto: {text}{alone_would(alone, best, budget)}", flush=True)
    cfg.parallel = dataclasses.replace(best.config, layout="manual")
    return {
        "layout": best.layout,
        "batch_s": best.batch_s,
        "interval_s": best.interval_s,
        "rate": best.rate,
        "worst_s": best.worst_s,
        "held_bytes": best.held_bytes,
    }
