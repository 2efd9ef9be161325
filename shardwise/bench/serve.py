"""Serving under load: an open-loop load generator against `shardwise serve`, with dynamic
batching and with batch-1 serving (serve.max_batch = 1), alternated.

Requests arrive as a Poisson process at each of RATES for SECONDS (open loop: an arrival
does not wait for earlier answers, so a server that falls behind shows it as latency, not as
a slower client). Each asks for one sample (64 features) of an MLP (4096 x 4096 hidden). A request's
latency runs from its scheduled arrival to its answer. Per rate: p50 and p99 latency, the
answers a second, and the goodput (answers within the P99_TARGET_MS a second). The figure:
the goodput at the highest rate whose p99 stays within the target, dynamic over batch-1.

Plain HTTP on loopback, the generator (aiohttp's client, asyncio) in this process: on a
small machine it shares the cores with the server, which the figures include.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import statistics
import subprocess
import sys
import time

import numpy as np

from shardwise.bench.common import Bench

RATES = (100, 150, 200, 250, 300, 400, 500, 600, 800, 1000, 1200, 1600, 2000)
GIVE_UP = 4.0  # a side's rates stop rising once its p99 passes this many times the target
SECONDS = 4.0
P99_TARGET_MS = 100.0
SIDES = {
    "batch-1": ["--serve.max_batch", "1", "--serve.max_wait_ms", "0"],
    "dynamic": ["--serve.max_batch", "32", "--serve.max_wait_ms", "5"],
}


def _start(run_folder, args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "shardwise", "serve", str(run_folder), "--serve.port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    line = found = None
    while line != "" and not found:  # (ranks may print before the server says where it listens)
        line = proc.stdout.readline()
        found = re.search(r"serving .* on (http://127\.0\.0\.1:\d+)/", line)
    if not found:
        proc.kill()
        raise RuntimeError(f"the server did not start: {proc.stderr.read()[-2000:]}")
    return proc, found.group(1)


def one_at_a_time(url: str, body: bytes, count: int, warm: int = 5) -> float:
    """The median ms of `count` requests sent one after another (after `warm` not counted)."""
    from shardwise.plan.front import median_round_trip

    return 1e3 * median_round_trip(url, body, count, warm)


async def _load(url: str, body: bytes, rate: float, seconds: float, seed: int) -> dict:
    import aiohttp

    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, int(rate * seconds * 1.5) + 10))
    arrivals = arrivals[arrivals < seconds]
    latencies: list[float] = []
    failed = 0
    connector = aiohttp.TCPConnector(limit=1024)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:

        async def ask(at: float) -> None:
            nonlocal failed
            try:
                async with client.post("/v1/predict", data=body, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    if r.status != 200:
                        failed += 1
                        return
            except (aiohttp.ClientError, TimeoutError):
                failed += 1
                return
            latencies.append(time.perf_counter() - (start + at))

        async with client.get("/healthz") as r:
            await r.read()
        start = time.perf_counter()
        tasks = []
        for at in arrivals:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(ask(float(at))))
        await asyncio.gather(*tasks)
        took = time.perf_counter() - start
    lat = np.asarray(latencies) * 1e3
    within = int((lat <= P99_TARGET_MS).sum()) if len(lat) else 0
    return {
        "rate": rate,
        "sent": len(arrivals),
        "answered": len(lat),
        "failed": failed,
        "throughput": len(lat) / took,
        "goodput": within / took,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("inf"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("inf"),
    }


def _side(run_folder, args: list[str], body: bytes, seed: int) -> list[dict]:
    """Each rate in turn, until the p99 passes GIVE_UP times the target (the higher rates
    would only queue longer)."""
    proc, url = _start(run_folder, args)
    rows: list[dict] = []
    try:
        for k, rate in enumerate(RATES):
            if rows and rows[-1]["p99_ms"] > GIVE_UP * P99_TARGET_MS:
                break
            rows.append(asyncio.run(_load(url, body, rate, SECONDS, seed + k)))
        return rows
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def capacity(rows: list[dict]) -> dict:
    """The row of the highest rate whose p99 stays within the target (the lowest's otherwise)."""
    within = [r for r in rows if r["p99_ms"] <= P99_TARGET_MS and not r["failed"]]
    return within[-1] if within else rows[0]


def run(bench: Bench) -> None:
    # a model whose forward pass reads much more than it computes at batch 1 (68 MB of weights),
    # what batching is for, on a small request (64 numbers: the HTTP and JSON work stays small)
    bench.train(["--model.name", "mlp", "--model.hidden", "4096,4096", "--data.name", "synthetic",
                 "--data.shape", "64", "--data.samples", "256"], "serve model", steps=5, nproc=1)  # fmt: skip
    run_folder = bench.work / "serve_model"
    sample = np.random.default_rng(0).standard_normal((1, 64)).round(3)
    body = json.dumps({"inputs": sample.tolist()}).encode()
    found: dict[str, list[list[dict]]] = {name: [] for name in SIDES}
    for i in range(bench.repeats):
        names = list(SIDES)[i % 2 :] + list(SIDES)[: i % 2]
        for name in names:
            found[name].append(_side(run_folder, SIDES[name], body, seed=100 * i))
        best = {n: capacity(found[n][-1]) for n in SIDES}
        shown = [f"{n} {b['goodput']:.0f}/s at {b['rate']}/s (p99 {b['p99_ms']:.1f} ms)" for n, b in best.items()]
        bench.console.print(f"  repetition {i + 1}: " + ", ".join(shown))
    _report(bench, found)


def _report(bench: Bench, found: dict[str, list[list[dict]]]) -> None:
    ratios = [capacity(d)["goodput"] / capacity(b)["goodput"] for d, b in zip(found["dynamic"], found["batch-1"],
                                                                             strict=True)]  # fmt: skip
    bench.record("serve", f"goodput at p99 <= {P99_TARGET_MS:g} ms, dynamic / batch-1", ratios,
                 how=f"open-loop Poisson arrivals {RATES} req/s, {SECONDS:g} s each, one sample a request")  # fmt: skip
    for name, reps in found.items():
        bench.record("serve", f"{name}: goodput at p99 <= {P99_TARGET_MS:g} ms (req/s)",
                     [capacity(r)["goodput"] for r in reps], unit="req/s")  # fmt: skip
        for k, rate in enumerate(RATES):
            rows = [r[k] for r in reps if len(r) > k]
            if len(rows) < len(reps):  # a rate some repetition gave up before
                break
            bench.record("serve", f"{name} at {rate} req/s: p50 ms", [r["p50_ms"] for r in rows], unit="ms")
            bench.record("serve", f"{name} at {rate} req/s: p99 ms", [r["p99_ms"] for r in rows], unit="ms")
            bench.record("serve", f"{name} at {rate} req/s: answers/s", [r["throughput"] for r in rows], unit="req/s")
    summary = statistics.median(ratios)
    bench.console.print(
        f"serve: dynamic batching serves {summary:.2f}x batch-1's goodput at p99 <= {P99_TARGET_MS:g} ms"
    )
