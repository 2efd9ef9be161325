"""The rendezvous of a job started by shardwise's launcher: a `torch.distributed.Store` that
only processes holding the job's secret may join, read or write.

torch's TCPStore has no authentication: any process that reaches its port can read the ranks'
addresses, write keys, or take a rank's place. Here rank 0 serves the store itself
(`StoreServer`, a thread), and every rank, rank 0 included, talks to it through `SecretStore`.
Each connection starts with a mutual proof of the secret (HMAC-SHA256 over both sides'
fresh nonces: neither side learns anything it could replay, and a rank will not talk to a
server without the secret either); every message after it is sealed with AES-256-GCM under a
key derived from the secret and both nonces, its nonce a counter per direction, so a message
cannot be read, altered, replayed or reordered. A peer that fails the proof is cut off before
it may send a request, and the server says so in one line. The launcher makes a fresh secret
for every start of the ranks (procs.SECRET_ENV) and hands it to them in their environment.

This covers the rendezvous only: gloo's own connections between ranks, which carry the
tensors, are neither authenticated nor encrypted (README: Checkpoints, restarts and hangs).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import struct
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shardwise.procs import read_exactly

HELLO = b"shardwise-rendezvous-1"
SET, GET, ADD, CHECK, WAIT, COMPARE_SET, DELETE, NUM_KEYS, APPEND = range(1, 10)
OK, FAILED = b"ok", b"failed"
MAX_FRAME = 64 << 20
_KEPT: list = []  # the stores (SecretStore.__init__) and rank 0's server (job_store): alive with the process
PROOF_S = 5.0  # a peer that has not proven the secret by then is cut off


class Refused(ConnectionError):
    """The peer did not prove the job's secret."""


class Channel:
    """A connected socket, after the proof: sealed frames of byte fields."""

    def __init__(self, sock: socket.socket, key: bytes, sending: int):
        self.sock, self.aead = sock, AESGCM(key)
        self.sending, self.receiving = sending, 1 - sending  # the direction bytes of the nonces
        self.sent = self.received = 0

    def send(self, *fields: bytes) -> None:
        body = b"".join(struct.pack(">I", len(f)) + f for f in fields)
        nonce = struct.pack(">B3xQ", self.sending, self.sent)
        self.sent += 1
        sealed = self.aead.encrypt(nonce, body, None)
        self.sock.sendall(struct.pack(">I", len(sealed)) + sealed)

    def recv(self) -> list[bytes]:
        (size,) = struct.unpack(">I", read_exactly(self.sock, 4))
        if size > MAX_FRAME:
            raise ConnectionError(f"a frame of {size} bytes")
        nonce = struct.pack(">B3xQ", self.receiving, self.received)
        self.received += 1
        body = self.aead.decrypt(nonce, read_exactly(self.sock, size), None)  # InvalidTag: altered or out of order
        fields, at = [], 0
        while at < len(body):
            (n,) = struct.unpack_from(">I", body, at)
            fields.append(body[at + 4 : at + 4 + n])
            at += 4 + n
        return fields


def _proof(secret: bytes, who: bytes, ours: bytes, theirs: bytes) -> bytes:
    return hmac.new(secret, HELLO + who + ours + theirs, hashlib.sha256).digest()


def _session_key(secret: bytes, client: bytes, server: bytes) -> bytes:
    return hmac.new(secret, HELLO + b"key" + client + server, hashlib.sha256).digest()


def client_handshake(sock: socket.socket, secret: bytes) -> Channel:
    mine = secrets.token_bytes(32)
    sock.sendall(HELLO + mine)
    reply = read_exactly(sock, len(HELLO) + 64)
    theirs, proof = reply[len(HELLO) : len(HELLO) + 32], reply[len(HELLO) + 32 :]
    if reply[: len(HELLO)] != HELLO or not hmac.compare_digest(proof, _proof(secret, b"server", mine, theirs)):
        raise Refused("it and this rank do not hold the same secret")
    sock.sendall(_proof(secret, b"client", mine, theirs))
    return Channel(sock, _session_key(secret, mine, theirs), sending=0)


def server_handshake(sock: socket.socket, secret: bytes) -> Channel:
    hello = read_exactly(sock, len(HELLO) + 32)
    if hello[: len(HELLO)] != HELLO:
        raise Refused("not the rendezvous's protocol")
    theirs, mine = hello[len(HELLO) :], secrets.token_bytes(32)
    sock.sendall(HELLO + mine + _proof(secret, b"server", theirs, mine))
    if not hmac.compare_digest(read_exactly(sock, 32), _proof(secret, b"client", theirs, mine)):
        raise Refused("a wrong proof")
    return Channel(sock, _session_key(secret, theirs, mine), sending=1)


class StoreServer:
    """Rank 0's store: keys and values in memory, a thread per proven connection."""

    def __init__(self, host: str, port: int, secret: bytes, *, backlog: int = 128):
        self.secret, self.data, self.changed = secret, {}, threading.Condition()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(backlog)
        self.refused = 0
        threading.Thread(target=self._accept, name="shardwise-rendezvous", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    def _serve(self, conn: socket.socket, peer) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(PROOF_S)  # for the proof; a proven rank may then wait as long as it likes
            try:
                channel = server_handshake(conn, self.secret)
            except (Refused, ConnectionError, OSError) as e:
                self.refused += 1
                print(f"shardwise: the rendezvous refused a connection from {peer[0]}: it did not prove the job's "
                      f"secret ({e})", file=sys.stderr, flush=True)  # fmt: skip
                return
            conn.settimeout(None)
            try:
                while True:
                    op, *args = channel.recv()
                    channel.send(*self._answer(op[0], args))
            except (ConnectionError, OSError, InvalidTag, ValueError, IndexError, struct.error):
                return  # a rank that left, or a frame that did not open (altered, replayed): dropped

    def _answer(self, op: int, args: list[bytes]) -> list[bytes]:
        data = self.data
        with self.changed:
            if op == SET:
                data[args[0]] = args[1]
            elif op == APPEND:
                data[args[0]] = data.get(args[0], b"") + args[1]
            elif op in (GET, WAIT):
                keys, timeout = args[1:], int(args[0]) / 1000
                if not self.changed.wait_for(lambda: all(k in data for k in keys), timeout):
                    missing = [k.decode(errors="replace") for k in keys if k not in data]
                    return [FAILED, f"timed out after {timeout:g} s waiting for {', '.join(missing)}".encode()]
                return [OK, *(data[k] for k in keys)] if op == GET else [OK]
            elif op == ADD:
                value = int(data.get(args[0], b"0")) + int(args[1])
                data[args[0]] = str(value).encode()
            elif op == COMPARE_SET:
                key, expected, desired = args
                if (key not in data and expected == b"") or data.get(key) == expected:
                    data[key] = desired
                    self.changed.notify_all()
                return [OK, data.get(key, expected)]
            elif op == CHECK:
                return [OK, b"1" if all(k in data for k in args) else b"0"]
            elif op == DELETE:
                return [OK, b"1" if data.pop(args[0], None) is not None else b"0"]
            elif op == NUM_KEYS:
                return [OK, str(len(data)).encode()]
            else:
                return [FAILED, f"unknown operation {op}".encode()]
            self.changed.notify_all()
            return [OK, data[args[0]]] if op == ADD else [OK]

    def close(self) -> None:
        self.sock.close()


class SecretStore(dist.Store):
    """A rank's end of the store: torch calls it as it calls a TCPStore."""

    def __init__(self, host: str, port: int, secret: bytes, *, timeout: timedelta):
        super().__init__()
        self.where, self.secret, self.wait_timeout = (host, port), secret, timeout
        self.wait_s = timeout.total_seconds()
        self.lock = threading.Lock()  # one request at a time on the connection, as TCPStore's client
        deadline = time.monotonic() + self.wait_s
        while True:  # rank 0's server may not listen yet
            try:
                sock = socket.create_connection((host, port), timeout=10.0)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise dist.DistStoreError(f"cannot reach the rendezvous at {host}:{port}: {e}") from None
                time.sleep(0.05)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.channel = client_handshake(sock, secret)
        except (ConnectionError, OSError) as e:
            sock.close()
            raise dist.DistStoreError(f"cannot join the rendezvous at {host}:{port}: {e}") from None
        sock.settimeout(None)
        # torch holds the store in C++ and calls its methods through this Python object, which
        # must outlive every such call: once the object is collected, torch finds no method
        # ("Not implemented"). So every store lives as long as the process.
        _KEPT.append(self)

    def clone(self) -> SecretStore:
        """A store of its own connection (gloo gives each of its groups' connections one)."""
        return SecretStore(*self.where, self.secret, timeout=self.wait_timeout)

    def _ask(self, op: int, *fields: bytes) -> list[bytes]:
        with self.lock:
            self.channel.send(bytes([op]), *fields)
            status, *answer = self.channel.recv()
        if status != OK:
            raise dist.DistStoreError(answer[0].decode(errors="replace"))
        return answer

    def _ms(self, timeout: timedelta | None = None) -> bytes:
        return str(int(1000 * (timeout.total_seconds() if timeout is not None else self.wait_s))).encode()

    def set(self, key: str, value) -> None:
        self._ask(SET, key.encode(), _bytes(value))

    def append(self, key: str, value) -> None:
        self._ask(APPEND, key.encode(), _bytes(value))

    def get(self, key: str) -> bytes:
        return self._ask(GET, self._ms(), key.encode())[0]

    def add(self, key: str, amount: int) -> int:
        return int(self._ask(ADD, key.encode(), str(int(amount)).encode())[0])

    def compare_set(self, key: str, expected, desired) -> bytes:
        return self._ask(COMPARE_SET, key.encode(), _bytes(expected), _bytes(desired))[0]

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        self._ask(WAIT, self._ms(timeout), *(k.encode() for k in keys))

    def check(self, keys: list[str]) -> bool:
        return self._ask(CHECK, *(k.encode() for k in keys))[0] == b"1"

    def delete_key(self, key: str) -> bool:
        return self._ask(DELETE, key.encode())[0] == b"1"

    def num_keys(self) -> int:
        return int(self._ask(NUM_KEYS)[0])

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return self._ask(GET, self._ms(), *(k.encode() for k in keys))

    def multi_set(self, keys: list[str], values: list) -> None:
        for key, value in zip(keys, values, strict=True):
            self.set(key, value)


def _bytes(value) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def job_store(host: str, port: int, rank: int, secret_hex: str, *, timeout: timedelta) -> SecretStore:
    """This rank's store; rank 0 serves it first, on `host`:`port` (all interfaces if `host`
    is not one of this machine's addresses)."""
    secret = bytes.fromhex(secret_hex)
    if rank == 0:
        try:
            server = StoreServer(host, port, secret)
        except OSError:
            server = StoreServer("::" if ":" in host else "0.0.0.0", port, secret)
        _KEPT.append(server)  # serves as long as the process lives
    return SecretStore(host, port, secret, timeout=timeout)


def init_from_env(backend: str = "gloo", *, timeout: timedelta = timedelta(minutes=10)) -> None:
    """`dist.init_process_group` from torchrun's environment, through the job's own store where
    the launcher gave the ranks a secret (procs.SECRET_ENV), else torch's env:// rendezvous."""
    from shardwise.procs import SECRET_ENV

    secret = os.environ.pop(SECRET_ENV, "")  # not for the processes this one starts
    if not secret:
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = job_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, secret, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
