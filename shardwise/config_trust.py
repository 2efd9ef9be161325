"""What a saved config may decide: it is read as the default when resuming or scoring, but
the code it names and the keys that vouch for a checkpoint come from the user alone."""

from __future__ import annotations

from pathlib import Path

from shardwise.config import CheckpointConfig, Config, user_section
from shardwise.errors import ShardwiseError


def check_code_trust(
    cfg: Config, source: Path, *, path: str | Path | None, overrides: dict[str, str], verified: bool = False
) -> None:
    """A saved config (a checkpoint's, a run folder's) that names code to import (a model's
    or a data source's import path) is followed only where the user's own config file or
    command line (`path`, `overrides`) names the same code, or the checkpoint's signature
    was verified with the user's key: reading saved files never runs code they chose."""
    for section in ("model", "data"):
        name = getattr(cfg, section).name
        named_by_user = user_section(path, overrides, section).name
        if ":" in name and name != named_by_user and not verified:
            raise ShardwiseError(
                f"{section}.name",
                f"{source} names code to import, {name}, and saved files cannot vouch for the code they run: "
                f"name it yourself (--{section}.name {name}) or verify the checkpoint (checkpoint.verify_key)",
            )


def trust_settings(path: str | Path | None, overrides: dict[str, str]) -> CheckpointConfig:
    """The [checkpoint] section as the user alone gives it: which keys to trust (the
    checkpoint cannot vouch for itself)."""
    return user_section(path, overrides, "checkpoint")
