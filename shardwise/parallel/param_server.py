"""Parameter server: workers push gradients, servers own the weights and the optimizer.

The master/worker scheme of Li et al., "Scaling Distributed Machine Learning
with the Parameter Server" (OSDI 2014), with the bounded staleness of Ho et al.,
"More Effective Distributed ML via a Stale Synchronous Parallel Parameter
Server" (NIPS 2013). Ranks 0..S-1 are servers (topology.py). The parameters,
flattened in the model's order, are cut into S contiguous slices of equal length
(equal bytes: every parameter is fp32); server s keeps slice s and the optimizer
state for it. SGD and AdamW act element by element, so stepping slices is
stepping the model.

Every message is one tensor of the model's dtype sent point to point (gloo on CPU):

    push   worker -> each server   [kind, step, loss, finite, version, gradient slice]
    reply  server -> worker        [stop, lowest clock, version, 0, 0, parameter slice]
    final  server 0 -> worker      [all parameters]

A worker's clock is the number of steps it has pushed. Synchronous: a server
waits for every worker's step t, averages the gradients in worker order, steps
once and answers everyone: the same update as all-reduce. Asynchronous: a
server steps on each gradient (scaled by 1/W: a worker's batch is 1/W of the
global batch) as it arrives, and answers a worker that wants to start step t
once every live worker's clock is at least t - k (k = ps.staleness). With k=0
that is lock-step; with SGD without momentum the W small steps then add up to
the synchronous one. Server 0 decides when to stop: after W x train.steps
gradients in all, however the workers shared them.

A worker says whether its loss and gradient are finite (`finite`); every
server reads every worker's word, so all servers decide alike without talking:
synchronous servers skip a step where any worker's gradient is not finite (as
the all-reduce layouts do), asynchronous ones drop that one gradient. Either
is counted, and train.max_bad_steps in a row (steps; asynchronous: one
worker's gradients) end the run.

Staleness is recorded by the servers from versions, not taken from the gate:
every reply carries the version of the weights it holds (the number of
gradients the server had taken), and the server keeps, per version, how many
steps of each worker those weights hold. A worker echoes the version with the
gradient it computed on them; for a gradient of step t the server records
t minus the fewest steps of any live worker in that version: how far the
weights it was computed on lag behind the worker's own clock. The bound k
promises at most k.

Each server reads every worker on a thread of its own: a message is taken the
moment it arrives, and a worker that dies is noticed at once (gloo reports the
closed connection on that worker's pending receive). The main thread applies
updates and answers in arrival order.

Colocated (parallel.colocate), rank i is worker i and server i at once: the server's
loop runs on a thread beside the worker's steps, and the two talk through memory
(ps_protocol.LocalEnd). Each rank's link then carries W - 1 slices each way per step,
pushes as a reduce-scatter would and replies as an all-gather would, where a separate
server's link carries W whole slices. A rank that dies takes its slice with it, so a
colocated job, asynchronous or not, ends when a rank is lost.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from shardwise.comm.collectives import all_gather_uneven
from shardwise.comm.flat import flatten, named_views
from shardwise.errors import TrainingDiverged
from shardwise.parallel import ps_protocol as proto
from shardwise.parallel.ps_protocol import Arrival, LocalEnd, Lost, ServerStats
from shardwise.parallel.splits import optimizer_keys, sum_of_squares
from shardwise.ranges import even_bounds


@dataclass(frozen=True)
class ServerSettings:
    """How the servers train: plain values from the config (train and ps sections)."""

    build_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer]  # over [this server's slice]
    lr_at: Callable[[int], float]  # the rate of the update made at each global step
    steps: int
    asynchronous: bool
    staleness: int
    clip_norm: float
    max_bad_steps: int = 3
    push: str = "none"  # comm.compression: none, or bf16 / fp16 pushes (ps_protocol.PushCodec)


class ParameterServer:
    """One server: its slice of the parameters, the optimizer for it, the workers' clocks.

    `model` gives the parameters' names, shapes and dtype only (a model on the meta
    device will do); `initial` is this server's slice of their flat values.
    `build_optimizer([param])` makes the optimizer, `lr_at(step)` the rate for global
    step `step` (both in `settings`). `servers_group` (several servers) adds up the
    gradient norm for clipping in synchronous mode. `first_worker`: the rank of worker 0
    in `group`; `local`: colocated, this rank's own worker, reached through memory.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        initial: Tensor,
        index: int,
        servers: int,
        workers: int,
        group: dist.ProcessGroup,
        servers_group: dist.ProcessGroup | None,
        settings: ServerSettings,
        first_worker: int,
        local: LocalEnd | None = None,
    ):
        self.index, self.servers, self.workers, self.group = index, servers, workers, group
        self.first_worker, self.local = first_worker, local
        self.servers_group = servers_group
        total = sum(p.numel() for p in model.parameters())
        self.bounds = even_bounds(total, servers)
        lo, hi = self.bounds[index]
        self.dtype = proto.model_dtype(model)
        self.codec = proto.PushCodec.for_method(self.dtype, settings.push)
        assert initial.numel() == hi - lo, f"server {index} holds {hi - lo} parameters, got {initial.numel()}"
        self.param = nn.Parameter(initial.clone())
        s = settings
        self.optimizer = s.build_optimizer([self.param])
        self.lr_at, self.steps, self.clip_norm = s.lr_at, s.steps, s.clip_norm
        self.asynchronous, self.bound, max_bad_steps = s.asynchronous, s.staleness, s.max_bad_steps
        # non-finite in a row: steps (synchronous), or each worker's own gradients (asynchronous:
        # the order of arrivals differs from server to server, each worker's sequence does not)
        self.max_bad_steps, self.bad_steps, self.bad_by_worker = max_bad_steps, 0, [0] * workers
        self.applied = 0  # gradients that went into the weights: applied // workers is the schedule's step
        self.clocks = [0] * workers  # steps each worker pushed
        self.included = [0] * workers  # steps of each worker taken into the weights
        # version (gradients taken) -> steps of each worker in the weights of that version
        self.versions: dict[int, tuple[int, ...]] = {proto.INITIAL: tuple(self.included)}
        self.sent = [proto.INITIAL] * workers  # the version each worker was last sent
        self.active = set(range(workers))  # neither done nor lost
        self.reading = set(range(workers))  # a reader thread still runs
        self.waiting: dict[int, int] = {}  # worker -> the step it wants to start
        self.pending: dict[int, Tensor] = {}  # synchronous: this step's gradients
        self.stats = ServerStats(steps_by_worker=[0] * workers)
        self.final: Tensor | None = None  # all parameters, when the run is over
        self._arrivals: queue.Queue[Arrival] = queue.Queue()
        if local is not None:
            local.arrivals = self._arrivals
        for w in range(workers):
            if self._mine(w):
                continue
            threading.Thread(target=self._read, args=(w,), daemon=True, name=f"ps-read-{w}").start()

    # -- receiving ---------------------------------------------------------------
    def worker_rank(self, w: int) -> int:
        return dist.get_global_rank(self.group, self.first_worker + w)

    def _mine(self, w: int) -> bool:
        return self.local is not None and w == self.local.index

    def _read(self, w: int) -> None:
        size = proto.HEADER + self.codec.words(self.bounds[self.index][1] - self.bounds[self.index][0])
        try:
            while True:
                buf = torch.empty(size, dtype=self.dtype)
                dist.recv(buf, group=self.group, group_src=self.first_worker + w, tag=proto.TAG_PUSH)
                self._arrivals.put(Arrival(w, buf))
                if buf[0].item() == proto.DONE:
                    return
        except Exception as e:  # the worker is gone: say so to the main thread
            self._arrivals.put(Arrival(w, None, proto.short_error(e)))

    def running(self) -> bool:
        return bool(self.reading)

    def next_arrival(self) -> Arrival:
        return self._arrivals.get()

    # -- the protocol --------------------------------------------------------------
    @property
    def global_step(self) -> int:
        return self.stats.updates // self.workers

    def handle(self, arrival: Arrival) -> int:
        """Apply what arrived, answer whoever may go on; returns the updates applied."""
        w, msg = arrival.worker, arrival.message
        if msg is None:
            self.reading.discard(w)
            self._lose(w, arrival.error)
            return 0
        if msg[0].item() == proto.DONE:
            self.reading.discard(w)
            self.active.discard(w)
            self.waiting.pop(w, None)
            self._release()
            return 0
        step = int(msg[1].item())
        assert step == self.clocks[w], f"worker {w} pushed step {step} at clock {self.clocks[w]}"
        self.clocks[w] += 1
        self.stats.steps_by_worker[w] += 1
        self.waiting[w] = step + 1
        taken = 0
        if self.asynchronous:
            self._take([(w, msg)], step=step + 1)
            taken = 1
        else:
            self.pending[w] = msg
            if len(self.pending) == self.workers:  # everyone's step: average in worker order
                self._take([(v, self.pending.pop(v)) for v in range(self.workers)], step=step + 1)
                taken = self.workers
        self._release()
        return taken

    def _take(self, arrived: list[tuple[int, Tensor]], *, step: int) -> None:
        """Apply the mean of these gradients (scaled by 1/W when asynchronous: one worker's
        share of a step), or skip it when any is not finite; `step` is 1-based."""
        for w, m in arrived:
            seen = self.versions[self._echoed(w, m)]  # what the weights this gradient came from held
            live = self.active | {w}
            self.stats.staleness.append(int(m[1].item()) - min(seen[a] for a in live))
        for w, _ in arrived:
            self.included[w] += 1
        self.stats.updates += len(arrived)
        bad = [w for w, m in arrived if m[3].item() != 1.0]
        for w, _ in arrived:
            self.bad_by_worker[w] = self.bad_by_worker[w] + 1 if w in bad else 0
        self.bad_steps = self.bad_steps + 1 if bad else 0
        if bad:
            self.stats.skipped.append(step)
            in_row = max(self.bad_by_worker[w] for w in bad) if self.asynchronous else self.bad_steps
            if in_row >= self.max_bad_steps:
                what = f"gradients of worker rank {self.worker_rank(bad[0])}" if self.asynchronous else "steps"
                raise TrainingDiverged(
                    f"train.max_bad_steps: {in_row} {what} in a row with a non-finite loss or gradient "
                    f"(the last at step {step}); lower train.lr or set train.clip_norm"
                )
            return
        self.stats.losses.extend(m[2].item() for _, m in arrived)
        n = self.param.numel()
        total = self.codec.decode(arrived[0][1][proto.HEADER :], n)
        for _, m in arrived[1:]:
            self.codec.add_to(total, m[proto.HEADER :])
        grad = total.div_(self.workers)
        if not self.asynchronous and self.clip_norm > 0:
            grad = self._clipped(grad)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.applied // self.workers)
        self.param.grad = grad
        self.optimizer.step()
        self.param.grad = None
        self.applied += len(arrived)

    def _echoed(self, w: int, message: Tensor) -> int:
        """The version worker w says its gradient was computed on: the one it was last sent
        (a float32 message holds versions exactly up to 2^24 gradients; past that, the one sent)."""
        echoed, sent = message[4].item(), self.sent[w]
        if abs(sent) >= (2**24 if self.dtype == torch.float32 else 2**53):
            return sent
        assert echoed == sent, f"worker {w} computed on version {echoed}, it was sent {sent}"
        return int(echoed)

    @property
    def schedule_step(self) -> int:
        """Steps of the learning-rate schedule taken: skipped steps do not count, as elsewhere."""
        return self.applied // self.workers

    def _clipped(self, grad: Tensor) -> Tensor:
        """torch.nn.utils.clip_grad_norm_'s rule on the whole model's gradient, whose
        squared norm is the sum over the servers' slices."""
        sq = sum_of_squares(grad)
        if self.servers_group is not None:
            dist.all_reduce(sq, group=self.servers_group)
        scale = min(1.0, self.clip_norm / (sq.sqrt().item() + 1e-6))
        return grad * scale if scale < 1.0 else grad

    def _lowest_clock(self) -> int:
        return min((self.clocks[a] for a in self.active), default=max(self.clocks))

    def _release(self) -> None:
        """Answer every waiting worker whose next step the bound allows."""
        lowest = self._lowest_clock()
        stop = self.index == 0 and self.stats.updates >= self.workers * self.steps
        reply = None  # the same for every worker answered now: made once
        for w, want in sorted(self.waiting.items()):
            if not stop and self.asynchronous and lowest < want - self.bound:
                continue
            if not self.asynchronous and w in self.pending:
                continue
            del self.waiting[w]
            version = self.stats.updates
            self.versions[version] = tuple(self.included)
            self.sent[w] = version
            if reply is None:
                header = torch.tensor([float(stop), float(lowest), float(version), 0.0, 0.0], dtype=self.dtype)
                reply = torch.cat([header, self.param.detach()])
            try:
                if self._mine(w):
                    self.local.replies.put(reply)
                else:
                    dist.send(reply, group=self.group, group_dst=self.first_worker + w, tag=proto.TAG_REPLY)
            except Exception as e:  # the worker died while we answered
                self._lose(w, proto.short_error(e))
                return
            if stop:
                self.active.discard(w)
        oldest = min(self.sent)  # no worker can echo an older version any more
        for version in [v for v in self.versions if v < oldest]:
            del self.versions[version]

    def _lose(self, w: int, error: str) -> None:
        if w not in self.active:
            return
        rank = self.worker_rank(w)
        if not self.asynchronous:
            raise RuntimeError(f"parameter server: worker rank {rank} was lost at step {self.clocks[w]}: {error}")
        self.active.discard(w)
        self.waiting.pop(w, None)
        self.stats.lost.append(Lost(rank, self.clocks[w], error))
        if not self.active and self.index == 0 and self.stats.updates < self.workers * self.steps:
            raise RuntimeError(
                f"parameter server: every worker was lost after {self.stats.updates} of "
                f"{self.workers * self.steps} gradients"
            )
        self._release()

    # -- checkpoints -------------------------------------------------------------
    def logical_state(self, model: nn.Module) -> dict[str, Tensor]:
        """`model/NAME` and `optim/KEY/NAME`, whole, on every server (a collective of the servers)."""
        named = list(model.named_parameters())
        out = named_views(self.gather(), named, prefix="model/")
        for key, value in sorted(self.optimizer.state.get(self.param, {}).items()):
            if value.dim() == 0:
                out |= {f"optim/{key}/{name}": value.clone() for name, _ in named}
            else:
                out |= named_views(self.gather(value), named, prefix=f"optim/{key}/")
        return out

    def load_state(self, model: nn.Module, tensors: dict[str, Tensor], *, step: int, schedule_step: int) -> None:
        """Take this server's slice of a checkpoint's optimizer state and go on from global step `step`
        with the schedule at `schedule_step` (the weights came in with the model)."""
        named = list(model.named_parameters())
        lo, hi = self.bounds[self.index]
        keys = optimizer_keys(tensors)
        state = {}
        for key in keys:
            # one process keeps no state for a parameter that never had a gradient: zeros
            # are what its first step would start from (a count of 0, empty moments)
            pieces = [tensors.get(f"optim/{key}/{name}") for name, _ in named]
            if any(t is not None and t.dim() == 0 for t in pieces):
                state[key] = next(t for t in pieces if t is not None).clone()
                continue
            # (on the CPU: a server after the first knows the parameters' shapes from a meta model)
            pieces = [
                t if t is not None else torch.zeros(p.shape, dtype=self.dtype)
                for t, (_, p) in zip(pieces, named, strict=True)
            ]
            flat = flatten(pieces)
            state[key] = flat[lo:hi].to(self.dtype).clone()
        if state:
            self.optimizer.state[self.param] = state
        self.clocks = [step] * self.workers
        self.included = [step] * self.workers
        self.versions = {proto.INITIAL: tuple(self.included)}
        self.stats.updates = step * self.workers
        self.applied = schedule_step * self.workers

    # -- the end -----------------------------------------------------------------
    def gather(self, piece: Tensor | None = None) -> Tensor:
        """All parameters (or the servers' slices of another flat tensor), flat: a collective of the servers."""
        piece = self.param.detach() if piece is None else piece.detach()
        if self.servers_group is None:
            return piece.clone()
        sizes = [hi - lo for lo, hi in self.bounds]
        return torch.cat(all_gather_uneven(piece.contiguous(), sizes, dim=0, group=self.servers_group))

    def send_final(self, flat: Tensor) -> None:
        """Server 0: the final parameters to every worker still there."""
        lost = {x.rank for x in self.stats.lost}
        for w in range(self.workers):
            if self.worker_rank(w) in lost:
                continue
            try:
                dist.send(flat, group=self.group, group_dst=self.first_worker + w, tag=proto.TAG_FINAL)
            except Exception as e:  # asynchronous: a worker may die after its last step, too
                if not self.asynchronous:
                    raise
                self.stats.lost.append(Lost(self.worker_rank(w), self.clocks[w], proto.short_error(e)))
