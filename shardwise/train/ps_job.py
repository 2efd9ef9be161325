"""A parameter-server job from the config: roles, data, the server or worker loop, outputs."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.distributed as dist

from shardwise.checkpoint.resume import load_weights, read_resume
from shardwise.checkpoint.store import Checkpointer
from shardwise.config import Config, to_toml
from shardwise.data import build_rank_data, load_source
from shardwise.errors import ShardwiseError
from shardwise.models import build_model
from shardwise.parallel.param_server import ParameterServer, WorkerClient, load_flat
from shardwise.topology import RankMesh
from shardwise.train.faults import FaultPlan
from shardwise.train.loop import LoopSettings, ModelRunner
from shardwise.train.optim import lr_at, optimizer_for
from shardwise.train.outputs import MetricsLog, run_summary, write_run
from shardwise.train.progress import ConsoleReporter, NullReporter, render_summary
from shardwise.train.ps_loop import score_flat, serve, staleness_summary, straggler, work


def run_parameter_server(
    cfg: Config, mesh: RankMesh, *, group: dist.ProcessGroup, out_dir: Path | None, launch_time: float, placement: dict
) -> tuple[dict[str, torch.Tensor], dict]:
    """A parameter-server run on the CPU, servers first, then workers: the final weights
    (every rank) and the summary (server 0's is the run's)."""
    dims, t, ps = mesh.dims, cfg.train, cfg.ps
    rank = dist.get_rank(group)
    worker_ranks = [dist.get_global_rank(group, r) for r in range(dims.servers, dims.world_size)]
    if ps.slow_factor > 1.0 and ps.slow_worker >= 0 and ps.slow_worker not in worker_ranks:
        raise ShardwiseError("ps.slow_worker", f"={ps.slow_worker}: not a worker, those are ranks {worker_ranks}")
    dtype = getattr(torch, t.dtype)
    torch.manual_seed(t.seed)  # every rank builds the same initial weights
    dataset = load_source(cfg.data, seed=t.seed)
    model = build_model(cfg.model, dataset.in_shape, dataset.num_classes).to(dtype)
    checkpoint = read_resume(cfg)
    start_step = 0
    if checkpoint is not None:
        load_weights(model, checkpoint)
        start_step = checkpoint.step
    settings = LoopSettings.from_train(t, start_step=start_step)
    common = {"global_batch": t.batch_size, "grad_accum": t.grad_accum, "seed": t.seed, "device": torch.device("cpu")}
    common["dtype"] = dtype
    is_server = mesh.coords["server"] >= 0
    if not is_server:
        data = build_rank_data(cfg.data, dataset, dp_rank=mesh.coords["dp"], dp=dims.dp, **common)
        faults = FaultPlan(rank)
        client = WorkerClient(model, servers=dims.servers, group=group)
        slowdown = straggler(slow_rank=ps.slow_worker, factor=ps.slow_factor, worker_ranks=worker_ranks, seed=t.seed)
        clip = t.clip_norm if ps.asynchronous else 0.0  # synchronous: the servers clip the averaged gradient
        steps = work(
            client,
            ModelRunner(model, dp_group=None, faults=faults),
            model,
            data,
            rank=rank,
            clip_norm=clip,
            slowdown=slowdown,
            faults=faults,
            start_step=start_step,
        )
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return state, {"role": "worker", "steps": steps}

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
        server.load_state(model, checkpoint.tensors, step=start_step, schedule_step=checkpoint.schedule_step)
    checkpointer = None
    if out_dir is not None and t.checkpoint_every > 0:

        def collect() -> tuple[dict, dict]:
            meta = {"world_size": dims.world_size, "layout": dims.layout, "schedule_step": server.schedule_step}
            return server.logical_state(model), meta

        group_of_servers = mesh.groups["servers"]
        checkpointer = Checkpointer(
            out_dir / "checkpoints",
            t.checkpoint_every,
            t.steps,
            group_of_servers,
            collect,
            cfg.checkpoint.sign_key,
            config_text=to_toml(cfg),
        )
    writes = rank == 0 and out_dir is not None
    evaluate = None
    if rank == 0:  # server 0 scores the weights on the whole validation set
        evaluate = score_flat(model, build_rank_data(cfg.data, dataset, dp_rank=0, dp=1, **common))
    if writes:
        from rich.console import Console

        console = Console(stderr=False)
        mode = f"asynchronous, staleness <= {ps.staleness}" if ps.asynchronous else "synchronous"
        console.print(f"layout {dims.layout} ({mode}): ranks {worker_ranks} push to ranks 0-{dims.servers - 1}")
        reporter = ConsoleReporter(
            MetricsLog(out_dir / "metrics.jsonl", from_step=start_step),
            total_steps=t.steps,
            console=console,
            show_progress=cfg.run.progress,
        )
    else:
        reporter = NullReporter()
    with reporter:
        result = serve(server, settings, reporter=reporter, evaluate=evaluate, checkpointer=checkpointer)
    load_flat(model, server.final)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if rank == 0:
        server.send_final(server.final)
    summary = {
        **run_summary(
            cfg,
            dims,
            result,
            state,
            backend=dist.get_backend(group),
            device="cpu",
            launch_time=launch_time,
            placement=placement,
        ),
        "skipped_steps": server.stats.skipped,
        "ps": staleness_summary(server),
    }
    if writes:
        write_run(out_dir, cfg, dims, state, result.records, summary)
        console.print(render_summary(summary, str(out_dir)))
        for lost in summary["ps"]["lost_workers"]:
            line = f"worker rank {lost['rank']} was lost after {lost['step']} steps: {lost['error']}"
            console.print(line, markup=False, soft_wrap=True)
    return state, summary
