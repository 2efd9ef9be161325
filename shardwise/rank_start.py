"""A rank's first steps, before torch is imported (2 s a process): the check that
the job's MASTER_ADDR is one the other hosts can reach, and the error record
torchrun and shardwise's launcher read. A rank torchrun starts with an unreachable
MASTER_ADDR says so at once, before another host's agent can tear the job down.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

from shardwise import procs
from shardwise.errors import EXIT_USAGE, ShardwiseError
from shardwise.files import write_atomic


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def loopback_interface() -> str:
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), "lo")


def check_master_reachable() -> None:
    """Refuse, in one line, a job over several hosts whose MASTER_ADDR is a loopback
    address (a hostname that /etc/hosts maps to 127.0.0.1, as torchrun picks by default):
    the ranks of the other hosts would wait for a store on their own machine until the
    timeout. torchrun's --local-addr gives the address the other hosts can reach."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    hosts = int(os.environ.get("GROUP_WORLD_SIZE", "0")) or (2 if local < world else 1)
    host = os.environ.get("MASTER_ADDR", "")
    if hosts <= 1 or not host:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError as e:
        raise ShardwiseError("MASTER_ADDR", f"{host!r} does not resolve on this host ({e.strerror})") from None
    if all(is_loopback(a.split("%")[0]) for a in addresses):
        raise ShardwiseError(
            "MASTER_ADDR",
            f"{host!r} resolves to {', '.join(sorted(addresses))}, a loopback address, but the job spans {hosts} "
            f"hosts ({world} ranks, {local} here): the other hosts cannot reach it; give torchrun --local-addr "
            "with an address of the store's host that they can reach",
        )


def record_error(exc: BaseException, rank: int, kind: str) -> None:
    """Write the error where torchrun and our launcher read it (TORCHELASTIC_ERROR_FILE):
    torchelastic's record (message, traceback), and ours beside it, which the launcher
    reads instead of parsing text: the rank, the step and phase it was in, the kind."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    # an error located in the loop is named by the type of what went wrong there
    shown = exc.__cause__ if getattr(exc, "phase", None) and exc.__cause__ is not None else exc
    record = {
        "rank": rank,
        "step": getattr(exc, "step", None),
        "phase": getattr(exc, "phase", None),
        "message": f"{type(shown).__name__}: {exc}",
        "kind": kind,
    }
    extra = {"py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))}  # torchrun reads both
    message = {"message": record["message"], "extraInfo": extra}
    write_atomic(Path(path), json.dumps({"message": message, "shardwise": record}))


def refuse_unreachable_master() -> None:
    """The worker's first act: a MASTER_ADDR the other hosts cannot reach ends this rank
    with one line and exit status 2, as any other mistake of the user's would."""
    try:
        check_master_reachable()
    except ShardwiseError as e:
        rank = int(os.environ.get("RANK", "0"))
        record_error(e, rank, procs.USAGE)
        if not os.environ.get(procs.LAUNCHED_ENV):
            print(f"shardwise: rank {rank}: {e}", file=sys.stderr)
        procs.exit_now(EXIT_USAGE)
