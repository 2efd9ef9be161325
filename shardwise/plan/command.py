"""`shardwise plan`: every layout of N ranks for a config, predicted and ranked.

The inputs are measured here, once: the model's layer profile and its optimizer step on one
thread (cached under the machine's cache, `cache_dir()`, by model, shape, dtype, device,
optimizer and threads), the data source's loading time per sample (measured each time)
and the link of N ranks placed like the job's: the alpha-beta fit of
a ping-pong, each collective's calibration and the overlap of communication with compute
(cached by placement and N).
Then every layout of `plan/space.py` is predicted by `plan/model.py`, those over the
memory budget dropped, and the rest ranked by step time; the table breaks each step into
loading, compute, communication and bubble, and one line says why the first beats the others.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from pathlib import Path

import torch

from shardwise.comm.cost import Link
from shardwise.config import Config
from shardwise.config_check import parse_bytes, uncompressed_because
from shardwise.errors import ShardwiseError
from shardwise.files import cache_dir, write_atomic
from shardwise.jsonsafe import dumps
from shardwise.plan.checkpointing import priced
from shardwise.plan.compression import named_settings, run_averaging
from shardwise.plan.memory import HEADROOM, fits
from shardwise.plan.model import Prediction, Setting, predict
from shardwise.plan.profile import ModelProfile, batch_sizes, cached, loading_fit, profile_key, profile_model
from shardwise.plan.space import ModelShape, layouts


def optimizer_slots(cfg: Config) -> int:
    """Tensors of optimizer state per parameter: AdamW's two moments, SGD's momentum."""
    if cfg.train.optimizer == "adamw":
        return 2
    return 1 if cfg.train.momentum > 0 else 0


def measured_profile(cfg: Config) -> tuple[ModelProfile, ModelShape, int, tuple[float, float]]:
    """The model's layer profile (cached), what its structure takes, the validation set's
    size, and the data source's loading time (fixed and per-sample seconds)."""
    from shardwise.data import load_source
    from shardwise.data.loader import VAL_BATCH
    from shardwise.models import build_model
    from shardwise.plan.activations import measure_in_child
    from shardwise.train.optim import optimizer_for

    dataset = load_source(cfg.data, seed=cfg.train.seed)
    dtype = getattr(torch, cfg.train.dtype)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, dataset.in_shape, dataset.num_classes).to(dtype)
    torch.set_num_threads(1)  # as a rank computes
    sizes = batch_sizes(cfg.train.batch_size)
    t = cfg.train
    update = {"name": t.optimizer, "momentum": t.momentum > 0, "weight_decay": t.weight_decay > 0}
    key = profile_key(dataclasses.asdict(cfg.model), dataset.in_shape, dtype, torch.device("cpu"), sizes, update)
    sample = torch.from_numpy(dataset.x_train[0]).to(dtype)
    step = functools.partial(optimizer_for, t)
    spec = {"model": dataclasses.asdict(cfg.model), "in_shape": list(dataset.in_shape), "dtype": t.dtype}
    spec |= {"num_classes": dataset.num_classes, "seed": t.seed, "train_samples": max(sizes), "eval_samples": VAL_BATCH}
    passes = functools.partial(measure_in_child, spec)
    profile = cached(
        cache_dir(), key, lambda: profile_model(model, sample, key, sizes=sizes, optimizer=step, passes=passes)
    )
    return profile, ModelShape.of(model, sample), len(dataset.y_val), loading_fit(dataset, sizes, dtype)


def measured_link(cluster: str, nproc: int) -> Link:
    """The link of `nproc` ranks placed as the job's would be: the alpha-beta fit of a
    ping-pong between two of them, each collective's measured calibration on all of them and
    the overlap of communication with compute (`cluster.probe.calibrate_link`)."""
    from shardwise.cluster.placement import placement_for
    from shardwise.cluster.probe import LINK_VERSION, calibrate_link
    from shardwise.procs import free_port

    placement = placement_for(cluster)
    world = max(2, nproc)
    path = cache_dir() / f"link-{re.sub(r'[^A-Za-z0-9]+', '-', placement.describe(world))}.json"
    fit = json.loads(path.read_text()) if path.is_file() else {}
    if fit.get("version") != LINK_VERSION:  # measured by an older probe
        fit = calibrate_link(placement, world=world, port=free_port())
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(fit))
    collectives = {k: (v[0], v[1]) for k, v in fit["collectives"].items()}
    return Link(fit["alpha_s"], fit["beta_s_per_byte"], collectives, fit["overlap"], fit["sync_s"])


def measured_setting(cfg: Config, cluster: str, nproc: int) -> tuple[Setting, ModelShape]:
    """What every prediction for `cfg` needs besides the layout: the measured profile and link,
    the batch, this machine's cores, the optimizer's state per parameter and the engine's
    own cost per step on these ranks (`plan/overhead.py`); and the model's structure, which
    bounds the layouts."""
    from shardwise.plan.overhead import loop_overhead, pipeline_action

    profile, shape, val_samples, (load_fixed, load_per_sample) = measured_profile(cfg)
    cores, link = len(os.sched_getaffinity(0)), measured_link(cluster, nproc)
    step_s, rank_bytes = loop_overhead(cluster, nproc)
    t = cfg.train
    setting = Setting(profile, link, t.batch_size, cores, optimizer_slots(cfg), step_s, rank_bytes, val_samples)
    setting = dataclasses.replace(setting, load_fixed_s=load_fixed, load_s_per_sample=load_per_sample)
    setting = dataclasses.replace(setting, grad_accum=t.grad_accum, averaging=run_averaging(cfg, link))
    setting = dataclasses.replace(setting, checkpointing=t.activation_checkpointing == "layers")
    action = functools.cache(functools.partial(pipeline_action, cluster))  # measured where a pipeline is predicted
    setting = dataclasses.replace(setting, pipeline_action_s=action)
    return dataclasses.replace(setting, compression=named_settings(cfg)), shape


def search(cfg: Config, nproc: int, setting: Setting, shape: ModelShape, budget: float | None) -> list[dict]:
    """Every layout's prediction (that can average through the run's named compression
    method), fastest first; those over `budget` bytes marked. Each checkpointed as
    train.activation_checkpointing says (auto: only where it would not fit unchecked)."""
    rows, method, mode = [], cfg.comm.compression, cfg.train.activation_checkpointing
    for layout in layouts(nproc, batch=cfg.train.batch_size, shape=shape, grad_accum=cfg.train.grad_accum):
        layout = dataclasses.replace(layout, bucket_mb=cfg.parallel.bucket_mb)  # DDP's buckets, as named
        if (
            method not in ("none", "auto")
            and uncompressed_because(shard=layout.shard, ps=layout.mode == "ps", method=method)[0]
        ):
            continue
        on, p = priced(functools.partial(predict, layout, nproc), setting, mode, budget)
        rows.append({"config": layout, "prediction": p, "fits": fits(p.memory_bytes, budget), "checkpointing": on})
    rows.sort(key=lambda r: r["prediction"].step_s)
    return rows


def why(best: Prediction, other: Prediction) -> str:
    """One line on what the best layout gains over another, in the model's terms."""
    saved = other.load_s + other.compute_s - best.load_s - best.compute_s  # a rank's own work
    extra = best.comm_s + best.bubble_s - other.comm_s - other.bubble_s
    work = "compute" if other.load_s == best.load_s else "loading and compute"
    text = f"{best.layout} beats {other.layout} by {1e3 * (other.step_s - best.step_s):.2f} ms a step: "
    if saved > 0 and extra > 0:
        return text + f"it saves {1e3 * saved:.2f} ms of {work} and adds {1e3 * extra:.2f} ms of communication"
    if saved > 0:
        return text + f"it saves {1e3 * saved:.2f} ms of {work} and {1e3 * -extra:.2f} ms of communication"
    return text + f"it spends {1e3 * -saved:.2f} ms more on {work} but {1e3 * -extra:.2f} ms less on communication"


def plan(cfg: Config, *, nproc: int, cluster: str, budget: float | None, out: Path) -> dict:
    """Measure, search, write plan.json and plan.png under `out`; the plan."""
    started = time.perf_counter()
    setting, shape = measured_setting(cfg, cluster, nproc)
    link = setting.link
    action_s = setting.pipeline_action_s() if nproc > 1 and shape.pp > 1 else None  # measured before the search
    searched = time.perf_counter()
    rows = search(cfg, nproc, setting, shape, budget)
    search_s = time.perf_counter() - searched
    feasible = _feasible(rows, budget, nproc, "memory-per-rank")
    result = {
        "nproc": nproc,
        "cores": setting.cores,
        "link": {
            "alpha_s": link.alpha_s,
            "beta_s_per_byte": link.beta_s_per_byte,
            "collectives": {k: {"per_call_s": a, "factor": b} for k, (a, b) in link.collectives.items()},
            "overlap": link.overlap,
            "sync_s": link.sync_s,
        },
        "step_overhead_s": setting.step_overhead_s,
        "rank_overhead_bytes": setting.rank_overhead_bytes,
        "pipeline_action_s": action_s,
        "budget_bytes": budget,
        "search_s": search_s,
        "measure_s": searched - started,
        "layouts": [summary_row(r, cfg.train.batch_size) for r in rows],
        "choice": summary_row(feasible[0], cfg.train.batch_size),
        "why": _why_first(feasible),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "plan.json", dumps(result, indent=1) + "\n")
    _plot(out / "plan.png", result["layouts"][:20])
    return result


def _feasible(rows: list[dict], budget: float | None, nproc: int, key: str) -> list[dict]:
    """The rows that fit `budget`; none: one line naming the smallest predicted peak."""
    feasible = [r for r in rows if r["fits"]]
    if not feasible:
        least = min(rows, key=lambda r: r["prediction"].memory_bytes)
        raise ShardwiseError(key, f"no layout of {nproc} ranks fits {budget / 2**20:,.1f} MiB a rank: the smallest "
                             f"predicted peak is {least['prediction'].memory_bytes / 2**20:,.1f} MiB "
                             f"({describe(summary_row(least, 1))}), and a layout fits with {HEADROOM:.0%} "
                             "to spare")  # fmt: skip
    return feasible


def _why_first(feasible: list[dict]) -> str:
    """Why the first beats the fastest layout of another shape (not one of its own options)."""
    best = feasible[0]["prediction"]
    other = next((r["prediction"] for r in feasible if r["prediction"].layout != best.layout), None)
    return why(best, other) if other is not None else ""


def describe(row: dict) -> str:
    """A row's layout and its options in a few words."""
    extra = options_text(row)
    return f"{row['layout']}, {extra}" if extra else row["layout"]


def summary_row(row: dict, batch: int) -> dict:
    """A searched layout (`config`, `prediction`, `fits`) as plan.json writes it."""
    layout, p = row["config"], row["prediction"]
    return {
        "layout": p.layout,
        "settings": {k: v for k, v in dataclasses.asdict(layout).items() if k != "feature_cost" and v is not None},
        "step_s": p.step_s,
        "load_s": p.load_s,
        "compute_s": p.compute_s,
        "comm_s": p.comm_s,
        "bubble_s": p.bubble_s,
        "samples_per_s": batch / p.step_s if p.step_s > 0 else None,
        "memory_bytes": p.memory_bytes,
        "fits": row["fits"],
        "activation_checkpointing": "layers" if row.get("checkpointing") else "none",
    }


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shardwise.files import atomic_path

    names = [f"{r['layout']} {options_text(r)}".strip() for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    bars = (("load_s", "tab:green"), ("compute_s", "tab:blue"), ("comm_s", "tab:orange"), ("bubble_s", "tab:grey"))
    for key, colour in bars:
        values = [1e3 * r[key] for r in rows]
        ax.barh(names, values, left=left, color=colour, label=key.removesuffix("_s"))
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.invert_yaxis()
    ax.set(xlabel="predicted ms per step", title="shardwise plan: the fastest layouts")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def options_text(row: dict) -> str:
    """A planned layout's options beside its degrees (shard mode, schedule and micro-batches,
    activation checkpointing), or ''."""
    settings = row["settings"]
    bits = [f"shard={settings['shard']}"] if settings.get("shard", "none") != "none" else []
    if settings.get("pp", 1) > 1:
        bits.append(f"{settings['schedule']} M={settings.get('microbatches')}")
    if row.get("activation_checkpointing") == "layers":
        bits.append("checkpointed")
    return ", ".join(bits)


def render(result: dict, top: int = 12):
    """The ranked table (the fastest `top`, and the choice), as rich renders it."""
    from rich.table import Table

    table = Table(
        title=f"shardwise plan: {len(result['layouts'])} layouts of {result['nproc']} ranks, predicted "
        f"(searched in {1e3 * result['search_s']:.0f} ms)",
        title_justify="left",
    )
    for col in ("#", "layout", "options", "ms / step", "load", "compute", "comm", "bubble", "samples/s", "MiB / rank"):
        table.add_column(col, justify="left" if col in ("layout", "options") else "right")
    for i, r in enumerate(result["layouts"][:top], start=1):
        mark = "" if r["fits"] else f" (over budget, {HEADROOM:.0%} kept)"
        table.add_row(
            str(i), r["layout"], options_text(r) + mark, f"{1e3 * r['step_s']:.2f}",
            f"{1e3 * r['load_s']:.3f}", f"{1e3 * r['compute_s']:.2f}", f"{1e3 * r['comm_s']:.2f}",
            f"{1e3 * r['bubble_s']:.2f}",
            f"{r['samples_per_s']:,.0f}", f"{r['memory_bytes'] / 2**20:,.1f}",
        )  # fmt: skip
    return table


def plan_and_print(cfg: Config, *, nproc: int, cluster: str, memory: str | None, out: Path | None) -> int:
    """The `plan` command: the plan, its table, the choice and why; exit status 0."""
    from rich.console import Console

    if nproc < 1:
        raise ShardwiseError("nproc", f"must be at least 1, got {nproc}")
    named = memory if memory is not None else cfg.train.memory_per_rank or None  # the flag, else the config's
    budget = parse_bytes(named) if named is not None else None
    out = out or Path("runs") / f"plan-{time.strftime('%Y%m%d-%H%M%S')}"
    result = plan(cfg, nproc=nproc, cluster=cluster, budget=budget, out=out)
    console = Console(width=max(120, Console().width))
    console.print(render(result))
    console.print(f"choice: {describe(result['choice'])}")
    if result["why"]:
        console.print(result["why"])
    console.print(f"written: {out / 'plan.json'}, {out / 'plan.png'}")
    return 0


def predicted_rows(cfg: Config, *, nproc: int, cluster: str) -> list[dict]:
    """Every layout of `nproc` ranks for `cfg`'s model and data, predicted, fastest first
    (as plan.json's `layouts`; no memory budget)."""
    setting, shape = measured_setting(cfg, cluster, nproc)
    return [summary_row(r, cfg.train.batch_size) for r in search(cfg, nproc, setting, shape, None)]


def choose_layout(cfg: Config, *, nproc: int, cluster: str) -> dict:
    """parallel.layout = auto: plan within the memory a rank may use, print the choice in one
    line, and set it in `cfg` (as a manual layout, with activation checkpointing where auto
    chose it: the run's saved config names what it ran). The choice's prediction, as
    `predicted_step` gives it."""
    from shardwise.plan.checkpointing import rank_budget

    setting, shape = measured_setting(cfg, cluster, nproc)
    budget, source = rank_budget(cfg, nproc)
    rows = search(cfg, nproc, setting, shape, budget)
    if cfg.train.memory_per_rank:  # a budget the user named: none fits is one line
        rows = _feasible(rows, budget, nproc, "train.memory_per_rank")
    elif not any(r["fits"] for r in rows):  # this machine's memory, shared: the fastest, with a warning
        mib, kept = budget / 2**20, f"{HEADROOM:.0%} kept"
        print(f"parallel.layout auto: no layout's predicted peak fits {mib:,.1f} MiB a rank, {kept} ({source})")
    rows = [r for r in rows if r["fits"]] or rows
    best = summary_row(rows[0], cfg.train.batch_size)
    print(
        f"parallel.layout auto: {describe(best)} (predicted {1e3 * best['step_s']:.2f} ms a step, "
        f"the fastest of {len(rows)} layouts of {nproc} ranks; `shardwise plan` shows them all)"
    )
    cfg.parallel = dataclasses.replace(rows[0]["config"], layout="manual")
    cfg.train.activation_checkpointing = best["activation_checkpointing"]
    return step_figures(rows[0]["prediction"])


def predicted_step(cfg: Config, *, nproc: int, cluster: str) -> dict:
    """What the cost model predicts for the layout `cfg` names on `nproc` ranks: the run's
    summary sets it beside what was measured."""
    setting, _ = measured_setting(cfg, cluster, nproc)
    return step_figures(predict(cfg.parallel, nproc, setting))


def step_figures(p: Prediction) -> dict:
    return {
        "step_s": p.step_s,
        "load_s": p.load_s,
        "compute_s": p.compute_s,
        "comm_s": p.comm_s,
        "bubble_s": p.bubble_s,
        "peak_bytes": p.memory_bytes,
    }
