"""Every command the README shows, run as written, in README order, in a scratch folder.

Runs are shortened, never changed otherwise: a `shardwise train` gets `--train.steps 4`
(8 where it resumes, so that it trains on) and `--run.progress false` appended, and
`--train.checkpoint_every 2` where it names checkpoint_every, so a run's checkpoints,
signatures and layout are what the command asks for at a tenth of the time. The files a
user brings (`new_digits.npz` to predict on, the README's own `run.toml`, the example
modules) are made or copied into the scratch folder first. A `make` target is checked to
run the command the README says it does, which then runs (`make test` is this suite).
What needs another machine or an hour says where it is tested instead.

`make train` runs `.venv/bin/shardwise` as a fresh process; every other `shardwise`
command runs what that script runs, shardwise.cli.main with the command's arguments, in
a process forked from this one with torch imported already (tests/cli_fork.py): the same
exit status, output and files, without 4 s of imports a command.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import cli_fork
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment running the tests: .venv/bin under make test
NETNS = os.geteuid() == 0 and all(shutil.which(t) for t in ("ip", "tc", "unshare"))
# commands that cannot run here as written, and the test that runs them
ELSEWHERE = {
    "torchrun": "tests/test_cluster.py::test_torchrun_across_hosts (one torchrun per emulated host)",
    "serve": "tests/test_serve.py (a server runs until stopped: started there, asked over HTTPS, stopped)",
}


def readme_commands() -> list[str]:
    """Each command of the README's bash blocks, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                commands.append(line.strip())
    return commands


def _toml_block(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    return next(b for b in re.findall(r"```toml\n(.*?)```", text, re.S) if b.startswith(f"# {name}"))


def _shortened(argv: list[str]) -> list[str]:
    if argv[1:2] != ["train"]:
        return argv
    steps = "8" if "--resume" in argv else "4"
    argv = [*argv, "--train.steps", steps, "--run.progress", "false"]
    if "--train.checkpoint_every" in argv[:-4]:
        argv += ["--train.checkpoint_every", "2"]
    return argv


def _make(target: str) -> list[str]:
    """The command `make TARGET` runs (its last line; the ones before set up .venv)."""
    done = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if not line.startswith("make")]
    return shlex.split(lines[-1])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "examples", folder / "examples")
    (folder / "run.toml").write_text(_toml_block("run.toml"))
    from sklearn.datasets import load_digits

    np.savez(folder / "new_digits.npz", x=load_digits().data[:20].reshape(-1, 1, 8, 8))
    return folder


def _run(argv: list[str], cwd: Path, *, fresh: bool) -> None:
    if argv[0].startswith(".venv/bin/"):
        argv = [str(BIN / argv[0].removeprefix(".venv/bin/")), *argv[1:]]
    if Path(argv[0]).name == "shardwise" and not fresh:
        done = cli_fork.run(argv[1:], cwd=cwd, timeout=240)
    else:
        if Path(argv[0]).name == "shardwise" and not Path(argv[0]).exists():
            argv = [sys.executable, "-m", "shardwise", *argv[1:]]
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{shlex.join(argv)}: exit {done.returncode}\n{done.stderr[-3000:]}"


def test_every_readme_command_runs_as_written(scratch):
    commands = readme_commands()
    assert len(commands) >= 30, commands
    script = BIN / "shardwise"  # what the forked commands run instead: the same function
    assert not script.exists() or "from shardwise.cli import main" in script.read_text()
    ran, cluster_up = [], False
    try:
        for command in commands:
            argv = shlex.split(command, comments=True)
            if argv[0] == "make":
                assert argv[1] in ("train", "test", "bench"), command
                expanded = _make(argv[1])
                assert expanded[0].startswith(".venv/bin/"), expanded
                if argv[1] == "test":  # this suite itself
                    assert expanded == [".venv/bin/python", "-m", "pytest", "-q"], expanded
                    continue
                argv = expanded + (["--plan"] if argv[1] == "bench" else [])
            if any(word in ELSEWHERE for word in argv[:3]) or argv[0].startswith("GLOO_SOCKET_IFNAME="):
                continue
            if argv[1:3] == ["cluster", "up"] or "--cluster" in argv or argv[1] == "cluster":
                if not NETNS:
                    continue  # the emulated cluster needs root and iproute2; tests/test_cluster.py says so too
                cluster_up = cluster_up or argv[1:3] == ["cluster", "up"]
            if argv[1:2] == ["bench"] and "--plan" not in argv:
                argv = [*argv, "--plan"]  # minutes to an hour: the request is checked, the plan printed
            _run(_shortened(argv), scratch, fresh=command.startswith("make train"))
            ran.append(command)
    finally:
        if cluster_up:
            subprocess.run([str(BIN / "shardwise"), "cluster", "down"], cwd=scratch, capture_output=True)
    assert (scratch / "runs" / "watched" / "tensorboard").is_dir()
    assert (scratch / "predictions.csv").read_text().count("\n") == 21

    def elsewhere(command: str) -> bool:
        argv = shlex.split(command, comments=True)
        return argv[:2] == ["make", "test"] or any(w in ELSEWHERE for w in argv[:3]) or argv[0].startswith("GLOO_")

    # every command not run here is one another test runs (or the emulated cluster's, without it)
    skipped = sorted(set(commands) - set(ran))
    assert all(elsewhere(c) or not NETNS for c in skipped), skipped
