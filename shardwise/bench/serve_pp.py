"""Serving a model too large for one rank's memory budget, cut in a pipeline of 2 stages:
pipelined (a batch a stage in flight) against one batch at a time (serve.pipelined =
false), alternated; on loopback, and on the emulated cluster (the stages on two hosts, the
activations crossing the shaped link; the server and the load on this machine).

The model: an MLP of 64 inputs and three hidden layers of 4096 (129 MiB of weights), served
under serve.memory_per_rank = BUDGET (96 MiB): one process is refused (checked, exit 2),
pp = 2 holds about 65 MiB a rank. Per side and repetition: the single-request latency (one
request at a time, closed loop, the median of SINGLE), then open-loop Poisson arrivals at
rates that are multiples of one request per single-request latency (measured once, on the
pipelined side, before the first repetition), SECONDS each, dynamic batching as `bench
serve`'s (32 samples, 5 ms). The figure the target reads: p99 over the side's own
single-request latency at each rate, and the highest rate whose p99 stays within 2x it
(0 where none did); and the two sides' p99 at each rate both reached.
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import subprocess
import sys

import numpy as np

from shardwise.bench.common import Bench
from shardwise.bench.serve import SIDES, _load, _start, one_at_a_time

BUDGET = "96MiB"
SINGLE = 40  # requests, one at a time, for the single-request latency
SECONDS = 4.0
LOADS = (0.5, 1, 1.5, 2, 3, 4, 6, 8)  # arrival rates, in requests per single-request latency
PP = ["--nproc", "2", "--parallel.pp", "2", "--serve.memory_per_rank", BUDGET, *SIDES["dynamic"]]
KINDS = {"pipelined": PP, "one batch at a time": [*PP, "--serve.pipelined", "false"]}


def _side(bench: Bench, args: list[str], body: bytes, rates: list[float] | None, seed: int) -> dict:
    """One server: its single-request latency, then the rates (`rates`, or LOADS of that latency)."""
    cluster = ["--cluster", f"emulated:{bench.placement.cluster.name}"] if bench.placement.cluster else []
    proc, url = _start(bench.work / "serve_pp_model", [*args, *cluster])
    try:
        single = one_at_a_time(url, body, SINGLE)
        rates = rates or [k * 1e3 / single for k in LOADS]
        rows = []
        for k, rate in enumerate(rates):
            if rows and rows[-1]["p99_ms"] > 4 * single:  # the higher rates would only queue longer
                break
            rows.append(asyncio.run(_load(url, body, rate, SECONDS, seed + k)))
        return {"single_ms": single, "rates": rates, "rows": rows}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _refused_alone(run_folder) -> str:
    done = subprocess.run([sys.executable, "-m", "shardwise", "serve", str(run_folder), "--serve.port", "0",
                           "--serve.memory_per_rank", BUDGET], capture_output=True, text=True, timeout=120)  # fmt: skip
    if done.returncode != 2 or "serve.memory_per_rank" not in done.stderr:
        raise RuntimeError(f"one process was not refused under {BUDGET}: exit {done.returncode} {done.stderr}")
    return done.stderr.strip()


def run(bench: Bench) -> None:
    bench.train(["--model.name", "mlp", "--model.hidden", "4096,4096,4096", "--data.name", "synthetic",
                 "--data.shape", "64", "--data.samples", "256"], "serve pp model", steps=3, nproc=1)  # fmt: skip
    run_folder = bench.work / "serve_pp_model"
    bench.console.print(f"  one process: {_refused_alone(run_folder)}")
    body = json.dumps({"inputs": np.random.default_rng(0).standard_normal((1, 64)).round(3).tolist()})
    found: dict[str, list[dict]] = {name: [] for name in KINDS}
    rates = None
    for i in range(bench.repeats):
        names = list(KINDS)[i % 2 :] + list(KINDS)[: i % 2]
        for name in names if rates else list(KINDS):  # the pipelined side first, once: it sets the rates
            side = _side(bench, KINDS[name], body.encode(), rates, seed=100 * i)
            rates = side["rates"]
            found[name].append(side)
        shown = [f"{n} {s[-1]['single_ms']:.1f} ms alone, within 2x up to {_within(s[-1]):.0f} req/s"
                 for n, s in found.items()]  # fmt: skip
        bench.console.print(f"  repetition {i + 1}: " + ", ".join(shown))
    _report(bench, found, rates)


def _within(side: dict) -> float:
    """The highest rate whose p99 stays within twice the side's single-request latency (0: none)."""
    ok = [r["rate"] for r in side["rows"] if r["p99_ms"] <= 2 * side["single_ms"] and not r["failed"]]
    return max(ok, default=0.0)


def _report(bench: Bench, found: dict[str, list[dict]], rates: list[float]) -> None:
    how = f"MLP 64-4096-4096-4096-10 under serve.memory_per_rank={BUDGET}, pp = 2, batches of up to 32 / 5 ms"
    for name, sides in found.items():
        bench.record("serve-pp", f"{name}: single-request latency, ms", [s["single_ms"] for s in sides], unit="ms",
                     how=how)  # fmt: skip
        arrivals = f"open-loop Poisson arrivals at {', '.join(f'{r:.0f}' for r in rates)} req/s"
        bench.record("serve-pp", f"{name}: highest rate with p99 <= 2x single (req/s)", [_within(s) for s in sides],
                     unit="req/s", how=arrivals)  # fmt: skip
        for k, rate in enumerate(rates):
            rows = [(s["rows"][k], s["single_ms"]) for s in sides if len(s["rows"]) > k]
            if len(rows) < len(sides):
                break
            bench.record("serve-pp", f"{name} at {rate:.0f} req/s: p99 / single", [r["p99_ms"] / m for r, m in rows])
            bench.record("serve-pp", f"{name} at {rate:.0f} req/s: p50 ms", [r["p50_ms"] for r, _ in rows], unit="ms")
            bench.record("serve-pp", f"{name} at {rate:.0f} req/s: p99 ms", [r["p99_ms"] for r, _ in rows], unit="ms")
    for k, rate in enumerate(rates):  # at the rates both sides reached in every repetition
        sides = zip(found["pipelined"], found["one batch at a time"], strict=True)
        pairs = [(p["rows"][k], o["rows"][k]) for p, o in sides if len(p["rows"]) > k < len(o["rows"])]
        if len(pairs) < len(found["pipelined"]):
            break
        bench.record("serve-pp", f"at {rate:.0f} req/s: p99 one batch at a time / pipelined",
                     [o["p99_ms"] / p["p99_ms"] for p, o in pairs], how=how)  # fmt: skip
    bench.console.print(f"serve-pp: pipelined keeps p99 within 2x its single-request latency up to "
                        f"{statistics.median(_within(s) for s in found['pipelined']):.0f} req/s")  # fmt: skip
