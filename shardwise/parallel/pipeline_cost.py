"""A pipeline step's time (the planner's cost model): torch's schedules played out in time.

Each stage runs its micro-batches' forwards and backwards in the order its schedule
gives (`schedule_order`, as `torch.distributed.pipelining` runs GPipe and 1F1B). A
forward waits for the previous stage's forward of the same micro-batch and the transfer
of its activation; a backward for the next stage's backward and the transfer of its
gradient, which move only once the receiver has posted its receive (gloo sends into a
posted receive, and torch posts it just before the task that needs it): a transfer is
never hidden behind its receiver's compute. A stage waiting on a receive
takes no CPU, so when there are more ranks than cores the stages share them as processor
sharing: while n stages (each run by `ranks_per_stage` ranks in lockstep: the
data-parallel replicas) compute at once, each goes at min(1, cores / (n x
ranks_per_stage)) of its own speed. The fill and the drain, where fewer stages compute,
run faster than the steady state: a single stretch of ranks / cores for every slot would
count the bubble at the steady state's speed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from shardwise.comm.cost import Link
from shardwise.parallel.pipeline import SCHEDULES, stage_ranks
from shardwise.topology import MULTI_STAGE

FORWARD, BACKWARD, WEIGHT = 0, 1, 2  # a backward: whole, or the input's gradient alone where WEIGHT follows
INPUT_SHARE = 0.5  # of a backward, the input's gradient (a linear layer's two products of the same size)
_KINDS = {"F": FORWARD, "B": BACKWARD, "I": BACKWARD, "W": WEIGHT}


def schedule_order(schedule: str, stages: int, stage: int, microbatches: int) -> list[tuple[int, int]]:
    """(FORWARD or BACKWARD, micro-batch) in the order stage `stage` runs them: GPipe all
    forwards then all backwards; 1F1B (torch's) stages - stage forwards to warm up, then
    a backward and a forward in turn, then the backwards left."""
    if schedule == "gpipe":
        return [(FORWARD, m) for m in range(microbatches)] + [(BACKWARD, m) for m in range(microbatches)]
    warm = min(microbatches, stages - stage)
    order = [(FORWARD, m) for m in range(warm)]
    for m in range(microbatches):
        order.append((BACKWARD, m))
        if warm + m < microbatches:
            order.append((FORWARD, warm + m))
    return order


Task = tuple[int, int, int]  # kind, stage, micro-batch


@functools.lru_cache(maxsize=256)
def rank_orders(schedule: str, ranks: int, virtual: int, microbatches: int) -> tuple[tuple[Task, ...], ...]:
    """Each pipeline rank's tasks (kind, stage, micro-batch) in the order it runs them. The
    interleaved schedules' orders are the ones torch computes for them (each rank's list of
    actions, which its runtime follows), without building a pipeline."""
    if schedule not in MULTI_STAGE:  # those of several stages a rank: torch's own orders
        orders = [schedule_order(schedule, ranks, r, microbatches) for r in range(ranks)]
        return tuple(tuple((k, r, m) for k, m in order) for r, order in enumerate(orders))
    from torch.distributed.pipelining import schedules

    kind = getattr(schedules, SCHEDULES[schedule])
    bare = kind.__new__(kind)  # the order needs only these counts, not the stages
    bare.pp_group_size, bare.n_local_stages, bare._n_microbatches = ranks, virtual, microbatches
    bare.number_of_rounds = max(1, microbatches // ranks)
    bare.microbatches_per_round = microbatches // bare.number_of_rounds
    bare.num_stages = bare._num_stages = ranks * virtual
    return tuple(
        tuple(
            (_KINDS[str(a.computation_type.value)], a.stage_index, a.microbatch_index)
            for a in bare._calculate_single_rank_operations(r)
            if a is not None
        )
        for r in range(ranks)
    )


def held_peak(order: tuple[Task, ...], weights: dict[int, float]) -> float:
    """The most activations a rank keeps at once over its `order`, each stage's micro-batch
    counting `weights[stage]`: kept from its forward until its backward's last part (the
    weights' gradient needs the layer inputs too)."""
    split = any(kind == WEIGHT for kind, _, _ in order)
    held = peak = 0.0
    for kind, stage, _ in order:
        if kind == FORWARD:
            held += weights[stage]
            peak = max(peak, held)
        elif kind == (WEIGHT if split else BACKWARD):
            held -= weights[stage]
    return peak


@dataclass(frozen=True)
class PipelineStep:
    step_s: float  # the last task of any rank ends
    compute_s: float  # the busiest rank's time computing (under sharing, at the speed it got)
    comm_s: float  # what the transfers between stages add to the step
    bubble_s: float  # the rest: waiting on the other stages
    ends_s: tuple[float, ...] = ()  # when each rank's last task ends
    busy_s: tuple[float, ...] = ()  # each rank's time computing


def _source(task: tuple[int, int, int], stages: int) -> int | None:
    """The stage whose output `task` (kind, stage, micro-batch) takes in (None: the data, or its own)."""
    kind, s, _ = task
    if kind == FORWARD and s > 0:
        return s - 1
    if kind == BACKWARD and s < stages - 1:
        return s + 1
    return None


@dataclass
class _Ranks:
    """Where every pipeline rank is while a schedule is played out."""

    orders: tuple[tuple[tuple[int, int, int], ...], ...]  # each rank's tasks (kind, stage, micro-batch)
    links: list[tuple[float, float]]  # each stage boundary's latency and bytes' time
    stages: int
    made: dict = field(default_factory=dict)  # a task's input: when its sender made it
    arrived: dict = field(default_factory=dict)  # and when it arrived

    def __post_init__(self):
        n = len(self.orders)
        self.nxt = [0] * n  # each rank's next task
        self.left: list[float | None] = [None] * n  # its running task's work left; None: not started
        self.free_at = [0.0] * n  # when its previous task ended, and it posted the next one's receive
        self.busy = [0.0] * n

    def post_receives(self) -> None:
        """Each idle rank has posted its next task's receive: a transfer made for it goes,
        taking its latency and its bytes' time (nothing, between two stages of one rank)."""
        for r, order in enumerate(self.orders):
            if self.left[r] is not None or self.nxt[r] == len(order):
                continue
            task = order[self.nxt[r]]
            src = _source(task, self.stages)
            if src is not None and task in self.made and task not in self.arrived:
                latency, occupied = self.links[min(task[1], src)]
                self.arrived[task] = max(self.made[task], self.free_at[r]) + occupied + latency

    def start_at(self, r: int) -> float | None:
        """When rank `r` can start its next task: once its input arrived (None: not yet on its way)."""
        task = self.orders[r][self.nxt[r]]
        if _source(task, self.stages) is None:
            return self.free_at[r]
        return max(self.arrived[task], self.free_at[r]) if task in self.arrived else None

    def done(self, r: int, now: float) -> None:
        kind, s, m = self.orders[r][self.nxt[r]]
        to = s + 1 if kind == FORWARD else s - 1
        if kind != WEIGHT and 0 <= to < self.stages:
            self.made[(kind, to, m)] = now
        self.free_at[r] = now
        self.left[r], self.nxt[r] = None, self.nxt[r] + 1


def _played(
    forward_s: list[float],
    backward_s: list[float],
    orders: tuple,
    links: list[tuple[float, float]],
    ranks_per_stage: int,
    cores: int | None,
    action_s: float = 0.0,
) -> tuple[float, list[float], list[float]]:
    """(the step's end, each rank's time computing, each rank's end): every rank's tasks played
    out in time, the ranks computing at once sharing the cores. A transfer starts once its
    sender has made it and its receiver has posted the receive (gloo sends only into a
    posted receive, and torch posts it just before the task that needs it: the receiver does
    not take it in while it computes). (1F1B waits on a send together with the next receive;
    both go to the same neighbour, whose posting the receive waits for.)"""
    ranks = len(orders)
    at = _Ranks(orders, links, len(forward_s))
    split = any(kind == WEIGHT for order in orders for kind, _, _ in order)
    share = INPUT_SHARE if split else 1.0
    work = {FORWARD: (forward_s, 1.0), BACKWARD: (backward_s, share), WEIGHT: (backward_s, 1.0 - share)}
    now = 0.0
    while any(n < len(o) for n, o in zip(at.nxt, at.orders, strict=True)):
        at.post_receives()
        starts = {}
        for r in range(ranks):
            if at.left[r] is None and at.nxt[r] < len(at.orders[r]) and (when := at.start_at(r)) is not None:
                starts[r] = when
                if when <= now:
                    kind, stage, _ = at.orders[r][at.nxt[r]]
                    times, part = work[kind]
                    at.left[r] = times[stage] * part + action_s
        running = [r for r in range(ranks) if at.left[r] is not None]
        speed = min(1.0, (cores or ranks * ranks_per_stage) / (len(running) * ranks_per_stage)) if running else 1.0
        waits = [when - now for when in starts.values() if when > now]
        if not running and not waits:
            raise ValueError(f"the schedule of {len(forward_s)} stages stalls")  # not a schedule torch runs
        dt = min([at.left[r] / speed for r in running] + waits)
        now += dt
        for r in running:
            at.busy[r] += dt
            at.left[r] -= dt * speed
            if at.left[r] <= 1e-15:
                at.done(r, now)
    return now, at.busy, at.free_at


def pipeline_seconds(
    forward_s: list[float],
    backward_s: list[float],
    microbatches: int,
    link: Link,
    boundary_bytes: list[float],
    schedule: str = "1f1b",
    ranks_per_stage: int = 1,
    cores: int | None = None,
    virtual: int = 1,
    action_s: float = 0.0,
) -> PipelineStep:
    """One step of the schedule: `forward_s`/`backward_s` each stage's time for one
    micro-batch on a core of its own (pp x `virtual` stages, placed on the ranks as the
    schedule places them); `boundary_bytes` what each boundary hands on, one micro-batch;
    `ranks_per_stage` the data-parallel replicas of each pipeline rank; `cores` None: as
    many as ranks. The step splits into the busiest rank's compute, what the transfers add
    (the same schedule played without them ends that much sooner), and the bubble. A
    transfer takes the link's latency and its bytes' time, once its receiver is ready for it;
    between two stages of one rank it is free. Each task costs `action_s` more on its rank
    (the schedule runtime's own cost per action, measured: `plan/overhead.py`)."""
    ranks = len(forward_s) // virtual
    orders = rank_orders(schedule, ranks, virtual, microbatches)
    placed = stage_ranks(schedule, ranks, virtual)
    played = functools.partial(
        _played, forward_s, backward_s, orders, ranks_per_stage=ranks_per_stage, cores=cores, action_s=action_s
    )
    costs = [
        (0.0, 0.0) if placed[b] == placed[b + 1] else (link.alpha_s, link.beta_s_per_byte * x)
        for b, x in enumerate(boundary_bytes)
    ]
    step, busy, ends = played(costs)
    without, _, _ = played([(0.0, 0.0)] * len(boundary_bytes))
    compute = max(busy)
    comm = min(step - compute, max(0.0, step - without))
    return PipelineStep(step, compute, comm, step - compute - comm, tuple(ends), tuple(busy))


def ideal_bubble(schedule: str, ranks: int, virtual: int, microbatches: int) -> float:
    """The schedule's own bubble fraction in theory: its order played out with every stage
    alike (a backward twice a forward, split evenly between the input's and the weights'
    gradients where the schedule splits it) and nothing on the wire; the idle share of the
    ranks' time. GPipe and 1F1B give (P - 1) / (M + P - 1), interleaved 1F1B with V stages a
    rank (P - 1) / (V M + P - 1) where M is a multiple of P."""
    stages = ranks * virtual
    step = pipeline_seconds(
        [1.0 / virtual] * stages, [2.0 / virtual] * stages, microbatches, Link(0.0, 0.0), [0.0] * (stages - 1),
        schedule, virtual=virtual,
    )  # fmt: skip
    return 1.0 - sum(step.busy_s) / (ranks * step.step_s)
