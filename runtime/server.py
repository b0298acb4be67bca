"""Serving edits over HTTP: one ASGI application (Starlette, metrics by ``prometheus_client``),
run by uvicorn on one machine (``adapedit serve``, :func:`serve`) or by Ray Serve across replicas
and machines (``adapedit serve --replicas N``, :mod:`adapedit.runtime.rayserve`).

Endpoints:

- ``POST /edit``: a JSON object with ``source`` and ``target`` (required) and any option of
  :func:`adapedit.runtime.api.parse_options` (``seed``, ``steps``, ``guidance``, ``scheduler``,
  ``edit_type``, ``lambda_tau``, ``lambda_s``, ``lambda_sv``, ``alpha_m``, ``use_fwt``,
  ``use_dps``, ``local_blend``, ``reweight``, …). Answers the ``result.json`` document of the
  edit (``tau`` as ``[{word, tokens, tau}]``, ``tau_self``, ``keywords``, ``config``,
  ``timings_s``, …) with ``source_png`` and ``edited_png`` (base64 PNG) and ``server``
  (``queue_s``: from arrival until an engine started the edit, ``total_s``: arrival to answer,
  ``worker``: ``host:pid`` of the process that ran it).
  With ``Accept: text/event-stream`` the answer is a stream of server-sent events instead:
  ``progress`` after each UNet step (``{stage, step, steps, done, total}``), then one ``result``
  (the document above) or ``error`` (the error document below, its ``status`` inside; a body
  the server does not read, 411/413, is still answered as such). Every answer also has
  ``attention_maps`` and ``dps_weight_png`` (:func:`pictures`).
- ``GET /``: the playground page (:mod:`adapedit.runtime.page`; ``/static/…`` its script and
  style), unless :attr:`HttpOptions.page` is False.
- ``GET /healthz``: ``{"status": "ok", "model", …}`` plus the state of the queue (see
  :class:`Editor`), ``engine`` (``EditSession.describe``) and ``limits`` (the body limits).
- ``GET /metrics``: Prometheus exposition of ``adapedit_requests_total{path,code}``, the
  ``adapedit_edit_request_seconds`` histogram (every ``POST /edit``, arrival to answer) and the
  queue metrics of the :class:`Editor`.

Requests are parsed and validated (:class:`~adapedit.runtime.api.Validator`: a tokenizer of its
own) as they arrive, so invalid ones are answered at once, even while edits run; valid ones go to
an :class:`Editor`, which runs one edit at a time per session. Errors answer
``{"error": {"status", "type", "message", "field"}}``:

- 400 malformed JSON, not an object, or arrays and objects nested over
  :data:`MAX_JSON_DEPTH` levels (counted before parsing); 411 no ``Content-Length``; 413 a body over
  ``max_image_body`` (16 MiB by default; answered without reading the body), or a body without
  an ``image`` over ``max_body`` (64 KiB);
- 422 invalid input (an unknown field, a wrong type, a value out of range, a prompt over 77
  tokens, a word in neither prompt, a resolution outside the engines' profile), ``field`` named;
- 503 at once when the queue is full (with ``Retry-After``);
- 504 when the answer is not ready ``timeout`` seconds after the request arrived (a queued edit
  is then dropped; one already running finishes and its result is discarded);
- 500 an engine failure.

A client that goes away (mid-body or before its answer) is counted as code 499 in the metrics,
and its edit is dropped if it has not started; the server keeps serving after every one of these.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import re
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import numpy as np
from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive

from adapedit.config import DEFAULT_CACHE_BYTES
from adapedit.errors import AdapEditError, ConfigError, InputError
from adapedit.io import png_bytes
from adapedit.pipelines.pipeline import Progress, ProgressCallback
from adapedit.runtime.api import EditRequest, Validator, parse_edit_request, to_plain
from adapedit.runtime.page import page_response
from adapedit.visualize import heat, token_heat

if TYPE_CHECKING:
    from adapedit.engines.ort import OrtOptions
    from adapedit.pipelines.pipeline import EditResult
    from adapedit.runtime.session import EditSession

log = logging.getLogger("adapedit.server")

MAX_BODY = 64 * 1024
#: The largest body of an edit of a given image (its base64 PNG/JPEG/WebP inside the JSON).
MAX_IMAGE_BODY = 16 * 1024 * 1024
CLIENT_CLOSED = 499  # nginx's code for a client that went away; in the metrics only
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: The deepest JSON body ``POST /edit`` parses (an edit's deepest is 3: ``reweight``'s pairs).
MAX_JSON_DEPTH = 32
IMAGES = {"source_image": "source_png", "edited_image": "edited_png"}
PATHS = ("/", "/static", "/edit", "/healthz", "/metrics")  # metric labels; others: "other"
UNREAD_BODY = (411, 413)  # answered without reading the body: the connection is closed after
EVENT_STREAM = "text/event-stream"
OPENS, CLOSES = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)
T = TypeVar("T")


@dataclass(frozen=True)
class HttpOptions:
    """How the application answers.

    Args:
        queue_size: edits that may wait for an engine; one more is answered 503 at once.
        timeout: seconds from a request's arrival to its answer; later, 504.
        max_body: the largest body of an edit without an image, in bytes; larger, 413.
        max_image_body: the largest body of an edit of a given image (``image`` field, base64),
            in bytes; larger, 413 before the body is read. At least ``max_body``.
        page: serve the playground page (``GET /``); False for an API-only deployment.
    """

    queue_size: int = 8
    timeout: float = 120.0
    max_body: int = MAX_BODY
    max_image_body: int = MAX_IMAGE_BODY
    page: bool = True

    def __post_init__(self) -> None:
        for name, value, ok in (
            ("queue_size", self.queue_size, isinstance(self.queue_size, int)),
            ("timeout", self.timeout, isinstance(self.timeout, (int, float))),
            ("max_body", self.max_body, isinstance(self.max_body, int)),
            ("max_image_body", self.max_image_body, isinstance(self.max_image_body, int)),
        ):
            if not ok or isinstance(value, bool) or not 0 < value < math.inf:
                raise ConfigError(
                    f"{name} must be positive", where="HttpOptions", expected="> 0", got=value
                )
        if not isinstance(self.page, bool):
            raise ConfigError(
                "page must be true or false", where="HttpOptions", expected="a bool", got=self.page
            )
        if self.max_image_body < self.max_body:
            raise ConfigError(
                "max_image_body is below max_body",
                where="HttpOptions",
                expected=f"≥ max_body ({self.max_body})",
                got=self.max_image_body,
            )


class Answer(NamedTuple):
    """An :class:`Editor`'s answer to one job: HTTP status, JSON document, seconds the engine
    spent on it, and the ``host:pid`` of the process that ran it (empty if none did)."""

    status: int
    doc: dict[str, Any]
    busy_s: float = 0.0
    worker: str = ""


def _error(status: int, message: str, kind: str | None = None, name: str | None = None) -> dict:
    return {
        "error": {
            "status": status,
            "type": kind or HTTPStatus(status).phrase,
            "message": message,
            "field": name,
        }
    }


def _error_of(status: int, e: AdapEditError) -> dict:
    return _error(status, str(e), type(e).__name__, e.field)


def queue_full(queue_size: int) -> Answer:
    """The 503 answer of an :class:`Editor` whose queue is full."""
    return Answer(503, _error(503, f"the queue is full ({queue_size} waiting); retry later"))


def open_session(
    engine_dir: str | Path,
    ort: OrtOptions | None = None,
    calibration_cache: int | None = DEFAULT_CACHE_BYTES,
) -> EditSession:
    """An :class:`~adapedit.runtime.session.EditSession` with every engine loaded now (not at the
    first edit), for a server that should be ready when it says so; ``calibration_cache``: its
    bound in bytes (None: no cache)."""
    from adapedit.runtime.session import EditSession

    session = EditSession(engine_dir, ort=ort, calibration_cache=calibration_cache)
    for runner in session.runners:
        runner.activate()
    return session


def _png64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(Image.fromarray(image))).decode()


def pictures(result: EditResult) -> dict[str, Any]:
    """What the page shows of an edit beside its images, as base64 PNG at the maps' own
    resolution (the LocalBlend layers': 1/4 of the latent): ``attention_maps``, one
    ``{"token", "png"}`` per token of the edit prompt after the start token (each map
    stretched to its own range, ``inferno`` colours), and ``dps_weight_png``, DPS's ``S`` at the
    last edit step (0 → 1 on the same colours; null without DPS)."""
    maps = token_heat(result.attention_maps)
    s = result.dps_weight
    return {
        "attention_maps": [
            {"token": label, "png": _png64(m)}
            for label, m in zip(result.attention_labels, maps, strict=True)
        ],
        "dps_weight_png": None if s is None else _png64(heat(s.clamp(0, 1).float().numpy())),
    }


def run_edit(
    session: EditSession, job: EditRequest, progress: ProgressCallback | None = None
) -> Answer:
    """Run one job on ``session`` (blocking) and make its answer: 200 with the ``result.json``
    document, both images as base64 PNG and :func:`pictures`; 422 an input error the engines
    found; 500 an engine failure. Never raises. ``progress`` hears of every UNet step."""
    start = time.perf_counter()
    try:
        result = session.edit(
            job.source,
            job.target,
            job.edit,
            job.sampler,
            image=job.image,
            image_config=job.image_config,
            on_progress=progress,
        )
        status, doc = 200, to_plain(result, session.manifest.model)
        for key, png_key in IMAGES.items():
            doc[png_key] = _png64(doc.pop(key))
        doc.update(pictures(result))
    except InputError as e:
        status, doc = 422, _error_of(422, e)
    except AdapEditError as e:
        status, doc = 500, _error_of(500, e)
    except Exception as e:
        log.exception("edit failed")
        status, doc = 500, _error(500, f"internal error: {type(e).__name__}: {e}")
    return Answer(status, doc, time.perf_counter() - start, f"{socket.gethostname()}:{os.getpid()}")


class Editor(Protocol):
    """Where the application's edits run, one at a time per session, with at most
    ``queue_size`` waiting. Cancelling :meth:`edit` drops a job that has not started."""

    queue_size: int

    async def edit(self, job: EditRequest, progress: ProgressCallback | None = None) -> Answer:
        """The answer to ``job`` (:func:`queue_full` at once when the queue is full);
        ``progress`` (thread-safe) hears of each UNet step of the edit."""
        ...

    def health(self) -> dict[str, Any]:
        """Fields of ``GET /healthz`` about the queue."""
        ...

    def collect(self) -> Iterable[Metric]:
        """Prometheus metrics of the queue, read at each scrape (a ``prometheus_client``
        collector)."""
        ...


class LocalEditor:
    """An :class:`Editor` on one session in this process: one worker thread, a bounded queue.

    Call :meth:`close` when done (drops the waiting jobs; the running one finishes).
    """

    def __init__(self, session: EditSession, queue_size: int) -> None:
        self.session, self.queue_size = session, queue_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapedit-edit")
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0

    async def edit(self, job: EditRequest, progress: ProgressCallback | None = None) -> Answer:
        with self._lock:
            if self.waiting >= self.queue_size:
                return queue_full(self.queue_size)
            self.waiting += 1
        future = self._pool.submit(self._run, job, progress)
        future.add_done_callback(self._dropped)
        return await asyncio.wrap_future(future)  # cancelled: cancels the future if it waits

    def _run(self, job: EditRequest, progress: ProgressCallback | None) -> Answer:
        with self._lock:
            self.waiting -= 1
            self.running = 1
        try:
            return run_edit(self.session, job, progress)
        finally:
            self.running = 0

    def _dropped(self, future: Future) -> None:
        if future.cancelled():  # never started: _run did not count it out
            with self._lock:
                self.waiting -= 1

    def health(self) -> dict[str, Any]:
        return {"queue_depth": self.waiting, "queue_size": self.queue_size, "running": self.running}

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "adapedit_queue_depth", "Edits waiting for the worker.", value=self.waiting
        )
        yield GaugeMetricFamily(
            "adapedit_queue_capacity", "Edits that may wait; more get 503.", value=self.queue_size
        )
        yield GaugeMetricFamily(
            "adapedit_edits_running", "Edits the worker is running (0 or 1).", value=self.running
        )

    def close(self) -> None:
        """Drop the waiting jobs and stop the worker once the running one ends."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Metrics:
    """Request counts and the ``POST /edit`` latency histogram, in a registry of their own (one
    per application), with the editor's metrics."""

    def __init__(self, editor: Editor) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "adapedit_requests",
            "HTTP requests answered, by path and status code (499: the client went away).",
            ("path", "code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "adapedit_edit_request_seconds",
            "POST /edit latency, arrival to answer, every status.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(editor)

    def observe(self, path: str, code: int, seconds: float | None = None) -> None:
        """Count one request; ``seconds`` goes into the latency histogram."""
        self.requests.labels(path if path in PATHS else "other", str(code)).inc()
        if seconds is not None:
            self.latency.observe(seconds)

    def count(self, path: str, code: int) -> int:
        """Requests answered so far on ``path`` with ``code``."""
        return int(
            self.registry.get_sample_value(
                "adapedit_requests_total", {"path": path, "code": str(code)}
            )
            or 0
        )


def _json(status: int, doc: dict[str, Any] | None) -> Response:
    headers = {"Retry-After": "1"} if status == 503 else {}
    if status in UNREAD_BODY:
        headers["Connection"] = "close"
    return Response(json.dumps(doc), status, headers, media_type="application/json")


async def with_progress(
    start: Callable[[ProgressCallback], Awaitable[T]],
) -> AsyncIterator[Progress | T]:
    """Run ``start(report)`` and yield each :class:`Progress` it reports (from any thread),
    then its result; closing the iterator cancels the run."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Progress] = asyncio.Queue()

    def report(p: Progress) -> None:
        loop.call_soon_threadsafe(events.put_nowait, p)

    task = asyncio.ensure_future(start(report))
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait((getter, task), return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            yield getter.result()
        while not events.empty():  # reported before the result (the loop runs callbacks FIFO)
            yield events.get_nowait()
        yield task.result()
    finally:
        task.cancel()


def _event(kind: str, doc: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return f"event: {kind}\ndata: {json.dumps(doc)}\n\n".encode()


def json_depth(body: bytes, limit: int) -> int:
    """How deep the arrays and objects of a JSON text nest (strings skipped), counted up to
    ``limit + 1`` only: cheap on a 16 MiB body, and never recursive."""
    outside = re.sub(rb'"(?:[^"\\]|\\.)*"', b"", body)  # strings may hold brackets
    chars = np.frombuffer(outside, dtype=np.uint8)
    step = np.isin(chars, OPENS).astype(np.int64) - np.isin(chars, CLOSES)
    return min(int(np.cumsum(step).max(initial=0)), limit + 1)


async def _client_gone(receive: Receive) -> None:
    """Return once the client has disconnected (its request body read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _App:
    """The endpoints of :func:`create_app`."""

    def __init__(self, session: EditSession, editor: Editor, options: HttpOptions) -> None:
        self.model = session.manifest.model
        self.engine = session.describe()
        self.validate = Validator(session)
        self.editor, self.options = editor, options
        self.metrics = _Metrics(editor)

    async def healthz(self, request: Request) -> Response:
        self.metrics.observe("/healthz", 200)
        limits = {"max_body": self.options.max_body, "max_image_body": self.options.max_image_body}
        return _json(
            200,
            {
                "status": "ok",
                "model": self.model,
                **self.editor.health(),
                "engine": self.engine,
                "limits": limits,
            },
        )

    async def page(self, request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        response = page_response(name)
        if response is None:
            raise HTTPException(404)  # answered by no_route, which counts it
        self.metrics.observe("/" if request.url.path == "/" else "/static", 200)
        return response

    async def metrics_text(self, request: Request) -> Response:
        self.metrics.observe("/metrics", 200)
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(self.metrics.registry), headers={"Content-Type": content_type})

    async def no_route(self, request: Request, exc: HTTPException) -> Response:
        status = exc.status_code
        what = "no such path" if status == 404 else HTTPStatus(status).phrase.lower()
        self.metrics.observe(request.url.path, status)
        return _json(status, _error(status, f"{what}: {request.method} {request.url.path}"))

    async def post_edit(self, request: Request) -> Response:
        arrival = time.monotonic()
        try:
            parsed = await self._parse(request)
            refused = not isinstance(parsed, EditRequest)
            if EVENT_STREAM in request.headers.get("accept", "") and not (
                refused and parsed[0] in (*UNREAD_BODY, CLIENT_CLOSED)
            ):
                return StreamingResponse(
                    self._events(parsed, arrival),
                    media_type=EVENT_STREAM,
                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
                )
            if isinstance(parsed, EditRequest):
                status, doc = await self._run(parsed, arrival, _client_gone(request.receive))
            else:
                status, doc = parsed
        except asyncio.CancelledError:  # Ray Serve cancels the request of a client that left
            self.metrics.observe("/edit", CLIENT_CLOSED, time.monotonic() - arrival)
            raise
        self.metrics.observe("/edit", status, time.monotonic() - arrival)
        return _json(status, doc)

    async def _events(
        self, job: EditRequest | tuple[int, dict[str, Any] | None], arrival: float
    ) -> AsyncIterator[bytes]:
        """The server-sent events of one edit: ``progress`` (:class:`Progress` as JSON) after
        each UNet step, then one ``result`` (the answer of a plain ``POST /edit``) or ``error``
        (its error document, ``status`` inside: a stream answers 200 and says how the edit
        ended in its last event, as an ``EventSource`` can read no other answer). ``job``: the
        edit, or the answer that refused it. The client leaving cancels the stream (and drops
        the edit if it waits)."""
        status = CLIENT_CLOSED
        if not isinstance(job, EditRequest):
            status, doc = job
            self.metrics.observe("/edit", status, time.monotonic() - arrival)
            yield _event("error", doc)
            return
        try:
            async for item in with_progress(lambda report: self._run(job, arrival, None, report)):
                if isinstance(item, Progress):
                    yield _event("progress", item.to_dict())
                    continue
                status, doc = item
                yield _event("result" if status == 200 else "error", doc)
        finally:
            self.metrics.observe("/edit", status, time.monotonic() - arrival)

    @staticmethod
    def _too_large(length: str, limit: int, kind: str) -> dict[str, Any]:
        e = InputError(
            "request body too large",
            where="POST /edit",
            expected=f"at most {limit} bytes for an edit {kind}",
            got=f"{length} bytes",
        )
        return _error_of(413, e)

    async def _parse(self, request: Request) -> EditRequest | tuple[int, dict[str, Any] | None]:
        """The request's edit, checked, or the answer that refuses it."""
        length = request.headers.get("content-length")
        if length is None or "transfer-encoding" in request.headers:
            return 411, _error(411, "a JSON body with a Content-Length header is required")
        if int(length) > self.options.max_image_body:
            return 413, self._too_large(length, self.options.max_image_body, "with an image")
        try:
            body = await request.body()
        except Exception:  # ClientDisconnect; under Ray Serve, its errors when its proxy lost it
            return CLIENT_CLOSED, None
        where, wanted = "POST /edit: the body", "a JSON object (UTF-8) of the edit's fields"
        depth = json_depth(body, MAX_JSON_DEPTH)
        if depth > MAX_JSON_DEPTH:
            e = InputError(
                "the JSON body nests too deeply",
                where=where,
                expected=f"arrays and objects nested at most {MAX_JSON_DEPTH} levels",
                got=f"more than {MAX_JSON_DEPTH} levels",
            )
            return 400, _error_of(400, e)
        try:
            fields = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            e = InputError("malformed JSON", where=where, expected=wanted, got=str(e))
            return 400, _error_of(400, e)
        if not isinstance(fields, dict):
            kind = type(fields).__name__
            e = InputError("the body must be a JSON object", where=where, expected=wanted, got=kind)
            return 400, _error_of(400, e)
        if fields.get("image") is None and int(length) > self.options.max_body:
            return 413, self._too_large(length, self.options.max_body, "without an image")
        try:
            job = parse_edit_request(fields, where="POST /edit")
            self.validate(job.source, job.target, job.edit, job.sampler, job.image)
        except InputError as e:
            return 422, _error_of(422, e)
        return job

    async def _run(
        self,
        job: EditRequest,
        arrival: float,
        client_gone: Awaitable[None] | None,
        progress: ProgressCallback | None = None,
    ) -> tuple[int, dict[str, Any] | None]:
        """Run ``job`` on the editor within the deadline: the answer (499 once ``client_gone``
        returns first; then the edit is dropped if it waits)."""
        timeout = self.options.timeout
        work = asyncio.ensure_future(
            asyncio.wait_for(self.editor.edit(job, progress), arrival + timeout - time.monotonic())
        )
        tasks = [work] + ([asyncio.ensure_future(client_gone)] if client_gone else [])
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()  # the one not done: a client gone drops its edit if it waits
        if not work.done():
            return CLIENT_CLOSED, None
        try:
            answer = work.result()
        except TimeoutError:
            return 504, _error(504, f"no answer within the server's timeout of {timeout:g} s")
        except Exception as e:
            log.exception("edit failed")
            return 500, _error(500, f"internal error: {type(e).__name__}: {e}")
        if answer.status == 200:
            total = time.monotonic() - arrival
            answer.doc["server"] = {
                "queue_s": max(0.0, total - answer.busy_s),
                "total_s": total,
                "worker": answer.worker,
            }
        return answer.status, answer.doc


def create_app(
    session: EditSession, editor: Editor, options: HttpOptions = HttpOptions()
) -> Starlette:
    """The HTTP application: requests validated against ``session`` (its tokenizer, model and
    engine profile; no edit runs on it here), edits run by ``editor``; the page at ``GET /``
    (:mod:`adapedit.runtime.page`) unless ``options.page`` is False. ``app.state.metrics``
    holds its metrics (``count(path, code)``), ``app.state.editor`` the editor."""
    endpoints = _App(session, editor, options)
    page = [
        Route("/", endpoints.page, methods=["GET"]),
        Route("/static/{name}", endpoints.page, methods=["GET"]),
    ]
    app = Starlette(
        routes=[
            Route("/edit", endpoints.post_edit, methods=["POST"]),
            Route("/healthz", endpoints.healthz, methods=["GET"]),
            Route("/metrics", endpoints.metrics_text, methods=["GET"]),
            *(page if options.page else []),
        ],
        exception_handlers={404: endpoints.no_route, 405: endpoints.no_route},
    )
    app.state.metrics, app.state.editor = endpoints.metrics, editor
    return app


@contextmanager
def serving_in_thread(
    session: EditSession, options: HttpOptions = HttpOptions(), host: str = "127.0.0.1"
) -> Iterator[tuple[str, Starlette]]:
    """The application on ``session`` served by uvicorn from a thread of this process on
    ``host``, any free port: yields ``(URL, application)``; stopped, and its editor closed, on
    exit (a notebook's, a benchmark's or a test's server)."""
    import uvicorn

    app = create_app(session, LocalEditor(session, options.queue_size), options)
    config = uvicorn.Config(app, host=host, port=0, log_level="warning")
    server = uvicorn.Server(config)
    sock = config.bind_socket()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > end:
                raise AdapEditError(
                    "the server did not start",
                    where=f"uvicorn on {host}",
                    expected="listening within 60 s",
                    got="a thread that ended" if not thread.is_alive() else "no answer",
                )
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        app.state.editor.close()


def exit_on_sigterm() -> None:
    """Make SIGTERM exit cleanly (``SystemExit(0)``, through ``finally`` blocks) like Ctrl-C."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)


def serve(
    engine_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    options: HttpOptions = HttpOptions(),
    ort: OrtOptions | None = None,
    access_log: bool = True,
    calibration_cache: int | None = DEFAULT_CACHE_BYTES,
) -> None:
    """Load the engine folder once and serve it with uvicorn until interrupted (Ctrl-C or
    SIGTERM); prints the URL (``serving http://HOST:PORT …``) on stdout once listening. Port 0
    takes a free port. ``calibration_cache``: the session's calibration cache bound in bytes
    (None: none)."""
    import uvicorn

    session = open_session(engine_dir, ort, calibration_cache)
    editor = LocalEditor(session, options.queue_size)
    config = uvicorn.Config(
        create_app(session, editor, options),
        host=host,
        port=port,
        access_log=access_log,
        log_level="info" if access_log else "warning",
    )
    server = uvicorn.Server(config)
    sock = config.bind_socket()
    sock.listen(config.backlog)  # connections wait from now on, before uvicorn accepts them
    exit_on_sigterm()  # uvicorn stops gracefully on SIGTERM, then raises it again: exit 0
    bound_host, bound_port = sock.getsockname()[:2]
    print(
        f"serving http://{bound_host}:{bound_port} (model {session.manifest.model}, engines "
        f"{engine_dir}, queue {options.queue_size}, timeout {options.timeout:g} s)"
        + (f"; open http://{bound_host}:{bound_port}/ for the page" if options.page else ""),
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        editor.close()
        session.close()
