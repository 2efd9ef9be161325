"""Parameter server: workers push gradients, servers own the weights and the optimizer.

The master/worker scheme of Li et al., "Scaling Distributed Machine Learning
with the Parameter Server" (OSDI 2014), with the bounded staleness of Ho et al.,
"More Effective Distributed ML via a Stale Synchronous Parallel Parameter
Server" (NIPS 2013). Ranks 0..S-1 are servers (topology.py). The parameters,
flattened in the model's order, are cut into S contiguous slices of equal length
(equal bytes: every parameter is fp32); server s keeps slice s and the optimizer
state for it. SGD and AdamW act element by element, so stepping slices is
stepping the model.

Every message is one float32 tensor sent point to point (gloo on CPU):

    push   worker -> each server   [kind, step, loss, staleness, gradient slice]
    reply  server -> worker        [stop, lowest clock, 0, 0, parameter slice]
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

Each server reads every worker on a thread of its own: a message is taken the
moment it arrives, and a worker that dies is noticed at once (gloo reports the
closed connection on that worker's pending receive). The main thread applies
updates and answers in arrival order.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

HEADER = 4
PUSH, DONE = 0.0, 1.0
TAG_PUSH, TAG_REPLY, TAG_FINAL = 101, 102, 103


def _short(e: Exception) -> str:
    """gloo's message without its source location: `Connection closed by peer [ADDR]:PORT`."""
    text = re.sub(r"^\[[^\]]*\.cc:\d+\] ", "", str(e).splitlines()[0])
    return text.split(". ")[0][:160]


def slice_bounds(total: int, servers: int) -> list[tuple[int, int]]:
    """Contiguous slices of a flat vector of `total` elements, lengths differing by at most one."""
    base, extra = divmod(total, servers)
    bounds, lo = [], 0
    for s in range(servers):
        hi = lo + base + (s < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def flat_parameters(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_gradients(model: nn.Module) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.parameters()])


@torch.no_grad()
def load_flat(model: nn.Module, flat: Tensor) -> None:
    offset = 0
    for p in model.parameters():
        p.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


class WorkerClient:
    """A worker's end: push this step's gradient slices, wait for fresh parameters."""

    def __init__(self, model: nn.Module, *, servers: int, group: dist.ProcessGroup):
        self.model, self.servers, self.group = model, servers, group
        for p in model.parameters():
            assert p.dtype == torch.float32, f"parameter server sends fp32, got {p.dtype}"
        self.bounds = slice_bounds(sum(p.numel() for p in model.parameters()), servers)
        self.staleness = 0  # of the parameters the next gradient is computed on

    def push_pull(self, step: int, loss: float) -> bool:
        """Send this step's gradient, load the parameters for the next; True: stop."""
        grad = flat_gradients(self.model)
        replies = [torch.empty(HEADER + hi - lo) for lo, hi in self.bounds]
        # receives first, so that a server's answer never waits for us to be ready
        waits = [dist.irecv(r, group=self.group, group_src=s, tag=TAG_REPLY) for s, r in enumerate(replies)]
        for s, (lo, hi) in enumerate(self.bounds):
            header = torch.tensor([PUSH, step, loss, self.staleness])
            dist.send(torch.cat([header, grad[lo:hi]]), group=self.group, group_dst=s, tag=TAG_PUSH)
        for w in waits:
            w.wait()
        flat = torch.cat([r[HEADER:] for r in replies])
        load_flat(self.model, flat)
        self.staleness = step + 1 - int(min(r[1].item() for r in replies))
        return bool(replies[0][0].item())

    def finish(self) -> None:
        """Tell every server this worker is done, then take the final parameters from server 0."""
        total = self.bounds[-1][1]
        final = torch.empty(total)
        wait = dist.irecv(final, group=self.group, group_src=0, tag=TAG_FINAL)
        for s, (lo, hi) in enumerate(self.bounds):
            done = torch.zeros(HEADER + hi - lo)
            done[0] = DONE
            dist.send(done, group=self.group, group_dst=s, tag=TAG_PUSH)
        wait.wait()
        load_flat(self.model, final)


@dataclass
class Arrival:
    worker: int  # index among the workers
    message: Tensor | None  # None: the connection to the worker broke
    error: str = ""


@dataclass
class Lost:
    rank: int
    clock: int
    error: str


@dataclass
class ServerStats:
    updates: int = 0  # gradients applied
    staleness: list[int] = field(default_factory=list)  # per update, as the worker saw it
    losses: list[float] = field(default_factory=list)  # per update
    steps_by_worker: list[int] = field(default_factory=list)
    lost: list[Lost] = field(default_factory=list)


class ParameterServer:
    """One server: its slice of the parameters, the optimizer for it, the workers' clocks.

    `build_optimizer([param])` makes the optimizer, `lr_at(step)` the rate for global
    step `step`. `servers_group` (several servers) adds up the gradient norm for
    clipping in synchronous mode.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        index: int,
        servers: int,
        workers: int,
        group: dist.ProcessGroup,
        servers_group: dist.ProcessGroup | None,
        build_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
        lr_at: Callable[[int], float],
        steps: int,
        asynchronous: bool,
        staleness: int,
        clip_norm: float,
    ):
        self.index, self.servers, self.workers, self.group = index, servers, workers, group
        self.servers_group = servers_group
        total = sum(p.numel() for p in model.parameters())
        self.bounds = slice_bounds(total, servers)
        lo, hi = self.bounds[index]
        self.param = nn.Parameter(flat_parameters(model)[lo:hi].clone())
        self.optimizer = build_optimizer([self.param])
        self.lr_at, self.steps, self.clip_norm = lr_at, steps, clip_norm
        self.asynchronous, self.bound = asynchronous, staleness
        self.clocks = [0] * workers
        self.active = set(range(workers))  # neither done nor lost
        self.reading = set(range(workers))  # a reader thread still runs
        self.waiting: dict[int, int] = {}  # worker -> the step it wants to start
        self.pending: dict[int, Tensor] = {}  # synchronous: this step's gradients
        self.stats = ServerStats(steps_by_worker=[0] * workers)
        self.final: Tensor | None = None  # all parameters, when the run is over
        self._arrivals: queue.Queue[Arrival] = queue.Queue()
        for w in range(workers):
            threading.Thread(target=self._read, args=(w,), daemon=True, name=f"ps-read-{w}").start()

    # -- receiving ---------------------------------------------------------------
    def worker_rank(self, w: int) -> int:
        return dist.get_global_rank(self.group, self.servers + w)

    def _read(self, w: int) -> None:
        size = HEADER + self.bounds[self.index][1] - self.bounds[self.index][0]
        try:
            while True:
                buf = torch.empty(size)
                dist.recv(buf, group=self.group, group_src=self.servers + w, tag=TAG_PUSH)
                self._arrivals.put(Arrival(w, buf))
                if buf[0].item() == DONE:
                    return
        except Exception as e:  # the worker is gone: say so to the main thread
            self._arrivals.put(Arrival(w, None, _short(e)))

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
        if msg[0].item() == DONE:
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
        applied = 0
        if self.asynchronous:
            self.stats.staleness.append(int(msg[3].item()))
            self.stats.losses.append(msg[2].item())
            self._step(msg[HEADER:] / self.workers)
            applied = 1
        else:
            self.pending[w] = msg
            if len(self.pending) == self.workers:  # everyone's step: average in worker order
                msgs = [self.pending.pop(v) for v in range(self.workers)]
                self.stats.staleness.extend(int(m[3].item()) for m in msgs)
                self.stats.losses.extend(m[2].item() for m in msgs)
                total = msgs[0][HEADER:].clone()
                for m in msgs[1:]:
                    total += m[HEADER:]
                self._step(total / self.workers, clip=True)
                applied = self.workers
        self._release()
        return applied

    def _step(self, grad: Tensor, *, clip: bool = False) -> None:
        if clip and self.clip_norm > 0:
            grad = self._clipped(grad)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.global_step)
        self.param.grad = grad
        self.optimizer.step()
        self.param.grad = None
        self.stats.updates += 1 if self.asynchronous else self.workers

    def _clipped(self, grad: Tensor) -> Tensor:
        """torch.nn.utils.clip_grad_norm_'s rule on the whole model's gradient, whose
        squared norm is the sum over the servers' slices."""
        sq = grad.double().pow(2).sum()
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
        for w, want in sorted(self.waiting.items()):
            if not stop and self.asynchronous and lowest < want - self.bound:
                continue
            if not self.asynchronous and w in self.pending:
                continue
            del self.waiting[w]
            reply = torch.cat([torch.tensor([float(stop), float(lowest), 0.0, 0.0]), self.param.detach()])
            try:
                dist.send(reply, group=self.group, group_dst=self.servers + w, tag=TAG_REPLY)
            except Exception as e:  # the worker died while we answered
                self._lose(w, _short(e))
                return
            if stop:
                self.active.discard(w)

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
        from shardwise.checkpoint.state import unflatten

        named = list(model.named_parameters())
        out = unflatten(self.gather(), named, prefix="model/")
        for key, value in sorted(self.optimizer.state.get(self.param, {}).items()):
            if value.dim() == 0:
                out |= {f"optim/{key}/{name}": value.clone() for name, _ in named}
            else:
                out |= unflatten(self.gather(value), named, prefix=f"optim/{key}/")
        return out

    def load_state(self, model: nn.Module, tensors: dict[str, Tensor], *, step: int) -> None:
        """Take this server's slice of a checkpoint's optimizer state and go on from global step `step`
        (the weights came in with the model)."""
        from shardwise.checkpoint.state import flatten, optimizer_keys

        named = list(model.named_parameters())
        lo, hi = self.bounds[self.index]
        state = {}
        for key in optimizer_keys(tensors):
            first = tensors[f"optim/{key}/{named[0][0]}"]
            state[key] = first.clone() if first.dim() == 0 else flatten(tensors, named, prefix=f"optim/{key}/")[lo:hi]
        self.optimizer.state[self.param] = state
        self.clocks = [step] * self.workers
        self.stats.updates = step * self.workers

    # -- the end -----------------------------------------------------------------
    def gather(self, piece: Tensor | None = None) -> Tensor:
        """All parameters (or the servers' slices of another flat tensor), flat: a collective of the servers."""
        piece = self.param.detach() if piece is None else piece.detach()
        if self.servers_group is None:
            return piece.clone()
        from shardwise.comm.collectives import all_gather_uneven

        sizes = [hi - lo for lo, hi in self.bounds]
        return torch.cat(all_gather_uneven(piece.contiguous(), sizes, dim=0, group=self.servers_group))

    def send_final(self, flat: Tensor) -> None:
        """Server 0: the final parameters to every worker still there."""
        lost = {x.rank for x in self.stats.lost}
        for w in range(self.workers):
            if self.worker_rank(w) in lost:
                continue
            try:
                dist.send(flat, group=self.group, group_dst=self.servers + w, tag=TAG_FINAL)
            except Exception as e:  # asynchronous: a worker may die after its last step, too
                if not self.asynchronous:
                    raise
                self.stats.lost.append(Lost(self.worker_rank(w), self.clocks[w], _short(e)))
