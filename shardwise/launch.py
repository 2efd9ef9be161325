"""Start N workers the way torchrun would, supervise them, stop them all together.

Each worker is `python -m shardwise.worker CONFIG` with torchrun's environment
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...), so the same
entry point runs under torchrun across machines. When one rank fails, the
others are stopped within seconds and the job ends with that rank's error in
one line. Nothing here imports torch: a bad config fails in a blink.
"""

from __future__ import annotations

import functools
import gc
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from shardwise import hangs
from shardwise import procs as contract  # its name, since `procs` names the rank processes here
from shardwise.checkpoint.manifest import latest_checkpoint
from shardwise.cluster.placement import Placement
from shardwise.config import Config
from shardwise.config_toml import to_toml
from shardwise.elastic import Elastic, Regrow, cut_off, shrink
from shardwise.errors import EXIT_USAGE, ShardwiseError
from shardwise.failures import REGROW, STALLED, RankFailure, cause_of, recorded_failure, stalled_rank
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
from shardwise.survivors import Survivors, could_serve, held
from shardwise.topology import ParallelDims

POLL_S = 0.05
SETTLE_S = 0.25


def supervise(
    procs: list,
    error_files: list[Path],
    expendable: set | None = None,
    stop=None,
    regrow=None,
    spare=False,
    leftover=None,
) -> RankFailure | None:
    """Wait for all ranks; at the first failure stop the rest and return it. An
    `expendable` rank that fails is reported in a line and the others go on. `stop`, once
    set: the ranks are stopped, and that is no failure. `spare`: the ranks that could serve
    their state after a failure are left running (survivors.py picks among them once the cause
    is known); `leftover`: those of the start before, stopped once these ranks took their state."""
    survived: set[int] = set()
    while True:
        if leftover is not None and leftover.taken(error_files):
            leftover.stop()
            leftover = None  # (no more looking for the files each poll)
        if stop is not None and stop.is_set():
            contract.stop_ranks(procs)
            return None
        if regrow is not None and regrow():
            contract.stop_ranks(procs)
            return RankFailure(-1, REGROW, "every host is back")
        failed = _failed(procs, error_files, survived)
        if failed:
            # the cause may have died a moment before its fallout: let both be seen
            time.sleep(SETTLE_S)
            failed = _failed(procs, error_files, survived)
            if set(failed) <= (expendable or set()):
                for r in failed:
                    lost = cause_of([recorded_failure(r, failed[r], error_files[r])])
                    print(
                        f"shardwise: rank {r} (a worker) failed (exit {lost.exit_code}): {lost.message}; "
                        "the servers carry on without it",
                        file=sys.stderr,
                    )
                survived.update(failed)
                continue
            failures = [recorded_failure(r, code, error_files[r]) for r, code in failed.items()]
            culprit = stalled_rank(procs, failures) or cause_of(failures)
            spared = could_serve(procs, error_files) - {culprit.rank} if spare else set()
            contract.stop_ranks([p for r, p in enumerate(procs) if r not in spared])
            return culprit
        if all(p.poll() == 0 or r in survived for r, p in enumerate(procs)):
            return None
        time.sleep(POLL_S)


def _failed(procs: list, error_files: list[Path], survived: set[int]) -> dict[int, int]:
    """The ranks that failed and their exit status: those that exited with another than 0, and
    those alive that recorded an error (they hold their state for the next start: 1)."""
    codes = {r: p.poll() for r, p in enumerate(procs) if r not in survived}
    out = {r: c for r, c in codes.items() if c not in (None, 0)}
    return out | {r: 1 for r in held(procs, error_files) if r not in survived}


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
    full, restarts, attempt, survivors = placement, 0, 0, None
    # ranks that lose a peer hold their state for the next start (survivors.py)
    hold = cfg.train.recovery == "peer" and max_restarts > 0 and contract.job_kind(env) == "train"
    try:
        while True:
            config_path = err_dir / f"attempt-{attempt}.toml"
            config_path.write_text(to_toml(cfg))
            regrow = Regrow(full, placement, out / "checkpoints") if elastic else None
            failure = _run_once(
                cfg, dims, nproc, config_path, err_dir / f"attempt-{attempt}", attempt, launch_time, placement, quiet,
                env or {}, stop, regrow, (hold, survivors),
            )  # fmt: skip
            attempt += 1
            survivors = failure.survivors if failure is not None else None
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
        if survivors is not None:
            survivors.stop()
        shutil.rmtree(err_dir, ignore_errors=True)

    return _ended(failure, out, created=created, restarts=restarts)


def _ended(failure: RankFailure | None, out: Path, *, created: bool, restarts: int) -> int:
    """The job's exit status, and its last line where a rank failed."""
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
    if failure.survivors is not None and failure.survivors.on(placement).procs:
        origin = f"{failure.survivors.words()}, else {origin}"
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
    peer: tuple[bool, Survivors | None] = (False, None),
) -> RankFailure | None:
    """Start every rank, supervise them, stop them all; the failure that ended it, if any.
    `peer`: whether ranks that lose a peer hold their state for the next start (those alive
    then are left running, on the failure), and the survivors of the start before, whose
    state these ranks take."""
    err_dir.mkdir()
    error_files = [err_dir / f"rank{r}.json" for r in range(nproc)]
    port, secret = contract.free_port(), secrets.token_hex(32)
    hold, survivors = peer
    peer_env = {contract.PEER_ENV: "1", **(survivors.env() if survivors else {})} if hold else {}
    procs: list[subprocess.Popen | ForkedRank] = []
    failure = None
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
                contract.HOST_ADDR_ENV: placement.address(rank),
                **peer_env,
                "TORCH_FR_BUFFER_SIZE": os.environ.get("TORCH_FR_BUFFER_SIZE", hangs.RING_SIZE),  # hangs.py
            }
            if fork:  # forked, torch already imported; on the emulated cluster it enters its host (forked.py)
                procs.append(ForkedRank(str(config_path), env, quiet=quiet, host=placement.enter(rank)))
            else:
                procs.append(
                    subprocess.Popen(
                        placement.argv(rank, [sys.executable, "-m", "shardwise.worker", str(config_path)]),
                        env=env,
                        stdout=subprocess.DEVNULL if quiet else None,
                        preexec_fn=functools.partial(contract.die_with_launcher, os.getpid()),
                    )
                )

        failure = supervise(procs, error_files, expendable_ranks(cfg, dims), stop, regrow, hold, survivors)
        failure = _named(failure, cfg, err_dir, placement, nproc)
        if hold and failure is not None and failure.exit_code not in (REGROW, EXIT_USAGE):
            failure.survivors = Survivors.keep(procs, error_files, placement, secret, failure.rank)
        return failure
    finally:
        gc.unfreeze()  # the ranks keep their copy frozen; this process collects its own again
        if survivors is not None:  # those of the start before: their state is taken, or no longer wanted
            survivors.stop()
        kept = failure.survivors.procs.values() if failure is not None and failure.survivors is not None else ()
        contract.stop_ranks([p for p in procs if p not in kept])


def _named(failure: RankFailure | None, cfg: Config, err_dir: Path, placement: Placement, nproc: int):
    """The failure with its cause named: the rings' first disagreement (hangs.py), or a host
    cut off. A host cut off: its ranks' rings would show them behind, as if they skipped a call;
    only for a rank that waited, stalled or died without a word (its own error says why)."""
    explained = hangs.explain(failure, err_dir, Path(cfg.run.out) if cfg.run.out else None, stalled=STALLED)
    waited = explained is not None and (explained.fallout or explained.exit_code == STALLED or not explained.kind)
    if not waited or explained.exit_code in (REGROW, EXIT_USAGE):
        return explained
    cut = cut_off(placement, nproc)
    return RankFailure(cut[0], STALLED, cut[1], "") if cut else explained


def _before_forking(dims: ParallelDims) -> None:
    """Make forked ranks start fast. DDP, FSDP2 and torch's pipelining import torch._dynamo
    when built: 1.5 to 4 s of CPU in every rank, queued where ranks outnumber cores, so it is
    imported once here. Then the garbage collector's objects are frozen: a child's first
    collection would otherwise touch every inherited object and copy all of their pages
    (Python's gc.freeze notes). 2 ranks on 2 cores started and ended 2 s sooner, 4 ranks 4 s."""
    if not dims.servers and (dims.dp > 1 or dims.pp > 1):
        import torch._dynamo  # noqa: F401
    gc.freeze()
