"""Gradient compression against none: time to a target validation accuracy, and the final
accuracy, for each method.

For each case (a model and a number of data-parallel ranks; the global batch is the same
at every world size), two phases on the bench's link:

1. accuracy: each method trains STEPS steps once per seed of SEEDS (the same seeds for
   every method: the initial weights, the data's order and split), evaluated every
   EVAL_EVERY steps, the first WARMUP steps uncompressed (`comm.warmup_steps`); the steps
   to the target accuracy and the final accuracy come from its metrics.jsonl (training
   is seeded: these are the same run after run);
2. speed: every method runs TIMED steps compressed from the first, in rotated order,
   `repeats` times; a method's step time is the median of its runs' median steps. none
   runs twice in each repetition (the second: "none again"), so that the table shows how
   far apart two identical jobs time on this machine.

Time to target = WARMUP x none's step + (steps to target - WARMUP) x the method's step:
the training time to the accuracy, without start-up and evaluations, which no method
changes; per seed, and the median over the seeds is the method's (a seed that never
reaches the target counts as slower than all that do; a median among those: never). `auto` is the
launcher's choice (plan/compression.py) among the others, with the same settings, and
where it shortlists, the run's trial (comm/trial.py): its accuracy runs say what each
kept, and each seed's time to target counts its trial's steps after the warm-up at each
candidate's median, as that run measured them; phase 2 runs auto as a user does (the
launcher's choice, the trial from the first step), its step the median of the steps after
the trial. A seed that kept another method than most timed runs of auto is priced at that
method's side.

torch's own `powerSGD_hook` is the yardstick of shardwise's PowerSGD in phase 2: a plain
DDP script (torch_ddp_reference) with the hook registered, each bucket's chain waited for
in the hook; unwaited, it deadlocks or mismatches collectives on gloo in this torch (2.13):
see `torch_ddp_reference.powersgd_hook`. Its steps to the target are not measured.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from shardwise.bench import common
from shardwise.bench.common import Bench, alternate, spread
from shardwise.comm.trial import STEPS_EACH
from shardwise.errors import ShardwiseError

STEPS, EVAL_EVERY, WARMUP, TIMED = 300, 5, 10, 40
SEEDS = (0, 1, 2)  # a step count to a target moves by tens of percent with the seed alone
WORLDS = (2, 4)
TOPK_RATIO, POWERSGD_RANK = 0.01, 4
# every side runs with both (a method reads its own): top-k and PowerSGD, and auto's choice among them
TUNING = ["--comm.topk_ratio", str(TOPK_RATIO), "--comm.powersgd_rank", str(POWERSGD_RANK)]
# the table's name of each side -> its comm.compression
METHODS: dict[str, str] = {
    "none": "none",
    "bf16": "bf16",
    "int8": "int8",
    f"topk {TOPK_RATIO:.0%}": "topk",
    f"powersgd rank {POWERSGD_RANK}": "powersgd",
    "auto": "auto",
}
POWERSGD = f"powersgd rank {POWERSGD_RANK}"
# none's own command, timed again in each repetition: how far apart two identical jobs time
# here (auto's side, where it keeps none, is that job too), priced with none's steps
AGAIN = "none again"
TORCH_POWERSGD = f"torch PowerSGD hook rank {POWERSGD_RANK}"  # the yardstick of POWERSGD: step time only


@dataclass(frozen=True)
class Model:
    description: str
    name: str
    hidden: str  # widths, comma-separated ("": the model's own)
    batch: int  # global: the same at every world size
    target: float  # validation accuracy

    @property
    def args(self) -> list[str]:
        hidden = ["--model.hidden", self.hidden] if self.hidden else []
        return ["--model.name", self.name, *hidden, "--train.batch_size", str(self.batch)]


MODELS: dict[str, Model] = {
    "mlp": Model("communication-bound MLP 64-2048-2048-10 (4.3 M parameters) on digits", "mlp", "2048,2048", 16, 0.95),
    "convnet": Model("compute-bound convnet (144 k parameters) on digits", "convnet", "", 64, 0.95),
}


def parse_cases(text: str | None) -> list[tuple[str, int]]:
    """`mlp:2,convnet:4` as (model, data-parallel ranks) pairs; None: both models at 2 and 4.
    The ranks must divide the model's global batch."""
    cases = common.parse_cases(text, MODELS, WORLDS)
    for model, ranks in cases:
        if MODELS[model].batch % ranks:
            raise ShardwiseError(
                "cases", f"{model}:{ranks}: {ranks} ranks do not divide its global batch of {MODELS[model].batch}"
            )
    return cases


def steps_to(metrics: Path, target: float) -> tuple[int | None, float]:
    """The first evaluated step at or above `target` (None: never), and the last accuracy."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    scored = [(r["step"], r["val_accuracy"]) for r in rows if "val_accuracy" in r]
    first = next((step for step, acc in scored if acc >= target), None)
    return first, scored[-1][1]


def time_to_target(steps: int | None, step_s: float, none_s: float, trial: list[float] = ()) -> float | None:
    """The training time to the target: WARMUP steps at none's step, then `trial`'s steps
    (auto's: each candidate's seconds a step, in the order run), then the method's."""
    if steps is None:
        return None
    after = max(steps - WARMUP, 0)
    timed = list(trial)[:after]
    return min(steps, WARMUP) * none_s + sum(timed) + (after - len(timed)) * step_s


def run(b: Bench) -> None:
    cases = parse_cases(b.options.get("cases"))
    b.console.print(
        f"[bold]compression[/] ({b.where}): accuracy over {STEPS} steps (the first {WARMUP} uncompressed), "
        f"step time over {TIMED} compressed steps, {b.repeats} rotated repetitions"
    )
    for key, world in cases:
        model = MODELS[key]
        b.console.print(
            f"  {model.description}, {world} data-parallel ranks, {model.batch // world} samples each, "
            f"target {model.target:.0%} validation accuracy"
        )
        case = f"{key}-{world}"
        reached = {m: [_accuracy(b, case, m, c, seed, model, world) for seed in SEEDS] for m, c in METHODS.items()}
        autos = [_auto(b, b.work / f"compression-{case}-auto-seed{seed}-accuracy", seed) for seed in SEEDS]
        timed_kept: list[str] = []  # what each timed run of auto kept
        sides = _timed_sides(b, case, model, world, max(len(t) for _, t in autos), timed_kept)
        times = alternate(sides, b.repeats, b.console)
        _report(b, f"{key}, {world} ranks", model.target, reached, times, autos, majority(timed_kept))
        b.runs.append(_runs(b.link, case, reached, times, autos) | {"auto_timed_kept": timed_kept})


def _runs(link: str, case: str, reached: dict, times: dict[str, list[float]], autos: list[tuple[str, list]]) -> dict:
    """What a case's figures come from, for bench.json: each seed's steps to the target and
    final accuracy per method, each auto run's method kept and trial steps, and each side's
    step time per repetition (so that the figures can be priced again another way)."""
    seeds = {
        m: [{"seed": s, "steps": st, "accuracy": acc} for s, (st, acc) in zip(SEEDS, rows, strict=True)]
        for m, rows in reached.items()
    }
    kept = [{"seed": s, "kept": k, "trial_step_s": t} for s, (k, t) in zip(SEEDS, autos, strict=True)]
    return {"scenario": "compression", "link": link, "case": case, "seeds": seeds, "auto": kept, "step_s": times}


def _method(compression: str) -> list[str]:
    return ["--comm.compression", compression, *TUNING]


def _accuracy(
    b: Bench, case: str, method: str, compression: str, seed: int, model: Model, world: int
) -> tuple[int | None, float]:
    """Phase 1 for one method and seed: its steps to the target and its final accuracy."""
    out = f"compression-{case}-{method}-seed{seed}-accuracy"
    run_args = [*model.args, *_method(compression), "--train.seed", str(seed)]
    run_args += ["--comm.warmup_steps", str(WARMUP), "--nproc", str(world)]
    b.train(run_args, out, steps=STEPS, eval_every=EVAL_EVERY)
    return steps_to(b.work / out.replace(" ", "_") / "metrics.jsonl", model.target)


def _auto(b: Bench, folder: Path, seed: int) -> tuple[str, list[float]]:
    """What auto's accuracy run of `seed` ran after its warm-up: the method it kept (the launcher's,
    or its trial's), and each trial step's seconds in order (each candidate's median)."""
    summary = json.loads((folder / "summary.json").read_text())
    c = summary.get("compression") or {"method": "none"}  # none: no compressor at all
    trial = c.get("trial") or {}
    times = trial.get("step_s") or {}
    seconds = [times.get(m, 0.0) for m in trial.get("candidates", []) for _ in range(STEPS_EACH)]
    if times:
        timed = ", ".join(f"{m} {1e3 * t:.1f} ms" for m, t in times.items())
        b.console.print(f"    auto, seed {seed}: the run timed {timed} a step and kept {c['method']}")
    else:
        b.console.print(f"    auto, seed {seed}: the launcher chose {c['method']}")
    return c["method"], seconds


def _timed_sides(b: Bench, case: str, model: Model, world: int, trial_steps: int, kept: list[str]) -> dict:
    """Phase 2's sides: each method compressed from the first step; none again (`AGAIN`);
    auto as the user runs it, the launcher's choice and the run's trial (`trial_steps` more
    steps, as its accuracy runs took), its step the median of those after the trial (the
    method it kept, appended to `kept`); and torch's PowerSGD hook on the same model, data,
    batch and optimizer (a plain DDP script)."""

    def side(extra: list[str], name: str):
        run_args = [*model.args, *extra, "--nproc", str(world)]
        return lambda i: b.train(run_args, f"compression-{case}-{name}-{i}", steps=TIMED)["step_time_s"]

    def auto_side(i: int) -> float:
        run_args = [*model.args, *_method("auto"), "--nproc", str(world)]
        summary = b.train(run_args, f"compression-{case}-auto-{i}", steps=TIMED + trial_steps)
        c = summary.get("compression") or {"method": "none"}
        kept.append(c["method"])
        return (c.get("trial") or {}).get("kept_step_s") or summary["step_time_s"]

    def torch_side(i: int) -> float:
        args = ["--steps", str(TIMED), "--batch-size", str(model.batch), "--model", model.name]
        args += ["--powersgd", str(POWERSGD_RANK)]
        args += ["--hidden", model.hidden] if model.hidden else []
        return b.reference("shardwise.bench.torch_ddp_reference", world, args, f"compression-{case}-torch-{i}")[
            "step_time_s"
        ]

    sides = {method: side(_method(c), method.replace(" ", "-")) for method, c in METHODS.items() if method != "auto"}
    return (
        {"none": sides.pop("none"), AGAIN: side(_method("none"), "none-again")}
        | sides
        | {
            "auto": auto_side,
            TORCH_POWERSGD: torch_side,
        }
    )


def median_time(runs: list[tuple[int | None, list[float], float]], none_s: float) -> float | None:
    """The median over seeds of the time to target (`runs`: each seed's steps to it, auto's
    trial steps, and the step of the method it ran); None where the median seed never
    reached it."""
    times = [time_to_target(steps, step_s, none_s, trial) for steps, trial, step_s in runs]
    middle = statistics.median([math.inf if t is None else t for t in times])
    return None if math.isinf(middle) else middle


def majority(kept: list[str]) -> str:
    """The method most of auto's runs kept (a tie: the first's)."""
    return Counter(kept).most_common(1)[0][0]


def auto_sides(kept: list[str], timed: str) -> list[str]:
    """For each seed's auto run, the timed side whose step prices its steps after the trial:
    auto's own where it kept what the timed runs of auto mostly kept (`timed`); else that
    method's own side (auto's, for a method the bench times no side of: fp16)."""
    names = {c: name for name, c in METHODS.items()}
    return ["auto" if k == timed or k not in names else names[k] for k in kept]


def _steps_text(rows: list[tuple[int | None, float]]) -> str:
    """The median steps to the target over the seeds, and their range where they differ
    (never: not within STEPS steps)."""
    steps = sorted(math.inf if s is None else s for s, _ in rows)

    def text(x: float) -> str:
        return "never" if math.isinf(x) else f"{x:g}"

    middle = text(statistics.median(steps))
    return middle if steps[0] == steps[-1] else f"{middle} ({text(steps[0])}-{text(steps[-1])})"


def _report(
    b: Bench,
    key: str,
    target: float,
    reached: dict,
    times: dict[str, list[float]],
    autos: list[tuple[str, list]],
    timed_kept: str,
) -> None:
    none_s = statistics.median(times["none"])
    sides = auto_sides([k for k, _ in autos], timed_kept)
    reached = reached | {AGAIN: reached["none"]}  # the same job: the same steps

    def runs(method: str, step_of=statistics.median) -> list[tuple[int | None, list[float], float]]:
        """Each seed's run of `method`, its step `step_of` its side's times (auto: each run's
        trial, and the side of the method it kept)."""
        return [
            (steps, autos[i][1], step_of(times[sides[i]])) if method == "auto" else (steps, [], step_of(times[method]))
            for i, (steps, _) in enumerate(reached[method])
        ]

    base_time = median_time(runs("none"), none_s)
    how = (
        f"{key}, target {target:.0%}: time = the median over {len(SEEDS)} seeds of the steps to it x the median "
        "step (auto: its trial's steps too, and the step of the method each run kept), per repetition"
    )
    table = Table(title=f"{key}: to {target:.0%} validation accuracy, {b.link}, {len(SEEDS)} seeds")
    for col in ("method", "ms / step", "steps to target", "time to target (s)", "speed-up", "final acc.", "vs none"):
        table.add_column(col, justify="right")
    for method, values in times.items():
        if method == TORCH_POWERSGD:
            table.add_row(method, spread(values), "", "", "", "", "")
            continue
        t = median_time(runs(method), none_s)
        speedup = base_time / t if t and base_time else None
        # the final accuracy's difference from none's, seed by seed (the same seed: the same start)
        gaps = [100 * (acc - none) for (_, acc), (_, none) in zip(reached[method], reached["none"], strict=True)]
        table.add_row(
            method,
            spread(values),
            _steps_text(reached[method]),
            f"{t:.2f}" if t is not None else "never",
            f"{speedup:.2f}x" if speedup else "",
            f"{statistics.median(acc for _, acc in reached[method]):.2%}",
            f"{statistics.median(gaps):+.1f} pt",
        )
        if speedup:  # each repetition's none and method side by side
            each = [
                median_time(runs("none", lambda v, r=r: v[r]), n) / median_time(runs(method, lambda v, r=r: v[r]), n)
                for r, n in enumerate(times["none"])
            ]
            b.record("compression", f"{key} {method}: time to target, none / method", each, how=how)
        b.record("compression", f"{key} {method}: final accuracy - none's (points)", gaps, unit="pt", how="per seed")
    b.console.print(table)
    mine = times[POWERSGD]
    text = b.ratio("compression", f"{key} step time: powersgd / torch's hook", mine, times[TORCH_POWERSGD], how=how)
    b.console.print(f"  step time shardwise PowerSGD / torch's PowerSGD hook: [bold]{text}[/] (target <= 1)")
