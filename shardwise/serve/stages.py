"""Pipelined serving: `shardwise serve RUN --nproc N --parallel.pp N` (a pipeline and nothing
else), with up to N batches in flight, one a stage.

The first stage (rank 0) takes each batch from the front, runs its layers and sends the
activations on; a middle stage receives, runs its layers and sends on; the last stage runs
its layers and sends the class probabilities straight back to the front over a link of its
own (serve/link.py: the front's "in" and "out" ends). So while the last stage works on one
batch, the first already works on the next: the front keeps as many batches in flight as
there are stages, and the answers come back in the order the batches went in. Each hop is
point to point (torch.distributed send and receive), preceded by a command (a batch, still
there, stop) so that an idle pipeline never times out and a stop reaches every stage in turn.
"""

from __future__ import annotations

from multiprocessing import AuthenticationError

import numpy as np
import torch
import torch.distributed as dist

from shardwise.comm.collectives import recv_tensor, send_tensor
from shardwise.serve.link import connect_to_front

RUN, STOP, IDLE = 1, 0, 2  # the commands a serving rank sends the next (ranks.py broadcasts the same)


class Stage:
    """One rank's stage of the model: its layers, and its neighbours' global ranks."""

    def __init__(self, runner, *, idle_s: float):
        from shardwise.parallel.data import unwrap

        self.module = unwrap(runner.module).eval()
        self.group, self.device, self.dtype, self.idle_s = runner.group, runner.device, runner.dtype, idle_s
        self.first, self.last, self.stages = runner.first, runner.last, runner.num_stages
        self.out = None  # the last stage's link to the front
        self.prev = None if runner.first else dist.get_global_rank(runner.group, runner.stage_index - 1)
        self.next = None if runner.last else dist.get_global_rank(runner.group, runner.stage_index + 1)

    def _tell(self, command: int) -> None:
        dist.send(torch.tensor([command], dtype=torch.int64), self.next, group=self.group)

    @torch.no_grad()
    def _pass(self, h: torch.Tensor) -> None:
        """This stage's layers on `h`, the result sent on (to the front from the last stage)."""
        h = self.module(h)
        if self.last:
            if self.out is not None:  # (none: the front stopped before this stage linked)
                self.out.send(torch.softmax(h.double(), dim=1).cpu().numpy())
            return
        self._tell(RUN)
        send_tensor(h, self.next, self.group)

    def lead(self, hello: dict) -> None:
        """The first stage: the front's batches, until it closes the link; then stop every stage."""
        try:
            front = connect_to_front({**hello, "role": "in", "in_flight": self.stages})
        except (OSError, EOFError, AuthenticationError):  # the front has stopped already
            self._tell(STOP)
            return
        with front:
            while True:
                if not front.poll(self.idle_s):
                    self._tell(IDLE)
                    continue
                try:
                    x = front.recv()
                except EOFError:  # the front stops
                    break
                self._pass(torch.from_numpy(np.ascontiguousarray(x)).to(self.device, self.dtype))
        self._tell(STOP)

    def follow(self) -> None:
        """A later stage: what the previous stage sends, until it says stop."""
        try:
            self.out = connect_to_front({"role": "out"}) if self.last else None
        except (OSError, EOFError, AuthenticationError):  # the front has stopped: pass the stop on when it comes
            self.out = None
        try:
            while True:
                command = torch.zeros(1, dtype=torch.int64)
                dist.recv(command, self.prev, group=self.group)
                if int(command) == STOP:
                    break
                if int(command) == IDLE:
                    if not self.last:
                        self._tell(IDLE)
                    continue
                self._pass(recv_tensor(self.prev, self.group, self.device, self.dtype))
            if not self.last:
                self._tell(STOP)
        finally:
            if self.out is not None:
                self.out.close()


def pipelined(dims) -> bool:
    """A layout served a batch a stage: a pipeline, nothing else cut."""
    return dims.pp > 1 and dims.pp == dims.world_size
