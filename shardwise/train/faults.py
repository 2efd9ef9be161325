"""Fault injection for tests and benchmarks of failure handling.

`SHARDWISE_FAULT=RANK:STEP:KIND` makes rank RANK fail at the start of step
STEP. KIND is `raise` (a RuntimeError) or `exit` (the process dies with
status 3, no Python error). Unset, it costs one integer compare per step.
"""

from __future__ import annotations

import os


class FaultPlan:
    def __init__(self, rank: int, spec: str | None = None):
        spec = os.environ.get("SHARDWISE_FAULT", "") if spec is None else spec
        self.step = -1
        if spec:
            fault_rank, step, self.kind = spec.split(":")
            if int(fault_rank) == rank:
                self.step = int(step)

    def maybe_fail(self, step: int) -> None:
        if step != self.step:
            return
        if self.kind == "exit":
            os._exit(3)
        raise RuntimeError(f"injected fault at step {step}")
