"""Start N local workers the way torchrun would, supervise them, stop them all together.

Each worker is `python -m shardwise.worker CONFIG` with torchrun's environment
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...), so the same
entry point runs under torchrun across machines. When one rank fails, the
others are stopped within seconds and the job ends with that rank's error in
one line. Nothing here imports torch: a bad config fails in a blink.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shardwise.config import Config, to_toml
from shardwise.data.features import vertical_parts
from shardwise.data.sampler import check_batch_layout
from shardwise.data.sources import check_source
from shardwise.errors import EXIT_USAGE, ShardwiseError
from shardwise.topology import ParallelDims

STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL after this long
POLL_S = 0.05
SETTLE_S = 0.25


@dataclass
class RankFailure:
    rank: int
    exit_code: int
    message: str
    traceback: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preflight(cfg: Config, nproc: int) -> ParallelDims:
    """Every check that needs no worker: layout, batch split, data paths."""
    dims = ParallelDims.resolve(cfg.parallel, nproc, vertical=cfg.data.vertical, ps_servers=cfg.ps.servers)
    check_batch_layout(
        global_batch=cfg.train.batch_size,
        grad_accum=cfg.train.grad_accum,
        dp=dims.dp,
        shards=cfg.data.shards,
        microbatches=dims.microbatches,
    )
    check_source(cfg.data)
    vertical_parts(cfg.data)
    ps = cfg.ps
    if dims.servers and ps.slow_factor > 1.0 and not (ps.slow_worker == -1 or dims.servers <= ps.slow_worker < nproc):
        raise ShardwiseError(
            "ps.slow_worker", f"={ps.slow_worker}: not a worker, those are ranks {dims.servers} to {nproc - 1}"
        )
    return dims


def expendable_ranks(cfg: Config, dims: ParallelDims) -> set[int]:
    """Ranks whose loss the job survives: the workers of an asynchronous parameter server."""
    if dims.servers and cfg.ps.asynchronous:
        return set(range(dims.servers, dims.world_size))
    return set()


def prepare_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ShardwiseError("out", f"{str(out)!r} exists and is not an empty folder")


def _read_error(path: Path) -> tuple[str, str]:
    """The message and traceback a worker recorded (torchelastic's error-file format)."""
    try:
        msg = json.loads(path.read_text())["message"]
        return msg["message"], msg.get("extraInfo", {}).get("py_callstack", "")
    except (OSError, ValueError, KeyError, TypeError):
        return "", ""


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# what a rank reports when a peer vanished under a collective: fallout, not the cause
PEER_LOST = re.compile(r"gloo/transport|Connection (closed|reset) by peer|DistNetworkError|Broken pipe|NCCL")


def _origin(failures: list[RankFailure]) -> RankFailure:
    """Of ranks seen failing together, the one that caused it: a rank with its own
    error first, then a rank that died without a word (killed, crashed, exited),
    and only then a rank that merely lost its peers."""

    def rank_of(f: RankFailure) -> int:
        if f.message and not PEER_LOST.search(f.message):
            return 0
        return 1 if not f.message else 2

    origin = min(failures, key=rank_of)
    if not origin.message:
        origin.message = f"exited with status {origin.exit_code}"
    return origin


def supervise(
    procs: list[subprocess.Popen], error_files: list[Path], expendable: set[int] | None = None
) -> RankFailure | None:
    """Wait for all ranks; at the first failure stop the rest and return it. An
    `expendable` rank that fails is reported in a line and the others go on."""
    survived: set[int] = set()
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0) and r not in survived]
        if failed:
            # the cause may have died a moment before its fallout: let both be seen
            time.sleep(SETTLE_S)
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0) and r not in survived]
            if set(failed) <= (expendable or set()):
                for r in failed:
                    lost = _origin([RankFailure(r, codes[r], *_read_error(error_files[r]))])
                    print(
                        f"shardwise: rank {r} (a worker) failed (exit {lost.exit_code}): {lost.message}; "
                        "the servers carry on without it",
                        file=sys.stderr,
                    )
                survived.update(failed)
                continue
            _stop(procs)
            failures = [RankFailure(r, codes[r], *_read_error(error_files[r])) for r in failed]
            return _origin(failures)
        if all(c == 0 or r in survived for r, c in enumerate(codes)):
            return None
        time.sleep(POLL_S)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # a SIGTERM to the launcher stops the workers as Ctrl-C does


def launch(cfg: Config, *, nproc: int, out: Path) -> int:
    """Run the job on `nproc` local workers; returns the exit status."""
    launch_time = time.time()
    signal.signal(signal.SIGTERM, _terminate)
    dims = preflight(cfg, nproc)
    prepare_out_dir(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    cfg.run.out = str(out.resolve())
    config_path = out / "config.toml"
    config_path.write_text(to_toml(cfg))

    err_dir = Path(tempfile.mkdtemp(prefix="shardwise-errors-"))
    error_files = [err_dir / f"rank{r}.json" for r in range(nproc)]
    port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(nproc):
            env = {
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "GROUP_RANK": "0",
                "ROLE_RANK": str(rank),
                "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc),
                "ROLE_WORLD_SIZE": str(nproc),
                "ROLE_NAME": "default",
                "TORCHELASTIC_RUN_ID": f"shardwise-{port}",
                "TORCHELASTIC_ERROR_FILE": str(error_files[rank]),
                "OMP_NUM_THREADS": "1",
                "SHARDWISE_LAUNCHED": "1",
                "SHARDWISE_LAUNCH_TIME": repr(launch_time),
            }
            procs.append(subprocess.Popen([sys.executable, "-m", "shardwise.worker", str(config_path)], env=env))
        failure = supervise(procs, error_files, expendable_ranks(cfg, dims))
    except KeyboardInterrupt:
        _stop(procs)
        print(f"shardwise: interrupted; all {nproc} ranks stopped", file=sys.stderr)
        return 130
    finally:
        _stop(procs)
        shutil.rmtree(err_dir, ignore_errors=True)

    if failure is None:
        return 0
    if failure.exit_code == EXIT_USAGE:
        if created:  # a user error found only by a worker: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        message = failure.message.removeprefix(f"{ShardwiseError.__name__}: ")
        print(f"shardwise: rank {failure.rank}: {message}", file=sys.stderr)
        return EXIT_USAGE
    note = ""
    if failure.traceback:
        log = out / "logs" / f"rank{failure.rank}-traceback.txt"
        log.parent.mkdir(exist_ok=True)
        log.write_text(failure.traceback)
        note = f" (traceback: {log})"
    print(f"shardwise: rank {failure.rank} failed (exit {failure.exit_code}): {failure.message}{note}", file=sys.stderr)
    return 1
