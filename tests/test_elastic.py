"""`shardwise train --nproc MIN:MAX`: a host lost mid-run, the job goes on with the ranks
left and grows back when the host returns, and ends with the failure-free run's weights."""

from __future__ import annotations

import os
import re
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
from shardwise.procs import ranks_under

ROOT = Path(__file__).resolve().parents[1]


def test_nproc_is_n_or_min_max():
    assert parse_nproc("4") == (4, 4) and parse_nproc("2:4") == (2, 4)
    for bad in ("0", "3:2", "two", "1:", ":2"):
        with pytest.raises(ShardwiseError, match="nproc"):
            parse_nproc(bad)


def test_a_placement_on_some_hosts_numbers_them_as_torchrun_would():
    from shardwise.cluster.netns import Cluster

    cluster = Cluster("swq", 4, "1gbit", 1e9, 1 << 20)
    kept = Placement(cluster, (1, 2, 3))  # host 0 lost: rank 0, and the rendezvous with it, move to host 1
    assert [kept.host(r) for r in range(6)] == [1, 2, 3, 1, 2, 3]
    env = kept.env(4, 6, 29500)
    assert (env["GROUP_RANK"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("1", "1", "2")
    assert env["MASTER_ADDR"] == cluster.address(1)
    assert Placement(cluster).env(4, 6, 29500)["GROUP_RANK"] == "0"  # all four: rank 4 on host 0


def test_the_job_goes_on_with_the_most_ranks_that_fit(monkeypatch):
    """Host 1 of 4 lost: 3 ranks are left, but a batch of 64 does not split in 3, so the job
    goes on with 2 on 2 hosts; a MIN above what fits is one line."""
    from shardwise import elastic
    from shardwise.cluster.netns import Cluster

    monkeypatch.setattr(elastic, "lost_hosts", lambda placement: [1])
    full = Placement(Cluster("swq", 4, "1gbit", 1e9, 1 << 20))
    fits = lambda n: 64 % n == 0  # noqa: E731
    placement, ranks, note = elastic.shrink(full, 4, elastic.Elastic(1, 4, 0.0), fits)
    assert (ranks, placement.used) == (2, (0, 2))
    assert note == ("swq-h1 lost (unreachable for 0 s): going on with 2 rank(s) on 2 host(s) (of the 3 the hosts "
                    "left hold: 3 do not fit the layout and batch)")  # fmt: skip
    with pytest.raises(ShardwiseError, match="no world of 3 to 3 rank"):
        elastic.shrink(full, 4, elastic.Elastic(3, 4, 0.0), fits)


@pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "tc", "unshare")),
    reason="the emulated cluster needs root, iproute2 (ip, tc) and unshare",
)
def test_a_lost_host_then_back_ends_with_the_failure_free_weights(tmp_path):
    """Two hosts, a rank each. Once step 40's checkpoint is written, host 1's link goes down
    and its rank is killed: the job goes on with one rank from the step rank 0 had completed,
    its state taken from rank 0's memory; the link comes back, and at the next checkpoint the
    job grows back to two ranks. Its weights equal those of a run with no failure (float64:
    to the rounding of sums taken in another order)."""
    from shardwise.cluster import netns

    name = "swe"
    netns.down(name)
    cluster = netns.up(name, 2, "1gbit")
    args = ["--model.name", "mlp", "--model.hidden", "512,512", "--train.dtype", "float64", "--train.steps", "500",
            "--train.checkpoint_every", "20", "--train.eval_every", "0", "--run.progress", "false",
            "--train.rejoin_timeout_s", "1"]  # fmt: skip
    out = tmp_path / "elastic"
    command = [sys.executable, "-m", "shardwise", "train", "--cluster", f"emulated:{name}", "--nproc", "1:2",
               "--max-restarts", "1", *args, "--out", str(out)]  # fmt: skip
    job = subprocess.Popen(command, stdout=(tmp_path / "stdout").open("w"), stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines: list[str] = []
    reading = threading.Thread(target=lambda: lines.extend(job.stderr), daemon=True)
    reading.start()
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-00000040" / "manifest.json").is_file():
            assert job.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        netns.set_link(cluster, 1, up=False)
        os.kill(ranks_under(job.pid)[1], 9)
        while not any("going on with 1 rank" in line for line in lines):
            assert job.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        netns.set_link(cluster, 1, up=True)
        code = job.wait(timeout=180)
        reading.join(timeout=10)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        netns.down(name)
    err = "".join(lines)
    assert code == 0, err
    lost = "swe-h1 lost (unreachable for 1 s): going on with 1 rank(s) on 1 host(s); restart 1 of 1 from "
    assert lost + "the memory of rank 0, else step-" in err
    taken = re.search(r"going on from step (\d+) in the survivors' memory \(step (\d+) on disk\)",
                      (tmp_path / "stdout").read_text())  # fmt: skip
    assert taken and int(taken[1]) >= int(taken[2]) >= 40, (tmp_path / "stdout").read_text()
    assert "every host is back: growing to 2 ranks from step-" in err, err
    done = subprocess.run([sys.executable, "-m", "shardwise", "train", "--nproc", "2", *args, "--out",
                           str(tmp_path / "plain")], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    elastic, plain = (load_file(d / "model.safetensors") for d in (out, tmp_path / "plain"))
    assert elastic.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(elastic[key], plain[key], rtol=1e-9, atol=1e-12)
