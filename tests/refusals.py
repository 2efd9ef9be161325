"""The check every refusal test shares: `shardwise train` with some settings exits 2 with
one line naming what is wrong, and leaves no run folder behind."""

from __future__ import annotations


def refused_in_one_line(tmp_path, capfd, overrides: dict[str, str], message: str) -> None:
    from shardwise.cli import main

    args = ["train", "--nproc", "2", "--train.steps", "2", "--run.progress", "false", "--out", str(tmp_path / "run")]
    for key, value in overrides.items():
        args += [f"--{key}", value]
    assert main(args) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run").exists()
