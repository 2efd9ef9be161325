"""The `shardwise words` command line (torch-free: the ranks import torch, not this process)."""

from __future__ import annotations

import argparse
from pathlib import Path

from shardwise.config import all_keys, load_config
from shardwise.errors import ShardwiseError


def add_parser(sub, add_config_options) -> None:
    words = sub.add_parser(
        "words",
        help="count the words of a text corpus across processes: the most frequent, and every count",
        description="Each rank counts its share of the documents; the counts are merged by word across ranks "
        "(an all-to-all of hashed counts). Writes words.tsv (the top words), counts/part-R.tsv (every word, "
        "a part per rank) and summary.json.",
    )
    words.add_argument("config", nargs="?", help="TOML config file (its [data] section names the corpus)")
    words.add_argument("--nproc", type=int, default=2, help="number of local worker processes (default: 2)")
    words.add_argument("--top", type=int, default=20, help="how many of the most frequent words (default: 20)")
    words.add_argument("--out", type=Path, default=None, help="output folder (default: a new folder under runs/)")
    words.add_argument("--overwrite", action="store_true", help="start again in --out if it holds a run already")
    add_config_options(words)


def run(args: argparse.Namespace) -> int:
    from shardwise.api import count_words
    from shardwise.config_sections import TEXT_DATA
    from shardwise.train.outputs import new_run_dir

    overrides = {k: v for k, v in vars(args).items() if k in set(all_keys())}
    if "data.name" not in overrides and "name" not in _named_data(args.config):
        overrides["data.name"] = "fortunes"  # the corpus `words` counts unless told
    cfg = load_config(args.config, overrides)
    if cfg.data.name not in TEXT_DATA:
        raise ShardwiseError("data.name", f"shardwise words counts a text source ({', '.join(TEXT_DATA)}), "
                             f"not {cfg.data.name}")  # fmt: skip
    if args.top < 1:
        raise ShardwiseError("top", f"must be positive, got {args.top}")
    if args.nproc < 1:
        raise ShardwiseError("nproc", f"must be positive, got {args.nproc}")
    out = args.out or (Path(cfg.run.out) if cfg.run.out else new_run_dir(Path("runs"), "words"))
    return count_words(cfg, nproc=args.nproc, out=out, top=args.top, overwrite=args.overwrite)


def _named_data(config: str | None) -> dict:
    """The [data] table of the config file (empty without one; load_config says what is wrong with it)."""
    import tomllib

    try:
        return tomllib.loads(Path(config).read_text()).get("data", {}) if config else {}
    except (OSError, tomllib.TOMLDecodeError):
        return {}
