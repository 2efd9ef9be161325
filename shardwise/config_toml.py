"""The resolved config written back as TOML: what a run saves beside its outputs and its
checkpoints, and what `shardwise train run.toml` reads again to the same config."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from shardwise.config import SECTIONS, Config


def toml_value(value: Any) -> str:
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


# where a run wrote and what it resumed: left out of the configs a run saves
PLACE_KEYS = {("run", "out"), ("run", "resume")}


def to_toml(cfg: Config, *, saved: bool = False) -> str:
    """The resolved config as TOML; `None` (follow the default) is left out. `saved`: the
    copy a run keeps (its folder's config.toml, a checkpoint's) leaves run.out and
    run.resume empty, so fed back it trains the same run into a new folder, and a
    checkpoint resumes into the run folder it sits in, wherever that was moved."""
    lines: list[str] = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for name, value in dataclasses.asdict(getattr(cfg, section)).items():
            if saved and (section, name) in PLACE_KEYS:
                lines.append(f'{name} = ""')
            elif value is not None:
                lines.append(f"{name} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
