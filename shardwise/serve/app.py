"""The model server as an ASGI app (Starlette, run by uvicorn: `serve/command.py`).

Routes: `POST /v1/predict` (JSON in, class probabilities and labels out), `GET /v1/model`,
`GET /metrics` (Prometheus text), `GET /healthz` and `GET /` (a page to try the model).

**Dynamic batching.** A request's prepared inputs join one queue; a single task takes the
first waiting request, then more until the batch holds `max_batch` samples or the first has
waited `max_wait_ms`, and runs one forward pass on a thread of its own (torch leaves the
event loop free meanwhile, so the next batch gathers while this one computes). A request
that would overflow the batch waits for the next; one larger than `max_batch` goes alone.
A pipelined model takes up to `in_flight` batches at once (serve/stages.py): the next batch
is sent while the last ones are still in the pipeline.

**At the door.** With tokens, every request but `GET /` and `GET /healthz` must carry
`Authorization: Bearer TOKEN`, compared with each token in constant time (`hmac`). A body
over `max_body_bytes` is refused (413) from its Content-Length, or once that many bytes
have arrived. Every refusal is a 4xx with one line of JSON (`{"error": ...}`), and the
server goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from shardwise.serve.model import RESTARTING, RequestError, ServedModel, answer, request_inputs

OPEN_PATHS = ("/", "/healthz")  # no token needed: the page (it asks for one) and the probe
PAGE = Path(__file__).with_name("page.html")


@dataclass
class Settings:
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_body_bytes: int = 4_194_304
    tokens: list[str] = field(default_factory=list)


class Metrics:
    def __init__(self, max_batch: int, in_flight: int = 1):
        self.registry = CollectorRegistry()
        self.requests = Counter("shardwise_requests", "Requests answered, by path and status", ["path", "status"],
                                registry=self.registry)  # fmt: skip
        self.latency = Histogram("shardwise_request_seconds", "Time from a request's arrival to its answer",
                                 ["path"], registry=self.registry,
                                 buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))  # fmt: skip
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch})
        self.batch = Histogram("shardwise_batch_samples", "Samples in each forward pass",
                               registry=self.registry, buckets=[s for s in sizes if s <= max_batch])  # fmt: skip
        self.flying = Histogram("shardwise_batches_in_flight", "Batches in the model as each is sent, itself included",
                                registry=self.registry, buckets=list(range(1, in_flight + 1)))  # fmt: skip


class Batcher:
    """Gathers requests' inputs into batches, one forward pass at a time (a pipeline's: `in_flight`)."""

    def __init__(self, served: ServedModel, settings: Settings, metrics: Metrics):
        self.served, self.settings, self.metrics = served, settings, metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(served.in_flight, thread_name_prefix="shardwise-forward")
        self.slots = asyncio.Semaphore(served.in_flight)  # batches in flight at once (a pipeline's stages)
        self.flying: set[asyncio.Task] = set()
        self.task: asyncio.Task | None = None

    async def submit(self, x: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((x, future))
        return await future

    async def run(self) -> None:
        loop, held = asyncio.get_running_loop(), None
        while True:
            await self.slots.acquire()  # (while every slot is busy, the queue grows into a larger batch)
            first = held or await self.queue.get()
            items, size, held = [first], len(first[0]), None
            deadline = loop.time() + self.settings.max_wait_ms / 1000.0
            while size < self.settings.max_batch:
                try:
                    wait = deadline - loop.time()
                    item = self.queue.get_nowait() if wait <= 0 else await asyncio.wait_for(self.queue.get(), wait)
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                if size + len(item[0]) > self.settings.max_batch:
                    held = item  # the next batch's first
                    break
                items.append(item)
                size += len(item[0])
            flying = asyncio.create_task(self._forward(loop, items, size))
            self.flying.add(flying)
            self.metrics.flying.observe(len(self.flying))
            flying.add_done_callback(self._landed)

    def _landed(self, task: asyncio.Task) -> None:
        self.flying.discard(task)
        self.slots.release()

    async def _forward(self, loop, items, size: int) -> None:
        self.metrics.batch.observe(size)
        try:
            probs = await loop.run_in_executor(self.executor, self.served.forward,
                                               np.concatenate([x for x, _ in items]))  # fmt: skip
        except Exception as e:  # a forward that fails fails its requests, not the server
            for _, future in items:
                if not future.done():
                    future.set_exception(e)
            return
        at = 0
        for x, future in items:
            if not future.done():  # (a client that left)
                future.set_result(probs[at : at + len(x)])
            at += len(x)


def _error(status: int, message: str, **headers) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def build_app(served: ServedModel, settings: Settings) -> Starlette:
    metrics = Metrics(settings.max_batch, served.in_flight)
    batcher = Batcher(served, settings, metrics)

    async def predict(request: Request) -> Response:
        if not served.ready():
            raise RequestError(503, RESTARTING)
        body = await _read_body(request, settings.max_body_bytes)
        x = await asyncio.to_thread(_parsed, served, body)  # off the event loop: images decode slowly
        step = settings.max_batch  # a request over max_batch samples goes as several batches
        parts = await asyncio.gather(*(batcher.submit(x[i : i + step]) for i in range(0, len(x), step)))
        return JSONResponse(answer(served, np.concatenate(parts)))

    async def model(request: Request) -> Response:
        return JSONResponse(served.about | {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms})

    async def metrics_text(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        if not served.ready():
            return JSONResponse({"status": "restarting: a rank failed"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE.read_text())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.task = asyncio.create_task(batcher.run())
        yield
        batcher.task.cancel()
        batcher.executor.shutdown(wait=True)

    routes = [
        Route("/v1/predict", predict, methods=["POST"]),
        Route("/v1/model", model),
        Route("/metrics", metrics_text),
        Route("/healthz", healthz),
        Route("/", page),
    ]

    async def http_error(request: Request, e: HTTPException) -> Response:  # 404, 405: one line of JSON too
        return _error(e.status_code, f"{request.method} {request.url.path}: {e.detail}")

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.add_middleware(_Door, settings=settings, metrics=metrics, paths={r.path for r in routes})
    return app


def _parsed(served: ServedModel, body: bytes) -> np.ndarray:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise RequestError(400, f"the body is not JSON ({type(e).__name__})") from None
    return request_inputs(served, payload)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the body has {declared} bytes, over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _Door:
    """Tokens, one-line errors and the request metrics, around every route (pure ASGI)."""

    def __init__(self, app, *, settings: Settings, metrics: Metrics, paths: set[str]):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.paths = paths  # the routes' own: any other path is counted as "?"
        self.tokens = [t.encode() for t in settings.tokens]

    def _allowed(self, scope) -> bool:
        if not self.tokens or scope["path"] in OPEN_PATHS:
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        given = header[7:] if header[:7].lower() == b"bearer " else b""
        matches = [hmac.compare_digest(given, token) for token in self.tokens]  # every one: constant time
        return any(matches)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if not self._allowed(scope):
                bearer = 'Bearer realm="shardwise"'
                await _error(401, "a valid bearer token is required", **{"WWW-Authenticate": bearer})(
                    scope, receive, sending
                )
            else:
                await self.app(scope, receive, sending)
        except RequestError as e:
            await _error(e.status, str(e))(scope, receive, sending)
        except Exception as e:  # noqa: BLE001 - a bug in one request must not end the server
            await _error(500, f"internal error: {type(e).__name__}: {e}")(scope, receive, sending)
        finally:
            path = scope["path"] if scope["path"] in self.paths else "?"
            self.metrics.requests.labels(path, str(status[0])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)
