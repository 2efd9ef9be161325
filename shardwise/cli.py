"""Command line: `shardwise train` and `shardwise bench`.

Every config field is a `--section.key VALUE` option, listed by
`shardwise train --help` with its type, default and documentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from shardwise.config import SECTIONS, Config, all_keys, describe_type, field_docs, load_config
from shardwise.errors import EXIT_USAGE, ShardwiseError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit 2), no usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"shardwise: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    defaults = Config()
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"[{section}]")
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = getattr(getattr(defaults, section), f.name)
            if default is None:
                shown = "follows --nproc"
            else:
                shown = ",".join(map(str, default)) if isinstance(default, list) else default
            kind = hints[f.name]
            metavar = (
                describe_type(typing.get_args(kind)[0]) + ",..."
                if typing.get_origin(kind) is list
                else describe_type(kind)
            )
            group.add_argument(
                f"--{section}.{f.name}",
                dest=f"{section}.{f.name}",
                default=argparse.SUPPRESS,
                metavar=metavar.upper().replace(" ", ""),
                help=f"{docs.get(f.name, '')} (default: {shown})",
            )


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="shardwise", description="Train neural networks across processes and machines.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    train = sub.add_parser(
        "train",
        help="train a model (default: the convnet on the bundled digits, 2 processes, data parallel)",
        description="Train as configured: defaults, then the TOML file, then --section.key overrides.",
    )
    train.add_argument("config", nargs="?", help="TOML config file")
    train.add_argument("--nproc", type=int, default=2, help="number of local worker processes (default: 2)")
    train.add_argument("--out", type=Path, default=None, help="output folder (default: a new folder under runs/)")
    _add_config_options(train)

    bench = sub.add_parser("bench", help="run benchmarks that print ratios measured side by side")
    bench.add_argument("scenario", choices=["ddp"], help="ddp: shardwise data parallel vs a plain torch DDP script")
    bench.add_argument("--nproc", type=int, default=2, help="world size (default: 2)")
    bench.add_argument("--repeats", type=int, default=7, help="runs of each side, alternated (default: 7)")
    bench.add_argument("--steps", type=int, default=200, help="steps per run (default: 200)")
    return parser


def _train(args: argparse.Namespace) -> int:
    from shardwise.launch import launch
    from shardwise.train.outputs import new_run_dir

    overrides = {k: v for k, v in vars(args).items() if k in set(all_keys())}
    if args.out is not None:
        overrides["run.out"] = str(args.out)
    cfg = load_config(args.config, overrides)
    out = Path(cfg.run.out) if cfg.run.out else new_run_dir(Path("runs"), cfg.model.name)
    return launch(cfg, nproc=args.nproc, out=out)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    try:
        for item in unknown:
            if item.startswith("--"):
                key = item[2:].split("=", 1)[0]
                if "." in key:
                    load_config(None, {key: ""})  # raises the unknown-key error with a suggestion
                parser.error(f"unknown option {item}")
            parser.error(f"unexpected argument {item!r}")
        if args.command == "bench":
            from shardwise.bench.ddp import main as bench_ddp

            return bench_ddp(nproc=args.nproc, repeats=args.repeats, steps=args.steps)
        return _train(args)
    except ShardwiseError as e:
        print(f"shardwise: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
