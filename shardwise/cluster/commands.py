"""`shardwise cluster up | down | status | probe`: the emulated cluster from the command line."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shardwise.cluster import netns
from shardwise.cluster.placement import DEFAULT_CLUSTER, Placement, placement_for
from shardwise.cluster.probe import DEFAULT_SIZES, TOLERANCE, probe
from shardwise.errors import ShardwiseError


def add_parser(sub: argparse._SubParsersAction, parser_class: type) -> None:
    cluster = sub.add_parser("cluster", help="an emulated cluster: hosts in network namespaces, shaped links")
    actions = cluster.add_subparsers(dest="action", required=True, parser_class=parser_class)
    up = actions.add_parser("up", help="create the hosts, the switch and the shaped links (root)")
    up.add_argument("--hosts", type=int, default=2, help="number of hosts (default: 2)")
    up.add_argument("--bandwidth", default="1gbit", help="each link's rate, each way, tc notation (default: 1gbit)")
    down = actions.add_parser("down", help="remove the cluster")
    status = actions.add_parser("status", help="hosts, addresses, link settings and byte counters")
    probe_ = actions.add_parser("probe", help="ping-pong between two hosts; fit latency and bandwidth")
    probe_.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="message sizes in bytes")
    probe_.add_argument("--repeats", type=int, default=20, help="timed rounds per size (default: 20)")
    probe_.add_argument("--out", type=Path, default=Path("probe.json"), help="the JSON (default: probe.json)")
    probe_.add_argument("--loopback", action="store_true", help="probe two local processes instead (no cluster)")
    for p in (up, down, status, probe_):
        p.add_argument("--name", default=DEFAULT_CLUSTER, help=f"the cluster's name (default: {DEFAULT_CLUSTER})")


def run(args: argparse.Namespace) -> int:
    console = Console()
    if args.action == "up":
        c = netns.up(args.name, args.hosts, args.bandwidth)
        console.print(
            f"cluster {c.name!r} up: {c.hosts} hosts {c.address(0)} .. {c.address(c.hosts - 1)}, "
            f"links {c.bandwidth} each way (tbf, burst {c.burst_bytes:,} bytes)"
        )
        return 0
    if args.action == "down":
        netns.check_can_run()
        removed = netns.down(args.name)
        console.print(f"cluster {args.name!r}: " + (f"removed {len(removed)} namespaces" if removed else "was not up"))
        return 0
    if args.action == "status":
        return _status(console, netns.load(args.name))
    return _probe(console, args)


def _rate(bps: float | None) -> str:
    return "none" if bps is None else f"{bps / 1e9:g} Gbit/s"


def _status(console: Console, c: netns.Cluster) -> int:
    table = Table(title=f"cluster {c.name!r}: {c.hosts} hosts, configured {c.bandwidth} each way")
    for col in ("host", "namespace", "address", "out (tbf)", "in (tbf)", "bytes sent", "bytes received"):
        table.add_column(col, justify="right")
    for h in range(c.hosts):
        s = netns.link_settings(c, h)
        table.add_row(
            str(h),
            s["namespace"],
            s["address"],
            _rate(s["egress_bps"]),
            _rate(s["ingress_bps"]),
            f"{s['tx_bytes']:,}",
            f"{s['rx_bytes']:,}",
        )
    console.print(table)
    return 0


def _probe(console: Console, args: argparse.Namespace) -> int:
    from shardwise.procs import free_port

    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise ShardwiseError("sizes", f"{args.sizes!r}: expected byte counts separated by commas") from None
    if not sizes or min(sizes) < 4 or len(set(sizes)) < 2:
        raise ShardwiseError("sizes", f"{args.sizes!r}: need at least two different sizes of 4 bytes or more")
    if args.repeats < 1:
        raise ShardwiseError("repeats", f"must be >= 1, got {args.repeats}")
    placement = Placement() if args.loopback else placement_for(f"emulated:{args.name}")
    console.print(f"probing: ping-pong between ranks 0 and 1; {placement.describe(2)}")
    result = probe(placement, sizes=sizes, repeats=args.repeats, port=free_port())
    table = Table(title="one-way time per message: median (min - max) over the rounds")
    for col in ("bytes", "ms", "Gbit/s"):
        table.add_column(col, justify="right")
    for r in result["sizes"]:
        rate = r["bytes"] * 8 / r["median_s"] / 1e9
        spread = f"{1e3 * r['median_s']:.3f} ({1e3 * r['min_s']:.3f} - {1e3 * r['max_s']:.3f})"
        table.add_row(f"{r['bytes']:,}", spread, f"{rate:.3f}")
    console.print(table)
    fit = result["fit"]
    console.print(
        f"alpha-beta fit: alpha (latency) {1e6 * fit['alpha_s']:.1f} us, beta {fit['beta_s_per_byte']:.4g} s/byte "
        f"= bandwidth {_rate(fit['bandwidth_bps'])}"
    )
    if "bandwidth_ratio" in result:
        verdict = "within" if result["within_tolerance"] else "NOT within"
        console.print(
            f"measured / configured bandwidth: [bold]{result['bandwidth_ratio']:.3f}[/] "
            f"({verdict} {TOLERANCE:.0%} of {result['link']})"
        )
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.out)
    console.print(f"written to {args.out}")
    return 0
