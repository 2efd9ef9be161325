"""`comm.compression = auto`, settled by the run itself: the cost model names a shortlist
(`comm.candidates`: the methods it predicts within TRIAL_BAND of its choice, and the
fastest lossless one; plan/compression.py `shortlist`), and the data-parallel ranks time
each for STEPS_EACH steps right after the warm-up, then keep the fastest for the rest of
the run.

A candidate's time is the period between the ends of two of its steps' averaging: a whole
step (forward, backward, the average, the optimizer, the data), so that a method whose
collectives DDP overlaps with the backward pass (none, bf16, fp16) is timed as fairly as one
that averages in place. The first step of each candidate is not counted: its period holds
the previous method's tail, and its buffers are made then. Each rank takes the median of
its own periods; the ranks agree on the slowest rank's median per candidate (one
all-reduce, at the trial's last step) and keep the least of those that save their margin
(comm/methods.py `fair`: the launcher's margins on its predictions, here on what was
measured; a lossy method must save a third of the fastest lossless method's step, since
it may also need more steps to the same accuracy). What the cost model predicted is the
answer only where the run measured nothing (a resume on another layout).
"""

from __future__ import annotations

import statistics
import time
import zlib

import torch
import torch.distributed as dist
from torch import Tensor

from shardwise.comm.methods import fair

STEPS_EACH = 5  # steps a candidate runs in the trial; the first is not counted
TRIAL_BAND = 0.25  # the shortlist: methods predicted within this share of the best's step


class Trial:
    """The trial of `candidates` over `group`, from step `start` (the warm-up's end)."""

    def __init__(self, candidates: tuple[str, ...], start: int, group: dist.ProcessGroup | None):
        self.candidates, self.start, self.group = candidates, start, group
        self.periods: dict[str, list[float]] = {c: [] for c in candidates}
        self.medians: dict[str, float] = {}  # the agreed (slowest rank's) median per candidate, once decided
        self.chosen: str | None = None
        self._last: tuple[int, float] | None = None  # the step whose averaging ended last, and when

    @property
    def end(self) -> int:
        """The first step after the trial."""
        return self.start + STEPS_EACH * len(self.candidates)

    def method(self, step: int) -> str | None:
        """The candidate that averages `step`, or None outside the trial."""
        if self.chosen is not None or not self.start <= step < self.end:
            return None
        return self.candidates[(step - self.start) // STEPS_EACH]

    def step_ended(self, step: int) -> None:
        """`step`'s averaging is done (on this rank): its period counts for its candidate if
        the step before ran the same one; after the trial's last step, the ranks decide."""
        now = time.perf_counter()
        method = self.method(step)
        if method is not None and self._last is not None and self._last[0] == step - 1:
            if self.method(step - 1) == method:
                self.periods[method].append(now - self._last[1])
        self._last = (step, now)
        if method is not None and step == self.end - 1:
            self._decide()

    def _own(self) -> list[float]:
        """This rank's median of each candidate's periods so far (-1: none yet)."""
        return [statistics.median(self.periods[c]) if self.periods[c] else -1.0 for c in self.candidates]

    def _decide(self) -> None:
        agreed = torch.tensor(self._own(), dtype=torch.float64)
        if self.group is not None:
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.group)
        self.medians = {c: float(t) for c, t in zip(self.candidates, agreed, strict=True) if t >= 0}
        # a candidate no rank timed (a resume in its steps) is left out; none timed: the
        # first. Only a method that saves its margin of the step, as measured
        kept = fair(self.medians)
        self.chosen = min(kept, key=kept.get) if kept else self.candidates[0]

    def state(self) -> Tensor:
        """For a checkpoint: per candidate, the agreed median once decided, else this rank's
        own so far (-1 where none), then the chosen candidate's index (-1: not decided), then
        a checksum of the candidates' names (a resume that names others starts afresh)."""
        decided = self.chosen is not None
        medians = [self.medians.get(c, -1.0) for c in self.candidates] if decided else self._own()
        chosen = self.candidates.index(self.chosen) if self.chosen is not None else -1
        return torch.tensor([*medians, chosen, self._names()], dtype=torch.float64)

    def _names(self) -> int:
        return zlib.crc32(",".join(self.candidates).encode())  # below 2^32: exact in a float64

    def load(self, state: Tensor) -> None:
        """A checkpoint's trial, taken back if it timed the same candidates: its decision, or,
        mid-trial, this rank's median of each candidate it had timed (the resumed run times
        those it has steps left for)."""
        if state.numel() != len(self.candidates) + 2 or int(state[-1]) != self._names():
            return
        times = {c: float(t) for c, t in zip(self.candidates, state[:-2], strict=True) if t >= 0}
        if int(state[-2]) >= 0:
            self.medians, self.chosen = times, self.candidates[int(state[-2])]
        else:
            self.periods |= {c: [t] for c, t in times.items()}

    def summary(self, after: list[float] = ()) -> dict:
        """The candidates, each one's agreed step, the one kept, and the median of the steps
        `after` the trial (the kept method's, as the run measured them; None without any)."""
        return {
            "candidates": list(self.candidates),
            "steps_each": STEPS_EACH,
            "step_s": self.medians,
            "chosen": self.chosen,
            "kept_step_s": statistics.median(after) if after else None,
        }
