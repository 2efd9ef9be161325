"""`shardwise ARGS` as a process of its own, forked from the test process.

The console script `shardwise` runs `sys.exit(shardwise.cli.main())` with ARGS in
sys.argv; so does the child here, once its working folder, environment, argv, stdin
(/dev/null), stdout and stderr (pipes), signal handlers and process group are set as a
fresh process would have them. What it keeps of the test process: the modules imported
already (torch, and torch._dynamo, which DDP imports when it is built: a fresh
`shardwise` spends about 4 s of CPU on them before it does anything, and the suite runs
a hundred commands), their state, and the import path (the checkout and tests/). Its
ranks are forked from it as the command's own, even where the test process had helper
threads (the process pool's queue feeders: the child has none of them, and touches
nothing they guard). What a test sees is what it would see of a fresh process: the exit
status (negative for a signal), stdout, stderr and the files written; a timeout kills
the child's process group (its ranks; a measuring run of the planner's own session is
left to its own timeout). tests/test_cli.py runs the console script itself, fresh.
"""

from __future__ import annotations

import gc
import io
import os
import selectors
import signal
import subprocess
import sys
import time
import traceback


def _child(args: list[str], env: dict[str, str], cwd: str | None, out: int, err: int, mask: set) -> None:
    code = 1
    try:
        os.setpgid(0, 0)  # its ranks join its group, which a timeout kills whole
        null = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 -- the child's for its life
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        from shardwise.forked import fresh_signals

        fresh_signals(mask)  # held since the fork: none reached pytest's handlers (SIGPIPE ignored, as Python does)
        os.environ.clear()
        os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        sys.argv = ["shardwise", *args]
        from shardwise.cli import main

        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def run(
    args: list[str], *, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`shardwise *args` with this environment (default: this process's) in cwd: its
    exit status, stdout and stderr, as subprocess.run(capture_output=True, text=True)."""
    import torch._dynamo  # noqa: F401 -- imported once here rather than in every command

    import shardwise.cli  # noqa: F401

    environment = dict(os.environ if env is None else env)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    gc.collect()
    gc.freeze()  # the child's first collection would otherwise copy every inherited page
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.valid_signals()))
    try:
        pid = os.fork()
        if pid == 0:
            os.close(out_r)
            os.close(err_r)
            _child(list(args), environment, None if cwd is None else str(cwd), out_w, err_w, mask)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        gc.unfreeze()
    try:
        os.setpgid(pid, pid)  # as the child does itself: whichever comes first
    except (PermissionError, ProcessLookupError):
        pass  # the child has set it (and may have run already)
    os.close(out_w)
    os.close(err_w)
    try:
        stdout, stderr = _read_until_closed(out_r, err_r, deadline=time.monotonic() + timeout)
    except BaseException as e:  # a timeout, or the test interrupted: nothing of the child is left running
        _kill(pid)
        if isinstance(e, TimeoutError):
            raise subprocess.TimeoutExpired(["shardwise", *args], timeout) from None
        raise
    _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(["shardwise", *args], os.waitstatus_to_exitcode(status), stdout, stderr)


def _read_until_closed(out: int, err: int, *, deadline: float) -> tuple[str, str]:
    """Both pipes, read until every writer (the child and its ranks) has closed them; each
    pipe is closed here once, whatever happens."""
    chunks: dict[int, list[bytes]] = {out: [], err: []}
    with selectors.DefaultSelector() as selector:
        for fd in chunks:
            selector.register(fd, selectors.EVENT_READ)
        try:
            while selector.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                for key, _ in selector.select(min(left, 1.0)):
                    data = os.read(key.fd, 65536)
                    if data:
                        chunks[key.fd].append(data)
                    else:
                        selector.unregister(key.fd)
                        os.close(key.fd)
        finally:
            for key in list(selector.get_map().values()):
                selector.unregister(key.fd)
                os.close(key.fd)
    return tuple(b"".join(chunks[fd]).decode("utf-8", "replace") for fd in (out, err))


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
