"""Start N workers the way torchrun would, supervise them, stop them all together.

Each worker is `python -m shardwise.worker CONFIG` with torchrun's environment
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...), so the same
entry point runs under torchrun across machines. When one rank fails, the
others are stopped within seconds and the job ends with that rank's error in
one line. Nothing here imports torch: a bad config fails in a blink.
"""

from __future__ import annotations

import gc
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from shardwise import hangs
from shardwise import procs as contract  # its name, since `procs` names the rank processes here
from shardwise.checkpoint.manifest import latest_checkpoint
from shardwise.cluster.placement import Placement
from shardwise.config import Config
from shardwise.config_toml import to_toml
from shardwise.elastic import Elastic, Regrow, cut_off, shrink
from shardwise.errors import EXIT_USAGE, ShardwiseError
from shardwise.files import write_atomic
from shardwise.forked import ForkedRank, can_fork
from shardwise.preflight import (
    expendable_ranks,
    layout_fits,
    preflight,
    prepare_out_dir,
    warn_oversubscribed,
    words_preflight,
)
from shardwise.topology import ParallelDims

STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL after this long
POLL_S = 0.05
SETTLE_S = 0.25


@dataclass
class RankFailure:
    rank: int
    exit_code: int
    message: str = ""
    traceback: str = ""
    kind: str = ""  # the rank's record: usage, error, peer-lost or timed-out ("": it left none)
    step: int | None = None  # where the rank was, if it was in the loop
    phase: str | None = None

    @property
    def fallout(self) -> bool:
        """The rank failed because a peer vanished or stopped answering."""
        return self.kind in (contract.PEER_LOST, contract.TIMED_OUT)


def _failure(rank: int, exit_code: int, path: Path) -> RankFailure:
    """What a failed rank recorded in its error file (worker.py: torchelastic's format,
    our record beside it); a rank that died without a word recorded nothing."""
    try:
        data = json.loads(path.read_text())
        record, callstack = data["shardwise"], data["message"]["extraInfo"]["py_callstack"]
    except (OSError, ValueError, KeyError, TypeError):
        return RankFailure(rank, exit_code)
    return RankFailure(
        rank, exit_code, record["message"], callstack, record["kind"], record.get("step"), record.get("phase")
    )


def _stop(procs: list[subprocess.Popen], grace: float = STOP_GRACE_S) -> None:
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


def _origin(failures: list[RankFailure]) -> RankFailure:
    """Of ranks seen failing together, the one that caused it: a rank with its own
    error first, then a rank that died without a word (killed, crashed, exited),
    and only then a rank that merely lost its peers or timed out waiting for them."""

    def rank_of(f: RankFailure) -> int:
        if f.kind and not f.fallout:
            return 0
        return 1 if not f.kind else 2

    origin = min(failures, key=rank_of)
    if not origin.message:
        origin.message = f"exited with status {origin.exit_code}"
    return origin


STALLED = -1000  # RankFailure.exit_code of a rank that stopped answering (it did not exit)
REGROW = -1001  # ... of an elastic job stopped to grow back onto hosts that returned


def _state(pid: int) -> str:
    """The process state letter from /proc (T: stopped), or '' where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _stalled(procs: list[subprocess.Popen], failures: list[RankFailure]) -> RankFailure | None:
    """The rank that stopped answering, when every failure is a timeout or a lost peer.

    A rank still alive while the others gave up (stopped, or stuck) is the one; if
    every rank exited, the one whose position differs from the others' (it skipped
    a collective and ran ahead)."""
    if not failures or not all(f.fallout for f in failures):
        return None
    where = [f for f in failures if f.step is not None]
    detail = f" in {where[0].phase} of step {where[0].step}" if where else ""
    names = [str(f.rank) for f in failures]
    waited = f"rank {names[0]}" if len(names) == 1 else f"ranks {', '.join(names[:-1])} and {names[-1]}"
    alive = [r for r, p in enumerate(procs) if p.poll() is None]
    stopped = [r for r in alive if _state(procs[r].pid) == "T"]
    if stopped or alive:
        how = "its process is stopped" if stopped else "it never reached the collective"
        message = f"stopped answering ({how}): {waited} timed out waiting for it{detail}"
        return RankFailure((stopped or alive)[0], STALLED, message, "")
    positions = {f.rank: (f.step, f.phase) for f in where}
    if len(set(positions.values())) > 1:
        counts: dict = {}
        for pos in positions.values():
            counts[pos] = counts.get(pos, 0) + 1
        odd = [r for r, pos in positions.items() if counts[pos] == 1]
        culprit = max(odd, key=lambda r: positions[r][0])  # on a tie, the one that ran ahead
        others = sorted({pos for r, pos in positions.items() if r != culprit})
        step, phase = others[0]
        message = (
            "skipped a collective or called it out of order: "
            f"it was at step {positions[culprit][0]} ({positions[culprit][1]}) "
            f"while the others waited in {phase} of step {step}"
        )
        return RankFailure(culprit, STALLED, message, "")
    return None


def supervise(
    procs: list, error_files: list[Path], expendable: set | None = None, stop=None, regrow=None
) -> RankFailure | None:
    """Wait for all ranks; at the first failure stop the rest and return it. An
    `expendable` rank that fails is reported in a line and the others go on. `stop`, once
    set: the ranks are stopped, and that is no failure."""
    survived: set[int] = set()
    while True:
        if stop is not None and stop.is_set():
            _stop(procs)
            return None
        if regrow is not None and regrow():
            _stop(procs)
            return RankFailure(-1, REGROW, "every host is back")
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0) and r not in survived]
        if failed:
            # the cause may have died a moment before its fallout: let both be seen
            time.sleep(SETTLE_S)
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0) and r not in survived]
            if set(failed) <= (expendable or set()):
                for r in failed:
                    lost = _origin([_failure(r, codes[r], error_files[r])])
                    print(
                        f"shardwise: rank {r} (a worker) failed (exit {lost.exit_code}): {lost.message}; "
                        "the servers carry on without it",
                        file=sys.stderr,
                    )
                survived.update(failed)
                continue
            failures = [_failure(r, codes[r], error_files[r]) for r in failed]
            stalled = _stalled(procs, failures)
            _stop(procs)
            return stalled or _origin(failures)
        if all(c == 0 or r in survived for r, c in enumerate(codes)):
            return None
        time.sleep(POLL_S)


def _interrupted(env: dict[str, str] | None, nproc: int) -> int:
    """Ctrl-C or SIGTERM: how a server is meant to stop (0), a training job's interruption (130)."""
    if contract.job_kind(env) == "serve":
        print("shardwise serve: stopped", file=sys.stderr)
        return 0
    print(f"shardwise: interrupted; all {nproc} ranks stopped", file=sys.stderr)
    return 130


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # a SIGTERM to the launcher stops the workers as Ctrl-C does


def launch(
    cfg: Config,
    *,
    nproc: int,
    out: Path,
    max_restarts: int = 0,
    resuming: bool = False,
    placement: Placement | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    env: dict[str, str] | None = None,
    stop: threading.Event | None = None,
    elastic: Elastic | None = None,
) -> int:
    """Run the job on `nproc` workers placed by `placement` (default: this machine), restarting
    all from the newest complete checkpoint up to `max_restarts` times; the exit status.
    `quiet`: the ranks' output dropped, a failure's line kept. `env`: more environment for the
    workers (procs.JOB_ENV: `words` or `serve` ranks). `stop`: an Event another thread sets to
    stop the ranks (launch then runs in a thread, where SIGTERM is not its to handle)."""
    placement = placement or Placement()
    launch_time = time.time()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    dims = (words_preflight if contract.job_kind(env) == "words" else preflight)(cfg, nproc)
    if not quiet:
        warn_oversubscribed(nproc)
    if max_restarts < 0:
        raise ShardwiseError("max-restarts", f"must be >= 0, got {max_restarts}")
    if not resuming:
        prepare_out_dir(out, overwrite=overwrite)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    cfg.run.out = str(out.resolve())
    write_atomic(out / "config.toml", to_toml(cfg, saved=True))
    err_dir = Path(tempfile.mkdtemp(prefix="shardwise-errors-"))
    full, restarts, attempt = placement, 0, 0
    try:
        while True:
            config_path = err_dir / f"attempt-{attempt}.toml"
            config_path.write_text(to_toml(cfg))
            regrow = Regrow(full, placement, out / "checkpoints") if elastic else None
            failure = _run_once(
                cfg, dims, nproc, config_path, err_dir / f"attempt-{attempt}", attempt, launch_time, placement, quiet,
                env or {}, stop, regrow,
            )  # fmt: skip
            attempt += 1
            stopping = stop is not None and stop.is_set()
            if failure is None or failure.exit_code == EXIT_USAGE or stopping:
                break
            if failure.exit_code != REGROW and restarts == max_restarts:
                break
            restarts += failure.exit_code != REGROW
            placement, nproc, dims = _go_on(cfg, out, failure, placement, full, nproc, elastic, launch_time, restarts,
                                            max_restarts)  # fmt: skip
    except KeyboardInterrupt:
        return _interrupted(env, nproc)
    finally:
        shutil.rmtree(err_dir, ignore_errors=True)

    if failure is None:
        return 0
    if failure.exit_code == EXIT_USAGE:
        # a user error found only by a worker: leave nothing behind, but never a checkpoint
        # (a restart refused after some were written)
        if created and not any((out / "checkpoints").glob("step-*")):
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
    after = f", after {restarts} restart{'s' * (restarts > 1)}" if restarts else ""
    what = "" if failure.exit_code == STALLED else f"failed (exit {failure.exit_code}): "
    print(f"shardwise: rank {failure.rank} {what}{failure.message}{note}{after}", file=sys.stderr)
    return 1


def _go_on(cfg, out, failure, placement, full, nproc, elastic, launch_time, restarts, max_restarts):
    """After a failure (or a stop to grow back): the placement, ranks and layout the job goes on
    with, from its newest checkpoint, said in one line."""
    # only a checkpoint this job wrote: a run resumed from an older step must not
    # restart from the newer checkpoints of the trajectory it left
    checkpoint = latest_checkpoint(out / "checkpoints", since=launch_time)
    cfg.run.resume = str(checkpoint) if checkpoint else cfg.run.resume
    origin = checkpoint.name if checkpoint else (cfg.run.resume or "the start")
    if failure.exit_code == REGROW:
        nproc = elastic.max_ranks
        print(f"shardwise: every host is back: growing to {nproc} ranks from {origin}", file=sys.stderr)
        return full, nproc, preflight(cfg, nproc)
    note = ""
    if elastic:
        placement, nproc, note = shrink(placement, nproc, elastic, lambda n: _fits(cfg, n))
    what = "" if failure.exit_code == STALLED else f"failed (exit {failure.exit_code}): "
    again = f"{note + '; ' if note else ''}restart {restarts} of {max_restarts} from {origin}"
    print(f"shardwise: rank {failure.rank} {what}{failure.message}; {again}", file=sys.stderr)
    return placement, nproc, preflight(cfg, nproc)


def _fits(cfg: Config, nproc: int) -> bool:
    try:
        layout_fits(cfg, nproc)  # (the data, key and code were checked at the start: the same for any size)
    except ShardwiseError:
        return False
    return True


def _run_once(
    cfg: Config,
    dims: ParallelDims,
    nproc: int,
    config_path: Path,
    err_dir: Path,
    attempt: int,
    launch_time: float,
    placement: Placement,
    quiet: bool = False,
    extra_env: dict[str, str] | None = None,
    stop: threading.Event | None = None,
    regrow=None,
) -> RankFailure | None:
    """Start every rank, supervise them, stop them all; the failure that ended it, if any."""
    err_dir.mkdir()
    error_files = [err_dir / f"rank{r}.json" for r in range(nproc)]
    port, secret = contract.free_port(), secrets.token_hex(32)
    procs: list[subprocess.Popen | ForkedRank] = []
    fork = can_fork()
    if fork:
        _before_forking(dims)
    try:
        for rank in range(nproc):
            env = {
                **os.environ,
                **(extra_env or {}),
                **placement.env(rank, nproc, port),
                "TORCHELASTIC_RUN_ID": f"shardwise-{port}-{attempt}",
                "TORCHELASTIC_ERROR_FILE": str(error_files[rank]),
                contract.LAUNCHED_ENV: "1",
                contract.LAUNCH_TIME_ENV: repr(launch_time),
                contract.ATTEMPT_ENV: str(attempt),
                contract.SECRET_ENV: secret,
                contract.PLACEMENT_ENV: placement.describe(nproc),
                "TORCH_FR_BUFFER_SIZE": os.environ.get("TORCH_FR_BUFFER_SIZE", hangs.RING_SIZE),  # hangs.py
            }
            fresh = [sys.executable, "-m", "shardwise.worker", str(config_path)]
            argv = placement.argv(rank, fresh)
            if fork and argv == fresh:  # a local rank: forked, torch already imported (forked.py)
                procs.append(ForkedRank(str(config_path), env, quiet=quiet))
            else:
                procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL if quiet else None))
        failure = supervise(procs, error_files, expendable_ranks(cfg, dims), stop, regrow)
        explained = hangs.explain(failure, err_dir, Path(cfg.run.out) if cfg.run.out else None, stalled=STALLED)
        # a host cut off: its ranks' rings would show them behind, as if they skipped a call. Only
        # for a rank that waited, stalled or died without a word: its own error says why
        waited = explained is not None and (explained.fallout or explained.exit_code == STALLED or not explained.kind)
        if not waited or explained.exit_code in (REGROW, EXIT_USAGE):
            return explained
        cut = cut_off(placement, nproc)
        return RankFailure(cut[0], STALLED, cut[1], "") if cut else explained
    finally:
        gc.unfreeze()  # the ranks keep their copy frozen; this process collects its own again
        _stop(procs)


def _before_forking(dims: ParallelDims) -> None:
    """Make forked ranks start fast. DDP, FSDP2 and torch's pipelining import torch._dynamo
    when built: 1.5 to 4 s of CPU in every rank, queued where ranks outnumber cores, so it is
    imported once here. Then the garbage collector's objects are frozen: a child's first
    collection would otherwise touch every inherited object and copy all of their pages
    (Python's gc.freeze notes). 2 ranks on 2 cores started and ended 2 s sooner, 4 ranks 4 s."""
    if not dims.servers and (dims.dp > 1 or dims.pp > 1):
        import torch._dynamo  # noqa: F401
    gc.freeze()
