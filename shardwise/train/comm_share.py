"""Where a training step's time goes on a rank, read from a torch.profiler trace of that
step.

A collective or point-to-point transfer shows as an event of the backend (`gloo:`,
`nccl:`) or of c10d; the rank's compute as `aten::` operators, of which the copies
(`aten::copy_`, `cat`, `clone`, ...) are told apart. Communication that runs while an
operator computes (DDP's gradient buckets overlapping the backward) costs the step
nothing, so it counts only the time inside communication events where no operator
computes: the exposed communication. What no operator and no communication event
covers is the rest: Python, the framework's own bookkeeping, and waits outside the
communication library. Each as a fraction of the step's wall time (`time_shares`).
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from shardwise.files import write_atomic

COMM = re.compile(r"^(gloo:|nccl:|c10d::|_c10d_functional::|record_param_comms|ProcessGroup)")
COPIES = {
    "aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::stack",
    "aten::constant_pad_nd", "aten::index_select", "aten::narrow_copy", "aten::flatten_dense_tensors",
}  # fmt: skip


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


def time_shares(events, wall_us: float) -> dict[str, float]:
    """The step's wall time split into compute (operators, less their copies), copies,
    exposed communication and the rest; `events`: the profiler's function events."""
    comm, ops, copies = [], [], []
    for e in events:
        span = (e.time_range.start, e.time_range.end)
        if COMM.match(e.name):
            comm.append(span)
        elif e.name.startswith("aten::"):
            (copies if e.name in COPIES else ops).append(span)
        # (other events: record_function ranges of Python code, which the rest covers)
    copies, ops = _union(copies), _union(ops)
    computing = _union(ops + copies)
    if wall_us <= 0:
        return {"compute": 0.0, "copies": 0.0, "communication": 0.0, "other": 0.0}
    shares = {
        "compute": _length(_minus(ops, copies)) / wall_us,
        "copies": _length(copies) / wall_us,
        "communication": _length(_minus(_union(comm), computing)) / wall_us,
    }
    shares = {k: min(1.0, v) for k, v in shares.items()}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


class StepProfile:
    """Profile one step (`with StepProfile() as p: ...`; then `p.shares`, `p.share`,
    computed once asked for, outside the step's time; `p.export(path)` writes its trace)."""

    def __init__(self):
        self._profile = profile(activities=[ProfilerActivity.CPU])
        self._shares: dict[str, float] | None = None
        self._ok = False

    def __enter__(self) -> StepProfile:
        self._profile.__enter__()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._wall_us = 1e6 * (time.perf_counter() - self._started)
        self._profile.__exit__(*exc)
        self._ok = exc[0] is None

    @property
    def shares(self) -> dict[str, float]:
        if self._shares is None:
            self._shares = time_shares(self._profile.events(), self._wall_us) if self._ok else {}
        return self._shares

    @property
    def share(self) -> float:
        return self.shares.get("communication", float("nan"))

    def export(self, path: str) -> None:
        """The step's Chrome trace (chrome://tracing, Perfetto)."""
        self._profile.export_chrome_trace(path)


def write_profile(path: Path, rank: int, steps: list[dict]) -> None:
    """A rank's profiled steps and the median of each share over them (run.profile)."""
    kinds = ("compute", "copies", "communication", "other")
    median = {k: statistics.median(s[k] for s in steps) for k in kinds} if steps else {}
    write_atomic(path, json.dumps({"rank": rank, "median": median, "steps": steps}, indent=1) + "\n")
