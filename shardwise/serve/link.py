"""The link between the HTTP front of `shardwise serve --nproc N` and its ranks.

The front runs in the launcher's process, not in a rank, so it outlives the ranks: when a
rank fails, the launcher stops the others and starts them again (`serve.max_restarts`),
and meanwhile the front answers at once with 503 (the batch in flight too), says so on
`/healthz`, and serves again when the new rank 0 connects. Rank 0 connects over a Unix
socket in a folder only this user can enter, proving a key made for this server
(`multiprocessing.connection`'s HMAC challenge); it says what it serves (a hello), then
answers each batch sent with the batch's class probabilities. The front closing the link
is rank 0's signal to stop the ranks.
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


class RankLink:
    """The front's end: accepts rank 0 (again after each restart), sends it batches."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="shardwise-link-"))  # mode 700
        self.key = secrets.token_bytes(32)
        self.listener = Listener(str(self.folder / "ranks"), "AF_UNIX", authkey=self.key)
        self.conn: Connection | None = None
        self.hello: dict | None = None
        self.changed = threading.Condition()
        self.ended: int | None = None  # the launcher's exit status, once it has returned
        self.lock = threading.Lock()  # one batch on the link at a time
        self.closing = False
        self.accepting = threading.Thread(target=self._accept, name="shardwise-serve-link", daemon=True)
        self.accepting.start()

    def env(self) -> dict[str, str]:
        return {ADDRESS_ENV: str(self.folder / "ranks"), KEY_ENV: self.key.hex()}

    def _accept(self) -> None:
        connected = 0
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
            connected += 1
            if connected > 1:
                print("shardwise serve: the ranks are back; serving again", file=sys.stderr, flush=True)
            with self.changed:
                self._drop()
                self.conn, self.hello = conn, hello
                self.changed.notify_all()

    def wait_ready(self) -> dict | None:
        """The first hello; None if the launcher returned first (its status in `ended`)."""
        with self.changed:
            self.changed.wait_for(lambda: self.hello is not None or self.ended is not None)
            return self.hello

    def launcher_ended(self, status: int) -> None:
        with self.changed:
            self.ended = status
            self._drop()
            self.changed.notify_all()

    def ready(self) -> bool:
        return self.conn is not None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The batch's probabilities from the ranks; RequestError(503) while they are away."""
        with self.lock:
            conn = self.conn
            if conn is None:
                raise RequestError(503, RESTARTING)
            try:
                conn.send(x)
                return conn.recv()
            except (OSError, EOFError):
                with self.changed:
                    if self.conn is conn:
                        self._drop()
                failed = "a rank failed while this batch was in flight; the ranks are restarting"
                raise RequestError(503, failed) from None

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    def close(self) -> None:
        """Stop accepting, and close the link: rank 0 stops the ranks."""
        self.closing = True
        with self.changed:
            self._drop()
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as waking:  # out of its accept()
            waking.connect(str(self.folder / "ranks"))
        self.accepting.join(timeout=5)
        self.listener.close()
        for path in self.folder.iterdir():
            path.unlink(missing_ok=True)
        self.folder.rmdir()


def connect_to_front() -> Connection:
    """Rank 0's end, from the launcher's environment."""
    return Client(os.environ[ADDRESS_ENV], "AF_UNIX", authkey=bytes.fromhex(os.environ[KEY_ENV]))
