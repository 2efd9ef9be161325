"""Ranks started by forking the launcher, which has imported torch already: a rank then
starts in milliseconds instead of the seconds a fresh interpreter spends importing torch
(on a machine with fewer cores than ranks, those imports queue behind one another).

Forking is safe only where the launcher is in a state a rank can start from: the
`shardwise` command's own process (not a user's Python calling the API), on Linux, with a
CPU-only torch (a CUDA driver does not survive a fork) and no other Python thread (a
lock another thread held would stay held in the child). Elsewhere, and with
SHARDWISE_START=spawn, ranks are fresh interpreters (`python -m shardwise.worker`), as
torchrun starts them. On the emulated cluster a forked rank first enters its host: the
host's network namespace and a UTS namespace of its own with the host's name, as
`ip netns exec NS unshare --uts` would have started it (`enter_host`). The forked rank
sets itself up as a fresh one would be: its own environment, its name (as `top` shows it:
`shardwise-rankN`, procs.forked_name), the signal dispositions a fresh Python has (signals
are held from the fork until they are set), one compute thread, the working folder first
on the import path; then it runs `shardwise.worker` as `python -m` would, which leaves by
`os._exit`, so nothing of the launcher's runs at its exit.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import traceback

from shardwise.procs import die_with_launcher, forked_name

START_ENV = "SHARDWISE_START"  # "spawn": every rank a fresh interpreter
_ALLOWED = False  # set by the command line's own process (`allow`): not in a user's Python


def allow() -> None:
    """This process is the `shardwise` command's launcher, whose state a rank may start from
    (a user's own process, calling the API, keeps fresh interpreters: its grad mode, open
    files and handlers are not a rank's)."""
    global _ALLOWED
    _ALLOWED = True


def can_fork() -> bool:
    """Whether ranks can be forked from this process now: the command's launcher, on Linux,
    with a CPU-only build of torch imported (a CUDA driver does not survive a fork, and
    asking whether there is a GPU may start it), and no other Python thread."""
    if not _ALLOWED or os.environ.get(START_ENV) == "spawn" or not sys.platform.startswith("linux"):
        return False
    torch = sys.modules.get("torch")
    if torch is None or torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None:
        return False
    return threading.active_count() == 1


# Python ignores these at start (a closed socket is an error to handle, not a death)
_IGNORED = tuple(getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, name))
_DEFAULT = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def fresh_signals(mask: set) -> None:
    """In a child forked with every signal held: the dispositions a fresh Python has, then
    `mask` (what was held before the fork) again."""
    for signum in _DEFAULT:
        signal.signal(signum, signal.SIG_DFL)
    for signum in _IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class ForkedRank:
    """One rank forked from this process, with the part of `subprocess.Popen`'s interface
    the launcher uses (pid, returncode, poll, wait, send_signal, kill)."""

    def __init__(self, config_path: str, env: dict[str, str], *, quiet: bool, host: tuple[str, str] | None = None):
        sys.stdout.flush()
        sys.stderr.flush()
        self.returncode: int | None = None
        # no signal is handled between the fork and the child's own handlers: the
        # launcher's would run in the child (and its clean-up with them)
        every = set(signal.valid_signals())
        before = signal.pthread_sigmask(signal.SIG_BLOCK, every)
        launcher = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                die_with_launcher(launcher)
                if host is not None:
                    enter_host(*host)
                fresh_signals(before)
                _run_rank(config_path, env, quiet)  # never returns
            except OSError as e:
                print(f"shardwise: rank {env.get('RANK', '')}: {e}", file=sys.stderr, flush=True)
            finally:
                os._exit(1)
        signal.pthread_sigmask(signal.SIG_SETMASK, before)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"rank process {self.pid}", timeout)
            time.sleep(0.005)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


CLONE_NEWUTS, CLONE_NEWNET = 0x04000000, 0x40000000


def enter_host(namespace: str, hostname: str) -> None:
    """In a forked rank, before anything else: the network namespace at the path `namespace`
    (one of `ip netns`'s), then a UTS namespace of its own named `hostname` (root only, as
    the emulated cluster is). A step that fails ends the rank with its reason."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(namespace, os.O_RDONLY | os.O_CLOEXEC)
    try:
        steps = [
            ("setns", lambda: libc.setns(fd, CLONE_NEWNET)),
            ("unshare", lambda: libc.unshare(CLONE_NEWUTS)),
            ("sethostname", lambda: libc.sethostname(hostname.encode(), len(hostname.encode()))),
        ]
        for name, step in steps:
            if step() != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"{name} for host {hostname} ({namespace}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def _run_rank(config_path: str, env: dict[str, str], quiet: bool) -> None:
    code = 1
    try:
        os.environ.clear()
        os.environ.update(env)
        _name(forked_name(int(env.get("RANK", "0"))))
        if quiet:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.close(null)
        # the import path of `python -m`: the working folder, then PYTHONPATH's
        extra = [os.getcwd(), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        sys.path[:0] = [p for p in extra if p not in sys.path]
        import torch

        torch.set_num_threads(1)  # before any work: the launcher's thread pool did not come along
        sys.argv = ["shardwise.worker", config_path]
        runpy.run_module("shardwise.worker", run_name="__main__", alter_sys=True)  # as `python -m` runs it
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - a rank reports and leaves, whatever happened
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _name(title: str) -> None:
    """The process's name as `top` and /proc/PID/comm show it (15 bytes; its command line
    stays the launcher's)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, ctypes.c_char_p(title.encode()[:15]), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
