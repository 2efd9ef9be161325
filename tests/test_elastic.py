"""`shardwise train --nproc MIN:MAX`: a host lost mid-run, the job goes on with the ranks
left and grows back when the host returns, and ends with the failure-free run's weights."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shardwise.cluster.placement import Placement
from shardwise.elastic import parse_nproc
from shardwise.errors import ShardwiseError

ROOT = Path(__file__).resolve().parents[1]


def test_nproc_is_n_or_min_max():
    assert parse_nproc("4") == (4, 4) and parse_nproc("2:4") == (2, 4)
    for bad in ("0", "3:2", "two", "1:", ":2"):
        with pytest.raises(ShardwiseError, match="nproc"):
            parse_nproc(bad)


def test_a_placement_on_some_hosts_numbers_them_as_torchrun_would():
    from shardwise.cluster.netns import Cluster

    cluster = Cluster("swq", 4, "1gbit", 1e9, 1 << 20)
    kept = Placement(cluster, (0, 2, 3))
    assert [kept.host(r) for r in range(6)] == [0, 2, 3, 0, 2, 3]
    env = kept.env(4, 6, 29500)
    assert (env["GROUP_RANK"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("1", "1", "2")
    assert env["MASTER_ADDR"] == cluster.address(0)
    assert Placement(cluster).env(4, 6, 29500)["GROUP_RANK"] == "0"  # all four: rank 4 on host 0


def _rank_pid(launcher: int, rank: int) -> int:
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if env.get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in env:
            return int(proc.name)
    raise AssertionError(f"no rank {rank} under {launcher}")


@pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "tc", "unshare")),
    reason="the emulated cluster needs root, iproute2 (ip, tc) and unshare",
)
def test_a_lost_host_then_back_ends_with_the_failure_free_weights(tmp_path):
    """Two hosts, a rank each. Once step 40's checkpoint is written, host 1's link goes down
    and its rank is killed: the job goes on with one rank from there; the link comes back,
    and at the next checkpoint the job grows back to two ranks. Its weights equal those of a
    run with no failure (float64: to the rounding of sums taken in another order)."""
    from shardwise.cluster import netns

    name = "swe"
    netns.down(name)
    cluster = netns.up(name, 2, "1gbit")
    args = ["--model.name", "mlp", "--model.hidden", "512,512", "--train.dtype", "float64", "--train.steps", "500",
            "--train.checkpoint_every", "20", "--train.eval_every", "0", "--run.progress", "false",
            "--train.rejoin_timeout_s", "1"]  # fmt: skip
    out = tmp_path / "elastic"
    job = subprocess.Popen([sys.executable, "-m", "shardwise", "train", "--cluster", f"emulated:{name}", "--nproc",
                            "1:2", "--max-restarts", "1", *args, "--out", str(out)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    lines: list[str] = []
    reading = threading.Thread(target=lambda: lines.extend(job.stderr), daemon=True)
    reading.start()
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-00000040" / "manifest.json").is_file():
            assert job.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        subprocess.run(["ip", "-n", cluster.namespace(1), "link", "set", netns.HOST_IF, "down"], check=True)
        os.kill(_rank_pid(job.pid, 1), 9)
        while not any("going on with 1 rank" in line for line in lines):
            assert job.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        subprocess.run(["ip", "-n", cluster.namespace(1), "link", "set", netns.HOST_IF, "up"], check=True)
        code = job.wait(timeout=180)
        reading.join(timeout=10)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        netns.down(name)
    err = "".join(lines)
    assert code == 0, err
    assert "swe-h1 lost (unreachable for 1 s): going on with 1 rank(s) on 1 host(s); restart 1 of 1 from step-" in err
    assert "every host is back: growing to 2 ranks from step-" in err, err
    done = subprocess.run([sys.executable, "-m", "shardwise", "train", "--nproc", "2", *args, "--out",
                           str(tmp_path / "plain")], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    elastic, plain = (load_file(d / "model.safetensors") for d in (out, tmp_path / "plain"))
    assert elastic.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(elastic[key], plain[key], rtol=1e-9, atol=1e-12)
