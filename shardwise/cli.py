"""Command line: `shardwise train`, `bench`, `cluster`, `keygen` and `verify`.

Every config field is a `--section.key VALUE` option, listed by
`shardwise train --help` with its type, default and documentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from shardwise.cluster.commands import add_parser as add_cluster_parser
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
    train.add_argument(
        "--timeline", action="store_true", help="pipeline: write timeline.png, a Gantt chart of the last step"
    )
    train.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="continue a run from its newest complete checkpoint (a run folder) or from a checkpoint folder; "
        "its config.toml is the default config and the outputs go on in that run folder",
    )
    train.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="when a rank dies, restart every rank from the newest complete checkpoint, up to this often",
    )
    train.add_argument(
        "--cluster",
        default="local",
        help="where the ranks run: local (this machine, loopback), or emulated[:NAME], the hosts of "
        "`shardwise cluster up` (rank r in host r mod H) (default: local)",
    )
    keygen = sub.add_parser("keygen", help="make an Ed25519 key pair for signing checkpoints")
    keygen.add_argument("--out", type=Path, default=Path("."), help="folder for shardwise.key and shardwise.pub")
    verify = sub.add_parser("verify", help="check a checkpoint's files against its manifest and signature")
    verify.add_argument("path", type=Path, help="a checkpoint folder, or a run folder (its newest checkpoint)")
    verify.add_argument("--key", default="", help="the public key that must have signed the manifest")
    _add_config_options(train)

    add_cluster_parser(sub, OneLineParser)
    bench = sub.add_parser("bench", help="run benchmarks that print ratios measured side by side")
    scenarios = bench.add_subparsers(dest="scenario", required=True, parser_class=OneLineParser)
    ddp = scenarios.add_parser("ddp", help="shardwise data parallel vs a plain torch DDP script")
    ddp.add_argument("--nproc", type=int, default=2, help="world size (default: 2)")
    ddp.add_argument("--repeats", type=int, default=7, help="runs of each side, alternated (default: 7)")
    ddp.add_argument("--steps", type=int, default=200, help="steps per run (default: 200)")
    tp = scenarios.add_parser("tp", help="tensor parallel vs one process vs torch DTensor, on a wide MLP")
    tp.add_argument("--nproc", type=int, default=2, help="tensor-parallel degree (default: 2)")
    tp.add_argument("--repeats", type=int, default=5, help="runs of each side, rotated (default: 5)")
    tp.add_argument("--steps", type=int, default=30, help="steps per run (default: 30)")
    tp.add_argument("--hidden", default="4096,4096", help="hidden widths (default: 4096,4096)")
    pp = scenarios.add_parser("pp", help="pipeline vs torch.distributed.pipelining vs one process, and the bubble")
    pp.add_argument("--nproc", type=int, default=2, help="pipeline stages (default: 2)")
    pp.add_argument("--microbatches", type=int, default=4, help="micro-batches per step (default: 4)")
    pp.add_argument("--schedule", choices=["gpipe", "1f1b"], default="1f1b", help="schedule (default: 1f1b)")
    pp.add_argument("--repeats", type=int, default=5, help="runs of each side, rotated (default: 5)")
    pp.add_argument("--steps", type=int, default=30, help="steps per run (default: 30)")
    pp.add_argument("--hidden", default="2048,2048,2048", help="hidden widths (default: 2048,2048,2048)")
    spatial = scenarios.add_parser("spatial", help="spatial bands vs one process on a large image: time and memory")
    spatial.add_argument("--nproc", type=int, default=2, help="bands (default: 2)")
    spatial.add_argument("--size", type=int, default=1024, help="image height and width (default: 1024)")
    spatial.add_argument("--repeats", type=int, default=5, help="runs of each side, rotated (default: 5)")
    spatial.add_argument("--steps", type=int, default=5, help="steps per run (default: 5)")
    ps = scenarios.add_parser("ps", help="sync parameter server vs all-reduce; async vs sync with a straggler")
    ps.add_argument("--workers", default="2,4", help="worker counts compared with all-reduce (default: 2,4)")
    ps.add_argument("--repeats", type=int, default=3, help="runs of each side, rotated (default: 3)")
    ps.add_argument("--steps", type=int, default=40, help="steps per run (default: 40)")
    ps.add_argument("--hidden", default="1024,1024", help="hidden widths (default: 1024,1024)")
    ps.add_argument("--slow-factor", type=float, default=2.0, help="the straggler's slowness (default: 2)")
    ps.add_argument("--loose", type=int, default=8, help="the looser staleness bound tried (default: 8)")
    restarts = scenarios.add_parser("restarts", help="random kills healed by --max-restarts: same weights?")
    restarts.add_argument("--trials", type=int, default=10, help="seeded trials (default: 10)")
    restarts.add_argument("--nproc", type=int, default=2, help="ranks (default: 2)")
    restarts.add_argument("--steps", type=int, default=12, help="steps per run (default: 12)")
    restarts.add_argument("--seed", type=int, default=100, help="seed of the first trial (default: 100)")
    shard = scenarios.add_parser("shard", help="bytes per rank with sharded parameters / optimizer, N = 1, 2, 4")
    shard.add_argument("--sizes", default="1,2,4", help="data-parallel degrees (default: 1,2,4)")
    shard.add_argument("--hidden", default="2048,2048", help="hidden widths (default: 2048,2048)")
    shard.add_argument("--steps", type=int, default=3, help="steps per run (default: 3)")
    return parser


def _train(args: argparse.Namespace) -> int:
    from shardwise.cluster.placement import placement_for
    from shardwise.launch import launch
    from shardwise.train.outputs import new_run_dir

    overrides = {k: v for k, v in vars(args).items() if k in set(all_keys())}
    if args.out is not None:
        overrides["run.out"] = str(args.out)
    if args.timeline:
        overrides["run.timeline"] = "true"
    config = args.config
    if args.resume is not None:
        from shardwise.checkpoint.manifest import find_checkpoint

        checkpoint = find_checkpoint(args.resume)
        run_dir = checkpoint.parent.parent if checkpoint != args.resume else args.resume
        if config is None and (run_dir / "config.toml").is_file():
            config = str(run_dir / "config.toml")
        overrides["run.resume"] = str(checkpoint)
        overrides.setdefault("run.out", str(run_dir))
    cfg = load_config(config, overrides)
    if cfg.run.resume:  # refuse a torn, tampered or unsigned checkpoint before starting anything
        from shardwise.checkpoint.manifest import verify

        verify(Path(cfg.run.resume), verify_key=cfg.checkpoint.verify_key)
    out = Path(cfg.run.out) if cfg.run.out else new_run_dir(Path("runs"), cfg.model.name)
    resuming = args.resume is not None and out.resolve() == run_dir.resolve()
    placement = placement_for(args.cluster)
    return launch(
        cfg, nproc=args.nproc, out=out, max_restarts=args.max_restarts, resuming=resuming, placement=placement
    )


def _keygen(args: argparse.Namespace) -> int:
    from shardwise.checkpoint.manifest import keygen

    private, public = keygen(args.out)
    print(f"private key {private} (keep it secret; checkpoint.sign_key), public key {public} (checkpoint.verify_key)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from shardwise.checkpoint.manifest import find_checkpoint, verify

    folder = find_checkpoint(args.path)
    manifest = verify(folder, verify_key=args.key)
    signed = "signature verified" if args.key else "signature not checked (no --key)"
    print(f"{folder}: step {manifest['step']}, {len(manifest['files'])} files match the manifest; {signed}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.scenario == "ddp":
        from shardwise.bench.ddp import main as bench_ddp

        return bench_ddp(nproc=args.nproc, repeats=args.repeats, steps=args.steps)
    if args.scenario == "tp":
        from shardwise.bench.tp import main as bench_tp

        return bench_tp(nproc=args.nproc, repeats=args.repeats, steps=args.steps, hidden=args.hidden)
    if args.scenario == "pp":
        from shardwise.bench.pp import main as bench_pp

        return bench_pp(
            nproc=args.nproc,
            microbatches=args.microbatches,
            schedule=args.schedule,
            repeats=args.repeats,
            steps=args.steps,
            hidden=args.hidden,
        )
    if args.scenario == "spatial":
        from shardwise.bench.spatial import main as bench_spatial

        return bench_spatial(nproc=args.nproc, size=args.size, repeats=args.repeats, steps=args.steps)
    if args.scenario == "ps":
        from shardwise.bench.ps import main as bench_ps

        return bench_ps(
            workers=[int(n) for n in args.workers.split(",")],
            repeats=args.repeats,
            steps=args.steps,
            hidden=args.hidden,
            slow_factor=args.slow_factor,
            loose=args.loose,
        )
    if args.scenario == "restarts":
        from shardwise.bench.restarts import main as bench_restarts

        return bench_restarts(trials=args.trials, nproc=args.nproc, steps=args.steps, seed=args.seed)
    from shardwise.bench.shard import main as bench_shard

    sizes = [int(n) for n in args.sizes.split(",")]
    return bench_shard(sizes=sizes, hidden=args.hidden, steps=args.steps)


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
            return _bench(args)
        if args.command == "cluster":
            from shardwise.cluster.commands import run as cluster_command

            return cluster_command(args)
        if args.command == "keygen":
            return _keygen(args)
        if args.command == "verify":
            return _verify(args)
        return _train(args)
    except ShardwiseError as e:
        print(f"shardwise: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
