"""The training loop: read top to bottom, no callbacks."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shardwise.checkpoint.store import Checkpointer
from shardwise.comm.compress import Compressor
from shardwise.comm.flat import sum_gradients
from shardwise.config import TrainConfig
from shardwise.data.loader import RankData
from shardwise.errors import ShardwiseError, TrainingDiverged
from shardwise.parallel.data import maybe_no_sync, unwrap
from shardwise.parallel.splits import Split, clip_grad_norm, local_tensor
from shardwise.peer_state import Holder
from shardwise.train.comm_share import StepProfile
from shardwise.train.evaluate import evaluate, predict
from shardwise.train.faults import FaultPlan


class Reporter(Protocol):
    """Where the loop's progress goes: rank 0 writes and draws, other ranks drop it."""

    def step_done(self, step: int) -> None: ...
    def log(self, record: dict) -> None: ...


@dataclass
class LoopResult:
    records: list[dict] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    load_times: list[float] = field(default_factory=list)  # of each step's time, taking its samples
    final_eval: dict[str, float] = field(default_factory=dict)
    train_s: float = 0.0
    skipped_steps: list[int] = field(default_factory=list)  # 1-based steps skipped as non-finite
    profiled: list[dict] = field(default_factory=list)  # each profiled step's time shares (comm_share.py)
    last_profile: StepProfile | None = None  # the last profiled step, whose trace run.profile writes


@dataclass
class LoopSettings:
    steps: int
    global_batch: int
    clip_norm: float = 0.0
    log_every: int = 10
    eval_every: int = 0
    start_step: int = 0  # a resumed run's first step
    max_bad_steps: int = 3
    measure_comm: bool = False  # profile each logged step for where its time goes

    @classmethod
    def from_train(cls, t: TrainConfig, *, start_step: int = 0, measure_comm: bool = False) -> LoopSettings:
        return cls(
            steps=t.steps,
            global_batch=t.batch_size,
            clip_norm=t.clip_norm,
            log_every=t.log_every,
            eval_every=t.eval_every,
            start_step=start_step,
            max_bad_steps=t.max_bad_steps,
            measure_comm=measure_comm,
        )


@dataclass
class Position:
    """Where this rank is, for the message if a collective there fails or times out."""

    step: int = 0
    phase: str = "start-up"

    def at(self, step: int, phase: str) -> None:
        self.step, self.phase = step, phase


class RankError(RuntimeError):
    """An error in the loop, with where this rank was (a collective that failed or timed
    out): in its text for the user, and as fields for the launcher's record."""

    def __init__(self, message: str, *, rank: int, step: int, phase: str):
        super().__init__(f"{message} [rank {rank} at step {step}: {phase}]")
        self.rank, self.step, self.phase = rank, step, phase


def located(position: Position, rank: int):
    """Add where this rank was to an error from the loop."""

    def wrap(fn):
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (ShardwiseError, TrainingDiverged):
                raise
            except Exception as e:
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise RankError(first, rank=rank, step=position.step + 1, phase=position.phase) from e

        return call

    return wrap


# the dtypes torch's fused check of gradients takes on every device
FUSED_CHECK_DTYPES = (torch.float32, torch.float16, torch.float64)


def all_finite(
    loss: torch.Tensor, model: nn.Module, group: dist.ProcessGroup | None, *, fault: str = "", known: bool | None = None
) -> bool:
    """Whether the loss and every gradient are finite. With `group`, on every rank of it
    (a collective), so all ranks skip a bad step together and their weights stay equal.
    Without, this rank's own answer: enough where the gradients were reduced whole and are
    equal on every rank, since a rank's non-finite loss reaches them (see `poisoned`).
    `known`: the gradients' answer where a compressor judged every bucket (comm/compress.py
    `take_verdict`), which saves a pass over them."""
    bad = torch.isfinite(loss.detach()).logical_not().to(torch.float32).reshape(())
    bad = bad if known is None else torch.maximum(bad, torch.tensor(float(not known), device=bad.device))
    grads: dict[tuple, list[torch.Tensor]] = {}
    for g in (local_tensor(p.grad) for p in (model.parameters() if known is None else ()) if p.grad is not None):
        grads.setdefault((g.device, g.dtype), []).append(g)
    for (device, dtype), same in grads.items():
        if dtype in FUSED_CHECK_DTYPES:
            # the fused check of torch's GradScaler: one pass over all gradients, setting
            # `found` on a NaN or inf; scaling by one leaves every value as it is
            found = torch.zeros((), device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(same, found, torch.ones((), device=device))
        else:  # bfloat16 on a GPU, say: one check per gradient
            found = torch.stack([torch.isfinite(g).all() for g in same]).all().logical_not().to(torch.float32)
        bad = torch.maximum(bad, found.to(bad.device))
    if group is not None and dist.get_world_size(group) > 1:
        if fault == "shape":  # injected faults: this rank's part has another shape, or dtype
            bad = bad.reshape(1).repeat(3)
        elif fault == "dtype":
            bad = bad.double()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
        if fault == "shape":
            bad = bad[0]
    return bad.item() == 0.0


def poisoned(loss: torch.Tensor) -> torch.Tensor:
    """`loss`, but a non-finite one makes every gradient it reaches NaN, so the gradient
    reduction carries it to every rank (no host synchronisation: the factor is a tensor)."""
    factor = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
    return loss * factor


def mean_over(group: dist.ProcessGroup | None, value: torch.Tensor) -> float:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(value, group=group)
        value = value / dist.get_world_size(group)
    return value.item()


class Runner(Protocol):
    """How one step's forward and backward run on this rank's part of the model."""

    def forward_backward(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Accumulate the gradient of the step's mean loss; return that loss as far as this rank knows it."""
        ...

    def mean_loss(self, value: torch.Tensor) -> float:
        """A loss summed on this rank, as the mean over the whole layout (a collective)."""
        ...

    def evaluate(self, data: RankData) -> dict[str, float]: ...

    def predict(self, data: RankData) -> torch.Tensor:
        """Class probabilities of the whole validation set, in its order, at least on rank 0."""
        ...


class ModelRunner:
    """The model (whole, or tensor/vertical slices of every layer) on every rank,
    data parallel around it: each micro-batch forward and backward in turn."""

    def __init__(
        self, model: nn.Module, *, dp_group: dist.ProcessGroup | None, faults: FaultPlan | None = None, band_sum=None
    ):
        self.model, self.dp_group, self.faults = model, dp_group, faults
        self.band_sum = band_sum  # spatial: (group, parameters) whose band shares are summed after the backward

    def forward_backward(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        total = torch.zeros((), device=micro[0][0].device)
        for i, (x, y) in enumerate(micro):
            # all-reduce only after the last micro-batch's backward
            with maybe_no_sync(self.model, skip_sync=i < len(micro) - 1):
                loss = F.cross_entropy(self.model(x), y) / len(micro)
                if self.faults is not None and self.faults.inflates_loss():
                    loss = loss + float("inf")  # the value only: the gradient stays finite
                loss = poisoned(loss)
                loss.backward()
            total += loss.detach()
        if self.band_sum is not None:
            group, params = self.band_sum
            sum_gradients(params, group)
        return total

    def mean_loss(self, value: torch.Tensor) -> float:
        return mean_over(self.dp_group, value)

    def evaluate(self, data: RankData) -> dict[str, float]:
        return evaluate(self.model, data, group=self.dp_group)

    def predict(self, data: RankData) -> torch.Tensor:
        return predict(self.model, data, group=self.dp_group)


@dataclass
class _Window:
    """The steps since the last logged one: their summed loss (finite steps only) and time,
    and what the last of them measured (gradient norm, exposed communication share)."""

    loss: torch.Tensor
    steps: int = 0
    good: int = 0
    start: float = field(default_factory=time.perf_counter)
    grad_norm: float | None = None
    comm_share: float | None = None

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.good += 1

    def record(self, step: int, lr: float, runner: Runner, settings: LoopSettings, *, skipped: int, where) -> dict:
        """The log line of the window (a collective: the loss is averaged over the layout)."""
        elapsed = time.perf_counter() - self.start  # the window's steps, not the logging
        where.phase = "logging (loss all-reduce)"
        record = {
            "step": step + 1,
            "loss": runner.mean_loss(self.loss / max(1, self.good)),
            "lr": lr,
            "samples_per_s": settings.global_batch * self.steps / elapsed,
            "skipped_steps": skipped,
        }
        if self.grad_norm is not None:
            record["grad_norm"] = self.grad_norm
        if self.comm_share is not None:
            record["comm_share"] = self.comm_share
        self.loss.zero_()
        self.steps = self.good = 0
        self.grad_norm = self.comm_share = None
        return record


@dataclass
class _Step:
    """What one step's update needs besides the model and the optimizer."""

    runner: Runner
    settings: LoopSettings
    faults: FaultPlan
    splits: dict[str, Split]
    sum_groups: list[dist.ProcessGroup]
    agree_group: dist.ProcessGroup | None
    holder: Holder | None = None  # the state served to the ranks that start after a failure
    compressor: Compressor | None = None  # comm/compress.py: its residuals are taken back on a skipped step

    def iteration(self, step: int):
        return self.holder.iteration(step) if self.holder is not None else nullcontext()

    def updating(self) -> None:
        """The weights and the schedule change from here to the end of the step (its logging and
        checkpoint): a snapshot of a holder is never half a step."""
        if self.holder is not None:
            self.holder.updating()


def _norm(ctx: _Step, model: nn.Module, where: Position) -> float:
    """The whole model's gradient norm, clipped to `clip_norm` where that is set."""
    where.phase = "gradient norm (all-reduce)"
    max_norm = ctx.settings.clip_norm if ctx.settings.clip_norm > 0 else math.inf
    return clip_grad_norm(unwrap(model), max_norm, splits=ctx.splits, sum_groups=ctx.sum_groups)


def _update(
    ctx: _Step, model: nn.Module, optimizer, scheduler, micro, step: int, where: Position, *, logged: bool
) -> tuple[torch.Tensor, bool, float | None]:
    """Forward, backward, the agreement on finite gradients, clipping and the optimizer
    step: (the loss, whether the step was applied, the gradient norm where measured: on
    every clipped step and every logged one)."""
    optimizer.zero_grad(set_to_none=True)
    fault = ctx.faults.at(step)  # "" but in tests and benchmarks of failure handling
    if fault == "nan":
        micro = [(torch.full_like(x, float("nan")), y) for x, y in micro]
    elif fault == "deadlock":
        ctx.runner.receive_first()
    loss = ctx.runner.forward_backward(micro)
    norm = _norm(ctx, model, where) if fault == "order" else None  # the norm's collective before the agreement
    where.phase = "agreeing on finite gradients"
    group = None if fault == "skip" else ctx.agree_group
    known = ctx.compressor.take_verdict() if ctx.compressor is not None else None
    if not all_finite(loss, model, group, fault=fault, known=known):
        optimizer.zero_grad(set_to_none=True)  # every rank skips it: the weights stay equal
        if ctx.compressor is not None:
            ctx.compressor.skipped()
        ctx.updating()
        return loss, False, None
    if (ctx.settings.clip_norm > 0 or logged) and norm is None:
        norm = _norm(ctx, model, where)
    where.phase = "optimizer step"
    ctx.updating()
    optimizer.step()
    scheduler.step()
    return loss, True, norm


def train_loop(
    runner: Runner,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: RankData,
    settings: LoopSettings,
    *,
    reporter: Reporter,
    faults: FaultPlan,
    splits: dict[str, Split] | None = None,
    sum_groups: list[dist.ProcessGroup] | None = None,
    agree_group: dist.ProcessGroup | None = None,
    checkpointer: Checkpointer | None = None,
    position: Position | None = None,
    holder: Holder | None = None,
    compressor: Compressor | None = None,
) -> LoopResult:
    """Train from `settings.start_step` to `settings.steps`. `model` is this rank's part of
    the model; `splits` (parameters held in pieces) and `sum_groups` (groups whose ranks
    hold disjoint parameters: FSDP shards, pipeline stages) let clipping see the whole
    model's gradient. `agree_group` (every rank of the layout) agrees on skipping a step
    whose loss or gradients are not finite. `holder`: where a replica's state is served from
    to the ranks that start after a failure (peer_state.py). `compressor`: the one averaging
    the gradients, if they are compressed: a skipped step takes back what it did."""
    result, where = LoopResult(), position or Position()
    ctx = _Step(runner, settings, faults, splits or {}, sum_groups or [], agree_group, holder, compressor)
    window = _Window(torch.zeros((), device=data.device))
    bad_in_row = 0
    model.train()
    for step in range(settings.start_step, settings.steps):
        with ctx.iteration(step):  # the weights served after a failure are a whole step's (peer_state.py)
            started = time.perf_counter()
            where.at(step, "forward/backward and gradient reduction")
            faults.maybe_fail(step)
            last = step == settings.steps - 1
            eval_now = last or (settings.eval_every > 0 and (step + 1) % settings.eval_every == 0)
            logged = eval_now or (step + 1) % settings.log_every == 0
            lr = scheduler.get_last_lr()[0]
            loading = time.perf_counter()
            micro = data.micro_batches(step)
            result.load_times.append(time.perf_counter() - loading)
            with StepProfile() if logged and settings.measure_comm else nullcontext() as measured:
                loss, applied, norm = _update(ctx, model, optimizer, scheduler, micro, step, where, logged=logged)
            if applied:
                bad_in_row = 0
                window.add(loss)
                window.grad_norm = norm
            else:
                result.skipped_steps.append(step + 1)
                bad_in_row += 1
                if bad_in_row >= settings.max_bad_steps:
                    raise TrainingDiverged(
                        f"train.max_bad_steps: {bad_in_row} steps in a row with a non-finite loss or gradient "
                        f"(steps {step + 2 - bad_in_row} to {step + 1}); lower train.lr or set train.clip_norm"
                    )
            result.step_times.append(time.perf_counter() - started)
            if measured is not None:  # read after the step's time is taken
                window.comm_share, result.last_profile = measured.share, measured
                result.profiled.append({"step": step + 1, **measured.shares})
            window.steps += 1
            reporter.step_done(step)
            if logged:
                record = window.record(step, lr, runner, settings, skipped=len(result.skipped_steps), where=where)
                if eval_now:
                    where.phase = "evaluation"
                    record.update(runner.evaluate(data))
                result.records.append(record)
                reporter.log(record)
                window.start = time.perf_counter()  # the next window's time leaves out this evaluation
            if checkpointer is not None:
                where.phase = "writing a checkpoint"
                checkpointer.maybe_save(step + 1)
    if not result.records:  # resumed at the last step: score the weights as loaded
        where.phase = "evaluation"
        result.records.append(_score_as_loaded(runner, data, step=settings.steps, lr=scheduler.get_last_lr()[0]))
    result.final_eval = {k: result.records[-1][k] for k in ("val_loss", "val_accuracy")}
    result.train_s = sum(result.step_times)
    return result


def _score_as_loaded(runner: Runner, data: RankData, *, step: int, lr: float) -> dict:
    return {"step": step, "loss": float("nan"), "lr": lr, "samples_per_s": 0.0, **runner.evaluate(data)}
