"""Command line: `shardwise train`, `bench`, `cluster`, `keygen` and `verify`.

Every config field is a `--section.key VALUE` option, listed by
`shardwise train --help` with its type, default and documentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from shardwise import __version__
from shardwise.checkpoint.commands import add_parsers as add_checkpoint_parsers
from shardwise.checkpoint.commands import run as run_checkpoint_command
from shardwise.cluster.commands import add_parser as add_cluster_parser
from shardwise.config import SECTIONS, Config, all_keys, field_docs, load_config
from shardwise.config_check import describe_type
from shardwise.config_trust import check_code_trust, trust_settings
from shardwise.errors import EXIT_USAGE, ShardwiseError
from shardwise.serve.command import add_parser as add_serve_parser
from shardwise.serve.command import run as run_serve
from shardwise.words_cli import add_parser as add_words_parser
from shardwise.words_cli import run as run_words


class RunComplete(Exception):
    """A resume of a run that has done all its steps: said in one line, and nothing runs."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit 2), no usage dump, and takes
    no abbreviated option (`--train.batch` is not `--train.batch_size`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        print(f"shardwise: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


# what no one but a test or a benchmark sets: accepted, left out of --help
TEST_AIDS = ("ps.slow_worker", "ps.slow_factor")


def _shown_default(default, doc: str) -> str:
    """` (default: X)` for the help, or nothing where the documentation already says it
    (a default that follows other keys) or there is nothing to show."""
    if "(default" in doc or default is None or default in ("", [], {}):
        return ""
    if isinstance(default, bool):
        return f" (default: {str(default).lower()})"
    return f" (default: {','.join(map(str, default)) if isinstance(default, list) else default})"


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    defaults = Config()
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"[{section}]")
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, doc = f"{section}.{f.name}", docs.get(f.name, "")
            shown = _shown_default(getattr(getattr(defaults, section), f.name), doc)
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
                help=argparse.SUPPRESS if key in TEST_AIDS else f"{doc}{shown}",
            )


def _add_train_parser(sub) -> None:
    train = sub.add_parser(
        "train",
        help="train a model (default: the convnet on the bundled digits, 2 processes, data parallel)",
        description="Train as configured: defaults, then the TOML file, then --section.key overrides.",
    )
    train.add_argument("config", nargs="?", help="TOML config file")
    train.add_argument("--nproc", default="2", help="number of worker processes (default: 2); MIN:MAX: elastic, "
                       "going on with fewer when a host is lost, growing back when it returns")  # fmt: skip
    train.add_argument("--out", type=Path, default=None, help="output folder (default: a new folder under runs/)")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in --out if it holds a run already (one left by Ctrl-C, say); a folder that is not a "
        "run folder is never removed",
    )
    train.add_argument(
        "--timeline", action="store_true", help="pipeline: write timeline.png, a Gantt chart of the last step"
    )
    train.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="continue from a run folder's newest complete checkpoint, or from a checkpoint folder: the config "
        "saved in the checkpoint is the default (its [checkpoint] trust settings excepted: those come only from "
        "this command line or CONFIG), and the outputs go on in the run folder holding it (or --out)",
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
    _add_config_options(train)


def _add_plan_parser(sub) -> None:
    plan = sub.add_parser(
        "plan",
        help="predict every layout's step time and memory for a config and rank them (the cost model)",
        description="Profile the model and the link once (cached), predict every layout of --nproc ranks, "
        "rank them; write plan.json and plan.png.",
    )
    plan.add_argument("config", nargs="?", help="TOML config file")
    plan.add_argument("--nproc", type=int, default=2, help="number of ranks to plan for (default: 2)")
    plan.add_argument("--cluster", default="local", help="where the ranks would run: local or emulated[:NAME]")
    plan.add_argument("--memory-per-rank", default=None, help="drop layouts predicted over this, e.g. 512MiB, 2GiB")
    plan.add_argument("--out", type=Path, default=None, help="folder for plan.json, plan.png (default: runs/plan-TIME)")
    _add_config_options(plan)


def _plan(args: argparse.Namespace) -> int:
    from shardwise.plan.command import plan_and_print

    cfg = load_config(args.config, {k: v for k, v in vars(args).items() if k in set(all_keys())})
    return plan_and_print(cfg, nproc=args.nproc, cluster=args.cluster, memory=args.memory_per_rank, out=args.out)


def _add_run_options(parser: argparse.ArgumentParser, verb: str) -> None:
    """What `evaluate` and `predict` share: the run folder, the ranks and the config keys."""
    parser.add_argument("run", type=Path, help="a finished run folder (config.toml, model.safetensors)")
    parser.add_argument(
        "--nproc", type=int, default=1, help=f"ranks to {verb} on, under the layout the --parallel.* keys name "
        "(default: 1, in this process)",
    )  # fmt: skip
    _add_config_options(parser)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="shardwise", description="Train neural networks across processes and machines.")
    parser.add_argument("--version", action="version", version=f"shardwise {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    _add_train_parser(sub)
    _add_plan_parser(sub)
    add_words_parser(sub, _add_config_options)
    add_serve_parser(sub, _add_config_options)
    evaluate = sub.add_parser(
        "evaluate",
        help="score a finished run's weights on its validation set (or on the data --data.* names)",
        description="Print the validation loss and accuracy of RUN's model.safetensors as JSON.",
    )
    _add_run_options(evaluate, "score")
    predict = sub.add_parser(
        "predict",
        help="class probabilities of a finished run's model for new inputs (an .npz or a folder of images)",
        description="Write class probabilities for --input, preprocessed as the run's training data was.",
    )
    predict.add_argument(
        "--input", type=Path, required=True, help="an .npz with raw samples x (as the run's source reads them) "
        "or a folder of image files (converted to the run's channels and size)",
    )  # fmt: skip
    predict.add_argument("--out", type=Path, required=True, help="a .csv (a row per input) or .npz file to write")
    _add_run_options(predict, "predict")
    add_checkpoint_parsers(sub)
    add_cluster_parser(sub, OneLineParser)
    bench = sub.add_parser(
        "bench",
        help="the benchmark suite: ratios measured side by side, on loopback and emulated links",
        description="Run benchmark scenarios on each link; write bench.json and bench.md.",
    )
    bench.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help="allreduce, ddp, scaling, tp, pp, spatial, shard, ps, precision, checkpointing, restarts, compression,"
        " planner, sql, serve, serve-pp, serve-auto, elastic, hangs (default: the first 9)",
    )
    bench.add_argument(
        "--links",
        default="loopback,1gbit,10gbit",
        help="loopback and/or rates of an emulated cluster (root), comma-separated (default: loopback,1gbit,10gbit)",
    )
    bench.add_argument("--repeats", type=int, default=5, help="repetitions of each comparison, >= 5 (default: 5)")
    bench.add_argument(
        "--cases", help="planner and compression: MODEL:RANKS cases, e.g. mlp:2,convnet:4 (default: each at 2 and 4)"
    )
    bench.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="planner: runs of every layout, in rotated order; the median counts (default: 3)",
    )
    bench.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="folder for bench.json, bench.md (default: bench-results)",
    )
    bench.add_argument(
        "--plan", action="store_true", help="check the request and print what would run on each link; run nothing"
    )
    return parser


def _train(args: argparse.Namespace) -> int:
    from shardwise import api
    from shardwise.elastic import parse_nproc

    least, most = parse_nproc(args.nproc)  # N, or MIN:MAX
    overrides = {k: v for k, v in vars(args).items() if k in set(all_keys())}
    if args.out is not None:
        overrides["run.out"] = str(args.out)
    if args.timeline:
        overrides["run.timeline"] = "true"
    out, resuming = None, False
    if args.resume is not None:
        cfg, out, resuming = _resume_config(args.config, args.resume, overrides)
    else:
        cfg = load_config(args.config, overrides)
        if cfg.run.resume:
            cfg, out, resuming = _resume_config(args.config, Path(cfg.run.resume), overrides)
    if cfg.run.resume:
        _check_not_complete(cfg)
    out = api.out_folder(cfg, out)
    return api.run_local(
        cfg,
        nproc=most,
        least=least,
        out=out,
        max_restarts=args.max_restarts,
        cluster=args.cluster,
        resuming=resuming,
        overwrite=args.overwrite,
    )


def _resume_config(config: str | None, path: Path, overrides: dict[str, str]):
    """The config, output folder and whether the run goes on in its own folder, for
    resuming from `path` (a run folder or a checkpoint folder).

    Trust comes only from the user: the verify key is read from CONFIG and the command
    line before the checkpoint is opened; the checkpoint is verified with it; only then
    is the config saved inside it (which the manifest covers) read, without its
    [checkpoint] and [run] sections. Nothing is ever written into a checkpoint."""
    from shardwise.checkpoint.manifest import find_checkpoint, is_signed, read_verified, verify
    from shardwise.checkpoint.seal import opened

    own = {k: v for k, v in overrides.items() if k != "run.resume"}
    trusted = trust_settings(config, own)
    checkpoint = find_checkpoint(path)
    verify(checkpoint, verify_key=trusted.verify_key)  # every file, before anything starts
    if is_signed(checkpoint) and not trusted.verify_key:
        print(f"note: {checkpoint} is signed, but its signature is not checked: no checkpoint.verify_key given")
    if is_signed(checkpoint) and not trusted.sign_key:
        print("note: the resumed run writes unsigned checkpoints: no checkpoint.sign_key given")
    manifest, files = read_verified(checkpoint, verify_key=trusted.verify_key, only={"config.toml"})
    if "config.toml" not in files:
        raise ShardwiseError("resume", f"{checkpoint} holds no config.toml")
    stored = opened(manifest, "config.toml", files["config.toml"], trusted.encrypt_key, checkpoint)
    stored = stored.decode("utf-8", errors="replace")
    cfg = load_config(config, own, resumed=stored)
    check_code_trust(cfg, checkpoint, path=config, overrides=own, verified=bool(trusted.verify_key))
    cfg.run.resume = str(checkpoint)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    if cfg.run.out:
        out = Path(cfg.run.out)
    elif run_dir is not None:
        out = run_dir
    else:
        raise ShardwiseError("resume", f"{checkpoint} is not in a run folder's checkpoints/: give --out for the run")
    target, inside = out.resolve(), checkpoint.resolve()
    if target == inside or inside in target.parents:
        raise ShardwiseError("out", f"{str(out)!r} is inside the checkpoint {checkpoint}, which is never written")
    return cfg, out, run_dir is not None and target == run_dir.resolve()


def _check_not_complete(cfg: Config) -> None:
    """A resume of a run that has done all its steps runs nothing: it says so, and how to go on."""
    from shardwise.checkpoint.manifest import MANIFEST

    step = json.loads((Path(cfg.run.resume) / MANIFEST).read_text())["step"]  # verified just before
    if step >= cfg.train.steps:
        raise RunComplete(
            f"{cfg.run.resume} is at step {step} of train.steps={cfg.train.steps}: the run is complete, nothing "
            f"to do; to train further, resume with more steps (--train.steps {2 * cfg.train.steps}: the schedule "
            "then runs to the new last step)"
        )


def _evaluate(args: argparse.Namespace) -> int:
    from shardwise import api
    from shardwise.jsonsafe import dumps

    settings = {k: v for k, v in vars(args).items() if k in set(all_keys())}
    print(dumps(api.evaluate(args.run, settings, nproc=args.nproc)))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from shardwise import api
    from shardwise.jsonsafe import dumps

    settings = {k: v for k, v in vars(args).items() if k in set(all_keys())}
    done = api.predict(args.run, args.input, args.out, settings, nproc=args.nproc)
    print(dumps({"inputs": done["inputs"], "out": done["out"]}))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from shardwise.bench.suite import run_suite

    links = [link.strip() for link in args.links.split(",") if link.strip()]
    return run_suite(
        args.scenarios, links, args.repeats, args.out, plan_only=args.plan, cases=args.cases, rounds=args.rounds
    )


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command's own process: ranks may be forked from it (forked.py)
        from shardwise.forked import allow

        allow()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:  # bare `shardwise`: what it can do
        parser.print_help()
        return 0
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
        if args.command == "words":
            return run_words(args)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "predict":
            return _predict(args)
        if args.command == "plan":
            return _plan(args)
        if args.command in ("keygen", "verify", "seal"):
            return run_checkpoint_command(args)
        return _train(args)
    except ShardwiseError as e:
        print(f"shardwise: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RunComplete as e:
        print(f"shardwise: {e}")
        return 0
    except KeyboardInterrupt:
        return 130
