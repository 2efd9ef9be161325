"""The emulated cluster: hosts in network namespaces, links shaped with tc tbf.

Needs root, iproute2 and unshare; each test says why it skips otherwise. The
cluster is named `swt` so that it never meets one a user has up, and it is
removed at the end of the module, whatever happened.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from shardwise.cli import main
from shardwise.cluster import netns
from shardwise.cluster.placement import Placement
from shardwise.cluster.probe import measure
from shardwise.comm.cost import Link, all_reduce
from shardwise.config import load_config
from shardwise.procs import free_port

NAME = "swt"
RATE = "1gbit"
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "tc", "unshare")),
    reason="the emulated cluster needs root, iproute2 (ip, tc) and unshare",
)


@pytest.fixture(scope="module")
def cluster():
    netns.down(NAME)  # a leftover of an interrupted run
    c = netns.up(NAME, 2, RATE)
    yield c
    netns.down(NAME)
    assert netns.namespaces(NAME) == []


def test_up_status_and_refusals(cluster, capsys):
    assert netns.namespaces(NAME) == ["swt-h0", "swt-h1", "swt-switch"]
    for h in range(2):
        s = netns.link_settings(cluster, h)
        assert s["address"] == f"10.77.0.{h + 1}"
        assert s["egress_bps"] == s["ingress_bps"] == 1e9  # shaped both ways, as tc reports it
    assert main(["cluster", "status", "--name", NAME]) == 0
    assert "10.77.0.2" in capsys.readouterr().out

    assert main(["cluster", "up", "--name", NAME, "--hosts", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["shardwise: cluster: 'swt' is already up (2 hosts); `shardwise cluster down` removes it first"]
    assert main(["cluster", "up", "--name", "swx", "--bandwidth", "fast"]) == 2
    assert "bandwidth: 'fast' is not a rate" in capsys.readouterr().err
    assert netns.namespaces("swx") == []


def test_non_root_gets_one_line(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["cluster", "up", "--name", "swx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs root" in err[0] and "uid 1000" in err[0]
    assert main(["train", "--cluster", "emulated:swx"]) == 2
    assert "needs root" in capsys.readouterr().err


def test_allreduce_time_follows_the_shaping(cluster):
    """Time grows with the message as bytes / rate predicts, and the bytes crossed the shaped links."""
    sizes = [2**20, 2**22, 2**24]
    before = [netns.link_settings(cluster, h) for h in range(2)]
    raw = measure(Placement(cluster), pattern="allreduce", sizes=sizes, repeats=4, world=2, port=free_port())
    after = [netns.link_settings(cluster, h) for h in range(2)]
    assert [r["hostname"] for r in raw["ranks"]] == ["swt-h0", "swt-h1"]
    assert {r["ifname"] for r in raw["ranks"]} == {"eth0"}
    medians = [statistics.median(r["seconds"]) for r in raw["sizes"]]
    # the cost model's ring all-reduce on the shaped link: with 2 ranks each sends (and
    # receives) the whole message once, a half in each phase
    link = Link.from_rate(cluster.rate_bps)
    predicted = [all_reduce(link, 2, n) for n in sizes]
    assert predicted == pytest.approx([n * 8 / cluster.rate_bps for n in sizes])
    # the bucket caps the rate, so no message is faster than its bytes allow; other jobs on a
    # shared machine only slow a message (CI has measured 1.5x), so the upper bound is loose
    for n, got, want in zip(sizes, medians, predicted, strict=True):
        assert 0.9 * want <= got <= 2.0 * want, f"{n} bytes: {got * 1e3:.1f} ms, shaping predicts {want * 1e3:.1f} ms"
    # 4x the bytes, about 4x the time; each median is itself within the band above, so this
    # only rules out a fixed cost that does not grow (CPU load from other jobs spreads it a little)
    assert 3.0 <= medians[2] / medians[1] <= 5.0 and 3.0 <= medians[1] / medians[0] <= 5.0
    sent = sum(n * (2 + len(r["seconds"])) for n, r in zip(sizes, raw["sizes"], strict=True))  # warm-up rounds too
    for h in range(2):
        assert after[h]["tx_bytes"] - before[h]["tx_bytes"] >= sent
        assert after[h]["rx_bytes"] - before[h]["rx_bytes"] >= sent


def test_probe_fits_the_configured_bandwidth(cluster, tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert main(["cluster", "probe", "--name", NAME, "--repeats", "10", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    # tbf counts headers too, so payload runs a little under the rate, never over it; a quiet
    # machine measures 0.95, a loaded one less (CI has measured 0.85), and the verdict says so
    ratio = result["bandwidth_ratio"]
    assert 0.7 <= ratio <= 1.0, ratio
    assert result["within_tolerance"] == (abs(ratio - 1) <= 0.1)
    verdict = "within 10% of 1gbit" if result["within_tolerance"] else "NOT within 10% of 1gbit"
    assert f"measured / configured bandwidth: {ratio:.3f} ({verdict})" in capsys.readouterr().out
    assert 0 < result["fit"]["alpha_s"] < 0.01


def test_train_on_the_cluster_ends_with_the_same_weights(cluster, tmp_path, capsys):
    """Placement changes where ranks run, never what they compute. The command forks its ranks
    (forked.py): each enters its host's network namespace and takes its name, so every byte
    between them crosses the shaped link."""
    args = ["--model.name", "mlp", "--train.steps", "12", "--train.eval_every", "0", "--run.progress", "false"]
    before = netns.link_settings(cluster, 1)
    emu = subprocess.run([sys.executable, "-m", "shardwise", "train", "--cluster", f"emulated:{NAME}", "--out",
                          str(tmp_path / "emu"), *args], capture_output=True, text=True)  # fmt: skip
    assert emu.returncode == 0, emu.stderr
    assert netns.link_settings(cluster, 1)["tx_bytes"] - before["tx_bytes"] > 12 * 4 * 10_000
    assert main(["train", "--out", str(tmp_path / "local"), *args]) == 0
    summary = json.loads((tmp_path / "emu" / "summary.json").read_text())
    assert summary["placement"].startswith(f"emulated cluster '{NAME}': 2 ranks on 2 of 2 hosts")
    assert summary["hosts"] == {f"{NAME}-h0": [0], f"{NAME}-h1": [1]}
    emu, local = (load_file(tmp_path / run / "model.safetensors") for run in ("emu", "local"))
    assert emu.keys() == local.keys() and all((emu[k] == local[k]).all() for k in emu)


def test_a_host_whose_link_goes_down_is_named_as_cut_off(cluster, tmp_path):
    """Host 1's link goes down after step 5: the job ends within the timeout (+ 5 s) naming its
    rank as cut off (its ring would show it behind the others, as a rank that skipped a call)."""
    out = tmp_path / "cut"
    args = ["train", "--cluster", f"emulated:{NAME}", "--nproc", "2", "--model.name", "mlp", "--train.steps", "100000",
            "--train.eval_every", "0", "--run.progress", "false", "--train.log_every", "1",
            "--train.collective_timeout_s", "3", "--out", str(out)]  # fmt: skip
    job = subprocess.Popen([sys.executable, "-m", "shardwise", *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while '"step": 5,' not in ((out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").exists() else ""):
            assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()
            time.sleep(0.05)
        netns.set_link(cluster, 1, up=False)
        down = time.monotonic()
        _, err = job.communicate(timeout=60)
        ended = time.monotonic() - down
    finally:
        netns.set_link(cluster, 1, up=True)
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 1
    said = f"the link of host {NAME}-h1 ({cluster.address(1)}) is down and rank 0 timed out waiting for it"
    assert err.strip().splitlines()[-1] == f"shardwise: rank 1 was cut off: {said}"
    assert ended < 3 + 5, ended


def test_serve_a_pipeline_on_the_cluster_answers_as_one_process(cluster, tmp_path):
    """`serve --nproc 2 --parallel.pp 2 --cluster`: the stages on two hosts, the activations
    crossing the shaped link; the front here, its answers `shardwise predict`'s."""
    import httpx
    import numpy as np

    run = tmp_path / "run"
    args = ["--model.name", "mlp", "--train.steps", "5", "--train.eval_every", "0", "--run.progress", "false"]
    assert main(["train", "--out", str(run), *args]) == 0
    x = np.random.default_rng(0).standard_normal((512, 1, 8, 8)).round(3)
    np.savez(tmp_path / "x.npz", x=x)
    assert main(["predict", str(run), "--input", str(tmp_path / "x.npz"), "--out", str(tmp_path / "p.npz")]) == 0
    before = netns.link_settings(cluster, 1)
    proc = subprocess.Popen([sys.executable, "-m", "shardwise", "serve", str(run), "--nproc", "2", "--parallel.pp",
                             "2", "--cluster", f"emulated:{NAME}", "--serve.port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "serving" in line, proc.stderr.read()
        url = line.split(" on ")[1].split()[0]
        with httpx.Client(base_url=url, timeout=60) as client:
            about = client.get("/v1/model").json()
            got = client.post("/v1/predict", json={"inputs": x.tolist()}).json()
    finally:
        proc.terminate()
        code = proc.wait(timeout=60)
    assert code == 0, proc.stderr.read()
    np.testing.assert_allclose(np.asarray(got["probabilities"]), np.load(tmp_path / "p.npz")["probabilities"],
                               rtol=1e-5, atol=1e-7)  # fmt: skip
    assert f"emulated cluster '{NAME}'" in about["layout"], about
    # the first stage's activations (512 samples x 64 or more float32) reached the second stage's host
    assert netns.link_settings(cluster, 1)["rx_bytes"] - before["rx_bytes"] > 512 * 64 * 4


def _torchrun_on_each_host(cluster, config: Path, *, run_id: str, hostname: str | None, local_addr: bool):
    """The README's multi-host command, once per host namespace, all at once; their results."""
    procs = []
    for h in range(cluster.hosts):
        name = hostname or cluster.hostname(h)
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(cluster.hosts)]
        command += ["--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{cluster.address(0)}:29500"]
        command += ["--rdzv-id", run_id, "--rdzv-conf", f"is_host={'true' if h == 0 else 'false'}"]
        command += ["--local-addr", cluster.address(h)] if local_addr else []
        command += ["-m", "shardwise.worker", str(config)]
        shell = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name, *command]
        env = {**os.environ, "GLOO_SOCKET_IFNAME": netns.HOST_IF, "OMP_NUM_THREADS": "1"}
        procs.append(
            subprocess.Popen(
                ["ip", "netns", "exec", cluster.namespace(h), *shell],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return [(p.wait(timeout=120), p.stdout.read()) for p in procs]


def _config(tmp_path: Path, out: Path) -> Path:
    from shardwise.config import load_config
    from shardwise.config_toml import to_toml

    overrides = {"model.name": "mlp", "train.steps": "12", "train.eval_every": "0", "run.progress": "false"}
    config = tmp_path / f"{out.name}.toml"
    config.write_text(to_toml(load_config(None, {**overrides, "run.out": str(out)})))
    return config


def test_torchrun_across_hosts(cluster, tmp_path):
    """torchrun itself, one per host, meeting over the shaped links: the summary names the
    hosts, and the weights are those of four local ranks."""
    out = tmp_path / "torchrun"
    results = _torchrun_on_each_host(cluster, _config(tmp_path, out), run_id="across", hostname=None, local_addr=True)
    assert all(code == 0 for code, _ in results), results
    summary = json.loads((out / "summary.json").read_text())
    assert load_config(out / "config.toml").model.name == "mlp"  # rank 0 wrote the run's config
    assert summary["hosts"] == {"swt-h0": [0, 1], "swt-h1": [2, 3]}
    assert summary["placement"] == "4 processes on 2 hosts: swt-h0 (ranks 0, 1), swt-h1 (ranks 2, 3)"
    args = ["--model.name", "mlp", "--train.steps", "12", "--train.eval_every", "0", "--run.progress", "false"]
    assert main(["train", "--nproc", "4", "--out", str(tmp_path / "local"), *args]) == 0
    across, local = (load_file(d / "model.safetensors") for d in (out, tmp_path / "local"))
    assert across.keys() == local.keys() and all((across[k] == local[k]).all() for k in local)


def test_torchrun_nnodes_min_max_goes_on_from_the_checkpoint_when_a_host_dies(cluster, tmp_path):
    """`torchrun --nnodes 1:2`, one agent a host. Once step 200's checkpoint is written, every
    process of host 1 is killed: torchrun's agent on host 0 starts its worker again as a world
    of one, which goes on from that checkpoint (counted in the agent's store), and the run ends
    with the weights of a failure-free run (float64: to the rounding of sums taken in another
    order)."""
    args = {"model.name": "mlp", "train.dtype": "float64", "train.steps": "600", "train.checkpoint_every": "100",
            "train.eval_every": "0", "run.progress": "false", "train.collective_timeout_s": "5"}  # fmt: skip
    from shardwise.config_toml import to_toml

    out, config = tmp_path / "elastic", tmp_path / "elastic.toml"
    config.write_text(to_toml(load_config(None, {**args, "run.out": str(out)})))
    agents = []
    for h in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "1",
                   "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{cluster.address(0)}:29500",
                   "--rdzv-id", "shrink", "--rdzv-conf", f"is_host={'true' if h == 0 else 'false'},last_call_timeout=1",
                   "--local-addr", cluster.address(h), "-m", "shardwise.worker", str(config)]  # fmt: skip
        env = {**os.environ, "GLOO_SOCKET_IFNAME": netns.HOST_IF, "OMP_NUM_THREADS": "1"}
        agents.append(subprocess.Popen(["ip", "netns", "exec", cluster.namespace(h), *command], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-00000200" / "manifest.json").is_file():
            assert agents[0].poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        pids = subprocess.run(["ip", "netns", "pids", cluster.namespace(1)], capture_output=True, text=True).stdout
        for pid in pids.split():  # host 1 dies: its agent and its worker
            os.kill(int(pid), 9)
        output, _ = agents[0].communicate(timeout=180)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
            agent.wait()
    assert agents[0].returncode == 0, output
    went_on = [line for line in output.splitlines() if line.startswith("shardwise: torchrun started the workers")]
    assert went_on and went_on[0].startswith("shardwise: torchrun started the workers again (1 ranks): going on "
                                             "from step-00000"), output  # fmt: skip
    assert "resumed from " in output, output  # from the checkpoint, not from the first step
    flags = [x for k, v in args.items() for x in (f"--{k}", v)]
    assert main(["train", "--nproc", "2", "--out", str(tmp_path / "plain"), *flags]) == 0
    elastic, plain = (load_file(d / "model.safetensors") for d in (out, tmp_path / "plain"))
    for key in plain:
        assert (elastic[key] - plain[key]).abs().max() < 1e-12, key


def test_a_loopback_master_addr_across_hosts_is_one_line(cluster, tmp_path):
    """Every host named localhost and no --local-addr: torchrun hands the workers
    MASTER_ADDR=localhost, which no other host can reach. Each rank says so and stops,
    instead of waiting out the rendezvous timeout."""
    config = _config(tmp_path, tmp_path / "loopback")
    started = time.monotonic()
    results = _torchrun_on_each_host(cluster, config, run_id="loop", hostname="localhost", local_addr=False)
    assert time.monotonic() - started < 60
    for code, output in results:
        assert code != 0
        lines = [line for line in output.splitlines() if line.startswith("shardwise: rank ")]
        assert lines and all("MASTER_ADDR: 'localhost' resolves to 127.0.0.1, a loopback address" in x for x in lines)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
