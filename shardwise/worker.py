"""One rank: process group -> topology -> model and data -> layout -> training loop -> outputs.

Started by `shardwise train` (local launcher) or by torchrun, which set the same
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m shardwise.worker run.toml
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from shardwise.config import Config, load_config
from shardwise.data import build_rank_data, load_source
from shardwise.data.report import render_report
from shardwise.errors import EXIT_USAGE, ShardwiseError
from shardwise.models import build_model
from shardwise.parallel.data import apply_data_parallel, unwrap
from shardwise.topology import ParallelDims
from shardwise.train.faults import FaultPlan
from shardwise.train.loop import LoopSettings, train_loop
from shardwise.train.optim import build_optimizer, build_scheduler
from shardwise.train.outputs import MetricsLog, new_run_dir, plot_curves, save_model, write_json
from shardwise.train.progress import ConsoleReporter, NullReporter, render_summary

# set by the local launcher: it prints the one-line error itself
LAUNCHED_ENV = "SHARDWISE_LAUNCHED"
LAUNCH_TIME_ENV = "SHARDWISE_LAUNCH_TIME"


@dataclass
class RunResult:
    state_dict: dict[str, torch.Tensor]
    summary: dict


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
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
    started = time.time()
    device = device or default_device()
    group = group or dist.group.WORLD
    rank = dist.get_rank(group)
    dims = ParallelDims.resolve(cfg.parallel, dist.get_world_size(group))
    mesh = dims.build_mesh(device.type, group)
    dp_group, dp_rank = mesh.get_group("dp"), mesh.get_local_rank("dp")
    t = cfg.train

    torch.manual_seed(t.seed)  # weights; data order and splits use their own seeded generators
    dataset = load_source(cfg.data, seed=t.seed)
    data = build_rank_data(
        cfg.data,
        dataset,
        global_batch=t.batch_size,
        grad_accum=t.grad_accum,
        dp_rank=dp_rank,
        dp=dims.dp,
        seed=t.seed,
        device=device,
    )
    model = build_model(cfg.model, dataset.in_shape, dataset.num_classes).to(device)
    num_params = sum(p.numel() for p in model.parameters())

    # Composition order (ARCHITECTURE.md): pipeline split, then tensor/spatial
    # partitioning per stage, then activation checkpointing, then the
    # data-parallel wrapper outermost. Only data parallelism exists so far.
    model = apply_data_parallel(model, group=dp_group, device=device)

    optimizer = build_optimizer(t, model)
    scheduler = build_scheduler(t, optimizer)
    settings = LoopSettings(
        steps=t.steps, global_batch=t.batch_size, clip_norm=t.clip_norm, log_every=t.log_every, eval_every=t.eval_every
    )
    writes = rank == 0 and out_dir is not None
    console = None
    if writes:
        from rich.console import Console

        console = Console(stderr=False)
        console.print(render_report(data.report, f"data: {cfg.data.name}, partition {cfg.data.partition}"))
        reporter = ConsoleReporter(
            MetricsLog(out_dir / "metrics.jsonl"), total_steps=t.steps, console=console, show_progress=cfg.run.progress
        )
    else:
        reporter = NullReporter()
    with reporter:
        result = train_loop(
            model, optimizer, scheduler, data, settings, dp_group=dp_group, reporter=reporter, faults=FaultPlan(rank)
        )

    state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
    warm = result.step_times[min(5, len(result.step_times) - 1) :]
    launch_time = float(os.environ.get(LAUNCH_TIME_ENV, started))
    summary = {
        **result.final_eval,
        "train_loss": result.records[-1]["loss"],
        "steps": t.steps,
        "global_batch": t.batch_size,
        "world_size": dims.world_size,
        "layout": dims.layout,
        "backend": dist.get_backend(group),
        "model": cfg.model.name,
        "parameters": num_params,
        "samples_per_s": t.batch_size * t.steps / result.train_s,
        "step_time_s": statistics.median(warm),
        "train_s": result.train_s,
        "wall_s": time.time() - launch_time,
        "partition": data.report,
    }
    if writes:
        save_model(out_dir / "model.safetensors", state)
        plot_curves(out_dir / "curves.png", result.records, f"{cfg.model.name} on {cfg.data.name}, {dims.layout}")
        write_json(out_dir / "summary.json", summary)
        console.print(render_summary(summary, str(out_dir)))
    return RunResult(state, summary)


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
        device = default_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=300))
        out_dir = Path(cfg.run.out) if cfg.run.out else new_run_dir(Path("runs"), cfg.model.name)
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
        run(cfg, out_dir=out_dir, device=device)
        # leave together: ranks wait while rank 0 writes the outputs, so no rank
        # closes its connections under a peer that still expects it
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
