"""Small helpers for the processes the project starts (workers, benchmark and probe
ranks): a free port for a store, and a quick exit. Nothing here imports torch, and
nothing here imports the launcher or the worker, so every layer may use it."""

from __future__ import annotations

import os
import socket
import sys


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_now(code: int) -> None:
    """End the process without interpreter finalisation. Gloo's worker threads can
    still hold tensors when Python tears down, and freeing them then aborts the
    process (SIGABRT, "terminate called without an active exception") even after
    destroy_process_group; see pytorch/pytorch#179291. Everything we write is
    closed and flushed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
