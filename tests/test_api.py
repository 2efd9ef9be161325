"""The Python API: a config in code, a run on local processes or as torchrun's ranks, its results."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import cli_fork
import pytest
import torch
from safetensors.torch import load_file

import shardwise
from shardwise.errors import ShardwiseError

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "model.name": "examples.digits_model:build",
    "model.options": {"width": 32},
    "train.steps": 8,
    "train.eval_every": 0,
    "run.progress": False,
}


def test_train_from_python_and_from_a_torchrun_script_give_the_same_run(tmp_path):
    """shardwise.train on 2 local processes, and the same call in a script that torchrun
    starts twice: the same summary's steps, the same final weights."""
    local = shardwise.run(shardwise.build_config(SETTINGS), nproc=2, out=tmp_path / "local")
    assert local.summary["steps"] == 8 and local.summary["world_size"] == 2 and local.weights.is_file()
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, os, sys
        import shardwise
        settings = json.loads({json.dumps(json.dumps(SETTINGS))})
        result = shardwise.run(shardwise.build_config(settings), out=sys.argv[1])
        with open(sys.argv[1] + ".result" + os.environ["RANK"], "w") as f:  # not stdout: both ranks write there at once
            json.dump({{"steps": result.summary["steps"], "out": str(result.out)}}, f)
    """)
    )
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         str(tmp_path / "torchrun")],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )  # fmt: skip
    # a rank's own message comes first, torchrun's summary of the failure last: both
    assert done.returncode == 0, done.stderr[:3000] + "\n...\n" + done.stderr[-2000:]
    results = [json.loads((tmp_path / f"torchrun.result{rank}").read_text()) for rank in (0, 1)]
    assert len(results) == 2 and all(r == {"steps": 8, "out": str(tmp_path / "torchrun")} for r in results)
    assert (tmp_path / "torchrun" / "config.toml").is_file()
    mine, theirs = load_file(local.weights), load_file(tmp_path / "torchrun" / "model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_mistake_in_code_raises_with_the_field():
    with pytest.raises(ShardwiseError, match="train.steps: expected int"):
        shardwise.build_config({"train.steps": "many"})
    with pytest.raises(ShardwiseError, match="nproc: must be at least 1"):
        shardwise.run(shardwise.build_config(SETTINGS), nproc=0)


def test_evaluate_scores_a_finished_run_as_the_run_did(tmp_path):
    """`shardwise evaluate RUN` on one process gives the accuracy the 2-rank run reported
    at its end (the loss up to summation order); the run's import path must be named."""
    run = shardwise.run(shardwise.build_config(SETTINGS), nproc=2, out=tmp_path / "run")
    mine = shardwise.api.evaluate(run.out, {"model.name": SETTINGS["model.name"]})
    assert mine["val_accuracy"] == run.summary["val_accuracy"]
    assert mine["val_loss"] == pytest.approx(run.summary["val_loss"], rel=1e-6)
    command = ["evaluate", str(run.out)]
    done = cli_fork.run([*command, "--model.name", SETTINGS["model.name"]], cwd=ROOT)
    assert done.returncode == 0 and json.loads(done.stdout)["val_accuracy"] == run.summary["val_accuracy"]
    refused = cli_fork.run(command, cwd=ROOT)
    assert refused.returncode == 2 and "names code to import" in refused.stderr


@pytest.mark.parametrize("layout", [{"parallel.tp": 2}, {"parallel.pp": 2}], ids=["tp", "pp"])
def test_evaluate_under_a_layout_scores_as_the_run_did(tmp_path, layout):
    """The weights cut as the layout cuts a model (tensor-parallel pairs, pipeline stages)
    and scored on 2 ranks: the accuracy the dp run reported, the loss up to summation order."""
    run = shardwise.run(shardwise.build_config(SETTINGS), nproc=2, out=tmp_path / "run")
    scored = shardwise.api.evaluate(run.out, {"model.name": SETTINGS["model.name"], **layout}, nproc=2)
    assert scored["val_accuracy"] == run.summary["val_accuracy"]
    assert scored["val_loss"] == pytest.approx(run.summary["val_loss"], rel=1e-5)
    assert list(tmp_path.iterdir()) == [tmp_path / "run"]
