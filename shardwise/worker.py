"""One rank's process: the device, the process group, then the job (job.py), and the exit.

Started by `shardwise train` (local launcher) or by torchrun, which set the same
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m shardwise.worker run.toml

This module (with rank_start.py, its torch-free first steps) is the only one that
reads the launcher's environment (procs.py names it): it hands what it read to the
job as a JobContext. On an error it writes
the rank's record (rank, step, phase, message, kind) beside torchelastic's in
TORCHELASTIC_ERROR_FILE; the launcher reads the record, never the text.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

from shardwise import procs
from shardwise.rank_start import (
    check_master_reachable,
    is_loopback,
    loopback_interface,
    record_error,
    refuse_unreachable_master,
)

if __name__ == "__main__":  # torchrun's entry: an unreachable MASTER_ADDR is said before torch's import
    refuse_unreachable_master()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from shardwise.checkpoint.manifest import latest_checkpoint  # noqa: E402
from shardwise.config import Config, load_config  # noqa: E402
from shardwise.config_toml import to_toml  # noqa: E402
from shardwise.errors import EXIT_USAGE, ShardwiseError  # noqa: E402
from shardwise.files import write_atomic  # noqa: E402
from shardwise.hangs import DUMP_SUFFIX  # noqa: E402
from shardwise.job import JobContext, RunResult, run  # noqa: E402
from shardwise.peer_state import PeerSettings, hold, serving  # noqa: E402
from shardwise.procs import exit_now  # noqa: E402
from shardwise.train.outputs import new_run_dir  # noqa: E402


def context_from_environ() -> JobContext:
    """What the launcher passed in the environment: read here, and only here."""
    launch_time = os.environ.get(procs.LAUNCH_TIME_ENV)
    error_file, peer = os.environ.get("TORCHELASTIC_ERROR_FILE"), None
    if os.environ.get(procs.PEER_ENV) and error_file and os.environ.get(procs.SECRET_ENV):
        peer = PeerSettings(
            announce=error_file + procs.PEER_SUFFIX,
            addr=os.environ.get(procs.HOST_ADDR_ENV, "127.0.0.1"),
            secret=os.environ[procs.SECRET_ENV],
            survivors=tuple(filter(None, os.environ.get(procs.SURVIVORS_ENV, "").split(","))),
            survivors_secret=os.environ.pop(procs.SURVIVORS_SECRET_ENV, ""),
        )
    return JobContext(
        launch_time=float(launch_time) if launch_time else None,
        placement=os.environ.get(procs.PLACEMENT_ENV) or None,
        faults=os.environ.get(procs.FAULT_ENV, ""),
        attempt=int(os.environ.get(procs.ATTEMPT_ENV, "0")),
        peer=peer,
    )


def rank_device() -> torch.device:
    """This rank's GPU where the machine has one for each of its ranks (LOCAL_RANK of
    LOCAL_WORLD_SIZE), else the CPU: ranks never share a GPU, and all ranks of a
    machine take the same kind of device."""
    if torch.cuda.is_available():
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        gpus = torch.cuda.device_count()
        if local_ranks <= gpus:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # a note with the progress, not an error
            print(f"{local_ranks} ranks on this machine and {gpus} GPU(s): the ranks run on the CPU (gloo)")
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """NCCL for GPU tensors; gloo for CPU tensors, which every rank also sends (sizes,
    summaries) on a GPU."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_process_group(backend: str, *, timeout: timedelta) -> None:
    """The job's rendezvous. Started by shardwise's launcher (it hands the ranks a secret):
    a store only the job's ranks may use (rendezvous.py). Otherwise torchrun's env://
    rendezvous, except that a job whose MASTER_ADDR is a loopback address (every rank on this
    machine) keeps every socket on loopback: torch's TCPStore would listen on all interfaces,
    so rank 0 binds the store's socket to MASTER_ADDR itself and hands it over. Either way,
    on loopback gloo (NCCL) binds to the loopback interface."""
    host = os.environ.get("MASTER_ADDR", "")
    ours = bool(os.environ.get(procs.SECRET_ENV))
    if not ours and (not is_loopback(host) or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        dist.init_process_group(backend, timeout=timeout)  # torchrun's agent hosts the store
        return
    if is_loopback(host):
        os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()  # even if the shell names another one
        os.environ["NCCL_SOCKET_IFNAME"] = loopback_interface()
        host = os.environ["MASTER_ADDR"] = "127.0.0.1" if host == "localhost" else host
    if ours:
        from shardwise.rendezvous import init_from_env

        init_from_env(backend, timeout=timeout)
        return
    rank, world, port = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["MASTER_PORT"])
    if rank == 0:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(max(128, world))
        store = dist.TCPStore(host, port, world, is_master=True, timeout=timeout, master_listen_fd=sock.detach())
    else:
        store = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


# what gloo and NCCL say when a peer vanished under a collective: fallout, not the cause
_PEER_LOST = re.compile(r"gloo/transport|Connection (closed|reset) by peer|DistNetworkError|Broken pipe|NCCL")
_TIMED_OUT = re.compile(r"[Tt]imed out|[Tt]imeout")


def error_kind(exc: BaseException) -> str:
    """Whether an error is the user's (usage), this rank's own, or the fallout of a peer
    that vanished (peer-lost) or stopped answering (timed-out)."""
    if isinstance(exc, ShardwiseError):
        return procs.USAGE
    causes, e = [], exc
    while e is not None and all(e is not c for c in causes):  # (a chain that loops ends where it loops)
        causes.append(e)
        e = e.__cause__
    text = " ".join(f"{type(c).__name__}: {c}" for c in causes)
    if any(isinstance(c, dist.DistNetworkError) for c in causes) or _PEER_LOST.search(text):
        return procs.PEER_LOST
    return procs.TIMED_OUT if _TIMED_OUT.search(text) else procs.OWN


def _record_error(exc: BaseException, rank: int) -> None:
    record_error(exc, rank, error_kind(exc))
    try:
        _dump_ring()  # this rank's last collectives (hangs.py)
    except Exception:  # noqa: S110 -- the record of the error matters more than the ring
        pass


def _fr_dump_path() -> Path | None:
    """Where this rank's flight recorder ring goes (beside its error file), where it keeps one."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    return Path(path + DUMP_SUFFIX) if path and os.environ.get("TORCH_FR_BUFFER_SIZE", "0") != "0" else None


def _dump_ring() -> None:
    path = _fr_dump_path()
    if path is not None:
        from torch._C._distributed_c10d import _dump_fr_trace_json

        from shardwise import p2p_ring

        text = _dump_fr_trace_json()
        if p2p_ring.RING:  # sends and receives, which the flight recorder leaves out for gloo
            text = json.dumps({**json.loads(text), "shardwise_p2p": p2p_ring.entries()})
        write_atomic(path, text)


_ON_TERMINATE: list = []  # the handler and the C++ runtime's own, kept alive


def dump_ring_on_terminate() -> None:
    """Dump the ring too where C++ ends the process: gloo raises on a background thread when a
    peer's message has another size than this rank's call (another dtype or shape), and the
    C++ runtime aborts with no Python frame to catch it. The handler dumps the ring (the
    launcher then sees this rank's call beside the culprit's), then runs the runtime's own
    handler, which prints the error and aborts as before."""
    if _fr_dump_path() is None or _ON_TERMINATE:
        return
    import ctypes

    try:
        set_terminate = ctypes.CDLL("libstdc++.so.6")._ZSt13set_terminatePFvvE
    except (OSError, AttributeError):  # another C++ runtime: the ring is only dumped on a Python error
        return
    set_terminate.restype, set_terminate.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    handler_type = ctypes.CFUNCTYPE(None)

    previous: list = []  # the runtime's own handler, set below

    def on_terminate() -> None:
        try:
            _dump_ring()
        except Exception:  # noqa: S110 -- the runtime's own handler still says why
            pass
        if previous[0]:
            handler_type(previous[0])()
        os.abort()

    handler = handler_type(on_terminate)
    previous.append(set_terminate(ctypes.cast(handler, ctypes.c_void_p)))
    _ON_TERMINATE.extend([handler, previous[0], set_terminate])


def restore_terminate() -> None:
    """The C++ runtime's own handler again, before the process group is torn down or the
    process leaves: a gloo thread ending then must not wait for the GIL to dump a ring."""
    if _ON_TERMINATE:
        handler, previous, set_terminate = _ON_TERMINATE
        set_terminate(previous)
        _ON_TERMINATE.clear()


STARTS_KEY, STARTED_KEY = "shardwise/starts", "shardwise/started"  # in torchrun's agent store
FIRST_START = ".torchrun-start.json"  # in run.out: the run id and when its first start began


def _root_store() -> dist.Store:
    store = dist.distributed_c10d._get_default_store()
    while hasattr(store, "underlying_store"):  # the agent's prefixes, one per start of the workers
        store = store.underlying_store
    return store


def _first_start(cfg: Config, out_dir: Path, store: dist.Store, run_id: str) -> float | None:
    """When this torchrun job first started: from the agent's store, else (a store started
    anew, where another host took over rendezvous rank 0) from the note in run.out."""
    if store.check([STARTED_KEY]):
        return float(store.get(STARTED_KEY).decode())
    try:
        note = json.loads((out_dir / FIRST_START).read_text()) if cfg.run.out else {}
    except (OSError, ValueError):
        return None
    return float(note["time"]) if note.get("run_id") == run_id else None


def torchrun_start(cfg: Config, out_dir: Path) -> int:
    """Which start of this torchrun job's workers this is (0: the first), counted by rank 0 in
    the rendezvous store that torchrun's agent keeps for the whole job (and told by the
    agent's own restart count). From the second on (the agent started the workers again after
    a failure, or because nodes left a `--nnodes MIN:MAX` job), the job goes on from the
    newest checkpoint it wrote in `run.out`, with however many ranks it now has (checkpoints
    are resharded on load)."""
    choice = [0, cfg.run.resume]
    if dist.get_rank() == 0:
        store, run_id = _root_store(), os.environ.get("TORCHELASTIC_RUN_ID", "")
        starts = store.add(STARTS_KEY, 1)
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if starts == 1 and not restarted:
            now = time.time()
            if cfg.run.out:
                write_atomic(out_dir / FIRST_START, json.dumps({"run_id": run_id, "time": now}))
            store.set(STARTED_KEY, repr(now))
        else:
            since = _first_start(cfg, out_dir, store, run_id)
            found = latest_checkpoint(out_dir / "checkpoints", since=since) if since is not None else None
            choice = [max(starts - 1, restarted), str(found) if found else cfg.run.resume]
            origin = found.name if found else (cfg.run.resume or "the start")
            unset = "" if cfg.run.out else " (run.out is not set: each start writes a new run folder)"
            print(f"shardwise: torchrun started the workers again ({dist.get_world_size()} ranks): going on from "
                  f"{origin}{unset}", file=sys.stderr, flush=True)  # fmt: skip
    dist.broadcast_object_list(choice, src=0)
    cfg.run.resume = choice[1]
    return choice[0]


def under_torchrun() -> bool:
    """Whether this process is a rank torchrun started (its agent names the run)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and not os.environ.get(procs.LAUNCHED_ENV)


def run_rank(cfg: Config) -> tuple[Path, RunResult]:
    """This process as one rank of a job the launcher or torchrun started (their environment
    says which rank): the device, the process group, the job; its run folder and result."""
    chosen_by_launcher = {  # each `auto` the launcher resolves before the ranks start
        "parallel.layout": (cfg.parallel.layout, "run `shardwise plan` and name the layout"),
        "comm.compression": (cfg.comm.compression, "name the method"),
        "train.activation_checkpointing": (cfg.train.activation_checkpointing, "name none or layers"),
    }
    for key, (value, instead) in chosen_by_launcher.items():
        if value == "auto":
            raise ShardwiseError(key, f"auto is chosen by shardwise's own launcher; under torchrun, {instead}")
    torch.set_num_threads(1)
    context = context_from_environ()  # before the rendezvous takes the secret out of the environment
    device = rank_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if cfg.train.deterministic:  # cuBLAS repeats its results only with a fixed workspace
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    check_master_reachable()
    init_process_group(backend_for(device), timeout=timedelta(seconds=cfg.train.collective_timeout_s))
    dump_ring_on_terminate()
    out_dir = Path(cfg.run.out) if cfg.run.out else new_run_dir(Path("runs"), cfg.model.name)
    if dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not (out_dir / "config.toml").exists():  # under torchrun: no launcher wrote it
            cfg.run.out = str(out_dir.resolve())
            write_atomic(out_dir / "config.toml", to_toml(cfg, saved=True))
    job = os.environ.get(procs.JOB_ENV, "")
    if job.startswith("words:"):
        from shardwise.words import run_words

        result = RunResult({}, run_words(cfg, out_dir=out_dir, top=int(job.removeprefix("words:"))))
    elif job.startswith("serve:"):
        from shardwise.serve.ranks import serve_rank

        serve_rank(cfg, device=device)
        result = RunResult({}, {})
    else:
        if under_torchrun():
            context = dataclasses.replace(context, attempt=torchrun_start(cfg, out_dir))
        result = run(cfg, out_dir=out_dir, device=device, context=context)
    # leave together: ranks wait while rank 0 writes the outputs, so no rank
    # closes its connections under a peer that still expects it
    if result.leave_together:
        dist.barrier()
    restore_terminate()
    dist.destroy_process_group()
    return out_dir, result


def main(argv: list[str] | None = None) -> int:
    """Run one rank; the exit status is 0, 2 (the user's mistake) or 1.

    On an error the process group is not destroyed: the error is recorded first
    and the process then exits, so peers see their connections drop only after
    the launcher can tell which rank failed first.
    """
    argv = sys.argv[1:] if argv is None else argv
    rank = int(os.environ.get("RANK", "0"))
    launched = bool(os.environ.get(procs.LAUNCHED_ENV))
    try:
        if len(argv) != 1:
            raise ShardwiseError("worker", f"expected one argument, the config file; got {argv}")
        run_rank(load_config(argv[0]))
        return 0
    except ShardwiseError as e:
        _record_error(e, rank)
        if not launched:
            print(f"shardwise: rank {rank}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        _record_error(e, rank)
        restore_terminate()
        if not launched:
            raise
        if serving() and error_kind(e) in (procs.PEER_LOST, procs.TIMED_OUT):
            hold(Path(os.environ["TORCHELASTIC_ERROR_FILE"] + procs.HELD_SUFFIX))  # the next start takes its state
        return 1


if __name__ == "__main__":
    exit_now(main())
