"""Fault injection for tests and benchmarks of failure handling.

`SHARDWISE_FAULT=RANK:STEP:KIND[,RANK:STEP:KIND...]` makes rank RANK fail at
step STEP (0-based, counted over the whole run). KIND is:

- `raise`  a RuntimeError at the start of the step
- `exit`   the process exits with status 3 at the start of the step, no Python error
- `kill`   the process sends itself SIGKILL at the start of the step
- `hang`   the process stops itself (SIGSTOP) at the start of the step: it stops answering
- `slow`   the process sleeps SLOW_S seconds at the start of the step: a straggler, running
           but late, past a short `train.collective_timeout_s`
- `skip`   the rank skips the step's agreement on finite gradients, a collective of every
           layout but plain data parallelism and ZeRO-1 (which have none to skip)
- `shape`  the rank's part of that agreement has another shape than the others' (three
           elements where they send one)
- `dtype`  the rank's part of that agreement has another dtype (float64 where they send
           float32): gloo aborts the rank that receives it
- `order`  the rank measures the step's gradient norm before that agreement, the others
           after it (give it a logged step, on a layout whose norm is a collective)
- `deadlock` the pipeline stage receives from its neighbouring stage before the step's
           schedule, a message that is never sent, while that stage waits on it in turn
- `nan`    the rank's input batch becomes NaN in that step, as a corrupt sample would make
           it: its loss and every gradient it reaches turn NaN (on a pipeline, give it to
           a first-stage rank: the other stages read no input)
- `inf-loss` the rank's loss becomes inf while its gradients stay finite (an overflow in
           the loss's last operation): only this rank sees anything wrong, unless the
           engine carries the news to the others
- `exit@POINT` the process exits with status 3 at POINT of the checkpoint written after
  the step: `checkpoint-shards` (its shard file written), `checkpoint-manifest` (rank 0,
  before the manifest), `checkpoint-rename` (rank 0, manifest written, before the rename),
  and where a step is written again, `checkpoint-replace` (the new step in place, the old
  not yet removed) or, where folders cannot be exchanged atomically, `checkpoint-aside`
  (the old step moved aside, the new one not yet in)

Faults fire in the first attempt only (SHARDWISE_ATTEMPT=0, which the launcher
raises on each restart), so a restarted run goes through; `RANK:STEP:KIND:A`
fires in attempt A only, and `RANK:STEP:KIND:*` in every attempt. Unset, a check costs a dictionary lookup per step.
"""

from __future__ import annotations

import os
import signal
import time

SLOW_S = 10.0  # a `slow` rank's sleep


class FaultPlan:
    """The faults `spec` gives this `rank` in attempt `attempt` (the launcher passes both;
    the worker reads them from its environment, nothing here does)."""

    def __init__(self, rank: int, spec: str = "", *, attempt: int = 0):
        self.faults: dict[int, str] = {}
        self.step = -1
        for item in filter(None, spec.split(",")):
            fault_rank, step, kind, *when = item.split(":")
            fires = attempt == 0 if not when else when[0] == "*" or int(when[0]) == attempt
            if int(fault_rank) == rank and fires:
                self.faults[int(step)] = kind

    def maybe_fail(self, step: int) -> None:
        """At the start of a step: the faults that end or stop the process."""
        self.step = step
        kind = self.faults.get(step)
        if kind == "exit":
            os._exit(3)
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            os.kill(os.getpid(), signal.SIGSTOP)
        if kind == "slow":
            time.sleep(SLOW_S)
        if kind == "raise":
            raise RuntimeError(f"injected fault at step {step}")

    def at(self, step: int) -> str:
        """This rank's fault in `step` ("" where none): the kinds the step itself carries out
        (nan, skip, shape, dtype, order, deadlock; see above) compare it with their name."""
        return self.faults.get(step, "")

    def inflates_loss(self) -> bool:
        """This rank's loss of the current step becomes inf, its gradients untouched."""
        return self.faults.get(self.step) == "inf-loss"

    def maybe_fail_at(self, point: str) -> None:
        """Inside the checkpoint written after the current step."""
        if self.faults.get(self.step) == f"exit@{point}":
            os._exit(3)
