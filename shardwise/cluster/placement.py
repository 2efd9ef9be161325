"""Where each rank runs: on this machine's loopback, or in a host of the emulated cluster.

Either way a rank gets torchrun's environment (RANK, LOCAL_RANK, GROUP_RANK,
WORLD_SIZE, MASTER_ADDR, ...), so the worker cannot tell the emulated cluster
from real machines. In the emulated cluster rank r runs in host r mod H,
inside its network namespace and its own UTS namespace with the host's name,
and gloo binds to the host's shaped interface (GLOO_SOCKET_IFNAME), so every
byte between hosts crosses a shaped link. Torch-free.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
import time
from dataclasses import dataclass

from shardwise.cluster.netns import HOST_IF, Cluster, load
from shardwise.errors import ShardwiseError
from shardwise.procs import SECRET_ENV

DEFAULT_CLUSTER = "sw"
NETNS_DIR = "/var/run/netns"  # where `ip netns add` keeps a namespace's file


@dataclass(frozen=True)
class Placement:
    cluster: Cluster | None = None  # None: every rank on this machine, over loopback
    hosts: tuple[int, ...] = ()  # the cluster's hosts in use, in order (): all (elastic.py leaves some out)

    @property
    def used(self) -> tuple[int, ...]:
        if not self.cluster:
            return (0,)
        return self.hosts or tuple(range(self.cluster.hosts))

    @property
    def master_addr(self) -> str:
        return self.cluster.address(self.used[0]) if self.cluster else "127.0.0.1"

    def host(self, rank: int) -> int:
        return self.used[rank % len(self.used)]

    def address(self, rank: int) -> str:
        """The address of `rank`'s host."""
        return self.cluster.address(self.host(rank)) if self.cluster else "127.0.0.1"

    def env(self, rank: int, world: int, port: int) -> dict[str, str]:
        hosts = len(self.used)
        node = rank % hosts  # the host's place among those in use
        env = {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank // hosts),
            "LOCAL_WORLD_SIZE": str(len(range(node, world, hosts))),
            "GROUP_RANK": str(node),
            "ROLE_RANK": str(rank),
            "ROLE_WORLD_SIZE": str(world),
            "ROLE_NAME": "default",
            "OMP_NUM_THREADS": "1",
        }
        if self.cluster:
            env["GLOO_SOCKET_IFNAME"] = HOST_IF
            env["TP_SOCKET_IFNAME"] = HOST_IF
        return env

    def argv(self, rank: int, argv: list[str]) -> list[str]:
        """The command that runs `argv` for `rank`; each wrapper execs the next, so
        the process we start is the rank itself (signals and /proc reach it)."""
        if not self.cluster:
            return argv
        host = self.host(rank)
        name = self.cluster.hostname(host)
        inner = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name, *argv]
        return ["ip", "netns", "exec", self.cluster.namespace(host), *inner]

    def enter(self, rank: int) -> tuple[str, str] | None:
        """For a rank forked from the launcher (forked.py): the network namespace it enters
        (the file `ip netns` keeps) and the host name it takes; None on this machine."""
        if not self.cluster:
            return None
        host = self.host(rank)
        return f"{NETNS_DIR}/{self.cluster.namespace(host)}", self.cluster.hostname(host)

    def describe(self, world: int) -> str:
        if not self.cluster:
            return f"{world} processes on this machine (loopback)"
        c, used = self.cluster, self.used
        where = f"rank r in host r mod {c.hosts}" if not self.hosts else (
            f"rank r in the (r mod {len(used)})th of hosts {', '.join(map(str, used))}")  # fmt: skip
        return (
            f"emulated cluster {c.name!r}: {world} ranks on {min(world, len(used))} of {c.hosts} hosts "
            f"({where}), links {c.bandwidth} each way"
        )


def placement_for(spec: str) -> Placement:
    """`local`, `emulated` (the cluster named sw) or `emulated:NAME`."""
    kind, _, name = spec.partition(":")
    if kind == "local" and not name:
        return Placement()
    if kind == "emulated":
        return Placement(load(name or DEFAULT_CLUSTER))
    raise ShardwiseError("cluster", f"{spec!r}: expected local, emulated or emulated:NAME")


def run_ranks(argv: list[str], world: int, placement: Placement, port: int, *, timeout_s: float = 600) -> None:
    """Run `argv` as `world` ranks placed by `placement` and wait for all; when one
    fails or time runs out, stop the others and raise with its output."""
    procs, logs, secret = [], [], secrets.token_hex(32)
    try:
        for rank in range(world):
            env = {**os.environ, **placement.env(rank, world, port), SECRET_ENV: secret}
            logs.append(tempfile.TemporaryFile("w+"))
            command = placement.argv(rank, argv)
            procs.append(subprocess.Popen(command, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        failed = [r for r, p in enumerate(procs) if p.poll() != 0]
        if failed:
            rank = min(failed, key=lambda r: procs[r].poll() is None)  # one that exited, if any did
            logs[rank].seek(0)
            how = "timed out" if procs[rank].poll() is None else f"failed (exit {procs[rank].poll()})"
            raise RuntimeError(f"rank {rank} of {' '.join(argv)} {how}: {logs[rank].read()[-2000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
