"""One job body for every layout: set-up -> apply_layout -> the loop (or a parameter
server's role) -> outputs.

Set-up is the same for every mode: the seed, this rank's data, the whole model,
the checkpoint to resume. `layout.apply_layout` then cuts and wraps the model
and says which role this rank plays: `train` (every all-reduce layout: the
training loop of train/loop.py), or a parameter server's `server` or `worker`
(the loops of train/ps_loop.py). The outputs (summary.json, the weights, the
curves) are written by one rank the same way for all. Nothing here names a
single strategy; what the job needs of one, it asks the Layout.

Everything a rank needs comes in as arguments: the config, the process group,
where to write, and a :class:`JobContext` with what the launcher knows (when the
job started, where the ranks run, faults to inject). Only `worker.py` reads the
environment.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from shardwise import roles
from shardwise.checkpoint.resume import load_model_file, load_weights, read_resume
from shardwise.checkpoint.store import Checkpoint
from shardwise.comm.collectives import all_gather_json
from shardwise.comm.compress import CompressionSettings
from shardwise.config import Config
from shardwise.data import RankData, build_rank_data, load_source
from shardwise.layout import DataCut, ServerSettings, apply_layout, data_cut, holds_whole_model
from shardwise.models import build_model
from shardwise.parallel.splits import local_bytes
from shardwise.peer_state import PeerSettings, recover
from shardwise.topology import ParallelDims, RankMesh
from shardwise.train.faults import FaultPlan
from shardwise.train.optim import lr_at, optimizer_for
from shardwise.train.outputs import describe_hosts, model_check, run_summary, write_run
from shardwise.train.precision import autocast_forward
from shardwise.train.progress import render_summary


@dataclass(frozen=True)
class JobContext:
    """What the launcher knows and a rank cannot: passed in, never read from the environment here."""

    launch_time: float | None = None  # when the job (its first attempt) started, for wall_s
    placement: str | None = None  # the launcher's words for where the ranks run
    faults: str = ""  # faults to inject (train/faults.py), for tests and benchmarks
    attempt: int = 0  # 0, then one more on each restart
    peer: PeerSettings | None = None  # recovery from the survivors' memory (peer_state.py)


@dataclass
class RunResult:
    state_dict: dict[str, torch.Tensor]
    summary: dict
    # wait for every rank before leaving (a parameter-server job may have lost workers,
    # and its servers answer the workers last, so it skips this)
    leave_together: bool = True


@dataclass
class SetUp:
    """A rank's start: its data (None where it needs none), the whole model (on the meta
    device where a rank holds only a slice), the shape of a sample, the checkpoint."""

    data: RankData | None
    model: nn.Module
    in_shape: tuple[int, ...]
    checkpoint: Checkpoint | None
    whole_bytes: int
    cut: DataCut  # what of the data this rank loads (the vertical split goes on to the layout)


def group_device(group: dist.ProcessGroup) -> torch.device:
    """The device a group's ranks compute on: the current GPU where it speaks NCCL."""
    if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run(
    cfg: Config,
    *,
    group: dist.ProcessGroup | None = None,
    out_dir: Path | None = None,
    device: torch.device | None = None,
    context: JobContext | None = None,
) -> RunResult:
    """Train as configured on the ranks of `group` (default: the world).

    Rank 0 of the group writes the outputs when `out_dir` is given. Returns the
    full, unsharded final weights (the same on every rank) and the summary.
    """
    started = time.time()
    group = group or dist.group.WORLD
    context = context or JobContext()
    dims = ParallelDims.resolve(cfg.parallel, dist.get_world_size(group))
    # a parameter server sends CPU tensors point to point (gloo)
    device = torch.device("cpu") if dims.servers else (device or group_device(group))
    timeout = timedelta(seconds=cfg.train.collective_timeout_s)
    mesh = RankMesh.build(dims, group, timeout=timeout, device_type=device.type)
    placement = describe_hosts(all_gather_json(socket.gethostname(), group), context.placement)
    rank = dist.get_rank(group)
    setup = None
    try:
        setup = set_up(cfg, mesh, device=device, peer=context.peer)
        faults = FaultPlan(rank, context.faults, attempt=context.attempt)
        layout = build_layout(cfg, mesh, setup, device=device, faults=faults)
        job = roles.Job(
            cfg,
            mesh,
            layout,
            setup.data,
            setup.checkpoint,
            faults,
            out_dir,
            rank,
            device,
            setup.whole_bytes,
            peer=context.peer,
        )
        console = _console() if rank == 0 and out_dir is not None else None
        outcome = roles.play(job, console)
        return _finish(job, outcome, console, placement=placement, launch_time=context.launch_time or started)
    finally:
        if setup is not None and setup.data is not None:
            setup.data.close()  # a database reader's background thread and connections
        mesh.close()


def build_layout(cfg: Config, mesh: RankMesh, setup: SetUp, *, device: torch.device, faults: FaultPlan):
    """This rank's layout of the model `set_up` made (`apply_layout`, as configured)."""
    layout = apply_layout(
        setup.model,
        mesh,
        in_shape=setup.in_shape,
        features=setup.cut.parts,
        example=lambda: _example(cfg, mesh.dims, setup.data),
        device=device,
        faults=faults,
        server=_server_settings(cfg),
        deterministic=cfg.train.deterministic,
        checkpointing=cfg.train.activation_checkpointing,
        compression=CompressionSettings(
            cfg.comm.compression,
            cfg.comm.topk_ratio,
            cfg.comm.powersgd_rank,
            cfg.comm.warmup_steps,
            tuple(cfg.comm.candidates),
            cfg.comm.min_bucket_bytes,
        ),
    )
    if cfg.train.precision == "bf16" and layout.role != "server":
        autocast_forward(layout.local_model, device.type)
    return layout


def set_up(cfg: Config, mesh: RankMesh, *, device: torch.device, peer: PeerSettings | None = None) -> SetUp:
    """The seed, this rank's data, the whole model (the checkpoint's weights in it: after a
    failure, where it can, the survivors' state from their memory, peer_state.py)."""
    t = cfg.train
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    dtype = getattr(torch, t.dtype)
    torch.manual_seed(t.seed)  # weights; data order and splits use their own seeded generators
    checkpoint = recover(peer, cfg.run.resume, mesh.parent, rank=dist.get_rank(mesh.parent)) or read_resume(cfg)
    cut = data_cut(mesh, cfg.data, cfg.parallel)
    plan = sql_plan(cfg, mesh, checkpoint) if cfg.data.name == "sql" else None  # a collective: every rank
    if not holds_whole_model(mesh):  # a server's slice: the model's names and shapes will do
        in_shape, classes = _shape_from_first_server(mesh)
        with torch.device("meta"):
            model = build_model(cfg.model, in_shape, classes).to(dtype=dtype)
        return SetUp(None, model, in_shape, checkpoint, 0, cut)
    data, in_shape, classes = _rank_data(cfg, mesh, cut, checkpoint, plan, device=device, dtype=dtype)
    _shape_from_first_server(mesh, (in_shape, classes))
    model = build_model(cfg.model, in_shape, classes).to(device=device, dtype=dtype)
    if checkpoint is not None:  # the whole model, before any layout cuts it
        load_weights(model, checkpoint)
    elif cfg.model.weights:
        load_model_file(model, Path(cfg.model.weights))
    return SetUp(data, model, in_shape, checkpoint, local_bytes(model.parameters()), cut)


def _shape_from_first_server(mesh: RankMesh, mine: tuple | None = None) -> tuple:
    """Parameter servers after the first load no data: server 0 tells them the shape of a
    sample and the number of classes (a collective of the servers)."""
    group = mesh.groups.get("servers")
    if group is None or mesh.coords.get("server", -1) < 0:
        return mine
    shape, classes = all_gather_json(list(mine) if mine is not None else None, group)[0]
    return tuple(shape), classes


def _rank_data(cfg: Config, mesh: RankMesh, cut: DataCut, checkpoint, plan, *, device: torch.device,
               dtype: torch.dtype):  # fmt: skip
    """This rank's data: what the layout cuts it to (data_cut), its share of each batch;
    and the shape and classes of a whole sample.
    A parameter server's first server keeps the whole validation set, to score the weights."""
    dims, t = mesh.dims, cfg.train
    scorer = mesh.coords.get("server", -1) == 0 and not dims.colocated
    shared = {  # this rank's share of each batch, whatever the source
        "global_batch": t.batch_size, "grad_accum": t.grad_accum, "dp_rank": 0 if scorer else mesh.coords["dp"],
        "dp": 1 if scorer else dims.dp, "seed": t.seed, "device": device, "microbatches": dims.microbatches,
        "dtype": dtype,
    }  # fmt: skip
    if cfg.data.name == "sql":
        return _sql_data(cfg, cut, checkpoint, plan, shared)
    dataset = load_source(cfg.data, seed=t.seed, features=cut.features, reduce_stats=cut.reduce_stats)
    rows = cut.rows(dataset)  # refuses early what cannot be cut
    data = build_rank_data(cfg.data, dataset, **shared)
    data.dataset = rows  # cut after the split into shards, which may read whole samples (kmeans)
    return data, dataset.in_shape, dataset.num_classes


def sql_plan(cfg: Config, mesh: RankMesh, checkpoint):
    """An SQL table's key ranges (`data/sql_loader.py` `TablePlan`), found once by the first
    rank and shared with all (a collective: every rank calls it): they read by the same even
    while the table changes, and the database sorts the keys once, not once a rank."""
    from shardwise.comm.collectives import all_gather_json
    from shardwise.data.sql_loader import TablePlan, shard_count, table_plan

    positions, dp = (checkpoint.tensors if checkpoint is not None else None), mesh.dims.dp
    mine = table_plan(cfg.data, shard_count(cfg.data, positions, dp), dp) if dist.get_rank(mesh.parent) == 0 else None
    return TablePlan.of(all_gather_json(mine.to_json() if mine else None, mesh.parent)[0])


def _sql_data(cfg: Config, cut: DataCut, checkpoint, plan, shared: dict):
    """`_rank_data` of an SQL table: this rank's rows read as it trains, from the
    checkpoint's read positions where it resumes (`data/sql_loader.py`)."""
    from shardwise.data.sql_loader import build_sql_rank_data

    data = build_sql_rank_data(
        cfg.data,
        **shared,
        features=cut.features,
        reduce_stats=cut.reduce_stats,
        positions=checkpoint.tensors if checkpoint is not None else None,
        start=checkpoint.step if checkpoint is not None else 0,
        name=f"shardwise-rank{dist.get_rank()}",
        plan=plan,
    )
    record = data.preprocess
    return data, tuple(record["in_shape"]), len(record["classes"])


def _example(cfg: Config, dims: ParallelDims, data: RankData) -> torch.Tensor:
    """One micro-batch of this rank's data (what a pipeline profiles its layers on)."""
    return data.example()[: cfg.train.batch_size // (dims.dp * dims.microbatches)]


def _server_settings(cfg: Config) -> ServerSettings:
    t = cfg.train
    return ServerSettings(
        build_optimizer=lambda tensors: optimizer_for(t, tensors),
        lr_at=lr_at(t),
        steps=t.steps,
        asynchronous=cfg.ps.asynchronous,
        staleness=cfg.ps.staleness,
        clip_norm=t.clip_norm,
        max_bad_steps=t.max_bad_steps,
        push=cfg.comm.compression,
    )


def _finish(job: roles.Job, outcome: roles.Outcome, console, *, placement: dict, launch_time: float) -> RunResult:
    """The final weights on every rank, the summary, and (one rank) the outputs."""
    cfg, layout, dims = job.cfg, job.layout, job.mesh.dims
    state = layout.full_state()
    extra, timeline = layout.summary()
    if outcome.result is None:  # a parameter server's worker: server 0 reports the run
        return RunResult(state, {"role": "worker", "steps": outcome.steps}, leave_together=False)
    summary = run_summary(
        cfg,
        dims,
        outcome.result,
        state,
        backend=dist.get_backend(job.mesh.parent),
        device=str(job.device),
        launch_time=launch_time,
        placement=placement,
    )
    summary |= {"skipped_steps": outcome.skipped, **outcome.extra, **extra, **roles.after_serving(job)}
    summary |= model_check(summary, cfg.train.memory_per_rank)
    if console is not None:
        preprocess = job.data.preprocess if job.data is not None else {}
        write_run(job.out_dir, cfg, dims, state, outcome.result.records, summary, preprocess)
        roles.print_end(console, job, summary, timeline, outcome)
        console.print(render_summary(summary, str(job.out_dir)))
    return RunResult(state, summary, leave_together=layout.role == "train")


def _console():
    from rich.console import Console

    return Console(stderr=False)
