"""The checks a job passes before any rank starts, and the run folder it writes to.
Nothing here imports torch: a bad config fails in a blink."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from shardwise.checkpoint.seal import load_key
from shardwise.config import Config, ParallelConfig
from shardwise.data.features import vertical_parts
from shardwise.data.sampler import check_batch_layout
from shardwise.data.sources import check_source
from shardwise.errors import ShardwiseError
from shardwise.own_code import check_import_path
from shardwise.topology import ParallelDims


def layout_fits(cfg: Config, nproc: int) -> ParallelDims:
    """The checks that depend on the number of ranks: the layout, the batch split, the
    parameter server's slow worker (what elastic.py asks of each smaller world)."""
    dims = ParallelDims.resolve(cfg.parallel, nproc)
    check_batch_layout(
        global_batch=cfg.train.batch_size,
        grad_accum=cfg.train.grad_accum,
        dp=dims.dp,
        shards=cfg.data.shards,
        microbatches=dims.microbatches,
    )
    ps = cfg.ps
    first = dims.first_worker
    if dims.servers and ps.slow_factor > 1.0 and not (ps.slow_worker == -1 or first <= ps.slow_worker < nproc):
        raise ShardwiseError(
            "ps.slow_worker", f"={ps.slow_worker}: not a worker, those are ranks {first} to {nproc - 1}"
        )
    return dims


def preflight(cfg: Config, nproc: int) -> ParallelDims:
    """Every check that needs no worker: layout, batch split, data paths."""
    dims = layout_fits(cfg, nproc)
    check_source(cfg.data)
    if cfg.checkpoint.encrypt_key:  # before any step, not at the first checkpoint
        load_key(cfg.checkpoint.encrypt_key)
    check_import_path(cfg.model.name, "model.name")
    check_import_path(cfg.data.name, "data.name")
    if cfg.model.weights and not Path(cfg.model.weights).is_file():
        raise ShardwiseError("model.weights", f"no such file {cfg.model.weights!r}")
    if ":" not in cfg.data.name:  # your own data's shape is known once a rank has loaded it
        vertical_parts(cfg.data, cfg.parallel)
    return dims


def words_preflight(cfg: Config, nproc: int) -> ParallelDims:
    """`shardwise words` has no layout, batch or model: each rank counts a share of the corpus."""
    check_source(cfg.data)
    return ParallelDims.resolve(ParallelConfig(dp=nproc), nproc)


def warn_oversubscribed(nproc: int) -> None:
    """One line when this machine has fewer cores than the ranks it runs: each rank then
    waits for a core, and a step takes several times as long."""
    cores = len(os.sched_getaffinity(0))
    if nproc > cores:
        print(f"note: {nproc} ranks on {cores} CPU core(s) here: the ranks share cores, so steps run slower")


def expendable_ranks(cfg: Config, dims: ParallelDims) -> set[int]:
    """Ranks whose loss the job survives: the workers of an asynchronous parameter server."""
    if dims.servers and cfg.ps.asynchronous:
        return set(range(dims.servers, dims.world_size))
    return set()


def prepare_out_dir(out: Path, *, overwrite: bool = False) -> None:
    """Refuse a folder that holds anything, unless `overwrite` asks to start it again: then
    it is removed, but only if it is a run folder (its config.toml says so), never another."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise ShardwiseError("out", f"{str(out)!r} exists and is not an empty folder (--overwrite starts it again)")
    if not (out / "config.toml").is_file():
        raise ShardwiseError("overwrite", f"{str(out)!r} is not a run folder (it has no config.toml): not removed")
    shutil.rmtree(out)
