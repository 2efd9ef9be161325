"""Failures end or heal the job: restarts from checkpoints, kills during a checkpoint
write, signed and tampered checkpoints, stalled ranks, non-finite steps."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import cli_fork
import pytest
import torch
from parity import BASE, TOL, reference, with_data
from safetensors.torch import load_file

from shardwise.checkpoint.manifest import keygen, verify
from shardwise.config import load_config
from shardwise.errors import ShardwiseError
from shardwise.job import JobContext, run
from shardwise.procs import forked_name, forked_rank, ranks_under
from shardwise.train.loop import poisoned

JOB = ["--model.name", "mlp", "--train.steps", "12", "--train.eval_every", "0", "--run.progress", "false"]
JOB += ["--train.checkpoint_every", "3", "--train.deterministic", "true"]


def shardwise(*args: str, fault: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    """The command in a process of its own, forked with torch imported (cli_fork.py)."""
    return cli_fork.run(list(args), env={**os.environ, "SHARDWISE_FAULT": fault}, timeout=timeout)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("whole") / "run"
    done = shardwise("train", "--nproc", "2", *JOB, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return _weights(out)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} differs from the run without failures"


@pytest.mark.parametrize(("seed", "recovery"), [(1, "disk"), (2, "peer")])
def test_killed_rank_restarts_from_the_newest_checkpoint_or_the_survivors_memory(
    tmp_path, uninterrupted, seed, recovery
):
    rng = random.Random(seed)
    rank, step = rng.randrange(2), rng.randrange(1, 12)
    done = shardwise("train", "--nproc", "2", *JOB, "--out", str(tmp_path / "run"), "--max-restarts", "2",
                     "--train.recovery", recovery, fault=f"{rank}:{step}:kill")  # fmt: skip
    assert done.returncode == 0, done.stderr
    newest = (step // 3) * 3
    origin = f"step-{newest:08d}" if newest else "the start"
    if recovery == "peer":  # the survivor held the weights of every step it completed: none is done again
        origin = f"the memory of rank {1 - rank}, else {origin}"
        assert f"going on from step {step} in the survivors' memory" in done.stdout
    assert f"rank {rank} failed (exit -9): exited with status -9; restart 1 of 2 from {origin}" in done.stderr
    _assert_same(_weights(tmp_path / "run"), uninterrupted)


def test_kills_during_checkpoint_writes_never_leave_a_torn_checkpoint(tmp_path, uninterrupted):
    # attempt 0 dies with its shard written, attempt 1 before the manifest, attempt 2
    # after the manifest but before the rename: each restart takes the previous checkpoint
    faults = "1:5:exit@checkpoint-shards:0,0:8:exit@checkpoint-manifest:1,0:8:exit@checkpoint-rename:2"
    done = shardwise("train", "--nproc", "2", *JOB, "--out", str(tmp_path / "run"), "--max-restarts", "3",
                     "--train.recovery", "disk", fault=faults)  # fmt: skip
    assert done.returncode == 0, done.stderr
    restarts = [line.rsplit(" from ", 1)[1] for line in done.stderr.splitlines() if "restart" in line]
    assert restarts == ["step-00000003", "step-00000006", "step-00000006"]
    _assert_same(_weights(tmp_path / "run"), uninterrupted)
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_a_forked_ranks_name_fits_the_kernels_15_bytes_and_says_its_rank():
    """/proc keeps 15 bytes of a name: shardwise-rank10 would read as rank 1, so ranks from
    10 on are named shardwise-rN, and `ranks_under` reads every name back to its rank."""
    for rank in (0, 9, 10, 99, 4095):
        name = forked_name(rank)
        assert len(name.encode()) <= 15 and forked_rank(name) == rank, name
    assert forked_name(1) == "shardwise-rank1" and forked_rank("python3") is None


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_no_rank_outlives_a_killed_launcher(tmp_path, start):
    """The launcher killed (SIGKILL: no clean-up of its own) mid-run: its ranks, forked from it
    or fresh interpreters, are ended by the kernel within seconds, not left training."""
    import signal
    import sys
    import time

    # the killed launcher cannot remove its temporary folder: it goes under the test's own
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "SHARDWISE_START": start, "TMPDIR": str(tmp_path / "tmp")}
    job = subprocess.Popen([sys.executable, "-m", "shardwise", "train", "--nproc", "2", "--model.name", "mlp",
                            "--train.steps", "100000", "--train.eval_every", "0", "--run.progress", "false", "--out",
                            str(tmp_path / "run")], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline, ranks = time.monotonic() + 60, []
        while len(ranks) < 2 and time.monotonic() < deadline:
            ranks = list(ranks_under(job.pid).values())
            time.sleep(0.05)
        assert len(ranks) == 2, ranks
        time.sleep(1.0)  # training
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{pid}") for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in ranks if os.path.exists(f"/proc/{pid}")], ranks
    finally:
        for pid in ranks:
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGKILL)


def test_restarts_exhausted_name_the_rank(tmp_path):
    done = shardwise("train", "--nproc", "2", *JOB, "--out", str(tmp_path / "run"), "--max-restarts", "1",
                     fault="1:1:exit:*")  # fmt: skip
    assert done.returncode == 1
    assert (
        done.stderr.strip().splitlines()[-1]
        == "shardwise: rank 1 failed (exit 3): exited with status 3, after 1 restart"
    )


def test_signed_checkpoints_and_tampering(tmp_path):
    keys = tmp_path / "keys"
    assert shardwise("keygen", "--out", str(keys)).returncode == 0
    out = tmp_path / "run"
    signed = ["--checkpoint.sign_key", str(keys / "shardwise.key")]
    done = shardwise("train", "--nproc", "1", *JOB, "--train.steps", "6", "--out", str(out), *signed)
    assert done.returncode == 0, done.stderr
    newest = out / "checkpoints" / "step-00000006"
    pub = str(keys / "shardwise.pub")
    ok = shardwise("verify", str(out), "--key", pub)
    assert ok.returncode == 0 and "signature verified" in ok.stdout

    def refused(*args: str) -> str:
        done = shardwise(*args)
        assert done.returncode == 2, done.stdout + done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1
        return lines[0]

    def verify_error(key: str = "") -> str:
        with pytest.raises(ShardwiseError) as e:
            verify(newest, verify_key=key)
        return str(e.value)

    shard = newest / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert refused("verify", str(out), "--key", pub).endswith(f"{shard}: SHA-256 differs from the manifest")
    resume = ["train", "--nproc", "1", "--resume", str(out), "--checkpoint.verify_key", pub]
    assert f"{shard}: SHA-256 differs from the manifest" in refused(*resume)
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    verify(newest, verify_key=pub)
    (newest / "extra.bin").write_bytes(b"x")
    assert verify_error().endswith(f"{newest / 'extra.bin'}: not in the manifest")
    (newest / "extra.bin").unlink()
    (newest / "state.json").rename(tmp_path / "state.json")
    assert verify_error().endswith(f"{newest / 'state.json'}: listed in the manifest but missing")
    (tmp_path / "state.json").rename(newest / "state.json")
    keygen(tmp_path / "other")
    other = str(tmp_path / "other" / "shardwise.pub")
    assert verify_error(other).endswith(f"{newest / 'manifest.json'}: the signature does not match {other}")
    (newest / "manifest.sig").unlink()
    assert "the checkpoint is unsigned and a verify key is set" in refused(*resume)
    verify(newest)  # unsigned is fine without a key


@pytest.mark.parametrize("kind, message, disagreement", [
    ("hang", "shardwise: rank 1 stopped answering (its process is stopped): ranks 0 and 2 timed out waiting for it",
     ""),
    ("slow", "shardwise: rank 1 stopped answering (it never reached the collective): ranks 0 and 2 timed out "
     "waiting for it", ""),  # a straggler: running, but later than the timeout
    ("skip", "shardwise: rank 1 skipped a collective or called it out of order: it was at step 4 (gradient norm",
     "the first disagreement: rank 1 never called all_reduce #4 on the agree group (scalar float32), which ranks 0 "
     "and 2 called; it called all_reduce #"),  # the gradient norm's, on the default group, logged every step
    ("order", "shardwise: rank 1 skipped a collective or called it out of order: it was at step 4 (gradient norm",
     "the first disagreement: rank 1 never called all_reduce #4 on the agree group (scalar float32), which ranks 0 "
     "and 2 called; it called all_reduce #"),
    ("shape", "shardwise: rank 1 disagrees with the others' collectives: ",
     "rank 1 called all_reduce #4 on the agree group (3 float32) while ranks 0 and 2 called all_reduce #4 (scalar"),
    # gloo aborts the rank that receives the float64 (SIGABRT, in C++): its ring is dumped all the same
    ("dtype", "shardwise: rank 1 disagrees with the others' collectives: ",
     "rank 1 called all_reduce #4 on the agree group (scalar float64) while ranks 0 and 2 called all_reduce #4 "
     "(scalar float32); rank "),
])  # fmt: skip
def test_a_rank_that_stops_answering_ends_the_job(tmp_path, kind, message, disagreement):
    # fully sharded: its ranks hold different gradient shards, so they agree on finite steps
    # by a collective every step, which is the one `skip` leaves out
    args = ["train", "--nproc", "3", *JOB, "--train.batch_size", "48", "--train.collective_timeout_s", "3"]
    args += ["--parallel.shard", "full", "--train.log_every", "1"]
    done = shardwise(*args, "--out", str(tmp_path / "run"), fault=f"1:3:{kind}", timeout=3 + 30 + 20)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(message) and disagreement in last, done.stderr
    if disagreement:  # torch's flight recorder rings of the ranks that failed, kept
        assert sorted(p.name for p in (tmp_path / "run" / "logs").glob("rank*-collectives.json"))


def test_a_pipeline_deadlock_names_the_stage_waiting_on_what_is_never_sent(tmp_path):
    # the last stage waits on its neighbour under a tag no schedule sends with, while that
    # neighbour's send of the step's first activations waits for it to receive them
    args = ["train", "--nproc", "2", *JOB, "--parallel.pp", "2", "--train.collective_timeout_s", "3"]
    done = shardwise(*args, "--out", str(tmp_path / "run"), fault="1:3:deadlock", timeout=3 + 30 + 20)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "shardwise: rank 1 deadlocked on point-to-point messages: rank 1 waits to receive #1 "
        "(tag 77, 1 float32) from rank 0, which rank 0 never sent on that tag; rank 0"
    ), done.stderr
    assert "to rank 1 waits for rank 1 to receive it" in last or "rank 0 waits to receive" in last, last


def _with_fault(spec: str, overrides: dict[str, str], *, group):
    cfg = load_config(None, {**BASE, **with_data({"model.name": "mlp", **overrides})})
    try:
        result = run(cfg, group=group, context=JobContext(faults=spec))
        return result.state_dict, result.summary
    except RuntimeError as e:
        return str(e), None


@pytest.mark.parametrize("layout, fault", [
    ({}, "nan"),  # data parallel: equal reduced gradients, each rank decides alone
    # only rank 1's loss is not finite, its gradients are: without `poisoned` rank 0
    # would see finite reduced gradients and step while rank 1 skips
    ({}, "inf-loss"),
    ({"parallel.shard": "full"}, "nan"),  # different gradient shards: the ranks agree by a collective
    ({"parallel.tp": "2"}, "inf-loss"),
    ({"parallel.mode": "ps"}, "nan"),  # one server, two workers: both workers' word reaches it
    ({"parallel.mode": "ps", "parallel.servers": "2"}, "inf-loss"),  # and each server skips alike
], ids=["dp-nan", "dp-inf-loss", "fully-sharded-nan", "tp-inf-loss", "ps-nan", "ps-2-servers-inf-loss"])  # fmt: skip
def test_a_non_finite_step_is_skipped_on_every_rank(pool, layout, fault):
    """Rank (or worker) nproc-1 goes wrong at step 6: every rank skips that step and only
    that one, and ends with the weights of the plain loop that skips step 6."""
    nproc = 2 + ("parallel.servers" in layout) + ("parallel.mode" in layout)
    results = pool.run(_with_fault, f"{nproc - 1}:5:{fault}", layout, ranks=list(range(nproc)))
    want = reference(with_data({"model.name": "mlp", **layout}), skip=frozenset({6}))
    assert results[0][1]["skipped_steps"] == [6]
    for state, _ in results:
        for key in want:
            torch.testing.assert_close(state[key], want[key], **TOL)


def test_too_many_non_finite_steps_stop_the_run(pool):
    faults = "0:4:nan,0:5:nan,1:6:nan"
    messages = pool.run(_with_fault, faults, {"train.max_bad_steps": "3"}, ranks=[0, 1])
    for message, _ in messages:
        assert message.startswith(
            "train.max_bad_steps: 3 steps in a row with a non-finite loss or gradient (steps 5 to 7)"
        )


def test_a_non_finite_loss_makes_the_gradients_it_reaches_nan():
    # plain data parallelism decides on its reduced gradients alone: a rank whose loss is
    # not finite must make them NaN, or the ranks would decide apart
    weight = torch.ones(3, requires_grad=True)
    poisoned(weight.sum() * 2).backward()
    assert torch.equal(weight.grad, torch.full((3,), 2.0))  # a finite loss is left as it is
    for bad in (float("inf"), float("nan")):
        weight.grad = None
        poisoned(weight.sum() + bad).backward()  # not finite, though its gradient would be
        assert torch.isnan(weight.grad).all()
