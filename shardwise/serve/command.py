"""`shardwise serve RUN`: a finished run's model behind an HTTP(S) server (uvicorn).

What may listen where: without TLS and tokens the server binds to loopback only, and says
so; any other address needs serve.tls_cert, serve.tls_key and serve.token_file, checked
(the files read, the pair loaded) before the socket opens. SIGTERM or Ctrl-C stops taking
connections, answers the requests in flight, then exits (uvicorn's graceful shutdown).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import ssl
import sys
from pathlib import Path

from shardwise.errors import ShardwiseError
from shardwise.rank_start import is_loopback

DRAIN_S = 30  # the longest SIGTERM waits for requests in flight


def add_parser(sub, add_config_options) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve a finished run's model over HTTP(S): predictions with dynamic batching, metrics, a page",
        description="Serve RUN's model.safetensors: POST /v1/predict, GET /v1/model, /metrics, /healthz and a "
        "page at /. Settings: --serve.* (host, port, max_batch, max_wait_ms, tls_cert, tls_key, token_file, "
        "max_body_bytes).",
    )
    serve.add_argument("run", type=Path, help="a finished run folder (config.toml, model.safetensors)")
    add_config_options(serve)


def read_tokens(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise ShardwiseError("serve.token_file", f"no such file {path!r}")
    tokens = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not tokens:
        raise ShardwiseError("serve.token_file", f"{path} holds no token (one a line)")
    if any(len(t) < 16 for t in tokens):
        raise ShardwiseError("serve.token_file", f"{path} holds a token shorter than 16 characters: too easy to guess")
    return tokens


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The pair loaded now, so a wrong file is one line before anything listens."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ShardwiseError("serve.tls_cert", f"cannot load the pair {cert} and {key}: {e}") from None
    return context


def run(args: argparse.Namespace) -> int:
    from shardwise.config import all_keys

    texts = {k: v for k, v in vars(args).items() if k in set(all_keys())}
    return serve(args.run, texts)


def serve(run_folder: Path, texts: dict[str, str]) -> int:
    import uvicorn

    from shardwise.serve.app import Settings, build_app
    from shardwise.serve.model import load_served

    served = load_served(run_folder, texts)
    s = _settings_of(texts)
    tokens = read_tokens(s.token_file) if s.token_file else []
    tls = tls_context(s.tls_cert, s.tls_key) if s.tls_cert else None
    if not is_loopback(s.host) and not (tls and tokens):
        raise ShardwiseError("serve.host", f"{s.host} is not loopback: serving beyond this machine needs "
                             "serve.tls_cert, serve.tls_key and serve.token_file")  # fmt: skip
    sock = _listen(s.host, s.port)
    port = sock.getsockname()[1]
    scheme = "https" if tls else "http"
    host = f"[{s.host}]" if ":" in s.host else s.host
    guard = ("TLS" if tls else "no TLS") + (f", {len(tokens)} token(s)" if tokens else ", no token")
    note = ": loopback only" if not (tls and tokens) else ""
    print(f"serving {served.name} on {scheme}://{host}:{port}/ ({guard}{note}); batches of up to {s.max_batch}, "
          f"{s.max_wait_ms:g} ms wait", flush=True)  # fmt: skip
    import torch

    torch.set_num_threads(1)  # one forward at a time, on one core; the event loop has the other
    settings = Settings(s.max_batch, s.max_wait_ms, s.max_body_bytes, tokens)
    config = uvicorn.Config(
        build_app(served, settings),
        log_level="warning",
        timeout_graceful_shutdown=DRAIN_S,
        ssl_certfile=s.tls_cert or None,
        ssl_keyfile=s.tls_key or None,
    )
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # these handlers instead: drain, then exit 0

    def stop(signum, frame) -> None:
        server.force_exit = server.should_exit  # a second signal: stop without waiting
        server.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    server.run(sockets=[sock])
    print("shardwise serve: stopped", file=sys.stderr)
    return 0


def _settings_of(texts: dict[str, str]):
    """The [serve] settings: from this command line only, never from the run's saved config."""
    from shardwise.config import load_config

    return load_config(None, {k: v for k, v in texts.items() if k.startswith("serve.")}).serve


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY on a connection only where its socket says TCP;
    # without it a keep-alive client's request waits 40 ms on delayed ACKs (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ShardwiseError("serve.port", f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
