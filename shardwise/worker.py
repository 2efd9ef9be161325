"""One rank: process group -> topology -> model and data -> layout -> training loop -> outputs.

Started by `shardwise train` (local launcher) or by torchrun, which set the same
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m shardwise.worker run.toml
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from shardwise.checkpoint.resume import build_checkpointer, load_weights, read_resume
from shardwise.checkpoint.state import load_optimizer, logical_model, logical_optimizer
from shardwise.checkpoint.store import restore_rng, rng_tensors
from shardwise.cluster.placement import PLACEMENT_ENV
from shardwise.comm.collectives import all_gather_json
from shardwise.config import Config, load_config
from shardwise.data import RankData, build_rank_data, load_source
from shardwise.data.features import vertical_parts
from shardwise.data.report import render_report
from shardwise.data.sources import take_rows
from shardwise.errors import EXIT_USAGE, ShardwiseError, TrainingDiverged
from shardwise.models import build_model
from shardwise.parallel.data import apply_data_parallel, is_fully_sharded, unwrap
from shardwise.parallel.pipeline import (
    apply_pipeline,
    describe_cut,
    gather_stages,
    owners,
    plan_pipeline,
    stage_shapes,
)
from shardwise.parallel.spatial import apply_spatial
from shardwise.parallel.splits import Split, full_state_dict, local_bytes
from shardwise.parallel.tensor import apply_tensor_parallel
from shardwise.parallel.vertical import apply_vertical
from shardwise.ranges import even_bounds
from shardwise.topology import ParallelDims, RankMesh
from shardwise.train.faults import FaultPlan
from shardwise.train.loop import LoopSettings, ModelRunner, Position, Runner, train_loop
from shardwise.train.memory import (
    gather_rows,
    measured_bytes,
    memory_records,
    rank_bytes,
    render_memory,
    start_measuring,
)
from shardwise.train.optim import build_optimizer, build_scheduler
from shardwise.train.outputs import describe_hosts, new_run_dir, run_summary, write_run
from shardwise.train.pipeline import PipelineRunner, render_cut
from shardwise.train.progress import open_reporter, render_summary
from shardwise.train.ps_job import run_parameter_server
from shardwise.train.timeline import bubble_summary, gather_events, plot_timeline

# set by the local launcher: it prints the one-line error itself
LAUNCHED_ENV = "SHARDWISE_LAUNCHED"
LAUNCH_TIME_ENV = "SHARDWISE_LAUNCH_TIME"


@dataclass
class RunResult:
    state_dict: dict[str, torch.Tensor]
    summary: dict
    # wait for every rank before leaving (a parameter-server job may have lost workers,
    # and its servers answer the workers last, so it skips this)
    leave_together: bool = True


def rank_device() -> torch.device:
    """This rank's GPU where the machine has one for each of its ranks (LOCAL_RANK of
    LOCAL_WORLD_SIZE), else the CPU: ranks never share a GPU, and all ranks of a
    machine take the same kind of device."""
    if torch.cuda.is_available():
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        gpus = torch.cuda.device_count()
        if local_ranks <= gpus:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # a note with the progress, not an error
            print(f"{local_ranks} ranks on this machine and {gpus} GPU(s): the ranks run on the CPU (gloo)")
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """NCCL for GPU tensors; gloo for CPU tensors, which every rank also sends (sizes,
    summaries) on a GPU."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _loopback_interface() -> str:
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), "lo")


def check_master_reachable() -> None:
    """Refuse, in one line, a job over several hosts whose MASTER_ADDR is a loopback
    address (a hostname that /etc/hosts maps to 127.0.0.1, as torchrun picks by default):
    the ranks of the other hosts would wait for a store on their own machine until the
    timeout. torchrun's --local-addr gives the address the other hosts can reach."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    hosts = int(os.environ.get("GROUP_WORLD_SIZE", "0")) or (2 if local < world else 1)
    host = os.environ.get("MASTER_ADDR", "")
    if hosts <= 1 or not host:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError as e:
        raise ShardwiseError("MASTER_ADDR", f"{host!r} does not resolve on this host ({e.strerror})") from None
    if all(_is_loopback(a.split("%")[0]) for a in addresses):
        raise ShardwiseError(
            "MASTER_ADDR",
            f"{host!r} resolves to {', '.join(sorted(addresses))}, a loopback address, but the job spans {hosts} "
            f"hosts ({world} ranks, {local} here): the other hosts cannot reach it; give torchrun --local-addr "
            "with an address of the store's host that they can reach",
        )


def init_process_group(backend: str, *, timeout: timedelta) -> None:
    """torchrun's env:// rendezvous, except that a job whose MASTER_ADDR is a loopback
    address (every rank on this machine) keeps every socket on loopback: torch's
    TCPStore would listen on all interfaces, so rank 0 binds the store's socket to
    MASTER_ADDR itself and hands it over, and gloo (NCCL) binds to the loopback interface."""
    host = os.environ.get("MASTER_ADDR", "")
    if not _is_loopback(host) or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        dist.init_process_group(backend, timeout=timeout)  # torchrun's agent hosts the store
        return
    os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()  # even if the shell names another one
    os.environ["NCCL_SOCKET_IFNAME"] = _loopback_interface()
    host = "127.0.0.1" if host == "localhost" else host
    rank, world, port = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["MASTER_PORT"])
    if rank == 0:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(max(128, world))
        store = dist.TCPStore(host, port, world, is_master=True, timeout=timeout, master_listen_fd=sock.detach())
    else:
        store = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


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
) -> RunResult:
    """Train as configured on the ranks of `group` (default: the world).

    Rank 0 of the group writes the outputs when `out_dir` is given. Returns the
    full, unsharded final weights (the same on every rank) and the summary.
    """
    group = group or dist.group.WORLD
    dims = ParallelDims.resolve(
        cfg.parallel, dist.get_world_size(group), vertical=cfg.data.vertical, ps_servers=cfg.ps.servers
    )
    mesh = RankMesh.build(
        dims,
        group,
        timeout=timedelta(seconds=cfg.train.collective_timeout_s),
        replicated_gradients=dims.replicated_gradients(cfg.parallel.shard),
    )
    placement = describe_hosts(all_gather_json(socket.gethostname(), group), os.environ.get(PLACEMENT_ENV))
    try:
        if dims.servers:
            launch_time = float(os.environ.get(LAUNCH_TIME_ENV, time.time()))
            state, summary = run_parameter_server(
                cfg, mesh, group=group, out_dir=out_dir, launch_time=launch_time, placement=placement
            )
            # its servers answer the workers last and may have lost some: no leaving together
            return RunResult(state, summary, leave_together=False)
        device = device or group_device(group)
        return _train(cfg, mesh, group=group, out_dir=out_dir, device=device, placement=placement)
    finally:
        mesh.close()


def _train(
    cfg: Config, mesh: RankMesh, *, group: dist.ProcessGroup, out_dir: Path | None, device, placement: dict
) -> RunResult:
    started = time.time()
    dims, t = mesh.dims, cfg.train
    rank = dist.get_rank(group)
    faults, position = FaultPlan(rank), Position()
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    dtype = getattr(torch, t.dtype)
    torch.manual_seed(t.seed)  # weights; data order and splits use their own seeded generators
    data, in_shape, num_classes = _rank_data(cfg, mesh, device=device, dtype=dtype)
    model = build_model(cfg.model, in_shape, num_classes).to(device=device, dtype=dtype)
    checkpoint = read_resume(cfg)
    if checkpoint is not None:  # the whole model, before any layout cuts it
        load_weights(model, checkpoint)
    whole_model_bytes = local_bytes(model.parameters())
    layout = _compose(cfg, mesh, model, data, in_shape=in_shape, group=group, device=device, faults=faults)
    start_bytes = gather_rows(rank_bytes(unwrap(layout.model)), group)
    zero_group = mesh.groups["dp"] if cfg.parallel.shard == "optimizer" else None
    optimizer = build_optimizer(t, layout.model, zero_group=zero_group)
    start_step = 0
    if checkpoint is not None:
        load_optimizer(unwrap(layout.model), optimizer, layout.splits, checkpoint.tensors)
        restore_rng(checkpoint, rank, dims.world_size)
        start_step = checkpoint.step
    scheduler = build_scheduler(t, optimizer, start=checkpoint.schedule_step if checkpoint is not None else 0)

    def collect() -> tuple[dict, dict]:
        part, splits = unwrap(layout.model), layout.splits
        tensors = logical_model(part, splits) | logical_optimizer(part, optimizer, splits) | rng_tensors(rank)
        return tensors, {"world_size": dims.world_size, "layout": dims.layout, "schedule_step": scheduler.last_epoch}

    checkpointer = build_checkpointer(cfg, out_dir, group, collect, faults)
    console = _console() if rank == 0 and out_dir is not None else None
    if console is not None:
        title = f"layout {dims.layout}, shard={cfg.parallel.shard}: parameters held by each rank at start"
        console.print(render_report(data.report, f"data: {cfg.data.name}, partition {cfg.data.partition}"))
        if layout.cut_rows:
            console.print(render_cut(layout.cut_rows, dims))
        console.print(render_memory(start_bytes, dims, whole_model_bytes=whole_model_bytes, title=title))
        if checkpoint is not None:
            console.print(
                f"resumed from {checkpoint.folder} (step {start_step}, saved as {checkpoint.state['layout']})"
            )
    reporter = open_reporter(
        out_dir, console, start_step=start_step, total_steps=t.steps, show_progress=cfg.run.progress
    )
    rss_start = start_measuring(device)  # what training adds: gradients, optimizer state, buffers, activations
    with reporter:
        result = _located(position, rank)(train_loop)(
            layout.runner,
            layout.model,
            optimizer,
            scheduler,
            data,
            LoopSettings.from_train(t, start_step=start_step),
            reporter=reporter,
            faults=faults,
            splits=layout.splits,
            sum_groups=layout.sum_groups,
            agree_group=mesh.groups["agree"],
            checkpointer=checkpointer,
            position=position,
        )
    measured = gather_rows(measured_bytes(device, rss_start), group)
    end_bytes = gather_rows(rank_bytes(unwrap(layout.model), optimizer), group)
    state, pipeline, timeline = _whole_state(layout, mesh)
    summary = run_summary(
        cfg,
        dims,
        result,
        state,
        backend=dist.get_backend(group),
        device=str(device),
        launch_time=float(os.environ.get(LAUNCH_TIME_ENV, started)),
        placement=placement,
    )
    summary |= {"shard": cfg.parallel.shard, "memory": memory_records(end_bytes, dims, measured)}
    summary |= {"skipped_steps": result.skipped_steps, **pipeline, "partition": data.report}
    if console is not None:
        write_run(out_dir, cfg, dims, state, result.records, summary)
        if pipeline and cfg.run.timeline:
            title = f"{dims.layout}, {dims.microbatches} micro-batches, {cfg.parallel.schedule}: the last step"
            plot_timeline(out_dir / "timeline.png", timeline, title)
        title = "bytes held by each rank at the end (gradients and optimizer state exist after the first step)"
        console.print(
            render_memory(end_bytes, dims, whole_model_bytes=whole_model_bytes, title=title, measured=measured)
        )
        console.print(render_summary(summary, str(out_dir)))
    return RunResult(state, summary)


def _console():
    from rich.console import Console

    return Console(stderr=False)


def _rank_data(cfg: Config, mesh: RankMesh, *, device: torch.device, dtype: torch.dtype):
    """This rank's data: only its input columns (vertical), its share of each batch (dp),
    only its rows of each image (spatial); and the shape and classes of a whole sample."""
    dims, t = mesh.dims, cfg.train
    feature_parts = vertical_parts(cfg.data)
    own_features = feature_parts[mesh.coords["vertical"]] if feature_parts else None
    dataset = load_source(cfg.data, seed=t.seed, features=own_features, reduce_stats=_summer(mesh.groups["vertical"]))
    if dims.spatial > 1 and len(dataset.in_shape) != 3:
        raise ShardwiseError("parallel.spatial", f"needs images (C, H, W), the data has shape {dataset.in_shape}")
    data = build_rank_data(
        cfg.data,
        dataset,
        global_batch=t.batch_size,
        grad_accum=t.grad_accum,
        dp_rank=mesh.coords["dp"],
        dp=dims.dp,
        seed=t.seed,
        device=device,
        microbatches=dims.microbatches,
        dtype=dtype,
    )
    if dims.spatial > 1:  # rows are cut after the split into shards, which may read whole samples (kmeans)
        data.dataset = take_rows(dataset, *even_bounds(dataset.in_shape[1], dims.spatial)[mesh.coords["spatial"]])
    return data, dataset.in_shape, dataset.num_classes


@dataclass
class _Layout:
    """What this rank runs: its part of the model, how a step runs on it, its split
    parameters, and for a pipeline the cut (which stage holds each tensor, and the
    report's rows). (Issue 15 turns this into the project's one Layout value.)"""

    model: nn.Module
    runner: Runner
    splits: dict[str, Split]
    sum_groups: list[dist.ProcessGroup]  # where the pieces of the gradient norm add up
    whole_state: dict[str, torch.Tensor]  # every tensor of the whole model (meta: names, shapes, dtypes)
    stage_of: dict[str, int]
    cut_rows: list[dict]


def _compose(
    cfg: Config,
    mesh: RankMesh,
    model: nn.Module,
    data: RankData,
    *,
    in_shape: tuple[int, ...],
    group: dist.ProcessGroup,
    device: torch.device,
    faults: FaultPlan,
) -> _Layout:
    """Composition order (ARCHITECTURE.md): pipeline split, then per stage the layer
    partitioning (vertical takes the input layer, tensor parallelism the fully-connected
    head, spatial the convolution stack), then the data-parallel wrapper (DDP, ZeRO-1 or
    FSDP2) outermost. Split layers hold plain local tensors, so the wrapper treats them
    like any other."""
    dims = mesh.dims
    whole_state = {k: v.detach().to("meta") for k, v in model.state_dict().items()}
    pp_group, dp_group, stage_of, cut_rows = mesh.groups["pp"], mesh.groups["dp"], {}, []
    if pp_group is not None:
        example = data.micro_batches(0)[0][0][: cfg.train.batch_size // (dims.dp * dims.microbatches)]
        cut, costs = plan_pipeline(model, example, stages=dims.pp, group=group)
        stage_of, cut_rows = owners(model, cut), describe_cut(costs, cut)
        shapes = stage_shapes(costs, cut, mesh.coords["pp"], tuple(example.shape))
        model = apply_pipeline(model, cut=cut, stage=mesh.coords["pp"])
    splits: dict[str, Split] = {}
    feature_parts = vertical_parts(cfg.data)
    if feature_parts:
        splits |= apply_vertical(model, group=mesh.groups["vertical"], features=feature_parts, in_shape=in_shape)
    splits |= apply_tensor_parallel(model, group=mesh.groups["tp"], skip=set(splits))
    apply_spatial(model, group=mesh.groups["spatial"], in_shape=in_shape)
    if pp_group is None:
        model = apply_data_parallel(model, mesh=mesh, device=device, shard=cfg.parallel.shard)
        runner: Runner = ModelRunner(model, dp_group=dp_group, faults=faults)
    else:  # a pipeline averages its stages' gradients itself, once drained (train/pipeline.py)
        runner = PipelineRunner(
            model,
            stage=mesh.coords["pp"],
            stages=dims.pp,
            group=pp_group,
            dp_group=dp_group,
            microbatches=dims.microbatches,
            schedule=cfg.parallel.schedule,
            device=device,
            shapes=shapes,
            dtype=next(model.parameters()).dtype,
        )
    sum_groups = [g for g in (dp_group if is_fully_sharded(model) else None, pp_group) if g is not None]
    return _Layout(model, runner, splits, sum_groups, whole_state, stage_of, cut_rows)


def _whole_state(layout: _Layout, mesh: RankMesh) -> tuple[dict[str, torch.Tensor], dict, list]:
    """The whole model's weights on every rank (collective), and for a pipeline its
    report (the cut, the bubble) and the last step's timeline."""
    state = full_state_dict(unwrap(layout.model), layout.splits)
    pp_group = mesh.groups["pp"]
    if pp_group is None:
        return state, {}, []
    state = gather_stages(state, layout.whole_state, layout.stage_of, group=pp_group)
    timeline = gather_events(layout.runner.events, pp_group)
    return state, {"pipeline": {"cut": layout.cut_rows, **bubble_summary(timeline, mesh.dims.microbatches)}}, timeline


def _located(position: Position, rank: int):
    """Add where this rank was to an error from the loop (a collective that failed or timed out)."""

    def wrap(fn):
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (ShardwiseError, TrainingDiverged):
                raise
            except Exception as e:
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise RuntimeError(f"{first} [rank {rank} at step {position.step + 1}: {position.phase}]") from e

        return call

    return wrap


def _summer(group: dist.ProcessGroup | None):
    """Adds up NumPy arrays over `group` (the vertical ranks' data statistics)."""
    if group is None:
        return None

    def reduce(stats):
        total = torch.from_numpy(stats.copy())
        dist.all_reduce(total, group=group)
        return total.numpy()

    return reduce


def _record_error(exc: BaseException) -> None:
    """Write the error where torchrun (and our launcher) read it: TORCHELASTIC_ERROR_FILE."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)


def main(argv: list[str] | None = None) -> int:
    """Run one rank; the exit status is 0, 2 (the user's mistake) or 1.

    On an error the process group is not destroyed: the error is recorded first
    and the process then exits, so peers see their connections drop only after
    the launcher can tell which rank failed first.
    """
    argv = sys.argv[1:] if argv is None else argv
    rank = int(os.environ.get("RANK", "0"))
    launched = bool(os.environ.get(LAUNCHED_ENV))
    try:
        if len(argv) != 1:
            raise ShardwiseError("worker", f"expected one argument, the config file; got {argv}")
        cfg = load_config(argv[0])
        torch.set_num_threads(1)
        device = rank_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
            if cfg.train.deterministic:  # cuBLAS repeats its results only with a fixed workspace
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        timeout = timedelta(seconds=cfg.train.collective_timeout_s)
        check_master_reachable()
        init_process_group(backend_for(device), timeout=timeout)
        out_dir = Path(cfg.run.out) if cfg.run.out else new_run_dir(Path("runs"), cfg.model.name)
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
        result = run(cfg, out_dir=out_dir, device=device)
        # leave together: ranks wait while rank 0 writes the outputs, so no rank
        # closes its connections under a peer that still expects it
        if result.leave_together:
            dist.barrier()
        dist.destroy_process_group()
        return 0
    except ShardwiseError as e:
        _record_error(e)
        if not launched:
            print(f"shardwise: rank {rank}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        _record_error(e)
        if not launched:
            raise
        return 1


def exit_now(code: int) -> None:
    """End the process without interpreter finalisation. Gloo's worker threads can
    still hold tensors when Python tears down, and freeing them then aborts the
    process (SIGABRT, "terminate called without an active exception") even after
    destroy_process_group; see pytorch/pytorch#179291. Everything we write is
    closed and flushed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
