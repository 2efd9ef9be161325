"""`train.activation_checkpointing = auto` and the memory a rank may use.

The planner prices every layout without activation checkpointing and, where the run allows
it (`layers`, or `auto`), with it: the checkpointed layers' forward once more in the step,
and the backward's activations as measured with every unit checkpointed
(`plan/activations.py`). Under `auto` a layout is checkpointed only where its predicted
peak does not fit the memory a rank may use (`train.memory_per_rank`, or this machine's
available memory shared by its ranks): checkpointing never makes a step faster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from shardwise.config import Config
from shardwise.config_check import parse_bytes
from shardwise.plan.memory import HEADROOM, fits
from shardwise.plan.model import Prediction, Setting

MiB = 2**20


def available_bytes() -> float | None:
    """This machine's available memory (Linux's MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rank_budget(cfg: Config, nproc: int) -> tuple[float | None, str]:
    """The bytes a rank may use and where the figure comes from (None: unknown)."""
    if cfg.train.memory_per_rank:
        return parse_bytes(cfg.train.memory_per_rank, "train.memory_per_rank"), "train.memory_per_rank"
    available = available_bytes()
    if available is None:
        return None, "this machine's memory is unknown"
    ranks = max(1, nproc)
    return available / ranks, f"this machine's available memory shared by {ranks} ranks"


def options(mode: str) -> tuple[bool, ...]:
    """Whether to price a layout unchecked, checkpointed, or both (auto: unchecked first)."""
    return {"none": (False,), "layers": (True,), "auto": (False, True)}[mode]


def priced(predict_with: Callable[[Setting], Prediction], setting: Setting, mode: str, budget: float | None):
    """(checkpointed, prediction) of a layout under `mode`: the first option that fits
    `budget`, or, where none does, the one with the smaller peak."""
    tried = [(on, predict_with(dataclasses.replace(setting, checkpointing=on))) for on in options(mode)]
    fitting = [t for t in tried if fits(t[1].memory_bytes, budget)]
    return fitting[0] if fitting else min(tried, key=lambda t: t[1].memory_bytes)


def explain(on: bool, without: Prediction, chosen: Prediction, budget: float | None, source: str) -> str:
    """The one line `auto` prints."""
    peak = f"the predicted peak, {without.memory_bytes / MiB:,.1f} MiB a rank"
    if budget is None:
        return f"none ({peak}; {source})"
    limit = f"{budget / MiB:,.1f} MiB ({source})"
    if not on:
        if fits(without.memory_bytes, budget):
            return f"none ({peak}, fits {limit} with {HEADROOM:.0%} to spare)"
        return f"none ({peak}, does not fit {limit} with {HEADROOM:.0%} to spare, and checkpointing would not lower it)"
    verdict = "fits" if fits(chosen.memory_bytes, budget) else "still does not fit"
    return (
        f"layers (the predicted peak, {without.memory_bytes / MiB:,.1f} MiB a rank, does not fit {limit} with "
        f"{HEADROOM:.0%} to spare; "
        f"checkpointed: {chosen.memory_bytes / MiB:,.1f} MiB, which {verdict}, and a step "
        f"{chosen.step_s / without.step_s:.2f}x as long)"
    )


def choose_checkpointing(cfg: Config, *, nproc: int, cluster: str) -> dict | None:
    """train.activation_checkpointing = auto for the layout `cfg` names: none where its
    predicted peak fits the memory a rank may use, else layers; printed in one line and
    set in `cfg`. The chosen prediction, as `predicted_step` gives it (None for a model the
    cost model cannot profile: then none)."""
    from shardwise.errors import ShardwiseError
    from shardwise.plan.command import measured_setting, predict, step_figures

    if cfg.train.steps == 0:  # scoring weights: no training pass to keep activations for
        cfg.train.activation_checkpointing = "none"
        print("train.activation_checkpointing auto: none (no training step)")
        return None
    budget, source = rank_budget(cfg, nproc)
    try:
        setting, _ = measured_setting(cfg, cluster, nproc)
    except ShardwiseError as e:
        cfg.train.activation_checkpointing = "none"
        print(f"train.activation_checkpointing auto: none (the cost model cannot profile this model: {e})")
        return None
    without = predict(cfg.parallel, nproc, setting)
    on, chosen = priced(lambda s: predict(cfg.parallel, nproc, s), setting, "auto", budget)
    print(f"train.activation_checkpointing auto: {explain(on, without, chosen, budget, source)}")
    cfg.train.activation_checkpointing = "layers" if on else "none"
    return step_figures(chosen)
