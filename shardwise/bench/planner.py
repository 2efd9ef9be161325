"""The cost model against the runs it predicts: every layout of 2 and 4 ranks, for models of
different character, predicted by `shardwise plan` and then trained for real.

For each model and world size, each of ROUNDS rounds (`--rounds`) first measures the
planner's inputs as `plan` measures them (the layer profile, the link of this bench's
placement, the engine's own overheads), afresh in a folder of its own, predicts every
layout, then runs each for STEPS steps, in an order rotated from round to round. A run's
own summary holds its measured median step and peak (`model_check`). Each run is paired
with the prediction made from the inputs measured in its own round, minutes before it,
so the machine's drift over the bench's hour (one profile measured 23% slower than the
runs it predicted hours later) is not counted as the model's error. A layout's error is
|the median over its rounds of predicted / measured - 1|; its predicted and measured steps
are the medians over the rounds. The planner's choice is round 1's. Figures per case
(model x world x link):

- the median and 90th percentile of the layouts' errors;
- Kendall's tau between the predicted and the measured order (scipy's);
- regret: the measured step of the planner's choice / the best measured step;
- the median measured / predicted peak memory.

Across links, `flips` says where the best measured layout differs between two links and
whether the planner's choice differs the same way.
"""

from __future__ import annotations

import json
import statistics

from shardwise.bench import common
from shardwise.bench.common import GIVE_BACK, Bench, fresh_inputs, spread
from shardwise.errors import ShardwiseError
from shardwise.plan.memory import HEADROOM

STEPS = 24  # the summary's step time is the median of the steps after the fifth: 19 of them
ROUNDS = 3  # runs of every layout, in rotated order: the machine's speed drifts between runs
WORLDS = (2, 4)
MODELS: dict[str, tuple[str, list[str]]] = {
    "convnet": (
        "compute-bound convnet, 3x32x32 synthetic images, batch 32",
        ["--model.name", "convnet", "--data.name", "synthetic", "--data.shape", "3,32,32", "--train.batch_size", "32"],
    ),
    "mlp": (
        "communication-bound MLP 64-1024-1024-10 on digits, batch 32",
        ["--model.name", "mlp", "--model.hidden", "1024,1024", "--train.batch_size", "32"],
    ),
    "wide": (
        "wide MLP 1024-4096-4096-10 on synthetic features, batch 16",
        ["--model.name", "mlp", "--model.hidden", "4096,4096", "--data.name", "synthetic", "--data.shape", "1024"]
        + ["--train.batch_size", "16"],
    ),
    "convhead": (
        "convnet with a 1024-1024 head, 3x32x32 synthetic images, batch 128 (the link decides: 2026-12-04's plans "
        "chose tp=2 at 1 Gbit/s, dp=2 at 10)",
        ["--model.name", "convnet", "--model.hidden", "1024,1024", "--data.name", "synthetic"]
        + ["--data.shape", "3,32,32", "--train.batch_size", "128"],
    ),
    "resnet": (
        "ResNet 8-16-32 (group norm) on 3x128x128 synthetic images, batch 2",
        ["--model.name", "resnet", "--model.norm", "group", "--data.name", "synthetic", "--data.shape", "3,128,128"]
        + ["--train.batch_size", "2"],
    ),
}


def _args(settings: dict) -> list[str]:
    return [a for k, v in settings.items() if k != "layout" for a in (f"--parallel.{k}", str(v))]


def _overrides(args: list[str]) -> dict[str, str]:
    return {args[i].removeprefix("--"): args[i + 1] for i in range(0, len(args), 2)}


def predicted_layouts(args: list[str], world: int, cluster: str) -> list[dict]:
    """Every layout of `world` ranks for the model `args` name, predicted, fastest first."""
    from shardwise.config import load_config
    from shardwise.plan.command import predicted_rows

    return predicted_rows(load_config(None, _overrides(args)), nproc=world, cluster=cluster)


def kendall_tau(predicted: list[float], measured: list[float]) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(predicted, measured).statistic) if len(predicted) > 1 else 1.0


def case_figures(rows: list[dict]) -> dict:
    """A case's figures from its runs (each with `predicted_s`, `measured_s`, the peaks), in
    the planner's order (its choice first)."""
    errors = sorted(r.get("error", abs(r["predicted_s"] - r["measured_s"]) / r["measured_s"]) for r in rows)
    memory = sorted(abs(r["measured_peak"] / r["predicted_peak"] - 1) for r in rows if r.get("measured_peak"))
    best = min(rows, key=lambda r: r["measured_s"])
    tightest = {r["name"]: r["predicted_peak"] * (1 + HEADROOM) for r in rows}
    return {
        "error_median": statistics.median(errors),
        "error_p90": errors[min(len(errors) - 1, round(0.9 * (len(errors) - 1)))],
        "tau": kendall_tau([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows]),
        "regret": rows[0]["measured_s"] / best["measured_s"],
        "memory_error_median": statistics.median(memory) if memory else float("nan"),
        "memory_error_max": memory[-1] if memory else float("nan"),
        "choice": rows[0]["name"],
        "best": best["name"],
        # the layouts that would run out of the tightest budget the planner calls them feasible
        # in (their own predicted peak and the headroom): measured alive at once, and resident
        # as the system counts it
        "over_budget": [r["name"] for r in rows if (r.get("measured_peak") or 0) > tightest[r["name"]]],
        "over_budget_resident": [r["name"] for r in rows if (r.get("resident_peak") or 0) > tightest[r["name"]]],
    }


def parse_cases(text: str | None) -> list[tuple[str, int]]:
    """`mlp:2,wide:4` as (model, ranks) pairs; None: every model at every world size."""
    return common.parse_cases(text, MODELS, WORLDS)


def run(b: Bench) -> None:
    cluster = f"emulated:{b.placement.cluster.name}" if b.placement.cluster else "local"
    rounds = b.options.get("rounds", ROUNDS)
    for model, world in parse_cases(b.options.get("cases")):
        _case(b, model, world, cluster, rounds)


def _key(row: dict) -> str:
    return json.dumps(row["settings"], sort_keys=True)


def _case(b: Bench, model: str, world: int, cluster: str, rounds: int) -> None:
    text, args = MODELS[model]
    layouts: list[dict] = []
    b.console.print(f"[bold]planner[/]: {text}, {world} ranks ({b.where}): each layout run {rounds}x, rotated")
    summaries: list[list[dict]] = []
    predicted: list[list[float]] = []  # each layout's prediction in each round
    for k in range(rounds):
        with fresh_inputs(b.work / f"planner-cache-{model}-{world}-{k}"):  # this round's inputs, measured now
            found = {_key(row): row for row in predicted_layouts(args, world, cluster)}
        missing = [row["layout"] for row in layouts if _key(row) not in found]
        if missing:
            raise ShardwiseError("planner", f"round {k + 1} predicted no {', '.join(missing)}, which round 1 did")
        if not layouts:
            layouts = list(found.values())  # round 1's order: its choice first
            summaries, predicted = [[] for _ in layouts], [[] for _ in layouts]
            b.console.print(f"  {len(layouts)} layouts")
        n = len(layouts)
        shift = k * max(1, n // rounds) % max(1, n)  # each round starts further on, fewer layouts than rounds too
        order = list(range(shift, n)) + list(range(shift))
        for i in order:
            predicted[i].append(found[_key(layouts[i])]["step_s"])
            summaries[i].append(b.train([*args, *_args(layouts[i]["settings"])], f"plan-{model}-{world}-{i}-{k}",
                                        nproc=world, steps=STEPS)["model_check"])  # fmt: skip
    # the peaks: once more each, glibc handing every freed block of 64 KiB or more back, so the
    # peak is the bytes alive at once, as the planner predicts them (the default allocator's
    # resident high-water mark keeps freed blocks, and moves from run to run; README)
    live = [
        b.train([*args, *_args(row["settings"])], f"plan-{model}-{world}-{i}-live", nproc=world, steps=STEPS,
                env=GIVE_BACK)["model_check"].get("measured_peak_bytes")
        for i, row in enumerate(layouts)
    ]  # fmt: skip
    rows = [
        _row(b, row, checks, peak, guesses)
        for row, checks, peak, guesses in zip(layouts, summaries, live, predicted, strict=True)
    ]
    figures = case_figures(rows)
    b.details.append({"model": model, "world": world, "link": b.link, "rounds": rounds, "runs": rows, **figures})
    how = f"{text}; {world} ranks, {len(rows)} layouts, {STEPS} steps a run, the median of {rounds} runs"
    for measure in ("error_median", "error_p90", "tau", "regret", "memory_error_median", "memory_error_max"):
        b.record("planner", f"{model} x{world}: {measure}", [figures[measure]], unit=measure, how=how)
    for measure in ("over_budget", "over_budget_resident"):
        b.record("planner", f"{model} x{world}: {measure}", [len(figures[measure])], unit="layouts", how=how)
    b.console.print(
        f"  error median {figures['error_median']:.1%}, p90 {figures['error_p90']:.1%}, tau "
        f"{figures['tau']:.2f}, regret {figures['regret']:.3f} (chose {figures['choice']}, best "
        f"{figures['best']}); peak memory error median {figures['memory_error_median']:.1%}, "
        f"largest {figures['memory_error_max']:.1%}"
    )
    b.console.print(
        f"  over their predicted peak and its {HEADROOM:.0%} headroom (out of the tightest budget the planner "
        f"calls them feasible in): {len(figures['over_budget'])} of {len(rows)} "
        f"alive at once ({', '.join(figures['over_budget']) or 'none'}), {len(figures['over_budget_resident'])} "
        "resident"
    )


def _row(b: Bench, row: dict, checks: list[dict], live: float | None, guesses: list[float]) -> dict:
    """One layout's predicted step (the median of each round's) and peak, the median of its
    runs' measured steps and resident peaks, its live peak (`live`: the run handing freed
    blocks back), and its error: each run against its own round's prediction."""
    from shardwise.plan.command import options_text

    layout = f"{row['layout']} {options_text(row)}".strip()
    steps = [c["measured_step_s"] for c in checks]
    peaks = [c["measured_peak_bytes"] for c in checks if c.get("measured_peak_bytes")]
    predicted, measured = statistics.median(guesses), statistics.median(steps)
    error = abs(statistics.median(p / m for p, m in zip(guesses, steps, strict=True)) - 1)
    text = f"{row['memory_bytes'] / 2**20:.1f} MiB predicted"
    if live:
        text += f", {live / 2**20:.1f} alive at once"
    if peaks:
        text += f", {statistics.median(peaks) / 2**20:.1f} resident"
    b.console.print(
        f"  {layout}: {1e3 * predicted:.2f} ms predicted, {spread(steps)} measured (median, min - max); {text}"
    )
    return {
        "name": layout,
        "predicted_s": predicted,
        "measured_s": measured,
        "error": error,
        "predicted_runs_s": guesses,
        "measured_runs_s": steps,
        "predicted_peak": row["memory_bytes"],
        "measured_peak": live,
        "resident_peak": statistics.median(peaks) if peaks else None,
    }


FLIP_MARGIN = 0.10  # one run's noise: three runs of one layout measured 89 to 105 ms (README)


def _beats(case: dict, winner: str, other: str) -> bool:
    """Whether `winner` measured faster than `other` on this case's link by more than the margin."""
    times = {r["name"]: r["measured_s"] for r in case["runs"]}
    return times[winner] * (1 + FLIP_MARGIN) < times[other]


def flips(details: list[dict]) -> list[dict]:
    """Where the best measured layout of a model and world differs between two links, each
    link's best beating the other's by more than FLIP_MARGIN there (not two layouts that
    tie within one run's noise), and whether the planner's choices differ the same way."""
    found = []
    by_case: dict[tuple[str, int], dict[str, dict]] = {}
    for case in details:
        by_case.setdefault((case["model"], case["world"]), {})[case["link"]] = case
    for (model, world), links in by_case.items():
        names = sorted(links)
        for i, a in enumerate(names):
            for c in names[i + 1 :]:
                best_a, best_c = links[a]["best"], links[c]["best"]
                if best_a != best_c and _beats(links[a], best_a, best_c) and _beats(links[c], best_c, best_a):
                    predicted = (links[a]["choice"], links[c]["choice"])
                    found.append(
                        {
                            "model": model,
                            "world": world,
                            "links": [a, c],
                            "best_measured": [links[a]["best"], links[c]["best"]],
                            "chosen": list(predicted),
                            "predicted_right": predicted == (links[a]["best"], links[c]["best"]),
                        }
                    )
    return found


def plot(path, details: list[dict]) -> None:
    """Predicted against measured, step time and peak memory, every run of every case (log
    axes; the diagonal and +-10% band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shardwise.files import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    markers = {}
    for case in details:
        marker = markers.setdefault(case["link"], "osv^D"[len(markers) % 5])
        label = f"{case['model']} x{case['world']}, {case['link']}"
        runs = case["runs"]
        axes[0].scatter([1e3 * r["predicted_s"] for r in runs], [1e3 * r["measured_s"] for r in runs], s=14,
                        marker=marker, label=label)  # fmt: skip
        peaks = [r for r in runs if r.get("measured_peak")]
        axes[1].scatter([r["predicted_peak"] / 2**20 for r in peaks], [r["measured_peak"] / 2**20 for r in peaks],
                        s=14, marker=marker)  # fmt: skip
    for ax, unit in ((axes[0], "step time, ms"), (axes[1], "peak memory of the largest rank, MiB")):
        ax.set(xscale="log", yscale="log", xlabel=f"predicted {unit}", ylabel=f"measured {unit}")
        low, high = ax.get_xlim()
        ax.plot([low, high], [low, high], color="black", linewidth=0.8)
        ax.fill_between([low, high], [0.9 * low, 0.9 * high], [1.1 * low, 1.1 * high], color="grey", alpha=0.2)
    axes[0].legend(fontsize=7)
    fig.suptitle("shardwise bench planner: the cost model against the runs")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
