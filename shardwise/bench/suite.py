"""`shardwise bench [SCENARIO ...]`: run scenarios on each link, write bench.json and bench.md.

A link is `loopback` (every rank on this machine) or a rate such as `1gbit`:
then an emulated cluster of HOSTS hosts with links shaped to that rate is
brought up for the scenarios and removed after them (root). Every timed figure
is a ratio of two jobs run side by side in one repetition, the jobs' order
rotated between repetitions; the table gives the median over the repetitions
with the min and max. Counted figures (bytes, trials) are not timed.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from shardwise.bench import (
    allreduce,
    buckets,
    checkpointing,
    compression,
    ddp,
    elastic,
    hangs,
    planner,
    pp,
    pp_schedules,
    precision,
    ps,
    restarts,
    scaling,
    serve,
    serve_auto,
    serve_pp,
    shard,
    spatial,
    sql,
    tp,
)
from shardwise.bench.common import Bench, bench_console
from shardwise.cluster import netns
from shardwise.cluster.placement import Placement
from shardwise.errors import ShardwiseError
from shardwise.jsonsafe import dumps

# the scenarios that take --cases: each parses them (MODEL:RANKS) against its own models
CASES: dict[str, Callable[[str | None], list[tuple[str, int]]]] = {
    "planner": planner.parse_cases,
    "compression": compression.parse_cases,
}

# name -> (run, runs on shaped links too)
SCENARIOS: dict[str, tuple[Callable[[Bench], None], bool]] = {
    "allreduce": (allreduce.run, True),
    "ddp": (ddp.run, True),
    "scaling": (scaling.run, True),
    "buckets": (buckets.run, True),  # DDP's bucket size against its own, per link
    "tp": (tp.run, True),
    "pp": (pp.run, True),
    "pp-schedules": (pp_schedules.run, True),  # torch's five schedules side by side: minutes a link
    "spatial": (spatial.run, True),
    "shard": (shard.run, False),  # bytes held: the same on every link
    "ps": (ps.run, True),
    "precision": (precision.run, False),  # compute: one link is enough
    "checkpointing": (checkpointing.run, False),  # compute and memory: one link is enough
    "restarts": (restarts.run, False),  # correctness trials, not timed
    "compression": (compression.run, True),  # every method trained to a target, 3 seeds: an hour a link
    "planner": (planner.run, True),  # every layout run for real: an hour and more
    "sql": (sql.run, False),  # a database on this machine: loopback only
    "serve": (serve.run, False),  # one serving process under load: loopback
    "serve-pp": (serve_pp.run, True),  # a model over one rank's budget, served by a pipeline
    "serve-auto": (serve_auto.run, True),  # every serving layout served, against the serving cost model
    "elastic": (elastic.run, True),  # hosts lost and back on a schedule: the emulated cluster only, minutes
    "hangs": (hangs.run, True),  # seeded broken collectives (and links taken down): is the culprit named?
}
NAMED_ONLY = (
    "buckets",
    "pp-schedules",
    "restarts",
    "planner",
    "compression",
    "checkpointing",
    "sql",
    "serve",
    "serve-pp",
    "serve-auto",
    "elastic",
    "hangs",
)
DEFAULT = [name for name in SCENARIOS if name not in NAMED_ONLY]
CLUSTER_NAME, HOSTS = "swb", 4


def check_request(scenarios: list[str], links: list[str], repeats: int) -> None:
    """One line, before anything runs, for a name, link or count that cannot be."""
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise ShardwiseError("scenario", f"{', '.join(unknown)}: not one of {', '.join(SCENARIOS)}")
    if repeats < 5:
        raise ShardwiseError("repeats", f"must be >= 5 (medians over at least 5 repetitions), got {repeats}")
    for link in links:
        if link != "loopback":
            netns.parse_rate(link)
    if any(link != "loopback" for link in links):
        netns.check_can_run()


@contextmanager
def link_placement(link: str):
    if link == "loopback":
        yield Placement()
        return
    netns.down(CLUSTER_NAME)  # a leftover of an interrupted run
    cluster = netns.up(CLUSTER_NAME, HOSTS, link)
    try:
        yield Placement(cluster)
    finally:
        netns.down(CLUSTER_NAME)


def markdown(results: list[dict], links: list[str]) -> str:
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    order = list(SCENARIOS)
    for r in sorted(results, key=lambda r: order.index(r["scenario"])):  # stable: each scenario's own order
        rows.setdefault((r["scenario"], r["measure"]), {})[r["link"]] = r
    lines = [
        "| scenario | measure | " + " | ".join(links) + " | how |",
        "|---|---|" + "---:|" * len(links) + "---|",
    ]
    for (scenario, measure), by_link in rows.items():
        cells = []
        for link in links:
            r = by_link.get(link)
            if r is None:
                cells.append("")
            elif r["min"] == r["max"]:
                cells.append(f"{r['median']:.3g}")
            else:
                cells.append(f"**{r['median']:.3f}** ({r['min']:.3f}-{r['max']:.3f})")
        how = next((r["how"] for r in by_link.values() if r["how"]), "")
        lines.append(f"| {scenario} | {measure} | " + " | ".join(cells) + f" | {how} |")
    return "\n".join(lines) + "\n"


def run_suite(
    scenarios: list[str],
    links: list[str],
    repeats: int,
    out: Path,
    *,
    plan_only: bool = False,
    cases: str | None = None,
    rounds: int = 3,
) -> int:
    scenarios = scenarios or DEFAULT
    check_request(scenarios, [], repeats)
    if not any(SCENARIOS[name][1] for name in scenarios):
        links = [link for link in links if link == "loopback"] or ["loopback"]  # the same on every link
    check_request(scenarios, links, repeats)
    takers = [name for name in scenarios if name in CASES]
    if cases and not takers:
        raise ShardwiseError("cases", f"only {' and '.join(CASES)} take cases, asked for {', '.join(scenarios)}")
    for name in takers:
        CASES[name](cases)  # a bad case stops the bench before anything runs
    if rounds < 1:
        raise ShardwiseError("rounds", f"must be >= 1 (runs of every layout), got {rounds}")
    if plan_only:
        for link in links:
            names = [name for name in scenarios if link == "loopback" or SCENARIOS[name][1]]
            print(f"{link}: {', '.join(names)}; {repeats} repetitions each")
        print(f"would write {out / 'bench.json'} and {out / 'bench.md'}")
        return 0
    console = bench_console()
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    details: list[dict] = []
    runs: list[dict] = []
    started = time.time()
    for link in links:
        console.rule(f"[bold]link: {link}")
        with link_placement(link) as placement, tempfile.TemporaryDirectory(prefix="shardwise-bench-") as tmp:
            bench = Bench(link, placement, repeats, Path(tmp), console, options={"cases": cases, "rounds": rounds})
            for name in scenarios:
                run, shaped_too = SCENARIOS[name]
                if link == "loopback" or shaped_too:
                    run(bench)
            results += bench.results
            details += bench.details
            runs += bench.runs
    report = {
        "command": "shardwise bench " + " ".join(sys.argv[2:]),
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
        "machine": f"{platform.machine()}, {platform.system()} {platform.release()}, cpus={_cpus()}",
        "links": links,
        "repeats": repeats,
        "wall_s": time.time() - started,
        "results": results,
    }
    if runs:
        report |= {"runs": runs}
    if details:
        report |= {"planner": details, "flips": planner.flips(details)}
        planner.plot(out / "planner.png", details)
    table = markdown(results, links)
    for path, text in ((out / "bench.json", dumps(report, indent=1)), (out / "bench.md", table)):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    console.rule("[bold]summary")
    print(table)
    console.print(f"written: {out / 'bench.json'}, {out / 'bench.md'} ({report['wall_s'] / 60:.1f} min)")
    return 0


def _cpus() -> int:
    return len(os.sched_getaffinity(0))
