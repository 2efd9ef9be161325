"""A parameter-server job from the config: roles, data, the server or worker loop, outputs."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from shardwise.checkpoint.resume import build_checkpointer, load_weights, read_resume
from shardwise.config import Config
from shardwise.data import Dataset, RankData, build_rank_data, load_source
from shardwise.errors import ShardwiseError
from shardwise.models import build_model
from shardwise.parallel.param_server import ParameterServer, WorkerClient, load_flat
from shardwise.topology import RankMesh
from shardwise.train.faults import FaultPlan
from shardwise.train.loop import LoopSettings, ModelRunner
from shardwise.train.optim import lr_at, optimizer_for
from shardwise.train.outputs import run_summary, write_run
from shardwise.train.progress import open_reporter, render_summary
from shardwise.train.ps_loop import score_flat, serve, staleness_summary, straggler, work


def run_parameter_server(
    cfg: Config, mesh: RankMesh, *, group: dist.ProcessGroup, out_dir: Path | None, launch_time: float, placement: dict
) -> tuple[dict[str, torch.Tensor], dict]:
    """A parameter-server run on the CPU, servers first, then workers: the final weights
    (every rank) and the summary (server 0's is the run's)."""
    dims, t, ps = mesh.dims, cfg.train, cfg.ps
    worker_ranks = [dist.get_global_rank(group, r) for r in range(dims.servers, dims.world_size)]
    if ps.slow_factor > 1.0 and ps.slow_worker >= 0 and ps.slow_worker not in worker_ranks:
        raise ShardwiseError("ps.slow_worker", f"={ps.slow_worker}: not a worker, those are ranks {worker_ranks}")
    torch.manual_seed(t.seed)  # every rank builds the same initial weights
    dataset = load_source(cfg.data, seed=t.seed)
    model = build_model(cfg.model, dataset.in_shape, dataset.num_classes).to(getattr(torch, t.dtype))
    checkpoint = read_resume(cfg)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    if mesh.coords["server"] < 0:
        return _work(cfg, mesh, model, dataset, group=group, worker_ranks=worker_ranks, checkpoint=checkpoint)
    server = _server(cfg, mesh, model, group=group, checkpoint=checkpoint)
    return _serve(cfg, mesh, model, dataset, server, group=group, out_dir=out_dir, worker_ranks=worker_ranks,
                  checkpoint=checkpoint, launch_time=launch_time, placement=placement)  # fmt: skip


def _rank_data(cfg: Config, dataset: Dataset, *, dp_rank: int, dp: int) -> RankData:
    t = cfg.train
    return build_rank_data(
        cfg.data,
        dataset,
        global_batch=t.batch_size,
        grad_accum=t.grad_accum,
        dp_rank=dp_rank,
        dp=dp,
        seed=t.seed,
        device=torch.device("cpu"),
        dtype=getattr(torch, t.dtype),
    )


def _work(
    cfg: Config, mesh: RankMesh, model: nn.Module, dataset: Dataset, *, group, worker_ranks: list[int], checkpoint
) -> tuple[dict[str, torch.Tensor], dict]:
    """A worker: its share of every step, pushed to the servers, until server 0 says stop."""
    t, ps, rank = cfg.train, cfg.ps, dist.get_rank(group)
    data = _rank_data(cfg, dataset, dp_rank=mesh.coords["dp"], dp=mesh.dims.dp)
    faults = FaultPlan(rank)
    steps = work(
        WorkerClient(model, servers=mesh.dims.servers, group=group),
        ModelRunner(model, dp_group=None, faults=faults),
        model,
        data,
        rank=rank,
        clip_norm=t.clip_norm if ps.asynchronous else 0.0,  # synchronous: the servers clip the mean gradient
        slowdown=straggler(slow_rank=ps.slow_worker, factor=ps.slow_factor, worker_ranks=worker_ranks, seed=t.seed),
        faults=faults,
        start_step=checkpoint.step if checkpoint is not None else 0,
    )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, {"role": "worker", "steps": steps}


def _server(cfg: Config, mesh: RankMesh, model: nn.Module, *, group, checkpoint) -> ParameterServer:
    """This server: its slice of the weights and their optimizer, as configured (or as saved)."""
    t, ps, dims = cfg.train, cfg.ps, mesh.dims
    server = ParameterServer(
        model,
        index=mesh.coords["server"],
        servers=dims.servers,
        workers=dims.dp,
        group=group,
        servers_group=mesh.groups["servers"],
        build_optimizer=functools.partial(optimizer_for, t),
        lr_at=lr_at(t),
        steps=t.steps,
        asynchronous=ps.asynchronous,
        staleness=ps.staleness,
        clip_norm=t.clip_norm,
        max_bad_steps=t.max_bad_steps,
    )
    if checkpoint is not None:
        server.load_state(model, checkpoint.tensors, step=checkpoint.step, schedule_step=checkpoint.schedule_step)
    return server


def _serve(
    cfg: Config,
    mesh: RankMesh,
    model: nn.Module,
    dataset: Dataset,
    server: ParameterServer,
    *,
    group,
    out_dir: Path | None,
    worker_ranks: list[int],
    checkpoint,
    launch_time: float,
    placement: dict,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Serve until the run is done. Server 0 also logs the loss, scores the weights and
    writes the outputs; the servers write checkpoints together."""
    dims, t, ps, rank = mesh.dims, cfg.train, cfg.ps, dist.get_rank(group)
    start_step = checkpoint.step if checkpoint is not None else 0

    def collect() -> tuple[dict, dict]:
        meta = {"world_size": dims.world_size, "layout": dims.layout, "schedule_step": server.schedule_step}
        return server.logical_state(model), meta

    checkpointer = build_checkpointer(cfg, out_dir, mesh.groups["servers"], collect)
    # server 0 scores the weights on the whole validation set
    evaluate = score_flat(model, _rank_data(cfg, dataset, dp_rank=0, dp=1)) if rank == 0 else None
    console = None
    if rank == 0 and out_dir is not None:
        from rich.console import Console

        console = Console(stderr=False)
        mode = f"asynchronous, staleness <= {ps.staleness}" if ps.asynchronous else "synchronous"
        console.print(f"layout {dims.layout} ({mode}): ranks {worker_ranks} push to ranks 0-{dims.servers - 1}")
    reporter = open_reporter(
        out_dir, console, start_step=start_step, total_steps=t.steps, show_progress=cfg.run.progress
    )
    with reporter:
        settings = LoopSettings.from_train(t, start_step=start_step)
        result = serve(server, settings, reporter=reporter, evaluate=evaluate, checkpointer=checkpointer)
    load_flat(model, server.final)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if rank == 0:
        server.send_final(server.final)
    summary = run_summary(
        cfg,
        dims,
        result,
        state,
        backend=dist.get_backend(group),
        device="cpu",
        launch_time=launch_time,
        placement=placement,
    )
    summary |= {"skipped_steps": server.stats.skipped, "ps": staleness_summary(server)}
    if console is not None:
        write_run(out_dir, cfg, dims, state, result.records, summary)
        console.print(render_summary(summary, str(out_dir)))
        for lost in summary["ps"]["lost_workers"]:
            line = f"worker rank {lost['rank']} was lost after {lost['step']} steps: {lost['error']}"
            console.print(line, markup=False, soft_wrap=True)
    return state, summary
