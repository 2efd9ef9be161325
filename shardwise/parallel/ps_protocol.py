"""The parameter server's messages and records, and a worker's end (the protocol is
described in parallel/param_server.py).

Every message is one tensor of the model's dtype: a header of HEADER numbers, then
a slice of the flat parameter (or gradient) vector, in model order. With
comm.compression = bf16 or fp16 a push's slice goes rounded to half precision, its
bytes packed into the message's dtype (`PushCodec`): half the bytes on the servers'
links, rounded as DDP's bf16 hook rounds, nothing dropped (so no error feedback).
"""

from __future__ import annotations

import math
import queue
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from shardwise.comm.cost import Link
from shardwise.comm.flat import copy_flat, flatten, read_range, write_range
from shardwise.ranges import even_bounds

if TYPE_CHECKING:
    from shardwise.topology import RankMesh

HEADER = 5
INITIAL = -1.0  # the version a worker echoes before its first reply: the weights it started with
PUSH, DONE = 0.0, 1.0
TAG_PUSH, TAG_REPLY, TAG_FINAL = 101, 102, 103


def short_error(e: Exception) -> str:
    """gloo's message without its source location: `Connection closed by peer [ADDR]:PORT`."""
    text = re.sub(r"^\[[^\]]*\.cc:\d+\] ", "", str(e).splitlines()[0])
    return text.split(". ")[0][:160]


def flat_parameters(model: nn.Module) -> Tensor:
    return flatten(list(model.parameters()))


def load_flat(model: nn.Module, flat: Tensor) -> None:
    copy_flat(flat, list(model.parameters()))


@dataclass(frozen=True)
class PushCodec:
    """How a push's gradient slice travels: whole (`half` None), or rounded to `half`
    (bf16, fp16) with its bytes packed into elements of the model's `dtype`."""

    dtype: torch.dtype
    half: torch.dtype | None = None

    @staticmethod
    def for_method(dtype: torch.dtype, method: str) -> PushCodec:
        return PushCodec(dtype, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(method))

    def words(self, n: int) -> int:
        """The elements of the model's dtype that a slice of `n` takes in a message."""
        if self.half is None:
            return n
        return math.ceil(2 * n / torch.empty((), dtype=self.dtype).element_size())

    def encode(self, grad: Tensor) -> Tensor:
        if self.half is None:
            return grad
        raw = grad.to(self.half).view(torch.uint8)
        packed = torch.zeros(self.words(grad.numel()), dtype=self.dtype)
        packed.view(torch.uint8)[: raw.numel()] = raw
        return packed

    def _view(self, payload: Tensor, n: int) -> Tensor:
        """The slice of `n` gradients a payload holds, as sent (no copy)."""
        return payload[:n] if self.half is None else payload.view(torch.uint8)[: 2 * n].view(self.half)

    def add_to(self, total: Tensor, payload: Tensor) -> None:
        """total += the slice a payload holds (in the model's dtype), in place."""
        total.add_(self._view(payload, total.numel()))

    def decode(self, payload: Tensor, n: int) -> Tensor:
        """The slice of `n` gradients a payload holds, in the model's dtype (a new tensor)."""
        return self._view(payload, n).to(self.dtype, copy=True)


class LocalEnd:
    """A colocated rank's worker and server (parallel.colocate), which talk through memory:
    gloo sends nothing to a rank's own self. The worker puts its pushes to its own server
    on the server's queue of arrivals; the server's thread puts its replies here, and,
    should it fail, its error, which the worker then raises as its own."""

    def __init__(self, index: int):
        self.index = index  # this rank's worker and server index
        self.arrivals: queue.Queue[Arrival] | None = None  # the server's (set by the server)
        self.replies: queue.Queue[Tensor | None] = queue.Queue()
        self.error: BaseException | None = None
        self.final: Tensor | None = None  # all parameters, once the server's loop is over
        self.done = threading.Event()

    def push(self, message: Tensor) -> None:
        self.arrivals.put(Arrival(self.index, message))

    def reply(self) -> Tensor:
        message = self.replies.get()
        if message is None:
            raise self.error
        return message

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.replies.put(None)

    def final_weights(self) -> Tensor:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.final


class WorkerClient:
    """A worker's end: push this step's gradient slices, wait for fresh parameters.
    `local`: colocated, the worker's own server is reached through memory."""

    def __init__(
        self,
        model: nn.Module,
        *,
        servers: int,
        group: dist.ProcessGroup,
        method: str = "none",
        local: LocalEnd | None = None,
    ):
        self.model, self.servers, self.group, self.local = model, servers, group, local
        self.dtype = model_dtype(model)
        self.codec = PushCodec.for_method(self.dtype, method)
        self.bounds = even_bounds(sum(p.numel() for p in model.parameters()), servers)
        self.versions = [INITIAL] * servers  # of the weights each server last sent

    def _mine(self, server: int) -> bool:
        return self.local is not None and server == self.local.index

    def push_pull(self, step: int, loss: Tensor) -> bool:
        """Send this step's gradient, load the parameters for the next; True: stop. Each
        slice is read from the gradients straight into its message, and each reply's slice
        written straight into the parameters (no flat copy of the whole model between)."""
        params = list(self.model.parameters())
        grads = [p.grad for p in params]
        messages = []
        for lo, hi in self.bounds:
            message = torch.empty(HEADER + self.codec.words(hi - lo), dtype=self.dtype)
            if self.codec.half is None:
                read_range(grads, params, lo, hi, message[HEADER:])
            else:
                piece = torch.empty(hi - lo, dtype=self.dtype)
                read_range(grads, params, lo, hi, piece)
                message[HEADER:] = self.codec.encode(piece)
            messages.append(message)
        # judged on what is sent: a gradient past fp16's range arrives as inf, and is skipped
        sent = [m[HEADER:].view(self.codec.half) if self.codec.half is not None else m[HEADER:] for m in messages]
        finite = bool(torch.isfinite(loss).all()) and all(bool(torch.isfinite(p).all()) for p in sent)
        replies = [torch.empty(HEADER + hi - lo, dtype=self.dtype) for lo, hi in self.bounds]
        # receives first, so that a server's answer never waits for us to be ready
        waits = [
            None if self._mine(s) else dist.irecv(r, group=self.group, group_src=s, tag=TAG_REPLY)
            for s, r in enumerate(replies)
        ]
        for s, message in enumerate(messages):
            fields = [PUSH, step, loss.item() if finite else 0.0, float(finite), self.versions[s]]
            message[:HEADER] = torch.tensor(fields, dtype=self.dtype)
            self._send(s, message)
        if self.local is not None:  # its own server first: should that fail, it says so at once
            replies[self.local.index] = self.local.reply()
        for s, w in enumerate(waits):
            if w is not None:
                w.wait()
            write_range(replies[s][HEADER:], self.bounds[s][0], params)
        self.versions = [r[2].item() for r in replies]
        return bool(replies[0][0].item())

    def _send(self, server: int, message: Tensor) -> None:
        if self._mine(server):
            self.local.push(message)
        else:
            dist.send(message, group=self.group, group_dst=server, tag=TAG_PUSH)

    def finish(self) -> None:
        """Tell every server this worker is done, then take the final parameters from server 0
        (colocated: from its own server, which gathered them with the others)."""
        total = self.bounds[-1][1]
        final = torch.empty(total, dtype=self.dtype)
        wait = None if self.local is not None else dist.irecv(final, group=self.group, group_src=0, tag=TAG_FINAL)
        for s, (lo, hi) in enumerate(self.bounds):
            done = torch.zeros(HEADER + self.codec.words(hi - lo), dtype=self.dtype)
            done[0] = DONE
            self._send(s, done)
        if wait is None:
            final = self.local.final_weights()
        else:
            wait.wait()
        load_flat(self.model, final)


def model_dtype(model: nn.Module) -> torch.dtype:
    dtypes = {p.dtype for p in model.parameters()}
    assert len(dtypes) == 1, f"a parameter server sends one dtype, the model has {dtypes}"
    return dtypes.pop()


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
    updates: int = 0  # gradients taken (applied, or dropped as non-finite)
    staleness: list[int] = field(default_factory=list)  # per gradient taken, as the servers recorded it
    losses: list[float] = field(default_factory=list)  # per finite gradient
    skipped: list[int] = field(default_factory=list)  # 1-based steps whose update was skipped (non-finite)
    steps_by_worker: list[int] = field(default_factory=list)
    lost: list[Lost] = field(default_factory=list)


def initial_slice(model: nn.Module, mesh: RankMesh) -> Tensor:
    """This server's slice of the starting weights: server 0 cuts them from its model and
    sends each other server its own (colocated, every server holds the whole model and
    cuts its own)."""
    index, group = mesh.coords["server"], mesh.groups["servers"]
    bounds = even_bounds(sum(p.numel() for p in model.parameters()), mesh.dims.servers)
    if mesh.dims.colocated:
        lo, hi = bounds[index]
        return flat_parameters(model)[lo:hi].clone()
    if index == 0:
        flat = flat_parameters(model)
        for s, (lo, hi) in enumerate(bounds[1:], start=1):
            dist.send(flat[lo:hi].contiguous(), group=group, group_dst=s)
        return flat[bounds[0][0] : bounds[0][1]].clone()
    lo, hi = bounds[index]
    piece = torch.empty(hi - lo, dtype=model_dtype(model))
    dist.recv(piece, group=group, group_src=0)
    return piece


def ps_seconds(
    link: Link,
    servers: int,
    workers: int,
    param_bytes: float,
    copy_s_per_byte: float = 0.0,
    push_half: bool = False,
    colocated: bool = False,
) -> float:
    """A synchronous parameter-server step's transfers (the planner's cost model): every
    worker pushes each server its slice of the gradient (in half precision: half its
    bytes) and pulls back the slice's new parameters, so each server's link carries
    workers x param_bytes / servers each way, one message after another. And the copies
    on the way, each a pass over fresh memory at `copy_s_per_byte`: a worker reads each
    slice of its gradient into its message and writes each reply's slice into its model (2
    of the model); a server receives each worker's message into a new buffer, sums them
    (a copy of the first, then adds), divides, and puts a header before the reply
    (2 x workers + 2 of its slice). Colocated, every rank is a worker and a server: its own
    slice stays in memory, so each rank's link carries the other workers - 1 slices in and
    out, pushes then replies, all links at once."""
    copies = (2 + (2 * workers + 2) / servers) * param_bytes * copy_s_per_byte
    push = link.send(param_bytes / servers / (2 if push_half else 1))
    messages = workers - 1 if colocated else workers
    return messages * (push + link.send(param_bytes / servers)) + copies
