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
- ``GET /healthz``: ``{"status": "ok", "model", …}`` plus the state of the queue (see
  :class:`Editor`).
- ``GET /metrics``: Prometheus exposition of ``adapedit_requests_total{path,code}``, the
  ``adapedit_edit_request_seconds`` histogram (every ``POST /edit``, arrival to answer) and the
  queue metrics of the :class:`Editor`.

Requests are parsed and validated (:class:`~adapedit.runtime.api.Validator`: a tokenizer of its
own) as they arrive, so invalid ones are answered at once, even while edits run; valid ones go to
an :class:`Editor`, which runs one edit at a time per session. Errors answer
``{"error": {"status", "type", "message", "field"}}``:

- 400 malformed JSON or not an object; 411 no ``Content-Length``; 413 a body over
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
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive

from adapedit.config import DEFAULT_CACHE_BYTES
from adapedit.errors import AdapEditError, ConfigError, InputError
from adapedit.io import png_bytes
from adapedit.runtime.api import EditRequest, Validator, parse_edit_request, to_plain

if TYPE_CHECKING:
    from adapedit.engines.ort import OrtOptions
    from adapedit.runtime.session import EditSession

log = logging.getLogger("adapedit.server")

MAX_BODY = 64 * 1024
#: The largest body of an edit of a given image (its base64 PNG/JPEG/WebP inside the JSON).
MAX_IMAGE_BODY = 16 * 1024 * 1024
CLIENT_CLOSED = 499  # nginx's code for a client that went away; in the metrics only
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
IMAGES = {"source_image": "source_png", "edited_image": "edited_png"}
PATHS = ("/edit", "/healthz", "/metrics")  # metric labels; any other path is "other"
UNREAD_BODY = (411, 413)  # answered without reading the body: the connection is closed after


@dataclass(frozen=True)
class HttpOptions:
    """How the application answers.

    Args:
        queue_size: edits that may wait for an engine; one more is answered 503 at once.
        timeout: seconds from a request's arrival to its answer; later, 504.
        max_body: the largest body of an edit without an image, in bytes; larger, 413.
        max_image_body: the largest body of an edit of a given image (``image`` field, base64),
            in bytes; larger, 413 before the body is read. At least ``max_body``.
    """

    queue_size: int = 8
    timeout: float = 120.0
    max_body: int = MAX_BODY
    max_image_body: int = MAX_IMAGE_BODY

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


def run_edit(session: EditSession, job: EditRequest) -> Answer:
    """Run one job on ``session`` (blocking) and make its answer: 200 with the ``result.json``
    document and both images as base64 PNG; 422 an input error the engines found; 500 an engine
    failure. Never raises."""
    start = time.perf_counter()
    try:
        result = session.edit(
            job.source,
            job.target,
            job.edit,
            job.sampler,
            image=job.image,
            image_config=job.image_config,
        )
        status, doc = 200, to_plain(result, session.manifest.model)
        for key, png_key in IMAGES.items():
            doc[png_key] = base64.b64encode(png_bytes(Image.fromarray(doc.pop(key)))).decode()
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

    async def edit(self, job: EditRequest) -> Answer:
        """The answer to ``job`` (:func:`queue_full` at once when the queue is full)."""
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

    async def edit(self, job: EditRequest) -> Answer:
        with self._lock:
            if self.waiting >= self.queue_size:
                return queue_full(self.queue_size)
            self.waiting += 1
        future = self._pool.submit(self._run, job)
        future.add_done_callback(self._dropped)
        return await asyncio.wrap_future(future)  # cancelled: cancels the future if it waits

    def _run(self, job: EditRequest) -> Answer:
        with self._lock:
            self.waiting -= 1
            self.running = 1
        try:
            return run_edit(self.session, job)
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


async def _client_gone(receive: Receive) -> None:
    """Return once the client has disconnected (its request body read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _App:
    """The endpoints of :func:`create_app`."""

    def __init__(self, session: EditSession, editor: Editor, options: HttpOptions) -> None:
        self.model = session.manifest.model
        self.validate = Validator(session)
        self.editor, self.options = editor, options
        self.metrics = _Metrics(editor)

    async def healthz(self, request: Request) -> Response:
        self.metrics.observe("/healthz", 200)
        return _json(200, {"status": "ok", "model": self.model, **self.editor.health()})

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
            status, doc = await self._answer(request, arrival)
        except asyncio.CancelledError:  # Ray Serve cancels the request of a client that left
            self.metrics.observe("/edit", CLIENT_CLOSED, time.monotonic() - arrival)
            raise
        self.metrics.observe("/edit", status, time.monotonic() - arrival)
        return _json(status, doc)

    @staticmethod
    def _too_large(length: str, limit: int, kind: str) -> dict[str, Any]:
        e = InputError(
            "request body too large",
            where="POST /edit",
            expected=f"at most {limit} bytes for an edit {kind}",
            got=f"{length} bytes",
        )
        return _error_of(413, e)

    async def _answer(self, request: Request, arrival: float) -> tuple[int, dict[str, Any] | None]:
        length = request.headers.get("content-length")
        if length is None or "transfer-encoding" in request.headers:
            return 411, _error(411, "a JSON body with a Content-Length header is required")
        if int(length) > self.options.max_image_body:
            return 413, self._too_large(length, self.options.max_image_body, "with an image")
        try:
            body = await request.body()
        except Exception:  # ClientDisconnect; under Ray Serve, its errors when its proxy lost it
            return CLIENT_CLOSED, None
        try:
            fields = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return 400, _error(400, f"malformed JSON: {e}")
        if not isinstance(fields, dict):
            return 400, _error(400, f"the body must be a JSON object, got {type(fields).__name__}")
        if fields.get("image") is None and int(length) > self.options.max_body:
            return 413, self._too_large(length, self.options.max_body, "without an image")
        try:
            job = parse_edit_request(fields, where="POST /edit")
            self.validate(job.source, job.target, job.edit, job.sampler, job.image)
        except InputError as e:
            return 422, _error_of(422, e)

        timeout = self.options.timeout
        work = asyncio.ensure_future(
            asyncio.wait_for(self.editor.edit(job), arrival + timeout - time.monotonic())
        )
        gone = asyncio.ensure_future(_client_gone(request.receive))
        try:
            await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, gone):
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
    engine profile; no edit runs on it here), edits run by ``editor``. ``app.state.metrics``
    holds its metrics (``count(path, code)``), ``app.state.editor`` the editor."""
    endpoints = _App(session, editor, options)
    app = Starlette(
        routes=[
            Route("/edit", endpoints.post_edit, methods=["POST"]),
            Route("/healthz", endpoints.healthz, methods=["GET"]),
            Route("/metrics", endpoints.metrics_text, methods=["GET"]),
        ],
        exception_handlers={404: endpoints.no_route, 405: endpoints.no_route},
    )
    app.state.metrics, app.state.editor = endpoints.metrics, editor
    return app


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
        f"{engine_dir}, queue {options.queue_size}, timeout {options.timeout:g} s)",
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        editor.close()
        session.close()
