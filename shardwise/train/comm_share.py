"""How much of a training step a rank spends waiting on communication, read from a
torch.profiler trace of that step.

A collective or point-to-point transfer shows as an event of the backend (`gloo:`,
`nccl:`) or of c10d; the rank's compute as `aten::` operators. Communication that runs
while an operator computes (DDP's gradient buckets overlapping the backward) costs the
step nothing, so the share counts only the time inside communication events where no
operator computes: the exposed communication, as a fraction of the step's wall time.
"""

from __future__ import annotations

import re
import time

from torch.profiler import ProfilerActivity, profile

COMM = re.compile(r"^(gloo:|nccl:|c10d::|_c10d_functional::|record_param_comms|ProcessGroup)")


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _minus(keep: list[tuple[float, float]], cut: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The parts of the (merged) intervals `keep` outside the (merged) intervals `cut`."""
    out, j = [], 0
    for start, end in keep:
        while j < len(cut) and cut[j][1] <= start:
            j += 1
        k, at = j, start
        while k < len(cut) and cut[k][0] < end:
            if cut[k][0] > at:
                out.append((at, cut[k][0]))
            at = max(at, cut[k][1])
            k += 1
        if at < end:
            out.append((at, end))
    return out


def exposed_share(events, wall_us: float) -> float:
    """Exposed communication (microseconds inside communication events and outside every
    compute operator) over the step's wall time; `events`: the profiler's function events."""
    comm, compute = [], []
    for e in events:
        span = (e.time_range.start, e.time_range.end)
        if COMM.match(e.name):
            comm.append(span)
        elif e.name.startswith("aten::"):
            compute.append(span)
    exposed = _minus(_union(comm), _union(compute))
    return min(1.0, _length(exposed) / wall_us) if wall_us > 0 else 0.0


class StepProfile:
    """Profile one step (`with StepProfile() as p: ...`; then `p.share`)."""

    def __init__(self):
        self.share = float("nan")
        self._profile = profile(activities=[ProfilerActivity.CPU])

    def __enter__(self) -> StepProfile:
        self._profile.__enter__()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall_us = 1e6 * (time.perf_counter() - self._started)
        self._profile.__exit__(*exc)
        if exc[0] is None:
            self.share = exposed_share(self._profile.events(), wall_us)
