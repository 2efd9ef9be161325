"""A pipeline step's time (the planner's cost model): torch's schedules played out in time.

Each stage runs its micro-batches' forwards and backwards in the order its schedule
gives (`schedule_order`, as `torch.distributed.pipelining` runs GPipe and 1F1B). A
forward waits for the previous stage's forward of the same micro-batch and the transfer
of its activation; a backward for the next stage's backward and the transfer of its
gradient. A stage waiting on a receive takes no CPU, so when there are more ranks than
cores the stages share them as processor sharing: while n stages (each run by
`ranks_per_stage` ranks in lockstep: the data-parallel replicas) compute at once, each
goes at min(1, cores / (n x ranks_per_stage)) of its own speed. The fill and the drain,
where fewer stages compute, run faster than the steady state: a single stretch of
ranks / cores for every slot would count the bubble at the steady state's speed.
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


def _ready(done: dict, task: tuple[int, int, int], stages: int, transfer: list[float]) -> float | None:
    """When `task` (kind, stage, micro-batch) has its input: None while its producer has not run."""
    kind, s, m = task
    if kind == FORWARD and s > 0:
        t = done.get((FORWARD, s - 1, m))
        return None if t is None else t + transfer[s - 1]
    if kind == BACKWARD and s < stages - 1:
        t = done.get((BACKWARD, s + 1, m))
        return None if t is None else t + transfer[s]
    return 0.0


def _played(
    forward_s: list[float],
    backward_s: list[float],
    microbatches: int,
    transfer: list[float],
    schedule: str,
    ranks_per_stage: int,
    cores: int | None,
) -> tuple[float, float]:
    """(the step's end, the busiest stage's time computing): every stage's tasks played out
    in time, the stages computing at once sharing the cores."""
    stages = len(forward_s)
    orders = [[(k, s, m) for k, m in schedule_order(schedule, stages, s, microbatches)] for s in range(stages)]
    work = [forward_s, backward_s]
    done: dict[tuple[int, int, int], float] = {}
    nxt = [0] * stages  # each stage's next task
    left: list[float | None] = [None] * stages  # the work its running task has left; None: not started
    free_at = [0.0] * stages  # when its previous task ended
    busy = [0.0] * stages
    now = 0.0
    while any(n < len(o) for n, o in zip(nxt, orders, strict=True)):
        starts = {}
        for s in range(stages):
            if left[s] is None and nxt[s] < len(orders[s]):
                ready = _ready(done, orders[s][nxt[s]], stages, transfer)
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
                done[orders[s][nxt[s]]] = free_at[s] = now
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
    sooner: a transfer made while its receiver computes costs nothing), and the bubble."""
    played = functools.partial(
        _played, forward_s, backward_s, microbatches, schedule=schedule, ranks_per_stage=ranks_per_stage, cores=cores
    )
    step, compute = played([link.send(b) for b in boundary_bytes])
    without, _ = played([0.0] * len(boundary_bytes))
    comm = min(step - compute, max(0.0, step - without))
    return PipelineStep(step, compute, comm, step - compute - comm)
