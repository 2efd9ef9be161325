"""The two loops of a parameter-server run (parallel/param_server.py).

A worker: forward and backward on its share of the step, push, pull, again,
until server 0 says stop. A server: take each arrival, apply it, answer; server
0 also logs the loss the workers reported and evaluates the weights. Global
step n is complete when the servers have applied n x W gradients.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from shardwise.checkpoint.store import Checkpointer
from shardwise.data.loader import RankData
from shardwise.parallel.param_server import ParameterServer
from shardwise.parallel.ps_protocol import WorkerClient
from shardwise.parallel.splits import clip_grad_norm
from shardwise.train.faults import FaultPlan
from shardwise.train.loop import LoopResult, LoopSettings, ModelRunner, Reporter


def straggler(*, slow_rank: int, factor: float, worker_ranks: list[int], seed: int) -> Callable[[int, int], float]:
    """How much slower `rank` runs its step `step`: `factor` for the slow worker
    (slow_rank = -1: a different worker each step, drawn from `seed`), else 1."""

    def slowdown(rank: int, step: int) -> float:
        if factor <= 1.0:
            return 1.0
        if slow_rank >= 0:
            return factor if rank == slow_rank else 1.0
        chosen = np.random.default_rng([seed, step]).integers(len(worker_ranks))
        return factor if worker_ranks[chosen] == rank else 1.0

    return slowdown


def work(
    client: WorkerClient,
    runner: ModelRunner,
    model: nn.Module,
    data: RankData,
    *,
    rank: int,
    clip_norm: float,
    slowdown: Callable[[int, int], float],
    faults: FaultPlan,
    start_step: int = 0,
) -> int:
    """Train until told to stop; returns the number of steps this worker pushed."""
    step = start_step
    model.train()
    while True:
        faults.maybe_fail(step)
        started = time.perf_counter()
        model.zero_grad(set_to_none=True)
        micro = data.micro_batches(step)
        if faults.at(step) == "nan":
            micro = [(torch.full_like(x, float("nan")), y) for x, y in micro]
        loss = runner.forward_backward(micro)
        factor = slowdown(rank, step)
        if factor > 1.0:
            time.sleep((factor - 1.0) * (time.perf_counter() - started))
        if clip_norm > 0:  # asynchronous: each worker clips its own gradient
            clip_grad_norm(model, clip_norm, splits={}, sum_groups=[])
        stop = client.push_pull(step, loss)
        step += 1
        if stop:
            break
    client.finish()
    return step


def serve(
    server: ParameterServer,
    settings: LoopSettings,
    *,
    reporter: Reporter,
    evaluate: Callable[[Tensor], dict[str, float]] | None,
    checkpointer: Checkpointer | None = None,
) -> LoopResult:
    """Serve until every worker is done or lost. `evaluate(flat parameters)` scores the
    weights (server 0); every server takes part in gathering them at each evaluation."""
    result = LoopResult()
    done_steps, logged_losses, logged_updates = settings.start_step, 0, server.stats.updates
    window_start = step_start = time.perf_counter()
    last_record: dict | None = None
    while server.running():
        server.handle(server.next_arrival())
        while done_steps < min(server.global_step, settings.steps):
            now = time.perf_counter()
            result.step_times.append(now - step_start)
            step_start = now
            reporter.step_done(done_steps)
            done_steps += 1
            eval_now = settings.eval_every > 0 and done_steps % settings.eval_every == 0
            last = done_steps == settings.steps
            if checkpointer is not None and not last:  # the last one once every gradient has landed
                checkpointer.maybe_save(done_steps)
            if not (last or eval_now or done_steps % settings.log_every == 0):
                continue
            losses = server.stats.losses[logged_losses:]
            taken = server.stats.updates - logged_updates
            logged_losses, logged_updates = len(server.stats.losses), server.stats.updates
            record = {
                "step": done_steps,
                "loss": float(np.mean(losses)) if losses else float("nan"),
                "lr": server.lr_at(max(0, server.schedule_step - 1)),
                "samples_per_s": settings.global_batch * taken / server.workers / (now - window_start),
                "skipped_steps": len(server.stats.skipped),
            }
            window_start = time.perf_counter()
            if last:  # scored after the last gradients in flight have landed
                last_record = record
                continue
            if eval_now:
                flat = server.gather()
                if evaluate is not None:
                    record.update(evaluate(flat))
            result.records.append(record)
            reporter.log(record)
    flat = server.gather()
    if checkpointer is not None and done_steps == settings.steps:
        checkpointer.maybe_save(done_steps)
    if last_record is None:  # the workers were lost before the end
        last_record = {"step": done_steps, "loss": float("nan"), "lr": 0.0, "samples_per_s": 0.0}
    if evaluate is not None:
        last_record.update(evaluate(flat))
    result.records.append(last_record)
    reporter.log(last_record)
    result.final_eval = {k: last_record.get(k, float("nan")) for k in ("val_loss", "val_accuracy")}
    result.train_s = sum(result.step_times)
    server.final = flat
    return result


def held_by_servers(server: ParameterServer, group) -> dict:
    """What each server keeps for serving, in bytes, in server order: its slice of the
    parameters, and that slice with the optimizer's state for it (a collective of the servers)."""
    from shardwise.comm.collectives import all_gather_json
    from shardwise.parallel.splits import local_bytes
    from shardwise.train.optim import optimizer_state_tensors

    mine = [local_bytes([server.param]), local_bytes([server.param, *optimizer_state_tensors(server.optimizer)])]
    rows = all_gather_json(mine, group) if group is not None else [mine]
    return {"slice_bytes": [r[0] for r in rows], "server_bytes": [r[1] for r in rows]}


def staleness_summary(server: ParameterServer) -> dict:
    stats = server.stats
    histogram = Counter(stats.staleness)
    return {
        "servers": server.servers,
        "workers": server.workers,
        "asynchronous": server.asynchronous,
        "staleness_bound": server.bound if server.asynchronous else 0,
        "updates": len(stats.staleness),
        "staleness_histogram": {str(k): histogram[k] for k in sorted(histogram)},
        "max_staleness": max(stats.staleness, default=0),
        "steps_by_worker": {str(server.worker_rank(w)): n for w, n in enumerate(stats.steps_by_worker)},
        "lost_workers": [{"rank": x.rank, "step": x.clock, "error": x.error} for x in stats.lost],
        "skipped_updates": len(stats.skipped),
        "pushes": str(server.codec.half).removeprefix("torch.") if server.codec.half is not None else "whole",
    }


def score_flat(model: nn.Module, data: RankData, group=None) -> Callable[[Tensor], dict[str, float]]:
    """A server's scorer: load the flat parameters into `model`, evaluate (colocated: every
    server its slice of the validation set, summed over `group`). The model holds storage
    only while it scores: from here on it lives on the meta device between evaluations, so
    a server keeps its slice of the parameters and nothing of the whole model (a worker's
    own model is the worker's)."""
    from shardwise.parallel.ps_protocol import load_flat
    from shardwise.train.evaluate import evaluate

    model.to("meta")

    def run(flat: Tensor) -> dict[str, float]:
        model.to_empty(device=data.device)
        try:
            with torch.no_grad():
                load_flat(model, flat)
            return evaluate(model, data, group=group)
        finally:
            model.to("meta")

    return run
