"""The launcher's rendezvous store: torch's own TCPStore is the reference for what each
operation answers; a peer without the job's secret can neither join, read nor write it,
on loopback and from another host of the emulated cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from shardwise.procs import free_port, ranks_under
from shardwise.rendezvous import SecretStore, StoreServer

SECRET = bytes(range(32))
WAIT = timedelta(seconds=5)


@pytest.fixture(scope="module")
def stores():
    """shardwise's store and torch's TCPStore, each served on loopback."""
    port = free_port()
    server = StoreServer("127.0.0.1", port, SECRET)
    ours = SecretStore("127.0.0.1", port, SECRET, timeout=WAIT)
    theirs = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True, timeout=WAIT)
    yield ours, theirs, server, port
    server.close()


def _script(store) -> list:
    """The operations torch's rendezvous and process groups use, and what each answered."""
    out = []
    store.set("a", b"1")
    store.set("text", "value")
    out.append(store.get("a"))
    out.append(store.get("text"))
    out.append(store.add("counter", 3))
    out.append(store.add("counter", -1))
    out.append(store.get("counter"))
    out.append(store.compare_set("cs", b"", b"first"))  # absent: set
    out.append(store.compare_set("cs", b"wrong", b"second"))  # not as expected: the value stays
    out.append(store.compare_set("cs", b"first", b"third"))
    out.append(store.check(["a", "cs"]))
    out.append(store.check(["a", "nothing"]))
    store.wait(["a", "text"])
    store.append("log", b"x")
    store.append("log", b"y")
    out.append(store.get("log"))
    out.append(store.multi_get(["a", "log"]))
    out.append(store.delete_key("a"))
    out.append(store.delete_key("a"))
    out.append(store.check(["a"]))
    return out


def test_each_operation_answers_as_torchs_tcpstore_does(stores):
    ours, theirs, _, _ = stores
    assert _script(ours) == _script(theirs)
    started = time.monotonic()
    for store in (ours, theirs):
        with pytest.raises(dist.DistStoreError):
            store.wait(["never"], timedelta(seconds=0.3))
    assert time.monotonic() - started < 3


def test_a_peer_without_the_secret_cannot_join_read_or_write(stores, capfd):
    ours, _, server, port = stores
    ours.set("address", b"10.0.0.1:1234")
    keys, refused = ours.num_keys(), server.refused
    with pytest.raises(dist.DistStoreError, match="do not hold the same secret"):
        SecretStore("127.0.0.1", port, b"\0" * 32, timeout=WAIT)
    with socket.create_connection(("127.0.0.1", port)) as raw:  # not the protocol at all
        raw.sendall(b"GET address\r\n" + b"\0" * 64)
        try:
            assert raw.recv(100) == b""  # cut off, nothing answered
        except ConnectionResetError:
            pass
    deadline = time.monotonic() + 5
    while server.refused < refused + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.refused == refused + 2
    assert ours.num_keys() == keys and ours.get("address") == b"10.0.0.1:1234"
    err = capfd.readouterr().err
    assert err.count("shardwise: the rendezvous refused a connection from 127.0.0.1: it did not prove") == 2, err


def test_a_rank_will_not_talk_to_a_server_without_the_secret():
    """The proof goes both ways: a store that does not hold the secret cannot pose as rank 0's."""
    port = free_port()
    impostor = StoreServer("127.0.0.1", port, b"\1" * 32)
    try:
        with pytest.raises(dist.DistStoreError, match="do not hold the same secret"):
            SecretStore("127.0.0.1", port, SECRET, timeout=WAIT)
    finally:
        impostor.close()


def test_an_altered_message_is_dropped(stores):
    """A request whose sealed bytes changed on the way (one bit): the server drops the
    connection instead of acting on it."""
    _, _, server, port = stores
    store = SecretStore("127.0.0.1", port, SECRET, timeout=WAIT)

    class Flipping:  # the wire, changing the last bit of what it carries
        def __init__(self, sock):
            self.sock = sock

        def sendall(self, data: bytes) -> None:
            self.sock.sendall(data[:-1] + bytes([data[-1] ^ 1]))

        def recv(self, n: int) -> bytes:
            return self.sock.recv(n)

    store.channel.sock = Flipping(store.channel.sock)
    with pytest.raises(ConnectionError):
        store.set("altered", b"1")
    assert not SecretStore("127.0.0.1", port, SECRET, timeout=WAIT).check(["altered"])


INTRUDER = """
import json, os, socket, sys
from datetime import timedelta
import torch.distributed as dist
from shardwise.rendezvous import SecretStore
host, port, secret = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
out = {}
try:
    store = dist.TCPStore(host, port, 2, is_master=False, timeout=timedelta(seconds=3))
    out["tcpstore"] = repr(store.get("0"))
except Exception as e:
    out["tcpstore"] = "failed: " + type(e).__name__
for name, key in (("guessed", os.urandom(32)), ("held", secret)):
    try:
        store = SecretStore(host, port, key, timeout=timedelta(seconds=5))
        out[name] = store.num_keys()
    except Exception as e:
        out[name] = "failed: " + str(e)
print(json.dumps(out))
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "tc", "unshare")),
    reason="the emulated cluster needs root, iproute2 (ip, tc) and unshare",
)
def test_another_host_without_the_secret_cannot_use_a_jobs_rendezvous(tmp_path):
    """A job on hosts 0 and 1 of the emulated cluster; from host 2, which reaches rank 0's
    store and knows its address and port: torch's TCPStore client and a client with a guessed
    secret are refused, while one holding the job's secret (taken from a rank, as only its
    user or root can) gets in. The job goes on."""
    from shardwise.cluster import netns

    name = "swr"
    netns.down(name)
    cluster = netns.up(name, 3, "1gbit")
    job = None
    try:
        job = subprocess.Popen([sys.executable, "-m", "shardwise", "train", "--cluster", f"emulated:{name}", "--nproc",
                                "2", "--model.name", "mlp", "--train.steps", "100000", "--train.eval_every", "0",
                                "--run.progress", "false", "--out", str(tmp_path / "run")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "SHARDWISE_START": "spawn"})  # fmt: skip
        env = _rank0_environ(job.pid)
        assert env["MASTER_ADDR"] == cluster.address(0)
        done = subprocess.run(["ip", "netns", "exec", cluster.namespace(2), sys.executable, "-c", INTRUDER,
                               env["MASTER_ADDR"], env["MASTER_PORT"], env["SHARDWISE_JOB_SECRET"]],
                              capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])  # fmt: skip
        assert done.returncode == 0, done.stderr
        seen = json.loads(done.stdout)
        assert seen["tcpstore"].startswith("failed"), seen
        assert seen["guessed"].startswith("failed: cannot join") and "the same secret" in seen["guessed"], seen
        assert isinstance(seen["held"], int) and seen["held"] > 0, seen
        assert job.poll() is None  # training goes on
    finally:
        if job is not None:
            job.send_signal(signal.SIGTERM)
            job.wait(timeout=30)
        netns.down(name)
    err = job.stderr.read()
    assert err.count(f"the rendezvous refused a connection from {cluster.address(2)}: it did not prove") == 2, err


def _rank0_environ(launcher: int) -> dict[str, str]:
    """The environment rank 0 (a fresh interpreter: a forked rank's /proc keeps its launcher's)
    started with."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if 0 in (ranks := ranks_under(launcher)):
            text = Path(f"/proc/{ranks[0]}/environ").read_text()
            return dict(kv.split("=", 1) for kv in text.split("\0") if "=" in kv)
        time.sleep(0.1)
    raise AssertionError("rank 0 never started")
