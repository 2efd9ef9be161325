"""Measure a link and fit the alpha-beta model: time(n bytes) = alpha + beta * n.

alpha is the start-up latency of one message, beta the seconds per byte (1/beta
the bandwidth), as in Hockney's model, which the planner's cost model uses. The
measurement is a gloo ping-pong between two ranks (hosts 0 and 1 of the
emulated cluster, or two processes on loopback) over a range of sizes; the
one-way time of a size is the median of its rounds. Torch-free: the ranks run
`shardwise.cluster.probe_worker`.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from shardwise.cluster.placement import Placement, run_ranks

DEFAULT_SIZES = [2**k for k in range(10, 25, 2)]  # 1 KiB .. 16 MiB
TOLERANCE = 0.10  # the measured bandwidth must be within 10% of the shaping


def fit_alpha_beta(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """alpha and beta from one-way times, each regime fitted where it dominates.

    beta is the least-squares slope over the sizes that take at least 8 times as
    long as the smallest (bandwidth-bound); alpha is what remains of the smallest
    message's time, `t_min - beta * n_min` (latency-bound). A single straight line
    through all points would be pulled by a shaped link's token bucket, which lets
    the first `burst` bytes of a message through at once: the line's intercept
    would come out below zero."""
    points = sorted(zip(sizes, seconds, strict=True))
    big = [(n, t) for n, t in points if t >= 8 * points[0][1]]
    if len(big) < 2:  # nothing is bandwidth-bound: the two largest are the best there is
        big = points[-2:]
    mx = sum(n for n, _ in big) / len(big)
    my = sum(t for _, t in big) / len(big)
    beta = sum((n - mx) * (t - my) for n, t in big) / sum((n - mx) ** 2 for n, _ in big)
    n0, t0 = points[0]
    return max(t0 - beta * n0, 0.0), beta


def measure(
    placement: Placement, *, pattern: str, sizes: list[int], repeats: int, world: int, port: int, collective=None
) -> dict:
    """Run the probe ranks; the JSON rank 0 wrote. The collectives are timed at `collective`'s
    sizes where it is given, else at `sizes`."""
    with tempfile.TemporaryDirectory(prefix="shardwise-probe-") as tmp:
        out = Path(tmp) / "probe.json"
        argv = [sys.executable, "-m", "shardwise.cluster.probe_worker", "--pattern", pattern]
        argv += ["--sizes", ",".join(map(str, sizes)), "--repeats", str(repeats), "--out", str(out)]
        argv += ["--collective-sizes", ",".join(map(str, collective))] if collective else []
        run_ranks(argv, world, placement, port)
        return json.loads(out.read_text())


LINK_VERSION = 5  # of what calibrate_link measures: a cached link of another version is measured again
COLLECTIVE_SIZES = [2**16, 2**24, 2**26]  # 64 KiB: the per-call cost; 16 and 64 MiB: the factor on the ring
PATTERN_KIND = {
    "allreduce": "all_reduce",
    "allgather": "all_gather",
    "reducescatter": "reduce_scatter",
    "allreduce_bf16": "all_reduce_bf16",  # of half-precision entries (bf16 and fp16 compression)
    "allreduce_fp16": "all_reduce_fp16",
}


def expected(seconds: list[float]) -> float:
    """What a call costs on average, the slowest tenth left out: a training step makes many
    small collectives, and pays their scheduler wake-ups (a few in ten rounds take several
    times the rest), which a median would hide; a rare stall of the machine should not count."""
    kept = sorted(seconds)[: max(1, round(0.9 * len(seconds)))]
    return sum(kept) / len(kept)


def calibrate_link(placement: Placement, *, world: int, port: int) -> dict:
    """In one start of `world` ranks placed by `placement`: the ping-pong fit between ranks 0
    and 1, each collective's calibration on all of them, the overlap of an all-reduce
    with compute (`comm.cost.calibrate`) and what a small exchange between computing ranks
    costs (what the planner's link is)."""
    from shardwise.comm.cost import Link, calibrate

    names = ",".join(["pingpong", *PATTERN_KIND, "overlap", "sync"])
    sizes = sorted(set(DEFAULT_SIZES) | set(COLLECTIVE_SIZES))
    raw = measure(
        placement, pattern=names, sizes=sizes, repeats=10, world=world, port=port, collective=COLLECTIVE_SIZES
    )["by_pattern"]
    ping = [(r["bytes"], statistics.median(r["seconds"])) for r in raw["pingpong"]]
    alpha, beta = fit_alpha_beta([n for n, _ in ping], [t for _, t in ping])
    timed = {kind: [(r["bytes"], expected(r["seconds"])) for r in raw[name]] for name, kind in PATTERN_KIND.items()}
    overlap = statistics.median(raw["overlap"][0]["seconds"])
    link = calibrate(Link(alpha, beta), world, timed, overlap)
    return {
        "version": LINK_VERSION,
        "alpha_s": alpha,
        "beta_s_per_byte": beta,
        "bandwidth_bps": 8 / beta if beta > 0 else None,
        "world": world,
        "collectives": {k: list(v) for k, v in link.collectives.items()},
        "overlap": overlap,
        "sync_s": raw["sync"][0]["seconds"][0],
    }


def probe(placement: Placement, *, sizes: list[int], repeats: int, port: int) -> dict:
    """Ping-pong between ranks 0 and 1, the fit, and how it compares with the shaping."""
    raw = measure(placement, pattern="pingpong", sizes=sizes, repeats=repeats, world=2, port=port)
    rows = [
        {
            "bytes": r["bytes"],
            "median_s": statistics.median(r["seconds"]),
            "min_s": min(r["seconds"]),
            "max_s": max(r["seconds"]),
            "rounds": len(r["seconds"]),
        }
        for r in raw["sizes"]
    ]
    alpha, beta = fit_alpha_beta([r["bytes"] for r in rows], [r["median_s"] for r in rows])
    cluster = placement.cluster
    result = {
        "link": cluster.bandwidth if cluster else "loopback",
        "ranks": raw["ranks"],
        "sizes": rows,
        "fit": {"alpha_s": alpha, "beta_s_per_byte": beta, "bandwidth_bps": 8 / beta if beta > 0 else None},
    }
    if cluster:
        bandwidth = result["fit"]["bandwidth_bps"] or 0.0
        result["configured_bps"] = cluster.rate_bps
        result["bandwidth_ratio"] = bandwidth / cluster.rate_bps
        result["within_tolerance"] = abs(result["bandwidth_ratio"] - 1) <= TOLERANCE
    return result
