"""What every benchmark scenario shares: where jobs run, alternating sides, recording ratios."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from shardwise.cluster.placement import Placement, run_ranks
from shardwise.errors import ShardwiseError

# glibc hands every freed block of 64 KiB or more straight back to the system (as the planner
# measures a pass's memory, plan/activations.py): a run's peak is then the bytes alive at once
GIVE_BACK = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": str(64 * 1024)}


def bench_console() -> Console:
    """Wide enough that the tables do not wrap when the output goes to a file."""
    return Console(width=max(120, Console().width))


def run_job(cmd: list[str], env: dict[str, str] | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"benchmark job failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")


@dataclass
class Bench:
    """One link's run of the suite: where the jobs go, how often, and what was found."""

    link: str  # "loopback", or the emulated cluster's rate ("1gbit")
    placement: Placement
    repeats: int
    work: Path
    console: Console
    results: list[dict] = field(default_factory=list)
    details: list[dict] = field(default_factory=list)  # a scenario's per-run rows, kept in bench.json
    runs: list[dict] = field(default_factory=list)  # what a scenario's figures come from (bench.json "runs")
    options: dict = field(default_factory=dict)  # a scenario's own settings (the planner's cases)

    @property
    def where(self) -> str:
        """The link in words, for each scenario's description."""
        if not self.placement.cluster:
            return "gloo over loopback"
        c = self.placement.cluster
        return f"gloo, emulated cluster, rank r in host r mod {c.hosts}, {c.bandwidth} links"

    def train(
        self,
        args: list[str],
        name: str,
        *,
        steps: int,
        env: dict[str, str] | None = None,
        nproc: int | None = None,
        eval_every: int = 0,
    ) -> dict:
        """Run `shardwise train ARGS` quietly for `steps` steps where this link says (on
        `nproc` ranks, or the default; evaluated every `eval_every` steps, else at the end
        only); its summary."""
        out = self.work / name.replace(" ", "_")
        cmd = [sys.executable, "-m", "shardwise", "train", *args, "--out", str(out)]
        cmd += ["--nproc", str(nproc)] if nproc is not None else []
        cmd += ["--train.steps", str(steps), "--train.eval_every", str(eval_every), "--train.log_every", str(steps)]
        cmd += ["--run.progress", "false"]
        if self.placement.cluster:
            cmd += ["--cluster", f"emulated:{self.placement.cluster.name}"]
        run_job(cmd, env)
        return json.loads((out / "summary.json").read_text())

    def reference(self, module: str, nproc: int, args: list[str], name: str) -> dict:
        """Run a reference script as `nproc` ranks placed like shardwise's (torchrun's
        environment); the JSON it writes."""
        from shardwise.procs import free_port

        out = self.work / f"{name.replace(' ', '_')}.json"
        run_ranks([sys.executable, "-m", module, *args, "--out", str(out)], nproc, self.placement, free_port())
        return json.loads(out.read_text())

    def record(self, scenario: str, measure: str, values: list[float], *, unit: str = "ratio", how: str = "") -> str:
        """Keep a figure (median, min and max over the repetitions); its text for printing."""
        median = statistics.median(values)
        self.results.append(
            {
                "scenario": scenario,
                "measure": measure,
                "link": self.link,
                "median": median,
                "min": min(values),
                "max": max(values),
                "repetitions": len(values),
                "unit": unit,
                "how": how,
            }
        )
        return f"{median:.3f} ({min(values):.3f} - {max(values):.3f})"

    def ratio(self, scenario: str, measure: str, a: list[float], b: list[float], *, how: str = "") -> str:
        """Record a / b per repetition (`per_repetition`)."""
        return self.record(scenario, measure, per_repetition(a, b), how=how)


def alternate(
    sides: dict[str, Callable[[int], float]], repeats: int, console: Console, unit: float = 1e3
) -> dict[str, list[float]]:
    """Run each side once per repetition, rotating which goes first (A B C, B C A, ...);
    each side returns a step time in seconds."""
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            times[name].append(sides[name](i))
        console.print(f"  repetition {i + 1}: " + ", ".join(f"{n} {unit * times[n][-1]:.2f} ms" for n in names))
    return times


def parse_cases(text: str | None, models: Iterable[str], worlds: Iterable[int]) -> list[tuple[str, int]]:
    """`mlp:2,wide:4` as (model, ranks) pairs, each model one of `models`; None: every model
    at every one of `worlds`."""
    models = list(models)
    if not text:
        return [(model, world) for model in models for world in worlds]
    cases = []
    for item in text.split(","):
        model, _, ranks = item.strip().partition(":")
        if model not in models or not ranks.isdigit() or int(ranks) < 2:
            raise ShardwiseError(
                "cases", f"{item.strip()!r}: expected MODEL:RANKS, MODEL one of {', '.join(models)}, RANKS >= 2"
            )
        cases.append((model, int(ranks)))
    return cases


def spread(values: list[float], scale: float = 1e3) -> str:
    """Median (min - max)."""
    return f"{scale * statistics.median(values):.2f} ({scale * min(values):.2f} - {scale * max(values):.2f})"


def per_repetition(a: list[float], b: list[float]) -> list[float]:
    """a / b for each repetition: each pair was measured side by side."""
    return [x / y for x, y in zip(a, b, strict=True)]


def ratio_spread(a: list[float], b: list[float]) -> tuple[float, str]:
    """The median of the per-repetition ratios and their range: the figure `Bench.ratio` records."""
    ratios = per_repetition(a, b)
    return statistics.median(ratios), f"{min(ratios):.3f} - {max(ratios):.3f}"


def mib(n: float) -> str:
    return f"{n / 2**20:,.2f}"


@contextmanager
def fresh_inputs(folder: Path) -> Iterator[None]:
    """The cost model's inputs (profile, link, overheads) measured afresh into `folder`, now,
    beside the runs they predict (not a cache of another hour, when the machine may have run
    faster or slower); the caller's SHARDWISE_CACHE given back after."""
    cache = os.environ.get("SHARDWISE_CACHE")
    os.environ["SHARDWISE_CACHE"] = str(folder)
    try:
        yield
    finally:
        os.environ.pop("SHARDWISE_CACHE")
        if cache is not None:
            os.environ["SHARDWISE_CACHE"] = cache
