"""comm.compression = auto, at the launcher: the method the cost model predicts fastest for
a step of the run's layout on its link, each of DDP's buckets priced apart
(plan/compression.py), and the methods the run times itself (comm/trial.py)."""

from __future__ import annotations

import dataclasses
import os

import torch

from shardwise.comm.compress import CompressionSettings
from shardwise.config import Config
from shardwise.config_check import uncompressed_because
from shardwise.errors import ShardwiseError
from shardwise.plan.command import measured_link, measured_setting, step_figures
from shardwise.plan.model import Prediction, core_stretch, predict
from shardwise.topology import ParallelDims


def choose_compression(cfg: Config, *, nproc: int, cluster: str) -> dict | None:
    """comm.compression = auto: the method the cost model predicts fastest for a step of this
    layout on this link, within its margins (plan/compression.py `pick`), and the methods the
    run times itself (comm.candidates), printed in one line and set in `cfg` (the run's
    saved config names them); none where no gradients are averaged. The chosen method's
    prediction, as `predicted_step` gives it, with each candidate's under `by_method` (None
    where none was made)."""
    from shardwise.data import load_source
    from shardwise.models import build_model
    from shardwise.plan.compression import bucket_plan, pick, rank_shapes, whole_below

    dims = ParallelDims.resolve(cfg.parallel, nproc)
    c = cfg.comm
    why = uncompressed_because(shard=dims.shard, ps=bool(dims.servers))[1]
    why = "one data-parallel rank: no gradients to average" if dims.dp <= 1 else why
    if why:
        c.compression, c.candidates = "none", []
        print(f"comm.compression auto: none ({why})")
        return None
    dataset = load_source(cfg.data, seed=cfg.train.seed)
    shapes = rank_shapes(build_model(cfg.model, dataset.in_shape, dataset.num_classes), dims.tp)
    settings = CompressionSettings("none", c.topk_ratio, c.powersgd_rank, c.warmup_steps)
    elem = torch.finfo(getattr(torch, cfg.train.dtype)).bits // 8
    stretch = core_stretch(nproc, len(os.sched_getaffinity(0)))  # ranks sharing cores compress at once
    plan = bucket_plan(shapes, settings, measured_link(cluster, nproc), dims.dp, elem, dims.bucket_bytes, stretch)
    averaging = {m: seconds for m, (seconds, _) in plan.items()}
    predicted = _method_steps(cfg, nproc, cluster, averaging)
    steps = {m: p.step_s for m, p in predicted.items()} if predicted else None
    c.compression, c.candidates, line = pick(averaging, steps)
    c.min_bucket_bytes, why = whole_below(plan, c.candidates or [c.compression], shapes, elem, dims.bucket_bytes)
    print(f"comm.compression auto: {line}{why}")
    if not predicted:
        return None
    # and each candidate's: the run's model check takes the one its trial keeps
    by_method = {m: step_figures(predicted[m]) for m in c.candidates}
    return step_figures(predicted[c.compression]) | ({"by_method": by_method} if by_method else {})


def _method_steps(cfg: Config, nproc: int, cluster: str, averaging: dict[str, float]) -> dict[str, Prediction] | None:
    """The cost model's step for this layout under each method (none: DDP's all-reduce,
    overlapped with the backward; the others: their averaging after it, and their buffers);
    None for a model it cannot profile."""
    try:
        setting, _ = measured_setting(
            dataclasses.replace(cfg, comm=dataclasses.replace(cfg.comm, compression="none")), cluster, nproc
        )
    except ShardwiseError:
        return None
    c, out = cfg.comm, {}
    for method, seconds in averaging.items():
        priced = setting
        if method != "none":
            named = CompressionSettings(method, c.topk_ratio, c.powersgd_rank)
            # (the plan's seconds: its compute already stretched for these ranks)
            priced = dataclasses.replace(setting, averaging=lambda dims, stretch, s=seconds: s, compression=named)
        out[method] = predict(cfg.parallel, nproc, priced)
    return out
