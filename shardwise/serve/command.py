"""`shardwise serve RUN`: a finished run's model behind an HTTP(S) server, in this process
(serve/front.py) or cut into a layout across ranks (`--nproc N` with --parallel.*:
serve/ranks.py, started by the launcher through the API)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub, add_config_options) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve a finished run's model over HTTP(S): predictions with dynamic batching, metrics, a page",
        description="Serve RUN's model.safetensors: POST /v1/predict, GET /v1/model, /metrics, /healthz and a "
        "page at /. Settings: --serve.* (host, port, max_batch, max_wait_ms, tls_cert, tls_key, token_file, "
        "max_body_bytes).",
    )
    serve.add_argument("run", type=Path, help="a finished run folder (config.toml, model.safetensors)")
    serve.add_argument("--nproc", type=int, default=1, help="ranks the model is cut across (default: 1, this process)")
    serve.add_argument("--cluster", default="local", help="where --nproc's ranks run: local, or emulated[:NAME] "
                       "(the hosts of `shardwise cluster up`; the server stays here) (default: local)")  # fmt: skip
    add_config_options(serve)


def run(args: argparse.Namespace) -> int:
    from shardwise.config import all_keys

    texts = {k: v for k, v in vars(args).items() if k in set(all_keys())}
    if args.nproc == 1:
        from shardwise.serve.front import serve_one

        if texts.pop("parallel.layout", None) == "auto":  # one process: nothing to choose
            print("parallel.layout auto: one process (--nproc 1; more ranks: --nproc N)", flush=True)
        return serve_one(args.run, texts)
    from shardwise.api import serve_on_ranks

    return serve_on_ranks(args.run, texts, nproc=args.nproc, cluster=args.cluster)
