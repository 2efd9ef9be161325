"""The HTTP(S) front of `shardwise serve`: checks what may listen where, opens the socket,
and runs the app (serve/app.py) on uvicorn until SIGTERM or Ctrl-C.

Without TLS and tokens the server binds to loopback only, and says so; any other address
needs serve.tls_cert, serve.tls_key and serve.token_file, checked (the files read, the pair
loaded) before the socket opens. SIGTERM or Ctrl-C stops taking connections, answers the
requests in flight, then returns (uvicorn's graceful shutdown).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import sys
from pathlib import Path

from shardwise.errors import ShardwiseError
from shardwise.rank_start import is_loopback

DRAIN_S = 30  # the longest SIGTERM waits for requests in flight


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


def check_door(s) -> tuple[list[str], ssl.SSLContext | None]:
    """(tokens, TLS context) of the [serve] settings `s`; one line where they cannot serve."""
    tokens = read_tokens(s.token_file) if s.token_file else []
    tls = tls_context(s.tls_cert, s.tls_key) if s.tls_cert else None
    if not is_loopback(s.host) and not (tls and tokens):
        raise ShardwiseError("serve.host", f"{s.host} is not loopback: serving beyond this machine needs "
                             "serve.tls_cert, serve.tls_key and serve.token_file")  # fmt: skip
    return tokens, tls


def serve_one(run_folder: Path, texts: dict[str, str]) -> int:
    """The run's model in this process, served."""
    from shardwise.serve.model import load_served

    s = settings_of(texts)
    door = check_door(s)  # before the model loads: a wrong file is said at once
    import torch

    torch.set_num_threads(1)  # one forward at a time, on one core; the event loop has the other
    listen_and_serve(load_served(run_folder, texts), s, door=door)
    print("shardwise serve: stopped", file=sys.stderr)
    return 0


def listen_and_serve(served, s, *, door: tuple | None = None, sock: socket.socket | None = None,
                     started=None) -> None:  # fmt: skip
    """Serve `served` (a ServedModel) as the [serve] settings `s` say, until SIGTERM or Ctrl-C
    (then the requests in flight are answered first). `door`: `check_door(s)`, if already made;
    `sock`: `listen(s.host, s.port)`, if already open; `started`: called with the uvicorn
    server before it runs (its `should_exit` stops it from another thread)."""
    import uvicorn

    from shardwise.serve.app import Settings, build_app

    tokens, tls = door or check_door(s)
    sock = sock or listen(s.host, s.port)
    port = sock.getsockname()[1]
    scheme = "https" if tls else "http"
    host = f"[{s.host}]" if ":" in s.host else s.host
    guard = ("TLS" if tls else "no TLS") + (f", {len(tokens)} token(s)" if tokens else ", no token")
    note = ": loopback only" if not (tls and tokens) else ""
    print(f"serving {served.name} on {scheme}://{host}:{port}/ ({guard}{note}); {served.about['layout']}; "
          f"batches of up to {s.max_batch}, {s.max_wait_ms:g} ms wait", flush=True)  # fmt: skip
    settings = Settings(s.max_batch, s.max_wait_ms, s.max_body_bytes, tokens)
    config = uvicorn.Config(
        build_app(served, settings),
        log_level="warning",
        timeout_graceful_shutdown=DRAIN_S,
        ssl_certfile=s.tls_cert or None,
        ssl_keyfile=s.tls_key or None,
    )
    config.load()
    if tls is not None:
        config.ssl = tls  # this context (TLS 1.2 at least), not the one uvicorn makes of the same files
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # these handlers instead: drain, then return
    seen: set[int] = set()

    def stop(signum, frame) -> None:
        # the same signal twice: stop without waiting (Ctrl-C's SIGINT, then the launcher's
        # SIGTERM, is one request to stop, and drains)
        server.force_exit = signum in seen
        seen.add(signum)
        server.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    if started is not None:
        started(server)
    server.run(sockets=[sock])


def settings_of(texts: dict[str, str]):
    """The [serve] settings: from this command line only, never from the run's saved config."""
    from shardwise.config import load_config

    return load_config(None, {k: v for k, v in texts.items() if k.startswith("serve.")}).serve


def listen(host: str, port: int) -> socket.socket:
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
