"""A pipeline step's time (the planner's cost model): torch's schedules played out in time.

Each stage runs its micro-batches' forwards and backwards in the order its schedule
gives (`schedule_order`, as `torch.distributed.pipelining` runs GPipe and 1F1B). A
forward waits for the previous stage's forward of the same micro-batch and the transfer
of its activation; a backward for the next stage's backward and the transfer of its
gradient. A stage's link sends one message at a time, in the order they were made: at
1 Gbit/s a stage's activations queue behind one another. A stage waiting on a receive
takes no CPU, so when there are more ranks than cores the stages share them as processor
sharing: while n stages (each run by `ranks_per_stage` ranks in lockstep: the
data-parallel replicas) compute at once, each goes at min(1, cores / (n x
ranks_per_stage)) of its own speed. The fill and the drain, where fewer stages compute,
run faster than the steady state: a single stretch of ranks / cores for every slot would
count the bubble at the steady state's speed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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
    step_s: float  # the last stage's last backward ends
    compute_s: float  # the busiest stage's time computing (under sharing, at the speed it got)
    comm_s: float  # what the transfers between stages add to the step
    bubble_s: float  # the rest: waiting on the other stages


def _ready(arrived: dict, task: tuple[int, int, int], stages: int) -> float | None:
    """When `task` (kind, stage, micro-batch) has its input: None while it is not on its way."""
    kind, s, _ = task
    if (kind == FORWARD and s > 0) or (kind == BACKWARD and s < stages - 1):
        return arrived.get(task)
    return 0.0


def _send(arrived: dict, nic_free: list[float], task: tuple[int, int, int], now: float, links) -> None:
    """What `task`, ending `now`, hands on (an activation forward, a gradient back) goes out
    through its stage's link once the link has sent what went before (`links`: each
    boundary's latency and its time on the link)."""
    kind, s, m = task
    stages = len(nic_free)
    to = s + 1 if kind == FORWARD else s - 1
    if not 0 <= to < stages:
        return
    latency, occupied = links[min(s, to)]
    start = max(now, nic_free[s])
    nic_free[s] = start + occupied
    arrived[(kind, to, m)] = start + occupied + latency


def _played(
    forward_s: list[float],
    backward_s: list[float],
    microbatches: int,
    links: list[tuple[float, float]],
    schedule: str,
    ranks_per_stage: int,
    cores: int | None,
) -> tuple[float, float]:
    """(the step's end, the busiest stage's time computing): every stage's tasks played out
    in time, the stages computing at once sharing the cores, each stage's sends one after
    another on its link."""
    stages = len(forward_s)
    orders = [[(k, s, m) for k, m in schedule_order(schedule, stages, s, microbatches)] for s in range(stages)]
    work = [forward_s, backward_s]
    arrived: dict[tuple[int, int, int], float] = {}  # a task's input, at its stage
    nic_free = [0.0] * stages  # when each stage's link has sent all it was given
    nxt = [0] * stages  # each stage's next task
    left: list[float | None] = [None] * stages  # the work its running task has left; None: not started
    free_at = [0.0] * stages  # when its previous task ended
    busy = [0.0] * stages
    now = 0.0
    while any(n < len(o) for n, o in zip(nxt, orders, strict=True)):
        starts = {}
        for s in range(stages):
            if left[s] is None and nxt[s] < len(orders[s]):
                ready = _ready(arrived, orders[s][nxt[s]], stages)
                if ready is not None:
                    starts[s] = max(ready, free_at[s])
        for s, at in starts.items():
            if at <= now:
                left[s] = work[orders[s][nxt[s]][0]][s]
        running = [s for s in range(stages) if left[s] is not None]
        speed = min(1.0, (cores or stages * ranks_per_stage) / (len(running) * ranks_per_stage)) if running else 1.0
        waits = [at - now for at in starts.values() if at > now]
        if not running and not waits:
            raise ValueError(f"the {schedule} schedule of {stages} stages stalls")  # not a schedule torch runs
        dt = min([left[s] / speed for s in running] + waits)
        now += dt
        for s in running:
            busy[s] += dt
            left[s] -= dt * speed
            if left[s] <= 1e-15:
                _send(arrived, nic_free, orders[s][nxt[s]], now, links)
                free_at[s] = now
                left[s], nxt[s] = None, nxt[s] + 1
    return now, max(busy)


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
    sooner: a transfer made while its receiver computes costs nothing), and the bubble.
    A transfer takes the link's latency and its bytes' time on the sending stage's link,
    which sends one message at a time."""
    played = functools.partial(
        _played, forward_s, backward_s, microbatches, schedule=schedule, ranks_per_stage=ranks_per_stage, cores=cores
    )
    step, compute = played([(link.alpha_s, link.beta_s_per_byte * b) for b in boundary_bytes])
    without, _ = played([(0.0, 0.0)] * len(boundary_bytes))
    comm = min(step - compute, max(0.0, step - without))
    return PipelineStep(step, compute, comm, step - compute - comm)
