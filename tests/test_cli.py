"""The command line end to end: bad input, a real run, failures and Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cli_fork
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shardwise.config import ModelConfig
from shardwise.models import build_model

SMALL = ["--model.name", "mlp", "--train.batch_size", "48", "--train.eval_every", "0", "--run.progress", "false"]


def shardwise(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The command in a process of its own, forked with torch imported (cli_fork.py)."""
    return cli_fork.run(list(args), env={**os.environ, **(env or {})}, timeout=timeout)


def endless_run(out: Path) -> list[str]:
    """A 2-rank run of a million steps: it only ends if something stops it."""
    return ["train", "--nproc", "2", *SMALL, "--train.steps", "1000000", "--out", str(out)]


MARK = "SHARDWISE_TEST_RUN"  # set for a launcher by a test; its workers inherit it


def workers_alive(out: Path) -> list[int]:
    """Worker processes of the run whose launcher got `MARK=out` in its environment: started
    as `python -m shardwise.worker`, or forked from the launcher and named for their rank."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit():
                continue
            worker = "shardwise.worker" in (proc / "cmdline").read_text()
            if not worker and not (proc / "comm").read_text().startswith("shardwise-rank"):
                continue
            if f"{MARK}={out}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def _cifar_with_bad_size(tmp_path: Path) -> str:
    folder = tmp_path / "cifar"
    folder.mkdir()
    (folder / "data_batch_1.bin").write_bytes(b"\0" * 3073 * 2 + b"\0")
    return str(folder)


BAD_INPUT = {
    "unknown key": (["--train.stepz", "5"], "train.stepz: unknown config key (did you mean train.steps?)"),
    "wrong type": (["--train.steps", "five"], "train.steps: expected int, got 'five'"),
    "nproc 0": (["--nproc", "0"], "nproc: must be at least 1, got 0"),
    "no weights to score": (["--train.steps", "0"], "train.steps: must be positive (0 only scores the weights"),
    "bf16 on float64": (
        ["--train.precision", "bf16", "--train.dtype", "float64"],
        "train.precision: bf16 keeps float32 master weights: needs train.dtype=float32, not float64",
    ),
    "profile under a parameter server": (
        ["--nproc", "2", "--parallel.mode", "ps", "--run.profile", "true"],
        "run.profile: profiles the all-reduce layouts' loop, not parallel.mode=ps",
    ),
    "missing weights": (["--model.weights", "/nonexistent/m.safetensors"], "model.weights: no such file"),
    "missing data dir": (
        ["--data.name", "cifar10", "--data.path", "/nonexistent/cifar"],
        "data.path: no such directory '/nonexistent/cifar'",
    ),
    "cifar wrong size": (
        ["--data.name", "cifar10", "--data.path", "CIFAR"],
        "data.path: data_batch_1.bin has 6147 bytes, not a multiple of the 3073-byte CIFAR-10 record",
    ),
    "batch not divisible": (
        ["--nproc", "3", "--train.batch_size", "64"],
        "train.batch_size: 64 is not divisible by parallel.dp=3 x train.grad_accum=1 (nearest that work: 63 or 66)",
    ),
    "an abbreviated option": (
        ["--train.batch", "32"],
        "train.batch: unknown config key (did you mean train.batch_size?)",
    ),
    "a layout key that moved": (
        ["--data.vertical", "2"],
        "data.vertical: moved to parallel.vertical (every layout key is under [parallel])",
    ),
    "layout vs world": (
        ["--nproc", "4", "--parallel.dp", "2", "--parallel.tp", "3"],
        "parallel.dp: dp=2 x pp=1 x spatial=1 x tp=3 x vertical=1 = 6 does not equal the world size 4 (--nproc)",
    ),
    "tp does not divide": (
        ["--nproc", "3", "--parallel.tp", "2"],
        "parallel.tp: parallel.pp=1 x parallel.spatial=1 x parallel.tp=2 x parallel.vertical=1 = 2 "
        "does not divide the world size 3",
    ),
    "vertical conv over pixels": (
        ["--parallel.vertical", "2"],
        "parallel.vertical_unit: convnet's first layer is a convolution, which needs whole channels",
    ),
    "vertical more ranks than units": (
        ["--parallel.vertical", "2", "--parallel.vertical_unit", "channel"],
        "parallel.vertical: 2 ranks, but samples shaped (1, 8, 8) have only 1 channel(s)",
    ),
    "pipeline deeper than the model": (
        [
            "--nproc",
            "3",
            "--parallel.pp",
            "3",
            "--parallel.microbatches",
            "4",
            "--model.name",
            "mlp",
            "--model.hidden",
            "16",
        ],
        "parallel.pp: 3 stages, but the model has only 2 layers with parameters",
    ),
    "1f1b with too few micro-batches": (
        ["--parallel.pp", "2", "--parallel.microbatches", "1"],
        "parallel.microbatches: 1f1b needs at least one micro-batch per stage: 1 < parallel.pp=2",
    ),
    "several stages a rank under 1f1b": (
        ["--parallel.pp", "2", "--parallel.virtual_stages", "2"],
        "parallel.virtual_stages: =2 with parallel.schedule=1f1b: one stage a rank; several need "
        "parallel.schedule=interleaved, zero-bubble or zbv",
    ),
    "interleaved micro-batches not in rounds": (
        ["--parallel.pp", "2", "--parallel.schedule", "interleaved", "--parallel.microbatches", "5"],
        "parallel.microbatches: =5: interleaved takes the micro-batches in rounds of parallel.pp=2, so they must be "
        "a multiple of 2 (e.g. 4)",
    ),
    "more stages than layers": (
        ["--parallel.pp", "2", "--parallel.schedule", "zbv", "--model.name", "mlp", "--model.hidden", "16"],
        "parallel.virtual_stages: =2: parallel.pp=2 x 2 = 4 stages, but the model has only 2 layers with parameters",
    ),
    "DDP buckets of no size": (
        ["--parallel.bucket_mb", "0"],
        "parallel.bucket_mb: must be > 0, got 0.0",
    ),
    "micro-batches do not divide the batch": (
        ["--parallel.pp", "2", "--parallel.microbatches", "5"],
        "train.batch_size: 64 is not divisible by parallel.dp=1 x parallel.microbatches=5 "
        "(nearest that work: 60 or 65)",
    ),
    "image too small for the bands": (
        ["--nproc", "3", "--parallel.spatial", "3", "--model.name", "resnet", "--model.channels", "16,32,32"],
        "parallel.spatial: 3 bands, but features.5.conv1 gives 2 rows, fewer than one per band",
    ),
    "tp wider than a layer": (
        ["--parallel.tp", "2", "--model.name", "mlp", "--model.hidden", "1"],
        "parallel.tp: layer head.0 (Linear 64->1) has 1 output features, fewer than tp=2",
    ),
    "parameter server with tp": (
        ["--nproc", "3", "--parallel.mode", "ps", "--parallel.tp", "2"],
        "parallel.tp: =2 with parallel.mode=ps: a parameter server runs data parallel only",
    ),
    "no rank left for workers": (
        ["--nproc", "2", "--parallel.mode", "ps", "--parallel.servers", "2"],
        "parallel.servers: =2 leaves no worker among 2 ranks (--nproc): use more ranks",
    ),
    "staleness without asynchrony": (
        ["--parallel.mode", "ps", "--ps.staleness", "2"],
        "ps.staleness: =2 needs ps.asynchronous=true",
    ),
    "slow worker that is a server": (
        ["--nproc", "3", "--parallel.mode", "ps", "--ps.slow_worker", "0", "--ps.slow_factor", "2"],
        "ps.slow_worker: =0: not a worker, those are ranks 1 to 2",
    ),
    "missing config file": (["nope.toml"], "config: no such file 'nope.toml'"),
}


def shardwise_here(capfd, *args: str) -> tuple[int, str]:
    """`shardwise ARGS` in this process (the launcher still starts workers as processes):
    the exit status and everything written to stderr, workers' included."""
    from shardwise.cli import main

    handler = signal.getsignal(signal.SIGTERM)
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    finally:
        signal.signal(signal.SIGTERM, handler)
    return code, capfd.readouterr().err


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capfd, case):
    args, message = BAD_INPUT[case]
    args = [_cifar_with_bad_size(tmp_path) if a == "CIFAR" else a for a in args]
    out = tmp_path / "out"
    code, err = shardwise_here(capfd, "train", *args, "--out", str(out))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert message in lines[0]
    assert not out.exists()


def test_refuses_to_overwrite_a_run(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = shardwise("train", "--out", str(tmp_path))
    assert result.returncode == 2 and "exists and is not an empty folder" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_run_writes_outputs_and_matches_one_process(tmp_path):
    """A 2-D layout with sharded parameters writes the same full model as one process."""
    layout = ["--nproc", "4", "--parallel.tp", "2", "--parallel.shard", "full"]
    two = shardwise("train", *layout, *SMALL, "--train.steps", "30", "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    one = shardwise("train", "--nproc", "1", *SMALL, "--train.steps", "30", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr

    run = tmp_path / "two"
    for name in ("config.toml", "metrics.jsonl", "curves.png", "model.safetensors", "summary.json"):
        assert (run / name).stat().st_size > 0, name
    summary = json.loads((run / "summary.json").read_text())
    for key in ("val_accuracy", "val_loss", "steps", "world_size", "layout", "samples_per_s", "wall_s"):
        assert key in summary
    assert summary["world_size"] == 4 and summary["layout"] == "dp=2 x tp=2" and summary["steps"] == 30
    # tp splits each layer in 2 and FSDP shards each piece in 2: about a quarter per rank
    held = [m["parameters_bytes"] / (4 * summary["parameters"]) for m in summary["memory"]]
    assert all(0.24 < h < 0.27 for h in held), held
    # and measured, per rank: the peak resident memory in training, at least what it started with
    assert all(m["rss_peak_bytes"] >= m["rss_start_bytes"] > 50 * 2**20 for m in summary["memory"])
    assert summary["hosts"] == {socket.gethostname(): [0, 1, 2, 3]}
    assert summary["val_accuracy"] > 0.5  # 30 steps; chance is 0.1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    assert all({"loss", "lr", "samples_per_s"} <= r.keys() for r in records)

    # the model's own parameter names, and the same weights as one process
    weights = load_file(run / "model.safetensors")
    assert weights.keys() == build_model(ModelConfig(name="mlp"), (1, 8, 8), 10).state_dict().keys()
    single = load_file(tmp_path / "one" / "model.safetensors")
    for name in weights:
        torch.testing.assert_close(weights[name], single[name], rtol=1e-5, atol=1e-6)
    assert "rank" in two.stdout and "validation accuracy" in two.stdout


@pytest.mark.parametrize(
    "kind, rank, expected", [("raise", 1, "RuntimeError: injected fault at step 5"), ("exit", 0, "exit 3")]
)
def test_failing_rank_stops_the_job_quickly(tmp_path, kind, rank, expected):
    out = tmp_path / "out"
    started = time.monotonic()
    result = shardwise(*endless_run(out), env={"SHARDWISE_FAULT": f"{rank}:5:{kind}", MARK: str(out)})
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"shardwise: rank {rank} failed") and expected in last
    assert elapsed < 25  # start-up (a few seconds) + 5 steps + the stop, far from a million steps
    assert workers_alive(out) == []
    if kind == "raise":
        assert "injected fault" in (out / "logs" / f"rank{rank}-traceback.txt").read_text()


def _other_interface() -> str | None:
    """An interface with an IPv4 address other than loopback, if this machine has one."""
    try:
        lines = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return None
    return next((line.split()[1] for line in lines if not line.split()[1].startswith("lo")), None)


OTHER_IF = _other_interface()


def listening_sockets(pid: int) -> list[str]:
    """The local addresses of the TCP sockets process `pid` listens on, read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
            found.append(f"{socket.inet_ntop(family, words)}:{int(port, 16)}")
    return found


def test_a_local_run_listens_on_loopback_only_and_ctrl_c_stops_it(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardwise", *endless_run(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # a shell set up for a multi-host job names another interface: a local run stays on loopback
        env={**os.environ, MARK: str(out), **({"GLOO_SOCKET_IFNAME": OTHER_IF} if OTHER_IF else {})},
        # as at a terminal: a shell that ran the tests in the background leaves SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").stat().st_size == 0:
            assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
            time.sleep(0.2)
        # every socket the ranks listen on (the store, gloo's pairs) is bound to loopback
        workers = workers_alive(out)
        sockets = [a for pid in workers for a in listening_sockets(pid)]
        assert len(workers) == 2 and sockets, (workers, sockets)
        # the command forks its ranks (torch already imported), each named for its rank
        names = sorted(Path(f"/proc/{pid}/comm").read_text().strip() for pid in workers)
        assert names == ["shardwise-rank0", "shardwise-rank1"], names
        for pid in workers:  # as a fresh Python: SIGPIPE ignored (gloo handles a closed socket's EPIPE)
            status = Path(f"/proc/{pid}/status").read_text()
            ignored = int(next(x for x in status.splitlines() if x.startswith("SigIgn:")).split()[1], 16)
            assert ignored & (1 << (signal.SIGPIPE - 1)), status
        assert all(a.startswith(("127.0.0.1:", "::1:")) for a in sockets), sockets
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in workers_alive(out):
            os.kill(pid, signal.SIGKILL)
        raise
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    assert workers_alive(out) == []


def test_forked_and_fresh_ranks_train_the_same_weights(tmp_path):
    """Ranks forked from the launcher (the default) and fresh interpreters
    (SHARDWISE_START=spawn) are the same ranks: bit-identical weights."""
    import threading

    from shardwise import forked
    from shardwise.forked import START_ENV, can_fork

    runs = {}
    for start in ("fork", "spawn"):
        out = tmp_path / start
        done = shardwise(
            "train", "--nproc", "2", *SMALL, "--train.steps", "6", "--out", str(out), env={START_ENV: start}
        )
        assert done.returncode == 0, done.stderr
        runs[start] = load_file(out / "model.safetensors")
    for name, tensor in runs["fork"].items():
        assert torch.equal(tensor, runs["spawn"][name]), name
    assert not can_fork()  # a Python calling the API or the command in-process: fresh interpreters
    forked._ALLOWED = True  # as the `shardwise` command's own process
    try:
        assert can_fork() == (threading.active_count() == 1)  # torch imported, a CPU-only build
        _with_a_thread_running(lambda: not can_fork())  # a lock it holds would stay held in a forked rank
    finally:
        forked._ALLOWED = False


def _with_a_thread_running(check) -> None:
    import threading

    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert check()
    finally:
        stop.set()
        other.join()


def test_python_dash_m_the_console_script_and_the_tests_forked_command_agree():
    script = Path(sys.executable).parent / "shardwise"
    assert script.exists()
    a = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True)
    b = subprocess.run([sys.executable, "-m", "shardwise", "train", "--help"], capture_output=True, text=True)
    c = shardwise("train", "--help")
    assert a.returncode == b.returncode == c.returncode == 0 and a.stdout == b.stdout == c.stdout
    assert np.all([k in a.stdout for k in ("--nproc", "--out", "--parallel.dp")])


def test_the_same_worker_runs_under_torchrun(tmp_path):
    """torchrun sets the environment the local launcher sets: same worker, same outputs."""
    from shardwise.config import load_config
    from shardwise.config_toml import to_toml

    out = tmp_path / "out"
    cfg = load_config(None, {"model.name": "mlp", "train.steps": "20", "run.progress": "false", "run.out": str(out)})
    config = tmp_path / "run.toml"
    config.write_text(to_toml(cfg))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + ["-m", "shardwise.worker", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["layout"] == "dp=2" and summary["steps"] == 20
    assert (out / "model.safetensors").exists()


def test_input_error_found_by_a_worker_leaves_nothing(tmp_path):
    """Some mistakes show only once a worker reads the data: same one line, exit 2, no folder."""
    np.savez(tmp_path / "bad.npz", a=np.zeros(3))
    out = tmp_path / "out"
    result = shardwise("train", "--data.name", "npz", "--data.path", str(tmp_path / "bad.npz"), "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardwise: rank ")  # whichever rank read it first
    assert lines[0].endswith(f": data.path: {tmp_path / 'bad.npz'} must hold arrays 'x' and 'y', found ['a']")
    assert not out.exists()


def test_a_ranks_error_record_reads_in_torchrun_and_in_the_launcher(tmp_path, monkeypatch):
    """The record a failing rank writes is torchelastic's (torchrun builds its report from
    it) with ours beside it: where the rank was and what kind of error it was."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from shardwise.failures import recorded_failure
    from shardwise.train.loop import RankError
    from shardwise.worker import _record_error

    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    try:
        try:
            raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")
        except RuntimeError as e:
            raise RankError(str(e), rank=1, step=7, phase="optimizer step") from e
    except RankError as e:
        _record_error(e, 1)
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=1, error_file=str(path))
    assert "Connection closed by peer" in failure.message["message"] and failure.timestamp > 0
    ours = recorded_failure(1, 1, path)
    assert (ours.kind, ours.step, ours.phase, ours.fallout) == ("peer-lost", 7, "optimizer step", True)
    assert ours.message.startswith("RuntimeError: Connection closed by peer")


def test_a_rank_torchrun_starts_with_a_loopback_master_across_hosts_stops_before_importing_torch(tmp_path):
    """Two hosts and MASTER_ADDR=localhost: the rank says so in one line and exits 2 before
    torch's import, so it speaks before another host's agent can end the job under it."""
    env = {**os.environ, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "localhost"}
    env["TORCHELASTIC_ERROR_FILE"] = str(tmp_path / "error.json")
    command = [sys.executable, "-X", "importtime", "-m", "shardwise.worker", str(tmp_path / "absent.toml")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("shardwise: rank 3: MASTER_ADDR: 'localhost' resolves to 127.0.0.1, a loopback")
    assert "2 hosts (4 ranks, 2 here)" in lines[0] and "--local-addr" in lines[0]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "shardwise.rank_start" in imported and "torch" not in imported
    record = json.loads((tmp_path / "error.json").read_text())["shardwise"]
    assert (record["rank"], record["kind"]) == (3, "usage") and "MASTER_ADDR" in record["message"]


def test_bare_command_lists_the_commands_and_version(capsys):
    from shardwise import __version__
    from shardwise.cli import main

    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("train", "bench", "cluster", "keygen", "verify"))
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"shardwise {__version__}"


def test_train_help_shows_each_default_once_and_plainly():
    from shardwise.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    flat = " ".join(text.split())
    assert "(default: )" not in flat and "(default: False)" not in flat and "(default: True)" not in flat
    assert "(default: 2 x parallel.pp)" in flat and "(default: 2 x parallel.pp). (default" not in flat
    assert "(default: true)" in flat  # run.progress
    assert "--ps.slow_factor" not in flat  # a test aid: accepted, not advertised


def test_more_ranks_than_cores_says_so_once(tmp_path):
    cores = len(os.sched_getaffinity(0))
    args = ["--train.steps", "2", "--train.eval_every", "0", "--run.progress", "false", "--model.name", "mlp"]
    args += ["--nproc", str(cores + 1), "--train.batch_size", str(8 * (cores + 1)), "--out", str(tmp_path / "run")]
    done = shardwise("train", *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(f"note: {cores + 1} ranks on {cores} CPU core(s)") == 1


def test_resuming_a_finished_run_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    args = ["--train.steps", "4", "--train.checkpoint_every", "2", "--train.eval_every", "0", "--run.progress", "false"]
    assert shardwise("train", "--model.name", "mlp", *args, "--out", str(out)).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    done = shardwise("train", "--resume", str(out))
    assert done.returncode == 0, done.stderr
    assert "is at step 4 of train.steps=4: the run is complete" in done.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    out = tmp_path / "run"
    args = ["--train.steps", "8", "--train.checkpoint_every", "2", "--train.keep_checkpoints", "2"]
    args += ["--train.eval_every", "0", "--run.progress", "false", "--model.name", "mlp", "--out", str(out)]
    assert shardwise("train", *args).returncode == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000006", "step-00000008"]
    assert shardwise("verify", str(out)).returncode == 0


def test_overwrite_starts_a_run_folder_again_and_nothing_else(tmp_path):
    args = ["--train.steps", "2", "--train.eval_every", "0", "--run.progress", "false", "--model.name", "mlp"]
    out = tmp_path / "run"
    assert shardwise("train", *args, "--out", str(out)).returncode == 0
    assert shardwise("train", *args, "--out", str(out)).returncode == 2  # it holds a run
    assert shardwise("train", *args, "--out", str(out), "--overwrite").returncode == 0
    assert (out / "summary.json").is_file()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    refused = shardwise("train", *args, "--out", str(other), "--overwrite")
    assert refused.returncode == 2 and "is not a run folder (it has no config.toml): not removed" in refused.stderr
    assert (other / "notes.txt").read_text() == "keep me"


def test_a_saved_config_fed_back_trains_the_same_run_and_a_moved_run_resumes_in_place(tmp_path):
    """The run folder's config.toml names no folder: fed back to `shardwise train` it trains
    the same run into the folder --out names (the same weights); a run folder moved
    elsewhere resumes into itself, not into the folder it was first written to."""
    from safetensors.torch import load_file

    first = tmp_path / "first"
    args = ["--train.steps", "6", "--train.checkpoint_every", "3", "--train.eval_every", "0"]
    args += ["--run.progress", "false", "--model.name", "mlp"]
    assert shardwise("train", *args, "--out", str(first)).returncode == 0
    saved = (first / "config.toml").read_text()
    assert 'out = ""' in saved and str(tmp_path) not in saved
    again = shardwise("train", str(first / "config.toml"), "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr
    a, b = load_file(first / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    moved = tmp_path / "moved"
    first.rename(moved)
    shutil.rmtree(moved / "checkpoints" / "step-00000006")
    done = shardwise("train", "--resume", str(moved))
    assert done.returncode == 0, done.stderr
    assert not first.exists() and (moved / "checkpoints" / "step-00000006").is_dir()
    c = load_file(moved / "model.safetensors")
    assert all((a[k] == c[k]).all() for k in a)
