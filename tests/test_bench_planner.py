"""`shardwise bench planner`'s figures, computed by hand; and that each layout it runs is
the layout that was predicted."""

from __future__ import annotations

import dataclasses

import pytest

from shardwise.bench.planner import _args, _overrides, case_figures, flips, parse_cases
from shardwise.config import load_config
from shardwise.errors import ShardwiseError
from shardwise.plan.space import layouts


def _runs(predicted: list[float], measured: list[float]) -> list[dict]:
    return [
        {"name": f"L{i}", "predicted_s": p, "measured_s": m, "predicted_peak": 100.0, "measured_peak": 100.0 + 10 * i}
        for i, (p, m) in enumerate(zip(predicted, measured, strict=True))
    ]


def test_case_figures_by_hand():
    # predicted order L0 < L1 < L2 < L3; measured swaps L1 and L2: 5 concordant pairs, 1 discordant
    runs = _runs([1.0, 2.0, 3.0, 4.0], [1.25, 2.5, 2.0, 4.0])
    runs[1]["measured_peak"] = 105.0
    figures = case_figures(runs)
    # errors |p - m| / m: 0.2, 0.2, 0.5, 0.0 -> sorted 0, 0.2, 0.2, 0.5
    assert figures["error_median"] == pytest.approx(0.2)
    assert figures["error_p90"] == pytest.approx(0.5)
    assert figures["tau"] == pytest.approx((5 - 1) / 6)
    assert figures["regret"] == pytest.approx(1.0) and figures["choice"] == figures["best"] == "L0"
    # peaks measured 1.0, 1.05, 1.2, 1.3 times the prediction: off by 0, 5, 20, 30%
    assert figures["memory_error_median"] == pytest.approx(0.125) and figures["memory_error_max"] == pytest.approx(0.3)
    # out of the tightest budget the planner calls them feasible in, their predicted peak and
    # its 10% headroom: L2 and L3 (L1, 5% over, fits)
    assert figures["over_budget"] == ["L2", "L3"] and figures["over_budget_resident"] == []


def test_regret_is_the_choice_against_the_best_measured():
    figures = case_figures(_runs([1.0, 2.0], [3.0, 2.0]))
    assert figures["regret"] == pytest.approx(1.5) and figures["choice"] == "L0" and figures["best"] == "L1"
    assert figures["tau"] == pytest.approx(-1.0)


def test_flips_say_whether_the_planner_moved_the_same_way():
    def case(link, choice, best, margin=0.2):
        runs = [{"name": "tp=2", "measured_s": 1.0}, {"name": "dp=2", "measured_s": 1.0}]
        runs[[r["name"] for r in runs].index(best)]["measured_s"] = 1.0 - margin
        return {"model": "mlp", "world": 2, "link": link, "choice": choice, "best": best, "runs": runs}

    right = flips([case("1gbit", "tp=2", "tp=2"), case("10gbit", "dp=2", "dp=2")])
    assert right == [
        {
            "model": "mlp",
            "world": 2,
            "links": ["10gbit", "1gbit"],
            "best_measured": ["dp=2", "tp=2"],
            "chosen": ["dp=2", "tp=2"],
            "predicted_right": True,
        }
    ]
    wrong = flips([case("1gbit", "dp=2", "tp=2"), case("10gbit", "dp=2", "dp=2")])
    assert [f["predicted_right"] for f in wrong] == [False]
    assert flips([case("1gbit", "tp=2", "dp=2"), case("10gbit", "tp=2", "dp=2")]) == []  # no flip measured
    # a best layout within one run's noise of the other link's best is no flip
    assert flips([case("1gbit", "tp=2", "tp=2", margin=0.08), case("10gbit", "dp=2", "dp=2")]) == []


def test_each_layout_runs_as_it_was_predicted():
    """The command-line settings the bench trains with load back to the very layout."""
    from shardwise.plan.command import summary_row
    from shardwise.plan.model import Prediction

    for world in (2, 4):
        for layout in layouts(world, batch=32):
            row = summary_row({"config": layout, "prediction": Prediction("x", 1, 0, 0, 1), "fits": True}, 32)
            cfg = load_config(None, {"model.name": "mlp", **_overrides(_args(row["settings"]))})
            assert dataclasses.replace(cfg.parallel, feature_cost=[]) == dataclasses.replace(layout, feature_cost=[])


def test_cases_are_chosen_by_name_and_ranks():
    assert parse_cases("mlp:2, wide:4") == [("mlp", 2), ("wide", 4)]
    assert len(parse_cases(None)) == 10  # five models at 2 and 4 ranks
    with pytest.raises(ShardwiseError, match="cases: 'mlp:1': expected MODEL:RANKS, MODEL one of convnet, mlp"):
        parse_cases("mlp:2,mlp:1")


def test_each_scenario_that_takes_cases_checks_them_before_anything_runs(tmp_path):
    from shardwise.bench import compression
    from shardwise.bench.suite import run_suite

    assert compression.parse_cases(None) == [("mlp", 2), ("mlp", 4), ("convnet", 2), ("convnet", 4)]
    assert compression.parse_cases("convnet:4") == [("convnet", 4)]
    with pytest.raises(ShardwiseError, match="cases: 'wide:2': expected MODEL:RANKS, MODEL one of mlp, convnet"):
        run_suite(["compression"], ["loopback"], 5, tmp_path, plan_only=True, cases="mlp:2,wide:2")
    with pytest.raises(ShardwiseError, match="cases: mlp:3: 3 ranks do not divide its global batch of 16"):
        run_suite(["compression"], ["loopback"], 5, tmp_path, plan_only=True, cases="mlp:3")
    with pytest.raises(ShardwiseError, match="cases: only planner and compression take cases, asked for tp"):
        run_suite(["tp"], ["loopback"], 5, tmp_path, plan_only=True, cases="mlp:2")
    assert run_suite(["planner", "compression"], ["loopback"], 5, tmp_path, plan_only=True, cases="mlp:2") == 0


def test_every_layout_runs_each_round_in_rotated_order_with_fresh_measurements(tmp_path, monkeypatch):
    import io
    import os

    from rich.console import Console

    from shardwise.bench import planner

    ran, caches = [], []
    measured = {0: [30, 10, 20], 1: [5, 6, 7], 2: [9, 1, 8]}  # ms of each layout's runs, in order

    def predicted(args, world, cluster):  # the machine drifts: round 2 measures inputs twice as slow
        caches.append(os.environ["SHARDWISE_CACHE"])
        scale = [1, 2, 1][len(caches) - 1]
        rows = [{"layout": f"L{i}", "settings": {"dp": i + 1}, "step_s": 0.01 * (i + 1) * scale, "memory_bytes": 1e6}
                for i in range(3)]  # fmt: skip
        return rows[len(caches) - 1 :] + rows[: len(caches) - 1]  # each round may rank them differently

    class FakeBench:
        work, options, link, where, details = tmp_path, {"cases": "mlp:2", "rounds": 3}, "loopback", "here", []
        console = Console(file=io.StringIO())
        record = staticmethod(lambda *a, **k: "")
        placement = type("P", (), {"cluster": None})()

        def train(self, args, name, *, nproc, steps, env=None):
            i = int(args[args.index("--parallel.dp") + 1]) - 1
            if env is not None:  # the run that hands freed memory back: the peak alive at once
                assert env["MALLOC_MMAP_THRESHOLD_"] == "65536"
                return {"model_check": {"measured_step_s": 1.0, "measured_peak_bytes": 1e6 + i}}
            ran.append(i)
            step = measured[i][sum(1 for j in ran if j == i) - 1] / 1e3
            return {"model_check": {"measured_step_s": step, "measured_peak_bytes": 2e6}}

    monkeypatch.setattr(planner, "predicted_layouts", predicted)
    monkeypatch.setenv("SHARDWISE_CACHE", "elsewhere")
    planner.run(FakeBench())
    assert ran == [0, 1, 2, 1, 2, 0, 2, 0, 1]  # each round starts one layout later
    assert caches == [str(tmp_path / f"planner-cache-mlp-2-{k}") for k in range(3)]  # each round's own inputs
    assert os.environ["SHARDWISE_CACHE"] == "elsewhere"
    (case,) = FakeBench.details
    assert [r["measured_s"] for r in case["runs"]] == pytest.approx([0.020, 0.006, 0.008])  # the medians
    assert [r["predicted_s"] for r in case["runs"]] == pytest.approx([0.010, 0.020, 0.030])
    # each run against its own round's prediction: L0 predicted 10, 20, 10 ms and measured 30,
    # 10, 20: ratios 1/3, 2, 1/2, median 1/2; L1 20, 40, 20 against 5, 6, 7: 4, 6.7, 2.9;
    # L2 30, 60, 30 against 9, 1, 8: 3.3, 60, 3.75
    assert [r["error"] for r in case["runs"]] == pytest.approx([0.5, 3.0, 2.75])
    assert case["error_median"] == pytest.approx(2.75)
    # the peak compared is the live one; the resident high-water mark is kept beside it
    assert [(r["measured_peak"], r["resident_peak"]) for r in case["runs"]] == [(1e6 + i, 2e6) for i in range(3)]
    assert case["best"].startswith("L1") and case["rounds"] == 3
