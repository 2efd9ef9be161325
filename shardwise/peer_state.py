"""Recovery from the survivors' memory: a data-parallel replica serves its training state to
the ranks that start after a failure, so the job goes on from the last step the survivors
completed, not from the last checkpoint on disk, and redoes no step.

Every rank of a layout that holds the whole model and optimizer state (data parallel, no
sharding, no residuals of lossy compression, data read from files) keeps a `Holder`: the
loop updates the weights under its lock and says which step they are at. A thread serves
the state on a TCP port of the rank's host (`serve_state`); the rank announces it in a file
beside its error record. When a peer fails, the surviving ranks do not exit: they record
their error and hold (worker.py), and the launcher keeps them alive while it starts the
ranks again, handing them the survivors' addresses. Each new rank asks every survivor for
its step, fetches the state from the most advanced (its own host's where that one is as
far), and the new ranks agree to take it only if every one of them got the same step, no
older than the checkpoint (`recover`); otherwise they read the checkpoint as before.

The connection proves the job's secret both ways (HMAC-SHA256 over fresh nonces, and over
the whole payload), and the state travels as safetensors and JSON: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from shardwise.procs import read_exactly

MAGIC = b"shardwise-peer-1\n"
NONCE = 32
ASK_STEP, ASK_STATE = b"S", b"F"
CONNECT_S = 3.0  # a survivor that does not answer in this long is not asked again
PROOF_S = 5.0  # the longest a client may take to prove the secret
READ_S = 60.0  # the longest a transfer may pause
# The longest a snapshot waits for the step under way. A survivor is asked only after a peer
# was lost, so a step it is still inside (its lock held: from the optimizer step to the end
# of its logging, evaluation and checkpoint) either ends at once (the lost peer had done its
# part of every collective, or what is left is local) or never (it waits on the lost peer
# until the collective timeout): waiting longer only delays the read of the checkpoint.
WAIT_S = 0.5
MAX_HEAD = 1 << 20  # the longest header a client accepts


@dataclass(frozen=True)
class PeerSettings:
    """What the launcher tells a rank about recovery from memory."""

    announce: str  # the file where this rank announces the address it serves its state on
    addr: str  # its host's address
    secret: str  # this start's secret, which a client must prove
    survivors: tuple[str, ...] = ()  # addr:port of the ranks a failure left alive, to take the state from
    survivors_secret: str = ""  # the secret of the start they belong to


@dataclass
class PeerState:
    """What a survivor sent: the step its weights are at, the checkpoint's meta, the tensors."""

    step: int
    meta: dict
    tensors: dict[str, torch.Tensor]
    source: str  # addr:port
    nbytes: int
    seconds: float


class Holder:
    """The training state of this rank, for the ranks that start after a failure: its step,
    and `provider()`, which gives (tensors, meta) as a checkpoint would hold them.

    The loop holds the lock from its optimizer step to the end of that step's logging,
    evaluation and checkpoint (`iteration`, `updating`), and only then says the weights are at
    the next step: a snapshot is a whole step, its records and checkpoint written. A rank that
    fails in between (a peer lost during that step's logging, say) serves nothing, and the
    ranks after it go on from the checkpoint."""

    def __init__(self, step: int):
        self.lock = threading.Lock()
        self.step = step
        self.provider: Callable[[], tuple[dict, dict]] | None = None
        self.broken = False  # a step that raised once the weights had changed
        self._mine = False  # the loop holds the lock

    @contextmanager
    def iteration(self, step: int):
        """One step of the loop; the weights are at `step + 1` once it ends."""
        try:
            yield
        except BaseException:
            self.broken = self.broken or self._mine  # the weights may have changed
            self._release()
            raise
        self.updating()  # (every step takes the lock at its update: a skipped one too)
        if not self.broken:
            self.step = step + 1
        self._release()

    def _release(self) -> None:
        if self._mine:
            self._mine = False
            self.lock.release()

    def updating(self) -> None:
        """The weights change from here to the end of the step."""
        if not self._mine:
            self.lock.acquire()
            self._mine = True

    def snapshot(self, *, state: bool) -> tuple[int, bytes, dict] | None:
        """(step, the tensors as safetensors, meta), or None: the loop is inside a step longer
        than WAIT_S (blocked in its logging, say), or a step failed half done."""
        from safetensors.torch import save

        if not self.lock.acquire(timeout=WAIT_S):
            return None
        try:
            if self.broken or self.provider is None:
                return None
            if not state:
                return self.step, b"", {}
            tensors, meta = self.provider()
            cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            return self.step, save(cpu), meta
        finally:
            self.lock.release()


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


def _answer(conn: socket.socket, holder: Holder, secret: bytes) -> None:
    """One client: the proof of the secret within PROOF_S, then the step or the state; the
    lengths and header, their MAC, the payload, and a MAC over all of it."""
    conn.settimeout(PROOF_S)
    nonce = secrets.token_bytes(NONCE)
    conn.sendall(MAGIC + nonce)
    ask, theirs, mac = (lambda b: (b[:1], b[1 : 1 + NONCE], b[1 + NONCE :]))(read_exactly(conn, 1 + NONCE + 32))
    if ask not in (ASK_STEP, ASK_STATE) or not hmac.compare_digest(mac, _mac(secret, b"client", nonce, ask)):
        return  # not the job's: nothing is said
    conn.settimeout(READ_S)
    snap = holder.snapshot(state=ask == ASK_STATE)
    step, payload, meta = snap if snap is not None else (None, b"", {})
    head = json.dumps({"step": step, "meta": meta}).encode()
    lengths = struct.pack(">IQ", len(head), len(payload))
    conn.sendall(lengths + head + _mac(secret, b"server-head", theirs, lengths, head))
    conn.sendall(payload)
    conn.sendall(_mac(secret, b"server", theirs, head, payload))


def holds_whole_state(cfg, dims, compressor) -> bool:
    """Whether every rank holds the whole training state (what a checkpoint of it holds):
    data parallel only, no sharding, no error-feedback residuals, no database read positions.
    (Whether the job recovers from memory at all, `train.recovery`, the launcher decides.)"""
    replicas = dims.dp == dims.world_size and dims.shard == "none" and not dims.servers
    return replicas and cfg.data.name != "sql" and not (compressor and compressor.owes)


_SERVER_PID = [0]  # the process that serves a holder (a forked child inherits this, not the thread)


def serving() -> bool:
    """Whether this process serves its state: a rank that loses a peer then holds."""
    return _SERVER_PID[0] == os.getpid()


def serve_state(holder: Holder, secret: str, host: str) -> tuple[str, int]:
    """Serve `holder` on a free port of `host` from a daemon thread; its address."""
    listener = socket.create_server((host, 0))
    key = secret.encode()

    def one(conn: socket.socket) -> None:
        with conn:
            try:
                _answer(conn, holder, key)
            except Exception:  # noqa: S110 -- a client that went away, or a state it could not be given
                pass

    def loop() -> None:  # a thread a client: one that is slow to prove itself holds up no other
        with listener:
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=one, args=(conn,), name="shardwise-peer-client", daemon=True).start()

    threading.Thread(target=loop, name="shardwise-peer-state", daemon=True).start()
    _SERVER_PID[0] = os.getpid()
    return host, listener.getsockname()[1]


def ask(endpoint: str, secret: str, *, state: bool) -> PeerState | None:
    """A survivor's step (`state=False`) or whole state; None where it has none to give."""
    from safetensors.torch import load

    addr, _, port = endpoint.rpartition(":")
    key, what, started = secret.encode(), ASK_STATE if state else ASK_STEP, time.perf_counter()
    with socket.create_connection((addr, int(port)), timeout=CONNECT_S) as sock:
        sock.settimeout(READ_S)
        if read_exactly(sock, len(MAGIC)) != MAGIC:
            raise ConnectionError(f"{endpoint} is not a shardwise rank")
        theirs, mine = read_exactly(sock, NONCE), secrets.token_bytes(NONCE)
        sock.sendall(what + mine + _mac(key, b"client", theirs, what))
        lengths = read_exactly(sock, 12)
        head_len, payload_len = struct.unpack(">IQ", lengths)
        head = read_exactly(sock, min(head_len, MAX_HEAD))
        if head_len > MAX_HEAD or not hmac.compare_digest(
            read_exactly(sock, 32), _mac(key, b"server-head", mine, lengths, head)
        ):
            raise ConnectionError(f"{endpoint} does not hold the job's secret")  # before any payload is taken
        payload = read_exactly(sock, payload_len)
        if not hmac.compare_digest(read_exactly(sock, 32), _mac(key, b"server", mine, head, payload)):
            raise ConnectionError(f"{endpoint} does not hold the job's secret")
    header = json.loads(head)
    if header.get("step") is None:
        return None
    tensors = load(payload) if state else {}
    return PeerState(header["step"], header["meta"], tensors, endpoint, len(payload), time.perf_counter() - started)


def fetch_best(endpoints: list[str], secret: str, *, mine: str) -> PeerState | None:
    """The state of the most advanced survivor (its own host's, `mine`, where that one is as
    far along); None where no survivor answers with one."""
    steps: dict[str, int] = {}
    for endpoint in endpoints:
        try:
            got = ask(endpoint, secret, state=False)
        except (OSError, ValueError):
            continue
        if got is not None:
            steps[endpoint] = got.step
    if not steps:
        return None
    best = max(steps.values())
    chosen = sorted((e for e, s in steps.items() if s == best), key=lambda e: (e.rpartition(":")[0] != mine, e))
    for endpoint in chosen:
        try:
            got = ask(endpoint, secret, state=True)
        except (OSError, ValueError):
            continue
        if got is not None and got.step == best:
            return got
    return None


def _disk_step(resume: str) -> int:
    """The step of the checkpoint a run would otherwise resume from (-1: none)."""
    from shardwise.checkpoint.manifest import find_checkpoint, folder_step

    if not resume:
        return -1
    try:
        step = folder_step(find_checkpoint(Path(resume)).name)
    except Exception:  # noqa: BLE001 -- the resume itself says what is wrong with it
        return -1
    return step if step is not None else -1


def recover(peer: PeerSettings | None, resume: str, group, *, rank: int):
    """The checkpoint the ranks take from the survivors' memory (a collective of `group`), or
    None: where there are no survivors, where any rank could not get the same step as the
    others, or where that step is older than the checkpoint on disk."""
    from shardwise.checkpoint.store import Checkpoint
    from shardwise.comm.collectives import all_gather_json

    if peer is None or not peer.survivors:  # the same on every rank: the launcher told them all
        return None
    try:
        got = fetch_best(list(peer.survivors), peer.survivors_secret, mine=peer.addr)
    except Exception:  # noqa: BLE001 -- whatever went wrong, the checkpoint instead, decided together
        got = None
    on_disk = _disk_step(resume)
    said = all_gather_json([got.step if got is not None else None, on_disk], group)
    if got is None or len({step for step, _ in said}) != 1 or got.step < max(disk for _, disk in said):
        return None
    if rank == 0:
        disk = f"step {on_disk} on disk" if on_disk >= 0 else "no checkpoint"
        print(f"shardwise: going on from step {got.step} in the survivors' memory ({disk}): rank 0 took "
              f"{got.nbytes / 1e6:.1f} MB from {got.source} in {got.seconds:.2f} s", flush=True)  # fmt: skip
    state = {**got.meta, "step": got.step, "index": {}}
    return Checkpoint(Path(f"the memory of the rank at {got.source}"), got.step, state, got.tensors)


HOLD_S = 600.0  # the longest a rank that lost a peer waits for the launcher to stop it


def hold(marker: Path) -> None:
    """After a peer failed (its error and ring recorded): say so in `marker`, and keep serving
    this rank's state until the launcher stops the process (SIGTERM), once the ranks started
    after the failure have taken it."""
    marker.touch()
    time.sleep(HOLD_S)
