"""The front's own time on a batch (plan/serving.py), measured: what `shardwise serve`'s HTTP
front (serve/app.py on uvicorn, as serve/front.py runs it) and an HTTP client add to every
batch, whatever the layout behind them.

The front is started on a loopback port of this machine, in this process, before any rank,
with a forward that does no work (uniform probabilities); an HTTP client (httpx, keep-alive)
sends it one request of a full batch at a time, the model's inputs written with 4 decimals.
The median round trip of REQUESTS (after WARM) is the front's time a batch: reading and
parsing the body, preparing the inputs, batching, the hand-offs between the event loop and
the forward's thread, and the answer in JSON, with the client's side of HTTP.
"""

from __future__ import annotations

import statistics
import time

REQUESTS, WARM = 20, 3
START_S = 10.0  # the longest the front may take to start listening


def median_round_trip(url: str, body: bytes, count: int, warm: int) -> float:
    """The median seconds of `count` requests of `body` to `url`/v1/predict sent one after
    another on one keep-alive connection (after `warm` not counted), each answer checked."""
    import httpx

    took = []
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(warm + count):
            started = time.perf_counter()
            client.post("/v1/predict", content=body, headers=headers).raise_for_status()
            if i >= warm:
                took.append(time.perf_counter() - started)
    return statistics.median(took)


def front_seconds(record: dict, max_batch: int, max_wait_ms: float) -> float:
    """The median seconds a full batch of `max_batch` samples of the run `record` describes
    takes through the front and back, with no model behind it."""
    import contextlib
    import json
    import threading

    import numpy as np
    import uvicorn

    from shardwise.serve.app import Settings, build_app
    from shardwise.serve.front import listen
    from shardwise.serve.model import ServedModel

    classes = len(record["classes"])

    def forward(x: np.ndarray) -> np.ndarray:
        return np.full((len(x), classes), 1.0 / classes)

    served = ServedModel("front", forward, record, {"layout": "none"})
    inputs = np.random.default_rng(0).standard_normal((max_batch, *record["in_shape"])).round(4)
    body = json.dumps({"inputs": inputs.tolist()}).encode()
    settings = Settings(max_batch, max_wait_ms, max_body_bytes=max(len(body), Settings().max_body_bytes))
    config = uvicorn.Config(build_app(served, settings), log_level="warning")
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # (not the main thread: no signal handlers)
    sock = listen("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="front-timing")
    try:
        thread.start()
        deadline = time.monotonic() + START_S
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            raise RuntimeError(f"the front to time did not start within {START_S:g} s")
        return median_round_trip(f"http://127.0.0.1:{sock.getsockname()[1]}", body, REQUESTS, WARM)
    finally:
        server.should_exit = True
        if thread.is_alive():
            thread.join(timeout=START_S)
        sock.close()
