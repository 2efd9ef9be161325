"""Small helpers for the processes the project starts (workers, benchmark and probe
ranks): a free port for a store, and a quick exit. Nothing here imports torch, and
nothing here imports the launcher or the worker, so every layer may use it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_working_folder() -> None:
    """Put the working folder on the import path, as `python -m` does: an import path the
    user names (their model) is found from where they run, whatever started the process
    (the `shardwise` script, torchrun, the Python API)."""
    here = os.getcwd()
    if "" not in sys.path and here not in sys.path:
        sys.path.insert(0, here)


def exit_now(code: int) -> None:
    """End the process without interpreter finalisation. Gloo's worker threads can
    still hold tensors when Python tears down, and freeing them then aborts the
    process (SIGABRT, "terminate called without an active exception") even after
    destroy_process_group; see pytorch/pytorch#179291. Everything we write is
    closed and flushed by now."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# the launcher's side of the worker's contract (launch.py sets them, worker.py reads them;
# torchrun sets none of them)
LAUNCHED_ENV = "SHARDWISE_LAUNCHED"  # the launcher prints the one-line error itself
LAUNCH_TIME_ENV = "SHARDWISE_LAUNCH_TIME"  # when the job's first attempt started
PLACEMENT_ENV = "SHARDWISE_PLACEMENT"  # the launcher's words for where the ranks run
FAULT_ENV = "SHARDWISE_FAULT"  # faults to inject (train/faults.py)
ATTEMPT_ENV = "SHARDWISE_ATTEMPT"  # 0, then one more on each restart
SECRET_ENV = "SHARDWISE_JOB_SECRET"  # the rendezvous's secret (rendezvous.py), fresh for every start of the ranks
PEER_ENV = "SHARDWISE_PEER"  # 1: a rank that loses a peer holds its state for the restarted ranks (peer_state.py)
HOST_ADDR_ENV = "SHARDWISE_HOST_ADDR"  # the address of the rank's host, where it serves its state
SURVIVORS_ENV = "SHARDWISE_SURVIVORS"  # addr:port,... of the ranks a failure left alive, holding their state
SURVIVORS_SECRET_ENV = "SHARDWISE_SURVIVORS_SECRET"  # the secret of the start those ranks belong to
PEER_SUFFIX = ".peer"  # beside a rank's error file: where it serves its state
HELD_SUFFIX = ".held"  # ... and there once it lost a peer and holds its state, its error recorded
JOB_ENV = "SHARDWISE_JOB"  # words:TOP runs `shardwise words`, serve:RUN `serve --nproc`; unset, the ranks train


def job_kind(env: dict[str, str] | None) -> str:
    """What the ranks of a launch with this environment run: train, words or serve."""
    return ((env or {}).get(JOB_ENV) or "train").split(":")[0]


# what a rank's error record says of its error (worker.py writes it, launch.py reads it)
USAGE, OWN, PEER_LOST, TIMED_OUT = "usage", "error", "peer-lost", "timed-out"


def die_with_launcher(launcher: int) -> None:
    """In a rank, before it runs: the kernel kills it (SIGKILL) when the launcher's thread that
    started it ends, so no rank outlives a launcher that was killed (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing). `launcher`: its pid, checked after, in case it
    ended before."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher:
        os._exit(1)


def ranks_under(parent: int) -> dict[int, int]:
    """The training or serving ranks `parent` (a launcher) runs now: {RANK: pid}, read from
    /proc (Linux): a fresh interpreter by the environment it started with (the link probe's
    processes are not ranks), a forked one by its name (`forked_name`)."""
    found: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
            name = (proc / "comm").read_text().strip()
        except (OSError, ValueError, IndexError):
            continue
        if "TORCHELASTIC_RUN_ID" in env and "RANK" in env:
            found[int(env["RANK"])] = int(proc.name)
        elif (rank := forked_rank(name)) is not None:
            found[rank] = int(proc.name)
    return found


def forked_name(rank: int) -> str:
    """A forked rank's process name as `top` shows it (15 bytes at most): shardwise-rankN,
    shardwise-rN from rank 10."""
    return f"shardwise-rank{rank}" if rank < 10 else f"shardwise-r{rank}"


def forked_rank(name: str) -> int | None:
    """The rank a process named `name` by `forked_name` is (None: not such a name)."""
    for prefix in ("shardwise-rank", "shardwise-r"):
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            return int(name[len(prefix) :])
    return None


STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL after this long


def stop_ranks(procs: list, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM to every rank process still running, SIGKILL to those left after `grace`."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def process_state(pid: int) -> str:
    """The process state letter from /proc (T: stopped), or '' where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def read_exactly(sock: socket.socket, n: int) -> bytes:
    """`n` bytes from `sock`, or ConnectionError where the peer closes first."""
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
