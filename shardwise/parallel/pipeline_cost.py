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

FORWARD, BACKWARD = 0, 1


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


@dataclass(frozen=True)
class PipelineStep:
    step_s: float  # stage 0's last backward ends
    compute_s: float  # the busiest stage's time computing (under sharing, at the speed it got)
    comm_s: float  # what the transfers between stages add to the step
    bubble_s: float  # the rest: waiting on the other stages
    ends_s: tuple[float, ...] = ()  # when each stage's last backward ends


def _source(task: tuple[int, int, int], stages: int) -> int | None:
    """The stage whose output `task` (kind, stage, micro-batch) takes in (None: the data, or its own)."""
    kind, s, _ = task
    if kind == FORWARD and s > 0:
        return s - 1
    if kind == BACKWARD and s < stages - 1:
        return s + 1
    return None


@dataclass
class _Stages:
    """Where every stage is while a schedule is played out."""

    orders: list[list[tuple[int, int, int]]]
    links: list[tuple[float, float]]  # each boundary's latency and bytes' time
    made: dict = field(default_factory=dict)  # a task's input: when its sender made it
    arrived: dict = field(default_factory=dict)  # and when it arrived

    def __post_init__(self):
        n = len(self.orders)
        self.nxt = [0] * n  # each stage's next task
        self.left: list[float | None] = [None] * n  # its running task's work left; None: not started
        self.free_at = [0.0] * n  # when its previous task ended, and it posted the next one's receive
        self.busy = [0.0] * n

    def post_receives(self) -> None:
        """Each idle stage has posted its next task's receive: a transfer made for it goes,
        taking its latency and its bytes' time."""
        stages = len(self.orders)
        for s, order in enumerate(self.orders):
            if self.left[s] is not None or self.nxt[s] == len(order):
                continue
            task = order[self.nxt[s]]
            src = _source(task, stages)
            if src is not None and task in self.made and task not in self.arrived:
                latency, occupied = self.links[min(s, src)]
                self.arrived[task] = max(self.made[task], self.free_at[s]) + occupied + latency

    def start_at(self, s: int) -> float | None:
        """When stage `s` can start its next task: once its input arrived (None: not yet on its way)."""
        task = self.orders[s][self.nxt[s]]
        if _source(task, len(self.orders)) is None:
            return self.free_at[s]
        return max(self.arrived[task], self.free_at[s]) if task in self.arrived else None


def _played(
    forward_s: list[float],
    backward_s: list[float],
    microbatches: int,
    links: list[tuple[float, float]],
    schedule: str,
    ranks_per_stage: int,
    cores: int | None,
) -> tuple[float, float, list[float]]:
    """(the step's end, the busiest stage's time computing, each stage's end): every stage's
    tasks played out in time, the stages computing at once sharing the cores. A transfer
    starts once its sender has made it and its receiver has posted the receive (gloo sends
    only into a posted receive, and torch posts it just before the task that needs it: the
    receiver does not take it in while it computes). (1F1B waits on a send together with
    the next receive; both go to the same neighbour, whose posting the receive waits for.)"""
    stages = len(forward_s)
    at = _Stages(
        [[(k, s, m) for k, m in schedule_order(schedule, stages, s, microbatches)] for s in range(stages)], links
    )
    work, now = [forward_s, backward_s], 0.0
    while any(n < len(o) for n, o in zip(at.nxt, at.orders, strict=True)):
        at.post_receives()
        starts = {}
        for s in range(stages):
            if at.left[s] is None and at.nxt[s] < len(at.orders[s]) and (when := at.start_at(s)) is not None:
                starts[s] = when
                if when <= now:
                    at.left[s] = work[at.orders[s][at.nxt[s]][0]][s]
        running = [s for s in range(stages) if at.left[s] is not None]
        speed = min(1.0, (cores or stages * ranks_per_stage) / (len(running) * ranks_per_stage)) if running else 1.0
        waits = [when - now for when in starts.values() if when > now]
        if not running and not waits:
            raise ValueError(f"the {schedule} schedule of {stages} stages stalls")  # not a schedule torch runs
        dt = min([at.left[s] / speed for s in running] + waits)
        now += dt
        for s in running:
            at.busy[s] += dt
            at.left[s] -= dt * speed
            if at.left[s] <= 1e-15:
                kind, _, m = at.orders[s][at.nxt[s]]
                to = s + 1 if kind == FORWARD else s - 1
                if 0 <= to < stages:
                    at.made[(kind, to, m)] = now
                at.free_at[s] = now
                at.left[s], at.nxt[s] = None, at.nxt[s] + 1
    return now, max(at.busy), at.free_at


def pipeline_seconds(
    forward_s: list[float],
    backward_s: list[float],
    microbatches: int,
    link: Link,
    boundary_bytes: list[float],
    schedule: str = "1f1b",
    ranks_per_stage: int = 1,
    cores: int | None = None,
) -> PipelineStep:
    """One step of the schedule: `forward_s`/`backward_s` each stage's time for one
    micro-batch on a core of its own; `boundary_bytes` what each boundary hands on, one
    micro-batch; `cores` None: as many as ranks. The step splits into the busiest stage's
    compute, what the transfers add (the same schedule played without them ends that much
    sooner), and the bubble. A transfer takes the link's latency and its bytes' time, once
    its receiver is ready for it."""
    played = functools.partial(
        _played, forward_s, backward_s, microbatches, schedule=schedule, ranks_per_stage=ranks_per_stage, cores=cores
    )
    step, compute, ends = played([(link.alpha_s, link.beta_s_per_byte * b) for b in boundary_bytes])
    without, _, _ = played([(0.0, 0.0)] * len(boundary_bytes))
    comm = min(step - compute, max(0.0, step - without))
    return PipelineStep(step, compute, comm, step - compute - comm, tuple(ends))
