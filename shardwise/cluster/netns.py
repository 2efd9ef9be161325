"""An emulated cluster on one Linux machine: hosts are network namespaces with shaped links.

Layout of a cluster named NAME with H hosts:

    NAME-switch            a namespace holding the bridge `br0`
    NAME-h0 .. NAME-h{H-1} one namespace per host, its interface `eth0` at 10.77.0.{i+1}/24
    veth pair h{i} <-> eth0  joins host i to the bridge

Every link is shaped in both directions with a token bucket (`tc tbf`): on the
host's `eth0` (host -> switch) and on the switch's `h{i}` (switch -> host). Both
are egress queues, so no ifb redirect is needed; netem (delay, loss) is not
used. Nothing touches the root namespace: `down` deletes the namespaces, and
with them every interface and queue.

Needs root and iproute2 (`ip`, `tc`). Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from shardwise.errors import ShardwiseError

SUBNET = "10.77.0"
STATE_DIR = Path(os.environ.get("SHARDWISE_CLUSTER_STATE", "/run/shardwise/clusters"))
QUEUE_LATENCY = "50ms"  # the longest a packet may wait in the bucket's queue before it is dropped
NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")
RATE = re.compile(r"^(\d+(?:\.\d+)?)(k|m|g)?bit$")
UNITS = {None: 1, "k": 1e3, "m": 1e6, "g": 1e9}
HOST_IF = "eth0"


@dataclass
class Cluster:
    name: str
    hosts: int
    bandwidth: str  # as tc writes it: 1gbit, 500mbit, ...
    rate_bps: float
    burst_bytes: int

    @property
    def switch(self) -> str:
        return f"{self.name}-switch"

    def namespace(self, host: int) -> str:
        return f"{self.name}-h{host}"

    def address(self, host: int) -> str:
        return f"{SUBNET}.{host + 1}"

    def hostname(self, host: int) -> str:
        return f"{self.name}-h{host}"


def parse_rate(text: str) -> float:
    """Bits per second from tc's notation (`1gbit`, `500mbit`, `100kbit`)."""
    m = RATE.match(text.strip().lower())
    if not m or float(m.group(1)) <= 0:
        raise ShardwiseError("bandwidth", f"{text!r} is not a rate like 100mbit, 1gbit or 10gbit")
    return float(m.group(1)) * UNITS[m.group(2)]


def burst_for(rate_bps: float) -> int:
    """Bucket size: what the link sends in 1 ms, but at least 64 KiB plus headers,
    the largest segment the kernel hands a veth (GSO); a smaller bucket would stall
    on such a segment."""
    return max(int(rate_bps / 8 * 1e-3), 70_000)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _tc(namespace: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(["tc", "-n", namespace, *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"tc -n {namespace} {' '.join(args)}: {done.stderr.strip()}")
    return done


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise ShardwiseError("name", f"{name!r}: 1 to 8 lower-case letters and digits, starting with a letter")
    return name


def check_can_run() -> None:
    """One line, exit 2, when the machine cannot host a cluster."""
    missing = [tool for tool in ("ip", "tc", "unshare") if shutil.which(tool) is None]
    if missing:
        raise ShardwiseError("cluster", f"needs {', '.join(missing)} (iproute2, util-linux); not found on PATH")
    if os.geteuid() != 0:
        raise ShardwiseError(
            "cluster", f"needs root to create network namespaces and shape links (running as uid {os.geteuid()})"
        )


def namespaces(name: str) -> list[str]:
    """The live namespaces of the cluster NAME."""
    listed = _ip("-j", "netns", "list", check=False).stdout.strip()
    names = [entry["name"] for entry in json.loads(listed)] if listed else []
    return sorted(n for n in names if n.startswith(f"{name}-"))


def _state_path(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def load(name: str) -> Cluster:
    """The cluster NAME as `up` recorded it; one line when it is not up."""
    check_name(name)
    check_can_run()
    path = _state_path(name)
    if not path.is_file() or not namespaces(name):
        raise ShardwiseError("cluster", f"no emulated cluster {name!r} is up; start one with `shardwise cluster up`")
    return Cluster(**json.loads(path.read_text()))


def up(name: str, hosts: int, bandwidth: str) -> Cluster:
    """Create the cluster; on any failure remove what was made and raise."""
    check_name(name)
    if not 2 <= hosts <= 64:
        raise ShardwiseError("hosts", f"must be 2 to 64, got {hosts}")
    rate = parse_rate(bandwidth)
    check_can_run()
    existing = namespaces(name)
    if existing:
        raise ShardwiseError(
            "cluster", f"{name!r} is already up ({len(existing) - 1} hosts); `shardwise cluster down` removes it first"
        )
    cluster = Cluster(name, hosts, bandwidth.strip().lower(), rate, burst_for(rate))
    shaping = ["tbf", "rate", cluster.bandwidth, "burst", str(cluster.burst_bytes), "latency", QUEUE_LATENCY]
    try:
        _ip("netns", "add", cluster.switch)
        _ip("-n", cluster.switch, "link", "set", "lo", "up")
        _ip("-n", cluster.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", cluster.switch, "link", "set", "br0", "up")
        for h in range(hosts):
            ns, port = cluster.namespace(h), f"h{h}"
            _ip("netns", "add", ns)
            _ip("-n", cluster.switch, "link", "add", port, "type", "veth", "peer", "name", HOST_IF, "netns", ns)
            _ip("-n", cluster.switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{cluster.address(h)}/24", "dev", HOST_IF)
            _ip("-n", ns, "link", "set", HOST_IF, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _tc(ns, "qdisc", "add", "dev", HOST_IF, "root", *shaping)
            _tc(cluster.switch, "qdisc", "add", "dev", port, "root", *shaping)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = _state_path(name).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(cluster), indent=1))
        tmp.replace(_state_path(name))
    except BaseException:
        down(name)
        raise
    return cluster


def down(name: str) -> list[str]:
    """Remove every namespace of the cluster and its record; the namespaces removed."""
    check_name(name)
    removed = namespaces(name)
    for ns in removed:
        _ip("netns", "delete", ns, check=False)
    _state_path(name).unlink(missing_ok=True)
    return removed


def set_link(cluster: Cluster, host: int, *, up: bool) -> None:
    """Take host's link down (its own end: the host is cut off) or bring it up again."""
    _ip("-n", cluster.namespace(host), "link", "set", HOST_IF, "up" if up else "down")


def link_up(cluster: Cluster, host: int) -> bool:
    """Whether host's link carries traffic both ways: its own end and the switch's are up, and
    its namespace exists (a host taken down: `ip -n NS link set eth0 down`, or its end at the
    switch)."""
    ends = ((cluster.namespace(host), HOST_IF), (cluster.switch, f"h{host}"))
    for ns, dev in ends:
        shown = _ip("-j", "-n", ns, "link", "show", "dev", dev, check=False)
        if shown.returncode != 0 or "LOWER_UP" not in json.loads(shown.stdout or "[{}]")[0].get("flags", []):
            return False
    return True


def link_settings(cluster: Cluster, host: int) -> dict:
    """What the kernel says of host's link: address, shaping both ways, bytes sent and received."""
    ns = cluster.namespace(host)
    link = json.loads(_ip("-j", "-s", "-n", ns, "link", "show", "dev", HOST_IF).stdout)[0]
    addrs = json.loads(_ip("-j", "-n", ns, "addr", "show", "dev", HOST_IF).stdout)[0]["addr_info"]

    def rate(namespace: str, dev: str) -> float | None:
        for q in json.loads(_tc(namespace, "-j", "qdisc", "show", "dev", dev).stdout):
            if q.get("kind") == "tbf":
                return float(q["options"]["rate"]) * 8  # tc -j reports bytes per second
        return None

    stats = link.get("stats64", link.get("stats", {}))
    return {
        "host": host,
        "namespace": ns,
        "address": next((a["local"] for a in addrs if a.get("family") == "inet"), ""),
        "egress_bps": rate(ns, HOST_IF),
        "ingress_bps": rate(cluster.switch, f"h{host}"),
        "tx_bytes": stats["tx"]["bytes"],
        "rx_bytes": stats["rx"]["bytes"],
    }
