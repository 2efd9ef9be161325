"""`serve --parallel.layout auto` against every serving layout it chooses from, each served
for real.

The model: `bench serve`'s MLP (64 inputs, two hidden layers of 4096: 68 MB of weights) on
RANKS ranks. Every serving layout `plan/serving.py` enumerates, and one process, is started
in turn (the order rotated each round; `--repeats` rounds), batches of up to 32 samples
(5 ms), and measured closed loop with full batches (32 samples a request):

- a batch's time: one request at a time, the median of BATCHES (after WARM not counted);
- the rate: CLIENTS clients sending full batches back to back for SECONDS, samples a second
  (enough requests in flight to keep a pipeline's stages busy);
- under load: open-loop Poisson arrivals of one sample a request (dynamic batching forms the
  batches) at LOADS of that rate, OPEN_S each: p50 and p99 latency, answers a second, and the
  goodput (answers within `bench serve`'s P99_TARGET_MS a second) at the highest load whose
  p99 stays within it.

Beside each, the serving model's prediction (`predicted_serving`, its inputs measured afresh
in the bench's folder). Figures per layout: the measured batch time and rate (the median of
the rounds) and measured / predicted for both; over the layouts, the median |error| of each;
and the regret of auto's choice: the best measured rate over the measured rate of the
layout `choose` picks (no target: the highest predicted rate).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import statistics
import time

import numpy as np

from shardwise.bench.common import Bench, fresh_inputs, spread
from shardwise.bench.serve import P99_TARGET_MS, _load, _start, capacity, one_at_a_time
from shardwise.config import ParallelConfig

RANKS = 2
BATCH = 32
WARM, BATCHES = 3, 20
CLIENTS, SECONDS = 3, 3.0
SERVE = ["--serve.max_batch", str(BATCH), "--serve.max_wait_ms", "5"]
LOADS, OPEN_S = (0.25, 0.5, 0.75, 1.0), 3.0  # open-loop arrivals, in fractions of the closed-loop rate
ONE = "one process"


def layout_args(cfg: ParallelConfig) -> list[str]:
    """The --parallel.* flags that name `cfg` (those that differ from the defaults)."""
    default = ParallelConfig()
    return [
        a
        for f in dataclasses.fields(cfg)
        if getattr(cfg, f.name) != getattr(default, f.name)
        for a in (f"--parallel.{f.name}", str(getattr(cfg, f.name)))
    ]


async def _rate(url: str, body: bytes) -> float:
    """Samples a second answered with CLIENTS full batches always in flight."""
    import aiohttp

    answered = 0
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def client(until: float) -> None:
            nonlocal answered
            while time.perf_counter() < until:
                async with session.post("/v1/predict", data=body, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    r.raise_for_status()
                answered += BATCH

        start = time.perf_counter()
        await asyncio.gather(*(client(start + SECONDS) for _ in range(CLIENTS)))
        return answered / (time.perf_counter() - start)


def _measure(bench: Bench, run_folder, args: list[str], body: bytes, seed: int) -> dict:
    """A layout's batch time and rate (full batches, closed loop), then open-loop Poisson
    arrivals of one sample a request at LOADS of that rate (dynamic batching forms the
    batches): p50, p99, answers and goodput a second at each."""
    cluster = ["--cluster", f"emulated:{bench.placement.cluster.name}"] if bench.placement.cluster and args else []
    proc, url = _start(run_folder, [*SERVE, *args, *cluster])
    try:
        found = {"batch_ms": one_at_a_time(url, body, BATCHES, WARM), "rate": asyncio.run(_rate(url, body))}
        one = json.dumps({"inputs": json.loads(body)["inputs"][:1]}).encode()
        found["open"] = [asyncio.run(_load(url, one, k * found["rate"], OPEN_S, seed + i)) for i, k in enumerate(LOADS)]
        return found
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _predicted(bench: Bench, run_folder) -> dict:
    """Each serving layout's prediction (and one process's), by name, and auto's choice."""
    from shardwise.plan.front import front_seconds
    from shardwise.plan.serving import choose, predicted_serving
    from shardwise.scoring import open_run, run_record
    from shardwise.serve.model import serving_config

    folder, cfg = open_run(run_folder, {"serve.max_batch": str(BATCH), "serve.max_wait_ms": "5"})
    record = run_record(folder)
    cfg = serving_config(cfg, folder, record, bench.work / "stand-in.npz")
    cluster = f"emulated:{bench.placement.cluster.name}" if bench.placement.cluster else "local"
    front_s = front_seconds(record, cfg.serve.max_batch, cfg.serve.max_wait_ms)
    classes = len(record["classes"])
    options = predicted_serving(cfg, nproc=RANKS, cluster=cluster, classes=classes, front_s=front_s)
    alone = predicted_serving(cfg, nproc=1, cluster=cluster, classes=classes, front_s=front_s)[0]
    chosen, line = choose(options, 0.0, None)
    return {"options": {o.layout: o for o in options}, ONE: alone, "choice": chosen.layout, "line": line}


def run(bench: Bench) -> None:
    bench.train(["--model.name", "mlp", "--model.hidden", "4096,4096", "--data.name", "synthetic",
                 "--data.shape", "64", "--data.samples", "256"], "serve auto model", steps=5, nproc=1)  # fmt: skip
    run_folder = bench.work / "serve_auto_model"
    with fresh_inputs(bench.work / "serve-auto-cache"):
        predicted = _predicted(bench, run_folder)
    bench.console.print(f"  auto would serve: {predicted['line']}")
    ranks = ["--nproc", str(RANKS)]
    sides = {ONE: [], **{name: [*ranks, *layout_args(o.config)] for name, o in predicted["options"].items()}}
    body = json.dumps({"inputs": np.random.default_rng(0).standard_normal((BATCH, 64)).round(3).tolist()}).encode()
    found: dict[str, list[dict]] = {name: [] for name in sides}
    names = list(sides)
    for i in range(bench.repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            found[name].append(_measure(bench, run_folder, sides[name], body, seed=100 * i))
        shown = ", ".join(f"{n} {r[-1]['batch_ms']:.1f} ms, {r[-1]['rate']:.0f}/s (goodput "
                          f"{capacity(r[-1]['open'])['goodput']:.0f} req/s)" for n, r in found.items())  # fmt: skip
        bench.console.print(f"  round {i + 1}: {shown}")
    _report(bench, predicted, found)


def _report(bench: Bench, predicted: dict, found: dict[str, list[dict]]) -> None:
    how = f"MLP 64-4096-4096-10, {RANKS} ranks, full batches of {BATCH}; closed loop"
    rates, errors = {}, {"batch": [], "rate": []}
    for name, rounds in found.items():
        p = predicted[ONE] if name == ONE else predicted["options"][name]
        batch_ms, rate = [r["batch_ms"] for r in rounds], [r["rate"] for r in rounds]
        rates[name] = statistics.median(rate)
        bench.record("serve-auto", f"{name}: batch ms", batch_ms, unit="ms", how=how)
        bench.record("serve-auto", f"{name}: samples/s", rate, unit="samples/s", how=how)
        bench.record("serve-auto", f"{name}: measured / predicted batch", [m / (1e3 * p.batch_s) for m in batch_ms])
        bench.record("serve-auto", f"{name}: measured / predicted rate", [m / p.rate for m in rate])
        errors["batch"].append(abs(statistics.median(batch_ms) / (1e3 * p.batch_s) - 1))
        errors["rate"].append(abs(rates[name] / p.rate - 1))
        bench.console.print(
            f"  {name}: batch {spread(batch_ms, 1)} ms measured, {1e3 * p.batch_s:.1f} predicted; "
            f"{statistics.median(rate):,.0f} samples/s measured, {p.rate:,.0f} predicted"
        )
    for name, rounds in found.items():  # under open-loop load: the goodput within the target, p50 and p99
        bench.record("serve-auto", f"{name}: goodput at p99 <= {P99_TARGET_MS:g} ms (req/s)",
                     [capacity(r["open"])["goodput"] for r in rounds], unit="req/s",
                     how=f"Poisson arrivals of one sample a request at {LOADS} of the closed-loop rate")  # fmt: skip
        for k, load in enumerate(LOADS):
            for q in ("p50", "p99"):
                at = [r["open"][k][f"{q}_ms"] for r in rounds]
                bench.record("serve-auto", f"{name} at {load:g}x: {q} ms", at, unit="ms")
    layouts = [n for n in rates if n != ONE]
    best = max(layouts, key=rates.get)
    regret = rates[best] / rates[predicted["choice"]]
    for kind, values in errors.items():
        bench.record("serve-auto", f"{kind} error median", [statistics.median(values)], unit="error")
    bench.record("serve-auto", "regret (best measured rate / the choice's)", [regret])
    bench.console.print(
        f"serve-auto: chose {predicted['choice']}, best measured {best} (regret {regret:.3f}); error median "
        f"batch {statistics.median(errors['batch']):.1%}, rate {statistics.median(errors['rate']):.1%}"
    )
