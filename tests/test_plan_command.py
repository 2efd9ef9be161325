"""`shardwise plan` from the command line: measured once (then cached), every layout
ranked, the files written; a budget no layout fits is one line, exit 2."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path

import cli_fork
import pytest

from shardwise.comm.cost import KINDS
from shardwise.config_check import parse_bytes
from shardwise.errors import ShardwiseError
from shardwise.plan.memory import HEADROOM
from shardwise.plan.overhead import PIPELINE_RUNS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One measurement cache for this module's plans, as a user's machine keeps one."""
    return tmp_path_factory.mktemp("cache")


def _plan(cwd: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SHARDWISE_CACHE": str(cache)}
    return cli_fork.run(["plan", "--model.name", "mlp", *args], cwd=cwd, env=env, timeout=180)


def test_plan_ranks_every_layout_and_caches_what_it_measured(tmp_path, cache):
    for old in cache.iterdir():
        old.unlink()  # measured from nothing
    done = _plan(tmp_path, cache, "--nproc", "2", "--out", "p")
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "p" / "plan.json").read_text())
    steps = [r["step_s"] for r in result["layouts"]]  # every layout of 2 ranks (of more: test_plan_inputs.py)
    assert steps == sorted(steps) and len(steps) >= 10 and result["search_s"] < 2.0
    assert result["choice"] == result["layouts"][0] and "beats" in result["why"]
    assert not any(r["settings"]["spatial"] > 1 for r in result["layouts"])  # an MLP has no convolutions
    assert (tmp_path / "p" / "plan.png").stat().st_size > 0
    assert f"choice: {result['choice']['layout']}" in done.stdout
    link = result["link"]  # measured on 2 ranks: each collective's calibration, and the overlap
    assert sorted(link["collectives"]) == sorted(KINDS)
    assert all(c["factor"] > 0 and c["per_call_s"] >= 0 for c in link["collectives"].values())
    assert -5 < link["overlap"] <= 1.5
    kept = sorted(p.name for p in cache.iterdir())
    # the engine's own loop and memory per rank: the tiny run's measured step and peak less
    # what the model predicted for it, as the plan used them
    (loop,) = cache.glob("loop-*.json")
    tiny = json.loads(loop.read_text())
    assert 0 < tiny["predicted_s"] and 0 < tiny["predicted_peak_bytes"] < tiny["peak_bytes"] < 2**30
    assert result["step_overhead_s"] == pytest.approx(max(0.0, tiny["step_s"] - tiny["predicted_s"]))
    assert result["rank_overhead_bytes"] == pytest.approx(tiny["peak_bytes"] - tiny["predicted_peak_bytes"])
    # a pipeline's cost per action: the tiny pipeline's measured step less its prediction and
    # the loop's cost, over the 16 forwards and backwards a rank runs
    (pipe,) = cache.glob("pipeline-*.json")
    tiny = json.loads(pipe.read_text())
    assert tiny["loop_s"] == result["step_overhead_s"] and 0 < tiny["predicted_s"] < tiny["step_s"]
    assert len(tiny["steps_s"]) == PIPELINE_RUNS == 3  # the median of its runs
    assert tiny["step_s"] == statistics.median(tiny["steps_s"])
    beyond = max(0.0, tiny["step_s"] - tiny["predicted_s"] - tiny["loop_s"])
    assert result["pipeline_action_s"] == tiny["action_s"] == pytest.approx(beyond / 16)
    # the link, the loop's cost, the pipeline's, the two models' profiles, the validation rows
    assert sorted({n.split("-")[0] for n in kept}) == ["link", "loop", "pipeline", "profile", "split"]
    again = _plan(tmp_path, cache, "--nproc", "2", "--memory-per-rank", "1GiB", "--out", "q")
    assert again.returncode == 0 and sorted(p.name for p in cache.iterdir()) == kept
    # a named lossy compression method: only the layouts that can average through it
    int8 = _plan(tmp_path, cache, "--nproc", "2", "--comm.compression", "int8", "--out", "c")
    assert int8.returncode == 0, int8.stderr
    names = {r["layout"] + " " + r["settings"]["shard"] for r in result["layouts"]}
    kept_layouts = json.loads((tmp_path / "c" / "plan.json").read_text())["layouts"]
    assert any(n.startswith("ps:") for n in names) and any(n.endswith(" full") for n in names)
    assert kept_layouts and all(
        r["settings"]["mode"] != "ps" and r["settings"]["shard"] != "full" for r in kept_layouts
    )


def test_a_budget_no_layout_fits_is_one_line(tmp_path, cache):
    done = _plan(tmp_path, cache, "--nproc", "2", "--memory-per-rank", "1KiB", "--out", "p")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "memory-per-rank: no layout of 2 ranks fits 0.0 MiB a rank: the smallest predicted peak is" in lines[0]
    assert lines[0].endswith("and a layout fits with 10% to spare")
    assert not (tmp_path / "p").exists()


def test_a_layout_fits_with_the_headroom_to_spare():
    from shardwise.plan.memory import fits

    # a predicted peak of 100 MiB fits 111 MiB, not 109: the allocator's blocks and what the
    # model leaves out (measured peaks up to 4.7% over the predicted)
    assert fits(100 * 2**20, 111 * 2**20) and not fits(100 * 2**20, 109 * 2**20) and fits(1e12, None)


def test_sizes_read_with_their_units():
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("2g") == 2 * 2**30 and parse_bytes("64") == 64 * 2**20
    with pytest.raises(ShardwiseError, match="memory-per-rank: 'lots': expected a size such as 512MiB"):
        parse_bytes("lots")


def test_auto_layout_trains_with_the_plans_choice(tmp_path):
    """parallel.layout = auto: the launcher plans, says its choice in one line, and the run
    (its summary, its saved config) is that layout."""
    import tomllib

    argv = ["train", "--parallel.layout", "auto", "--nproc", "2"]
    argv += ["--model.name", "mlp", "--train.steps", "4", "--run.progress", "false", "--out", "run"]
    done = cli_fork.run(argv, cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stdout.splitlines() if line.startswith("parallel.layout auto: ")]
    assert len(said) == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert said[0].removeprefix("parallel.layout auto: ").startswith(summary["layout"])
    saved = tomllib.loads((tmp_path / "run" / "config.toml").read_text())["parallel"]
    assert saved["layout"] == "manual"
    # every run sets the cost model's prediction for its layout beside what it measured
    check = summary["model_check"]
    assert f"(predicted {1e3 * check['predicted']['step_s']:.2f} ms a step" in said[0]
    assert check["measured_step_s"] == summary["step_time_s"]
    assert check["step_ratio"] == pytest.approx(summary["step_time_s"] / check["predicted"]["step_s"])
    if not summary["layout"].startswith("ps:"):  # a rank that loads wrote the summary: it timed its loading
        assert (
            check["measured_load_s"] == summary["load_time_s"] and 0 < summary["load_time_s"] < summary["step_time_s"]
        )
        assert 0 < check["predicted"]["load_s"] < check["predicted"]["step_s"]
    if "memory" in summary:  # a parameter server's run records no memory per rank
        peak = max(r["parameters_bytes"] + r["rss_peak_bytes"] - r["rss_start_bytes"] for r in summary["memory"])
        assert check["memory_ratio"] == pytest.approx(peak / check["predicted"]["peak_bytes"])
    else:
        assert "memory_ratio" not in check and summary["layout"].startswith("ps:")
    assert "cost model" in done.stdout and f"({check['step_ratio']:.2f}x)" in done.stdout
    refused = cli_fork.run([*argv[:-2], "--parallel.tp", "2"], cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "shardwise: parallel.tp: =2 with parallel.layout=auto: the planner chooses the layout; name one or the other"
    )


def test_auto_checkpointing_within_the_memory_a_rank_may_use(tmp_path, cache):
    """train.activation_checkpointing = auto: checkpointed only where the layout's predicted
    peak is over train.memory_per_rank; the launcher says so in one line and the run (its
    summary, its saved config) checkpoints; the plan prices both."""
    import tomllib

    # hidden layers wide enough that checkpointing saves about a third of the activations
    # (measured: 25.0 KB a sample against 17.1); with the default 128 and 64 it saved 1.6%,
    # within what the measurement varies between machines
    model = ["--model.name", "convnet", "--model.channels", "8,16", "--model.hidden", "1024,1024"]
    model += ["--train.batch_size", "256"]
    env = {**os.environ, "SHARDWISE_CACHE": str(cache)}

    def dp2(mode: str, *extra: str) -> dict:
        args = ["plan", *model, "--nproc", "2", "--train.activation_checkpointing", mode, *extra, "--out", mode]
        done = cli_fork.run(args, cwd=tmp_path, env=env, timeout=180)
        assert done.returncode == 0, done.stderr
        rows = json.loads((tmp_path / mode / "plan.json").read_text())["layouts"]
        return next(r for r in rows if r["layout"] == "dp=2" and r["settings"]["shard"] == "none")

    plain, checked = dp2("none"), dp2("layers")
    assert checked["activation_checkpointing"] == "layers" and plain["activation_checkpointing"] == "none"
    assert checked["memory_bytes"] < plain["memory_bytes"] and checked["compute_s"] > plain["compute_s"]
    roomy = dp2("auto", "--memory-per-rank", f"{2 * plain['memory_bytes'] / 1024:.0f}KiB")
    assert roomy["activation_checkpointing"] == "none"  # it fits: checkpointing would only slow it
    # a budget the plain peak with the planner's headroom is over, and the checkpointed one fits in
    budget = f"{(plain['memory_bytes'] + checked['memory_bytes']) / 2 * (1 + HEADROOM) / 1024:.0f}KiB"
    argv = ["train", *model, "--nproc", "2", "--train.steps", "3", "--run.progress", "false", "--out", "run"]
    argv += ["--train.activation_checkpointing", "auto", "--train.memory_per_rank", budget]
    done = cli_fork.run(argv, cwd=tmp_path, env=env, timeout=180)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stdout.splitlines() if line.startswith("train.activation_checkpointing auto: ")]
    assert len(said) == 1 and said[0].split(": ", 1)[1].startswith("layers (the predicted peak"), said
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["checkpointed_units"] == 4  # two convolution blocks, two hidden Linear + ReLU
    assert summary["model_check"]["predicted"]["peak_bytes"] == pytest.approx(checked["memory_bytes"])
    # the run checks its measured peak against the budget it was planned within, and says so
    check = summary["model_check"]
    assert check["budget_bytes"] == parse_bytes(budget)
    assert check["over_budget"] == (check["measured_peak_bytes"] > parse_bytes(budget))
    over = "over" if check["over_budget"] else "within"
    table = " ".join(done.stdout.replace("│", " ").split())  # the summary table's cell, unwrapped
    assert f"{over} train.memory_per_rank ({parse_bytes(budget) / 2**20:,.1f} MiB)" in table
    saved = tomllib.loads((tmp_path / "run" / "config.toml").read_text())["train"]
    assert saved["activation_checkpointing"] == "layers"
