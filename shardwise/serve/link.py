"""The link between the HTTP front of `shardwise serve --nproc N` and its ranks.

The front runs in the launcher's process, not in a rank, so it outlives the ranks: when a
rank fails, the launcher stops the others and starts them again (`serve.max_restarts`),
and meanwhile the front answers at once with 503 (the batch in flight too), says so on
`/healthz`, and serves again when the new rank 0 connects. Rank 0 connects over a Unix
socket in a folder only this user can enter, proving a key made for this server
(`multiprocessing.connection`'s HMAC challenge); it says what it serves (a hello), then
answers each batch sent with the batch's class probabilities. The front closing the link
is rank 0's signal to stop the ranks.

A pipelined layout (serve/stages.py) links twice: the first stage takes the batches (the
"in" end), the last stage sends their answers (the "out" end), and the front keeps up to a
batch a stage in flight, matching the answers to the batches by their order. The ends of one
start of the ranks are told from a stale one's by the launcher's name for that start; a
failure on either end fails every batch in flight with 503.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sys
import tempfile
import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

import numpy as np

from shardwise.serve.model import RESTARTING, RequestError

ADDRESS_ENV = "SHARDWISE_SERVE_LINK"  # the socket's path, for rank 0
KEY_ENV = "SHARDWISE_SERVE_KEY"  # the key it proves, hex


class Ends:
    """One start of the ranks, as the front sees it: its "in" and "out" connections (one
    connection for both where rank 0 answers its own batches), and the batches in flight."""

    def __init__(self, start: str):
        self.start, self.inp, self.out, self.hello = start, None, None, None
        self.sent = self.answered = 0  # batches sent; answers taken (in the same order)
        self.failed = False

    def ready(self) -> bool:
        return not self.failed and self.inp is not None and self.out is not None

    def close(self) -> None:
        """Fail this start's batches: its connections shut down first, which wakes a thread
        blocked reading an answer (closing alone would not), then closed."""
        self.failed = True
        for conn in {id(c): c for c in (self.inp, self.out) if c is not None}.values():
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as end:
                end.shutdown(socket.SHUT_RDWR)
            conn.close()


class RankLink:
    """The front's end: accepts the ranks' ends (again after each restart), sends them batches."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="shardwise-link-"))  # mode 700
        self.key = secrets.token_bytes(32)
        self.listener = Listener(str(self.folder / "ranks"), "AF_UNIX", authkey=self.key)
        self.ends = Ends("")
        self.hello: dict | None = None  # the first start's
        self.changed = threading.Condition()  # guards ends, hello, ended; wakes answer-takers and wait_ready
        self.ended: int | None = None  # the launcher's exit status, once it has returned
        self.sending = threading.Lock()  # one batch onto the link at a time
        self.closing = False
        self.accepting = threading.Thread(target=self._accept, name="shardwise-serve-link", daemon=True)
        self.accepting.start()

    def env(self) -> dict[str, str]:
        return {ADDRESS_ENV: str(self.folder / "ranks"), KEY_ENV: self.key.hex()}

    def _accept(self) -> None:
        starts = 0
        while True:
            try:
                conn = self.listener.accept()
                hello = conn.recv()
            except (OSError, EOFError, AuthenticationError):  # a peer without the key, or close()'s wake-up
                if self.closing:
                    return
                continue
            if self.closing:
                conn.close()
                return
            with self.changed:
                if hello["start"] != self.ends.start:  # a new start of the ranks: the old one's ends go
                    self.ends.close()
                    self.ends = Ends(hello["start"])
                ends = self.ends
                if hello["role"] in ("in", "both"):
                    ends.inp, ends.hello = conn, hello
                if hello["role"] in ("out", "both"):
                    ends.out = conn
                if ends.ready():
                    starts += 1
                    self.hello = self.hello or ends.hello
                    if starts > 1:
                        print("shardwise serve: the ranks are back; serving again", file=sys.stderr, flush=True)
                self.changed.notify_all()

    def wait_ready(self) -> dict | None:
        """The first start's hello; None if the launcher returned first (its status in `ended`)."""
        with self.changed:
            self.changed.wait_for(lambda: self.hello is not None or self.ended is not None)
            return self.hello

    def launcher_ended(self, status: int) -> None:
        with self.changed:
            self.ended = status
            self.ends.close()
            self.changed.notify_all()

    def ready(self) -> bool:
        return self.ends.ready()

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The batch's probabilities from the ranks; RequestError(503) while they are away.
        Batches may be sent from several threads: each takes its answer in its turn."""
        with self.sending:
            ends = self.ends
            if not ends.ready():
                raise RequestError(503, RESTARTING)
            turn = ends.sent
            ends.sent += 1
            try:
                ends.inp.send(x)
            except OSError:
                self._fail(ends)
        with self.changed:
            self.changed.wait_for(lambda: ends.answered == turn or ends.failed)
        if ends.failed:
            self._fail(ends)
        try:
            return ends.out.recv()
        except (OSError, EOFError):
            self._fail(ends)
        finally:
            with self.changed:
                ends.answered += 1
                self.changed.notify_all()

    def _fail(self, ends: Ends):
        with self.changed:
            ends.close()
            self.changed.notify_all()
        raise RequestError(503, "a rank failed while this batch was in flight; the ranks are restarting")

    def close(self) -> None:
        """Stop accepting, and close the link: rank 0 stops the ranks."""
        self.closing = True
        with self.changed:
            self.ends.close()
            self.changed.notify_all()
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as waking:  # out of its accept()
            waking.connect(str(self.folder / "ranks"))
        self.accepting.join(timeout=5)
        self.listener.close()
        for path in self.folder.iterdir():
            path.unlink(missing_ok=True)
        self.folder.rmdir()


def connect_to_front(hello: dict) -> Connection:
    """A rank's end, from the launcher's environment, `hello` sent (its role, and what it
    serves) with this start's name (the launcher's run id: port and attempt)."""
    conn = Client(os.environ[ADDRESS_ENV], "AF_UNIX", authkey=bytes.fromhex(os.environ[KEY_ENV]))
    conn.send({**hello, "start": os.environ.get("TORCHELASTIC_RUN_ID", "")})
    return conn
