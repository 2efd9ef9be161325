"""What a rank does between set-up and outputs, by the role its layout gives it.

`train`: the optimizer, the schedule, the training loop of train/loop.py, and the
memory table. A parameter server's `worker`: its share of every step, pushed and
pulled until server 0 says stop; its `server`: serve the workers, log, score and
checkpoint (train/ps_loop.py); `colocated` (parallel.colocate): both at once, the
server on a thread of its own. Every role resumes from the same checkpoint and
writes checkpoints through the same checkpointer; job.py does the rest.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shardwise.checkpoint.resume import build_checkpointer
from shardwise.checkpoint.state import compression_state, decided_trial, load_compression
from shardwise.checkpoint.store import Checkpoint, restore_rng, rng_tensors
from shardwise.config import Config
from shardwise.data import RankData
from shardwise.data.report import render_report
from shardwise.errors import ShardwiseError
from shardwise.files import atomic_path
from shardwise.layout import Layout
from shardwise.peer_state import Holder, PeerSettings, holds_whole_state, serve_state
from shardwise.survivors import announce
from shardwise.topology import RankMesh
from shardwise.train.comm_share import write_profile
from shardwise.train.faults import FaultPlan
from shardwise.train.loop import LoopResult, LoopSettings, ModelRunner, Position, located, train_loop
from shardwise.train.memory import gather_rows, measured_bytes, memory_records, render_memory, start_measuring
from shardwise.train.optim import build_scheduler
from shardwise.train.progress import open_reporter
from shardwise.train.ps_loop import held_by_servers, score_flat, serve, staleness_summary, straggler, work
from shardwise.train.timeline import plot_timeline


@dataclass
class Job:
    """One rank's job once its layout is applied."""

    cfg: Config
    mesh: RankMesh
    layout: Layout
    data: RankData | None
    checkpoint: Checkpoint | None
    faults: FaultPlan
    out_dir: Path | None
    rank: int
    device: torch.device
    whole_bytes: int = 0  # of the whole model's parameters, before the layout cut it
    position: Position = field(default_factory=Position)
    peer: PeerSettings | None = None  # recovery from the survivors' memory (peer_state.py)

    @property
    def start_step(self) -> int:
        return self.checkpoint.step if self.checkpoint is not None else 0

    def reporter(self, console):
        return open_reporter(
            self.out_dir,
            console,
            start_step=self.start_step,
            total_steps=self.cfg.train.steps,
            show_progress=self.cfg.run.progress,
            tensorboard=self.cfg.run.tensorboard,
        )


@dataclass
class Outcome:
    result: LoopResult | None  # None: a worker (server 0 reports the run)
    steps: int = 0  # the steps a worker pushed
    skipped: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # the role's own summary keys
    memory: tuple = ()  # train: the bytes each rank held at start and end, and measured


def play(job: Job, console) -> Outcome:
    """Run this rank's role to the end of training."""
    role = job.layout.role
    if role == "worker":
        return _work(job)
    if role == "server":
        return _serve(job, console)
    if role == "colocated":
        return _colocated(job, console)
    return _train(job, console)


def _train(job: Job, console) -> Outcome:
    cfg, layout, mesh, t = job.cfg, job.layout, job.mesh, job.cfg.train
    dims, group = mesh.dims, mesh.parent
    start_bytes = gather_rows(layout.memory(), group)
    optimizer = layout.build_optimizer(t)
    checkpoint = job.checkpoint
    compressor = layout.part.compressor
    if checkpoint is not None:
        layout.load_state(optimizer, checkpoint.tensors)
        restore_rng(checkpoint, job.rank, dims.world_size)
        same = checkpoint.state.get("world_size") == dims.world_size and checkpoint.state.get("layout") == dims.layout
        load_compression(compressor, layout.local_model, layout.splits, checkpoint.tensors, rank=job.rank, same=same)
    if compressor is not None:
        compressor.steps = job.start_step  # the warm-up counts the run's steps, not this start's
    scheduler = build_scheduler(t, optimizer, start=checkpoint.schedule_step if checkpoint is not None else 0)

    def collect() -> tuple[dict, dict]:
        tensors = layout.logical_tensors(optimizer) | rng_tensors(job.rank)
        tensors |= compression_state(compressor, layout.local_model, layout.splits, job.rank)
        tensors |= job.data.position_tensors()  # where a database's rows are read from on a resume
        return tensors, {"world_size": dims.world_size, "layout": dims.layout, "schedule_step": scheduler.last_epoch}

    checkpointer = build_checkpointer(cfg, job.out_dir, group, collect, job.faults)
    holder = _peer_holder(job, optimizer, scheduler)
    if console is not None:
        title = f"layout {dims.layout}, shard={dims.shard}: parameters held by each rank at start"
        split = "key ranges" if cfg.data.name == "sql" else f"partition {cfg.data.partition}"
        console.print(render_report(job.data.report, f"data: {cfg.data.name}, {split}"))
        for report in layout.reports():
            console.print(report)
        console.print(render_memory(start_bytes, dims, whole_model_bytes=job.whole_bytes, title=title))
        if checkpoint is not None:
            saved = checkpoint.state["layout"]
            console.print(f"resumed from {checkpoint.folder} (step {job.start_step}, saved as {saved})")
    profiled = job.out_dir / "profile" / f"rank-{job.rank}" if cfg.run.profile and job.out_dir else None
    rss_start = start_measuring(job.device)  # what training adds: gradients, optimizer state, buffers, activations
    with job.reporter(console) as reporter:
        result = located(job.position, job.rank)(train_loop)(
            layout.runner,
            layout.model,
            optimizer,
            scheduler,
            job.data,
            LoopSettings.from_train(
                t, start_step=job.start_step, measure_comm=cfg.run.comm_share or profiled is not None
            ),
            reporter=reporter,
            faults=job.faults,
            splits=layout.splits,
            sum_groups=layout.sum_groups,
            agree_group=mesh.groups["agree"],
            checkpointer=checkpointer,
            position=job.position,
            holder=holder,
            compressor=compressor,
        )
    if profiled is not None:
        profiled.parent.mkdir(parents=True, exist_ok=True)
        write_profile(profiled.with_suffix(".json"), job.rank, result.profiled)
        if result.last_profile is not None:
            result.last_profile.export(f"{profiled}.trace.json")
    if cfg.run.predictions:
        job.position.phase = "predictions"
        write_predictions(Path(cfg.run.predictions), layout.runner.predict(job.data), job.rank)
    measured = gather_rows(measured_bytes(job.device, rss_start), group)
    end_bytes = gather_rows(layout.memory(optimizer), group)
    extra = {"shard": dims.shard, "memory": memory_records(end_bytes, dims, measured), "partition": job.data.report}
    if layout.part.compressor is not None:
        extra["compression"] = layout.part.compressor.summary(result.step_times, first_step=job.start_step)
    return Outcome(result, skipped=result.skipped_steps, extra=extra, memory=(end_bytes, measured))


def _peer_holder(job: Job, optimizer, scheduler) -> Holder | None:
    """Where every rank holds the whole training state: a holder of it, served to the ranks
    that start after a failure and announced to the launcher (None elsewhere)."""
    dims, peer = job.mesh.dims, job.peer
    if peer is None or not holds_whole_state(job.cfg, dims, job.layout.part.compressor):
        return None
    holder = Holder(job.start_step)
    layout = job.layout

    def provider() -> tuple[dict, dict]:  # a replica's checkpoint tensors, auto's decision: no collective
        meta = {"world_size": dims.world_size, "layout": dims.layout, "schedule_step": scheduler.last_epoch}
        return layout.logical_tensors(optimizer) | decided_trial(layout.part.compressor), meta

    holder.provider = provider
    announce(Path(peer.announce), *serve_state(holder, peer.secret, peer.addr))
    return holder


def write_predictions(path: Path, probs: torch.Tensor, rank: int) -> None:
    """Rank 0 writes the validation set's class probabilities (an .npy, atomically)."""
    if rank != 0:
        return
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, probs.cpu().numpy())


def _work(job: Job) -> Outcome:
    """A parameter server's worker: its share of every step, pushed to the servers, until
    server 0 says stop."""
    t, ps, model = job.cfg.train, job.cfg.ps, job.layout.model
    slowdown = straggler(slow_rank=ps.slow_worker, factor=ps.slow_factor, worker_ranks=_workers(job), seed=t.seed)
    steps = work(
        job.layout.part.client,
        ModelRunner(model, dp_group=None, faults=job.faults),
        model,
        job.data,
        rank=job.rank,
        clip_norm=t.clip_norm if ps.asynchronous else 0.0,  # synchronous: the servers clip the mean gradient
        slowdown=slowdown,
        faults=job.faults,
        start_step=job.start_step,
    )
    return Outcome(None, steps=steps)


def _workers(job: Job) -> list[int]:
    import torch.distributed as dist

    dims, ps = job.mesh.dims, job.cfg.ps
    ranks = [dist.get_global_rank(job.mesh.parent, r) for r in range(dims.first_worker, dims.world_size)]
    if ps.slow_factor > 1.0 and ps.slow_worker >= 0 and ps.slow_worker not in ranks:
        raise ShardwiseError("ps.slow_worker", f"={ps.slow_worker}: not a worker, those are ranks {ranks}")
    return ranks


def _colocated(job: Job, console) -> Outcome:
    """parallel.colocate: this rank's server loop on a thread of its own, its worker's steps
    on this one. Should the server fail, its worker raises the server's error (LocalEnd)."""
    local = job.layout.part.client.local
    scorer = copy.deepcopy(job.layout.local_model)  # the worker's own model trains meanwhile
    served: list[Outcome] = []

    def serve_slice() -> None:
        try:
            served.append(_serve(job, console, scorer=scorer))
            local.final = job.layout.part.server.final
        except BaseException as e:  # handed to the worker, which raises it as this rank's error
            local.fail(e)
        finally:
            local.done.set()

    thread = threading.Thread(target=serve_slice, name="ps-server", daemon=True)
    thread.start()
    try:
        steps = _work(job).steps
    except BaseException as e:  # the worker timed out on a peer held up by this rank's failed server: say why
        if local.error is not None and local.error is not e:
            raise local.error from e
        raise
    thread.join()  # (the worker's finish took the final weights: the server ended without error)
    return Outcome(served[0].result, steps=steps, skipped=served[0].skipped)


def _serve(job: Job, console, scorer=None) -> Outcome:
    """A server: serve until the run is done. Server 0 also logs the loss, scores the
    weights and writes the outputs; the servers write checkpoints together. Colocated,
    every server scores its slice of the validation set on `scorer`, a copy of the model
    (weights only while it scores)."""
    cfg, layout, dims, ps = job.cfg, job.layout, job.mesh.dims, job.cfg.ps
    server, workers = layout.part.server, _workers(job)
    checkpoint = job.checkpoint
    if checkpoint is not None:
        layout.load_state(None, checkpoint.tensors, step=checkpoint.step, schedule_step=checkpoint.schedule_step)

    def collect() -> tuple[dict, dict]:
        meta = {"world_size": dims.world_size, "layout": dims.layout, "schedule_step": server.schedule_step}
        return layout.logical_tensors(None), meta

    checkpointer = build_checkpointer(cfg, job.out_dir, job.mesh.groups["servers"], collect)
    if scorer is not None:  # colocated: each server its slice of the validation set
        evaluate = score_flat(scorer, job.data, group=job.mesh.groups["servers"])
    else:  # server 0, on the whole validation set
        evaluate = score_flat(layout.local_model, job.data) if job.rank == 0 else None
    if console is not None:
        mode = f"asynchronous, staleness <= {ps.staleness}" if ps.asynchronous else "synchronous"
        roles = f"ranks {workers} push to ranks 0-{dims.servers - 1}"
        if dims.colocated:
            roles = f"each of ranks {workers} pushes its gradient's slices to the others and serves its own"
        console.print(f"layout {dims.layout} ({mode}): {roles}")
    with job.reporter(console) as reporter:
        settings = LoopSettings.from_train(cfg.train, start_step=job.start_step)
        result = serve(server, settings, reporter=reporter, evaluate=evaluate, checkpointer=checkpointer)
    return Outcome(result, skipped=server.stats.skipped)


def after_serving(job: Job) -> dict:
    """Server 0 hands the final weights to every worker still there (a worker lost then is
    counted too); a server's summary keys: the staleness and the workers lost."""
    server = job.layout.part.server
    if server is None:
        return {}
    held = held_by_servers(server, job.mesh.groups["servers"])  # a collective of the servers
    if job.rank == 0 and not job.mesh.dims.colocated:  # colocated: each worker has them from its server
        server.send_final(server.final)
    return {"ps": staleness_summary(server) | held}


def print_end(console, job: Job, summary: dict, timeline: list, outcome: Outcome) -> None:
    """Rank 0's report after training: the pipeline's timeline, the memory table, lost workers."""
    dims = job.mesh.dims
    if timeline and job.cfg.run.timeline:
        stages = f", {dims.virtual} stages a rank" if dims.virtual > 1 else ""
        title = f"{dims.layout}, {dims.microbatches} micro-batches, {dims.schedule}{stages}: the last step"
        plot_timeline(job.out_dir / "timeline.png", timeline, title)
    if outcome.memory:
        end_bytes, measured = outcome.memory
        title = "bytes held by each rank at the end (gradients and optimizer state exist after the first step)"
        console.print(render_memory(end_bytes, dims, whole_model_bytes=job.whole_bytes, title=title, measured=measured))
    for lost in summary.get("ps", {}).get("lost_workers", []):
        line = f"worker rank {lost['rank']} was lost after {lost['step']} steps: {lost['error']}"
        console.print(line, markup=False, soft_wrap=True)
