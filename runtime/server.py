"""Serving edits over HTTP (``adapedit serve``): standard library only.

Endpoints:

- ``POST /edit``: a JSON object with ``source`` and ``target`` (required) and any option of
  :func:`adapedit.runtime.api.parse_options` (``seed``, ``steps``, ``guidance``, ``scheduler``,
  ``edit_type``, ``lambda_tau``, ``lambda_s``, ``lambda_sv``, ``alpha_m``, ``use_fwt``,
  ``use_dps``, ``local_blend``, ``reweight``, …). Answers the ``result.json`` document of the
  edit (``tau`` as ``[{word, tokens, tau}]``, ``tau_self``, ``keywords``, ``config``,
  ``timings_s``, …) with ``source_png`` and ``edited_png`` (base64 PNG) and ``server``
  (``queue_s``: waiting for the worker, ``total_s``: arrival to answer).
- ``GET /healthz``: ``{"status": "ok", "model", "queue_depth", "queue_size", "running"}``.
- ``GET /metrics``: Prometheus text format: ``adapedit_requests_total{path,code}``, the
  ``adapedit_edit_request_seconds`` histogram (every ``POST /edit``, arrival to answer),
  ``adapedit_queue_depth``, ``adapedit_queue_capacity``, ``adapedit_edits_running``.

One worker thread runs the edits, one at a time, from a bounded queue; connection threads parse,
validate (:class:`~adapedit.runtime.api.Validator`: a tokenizer of its own, so invalid requests
are answered at once, even while an edit runs) and encode PNGs. Errors answer
``{"error": {"status", "type", "message", "field"}}``:

- 400 malformed JSON or not an object; 411 no ``Content-Length``; 413 a body over ``max_body``;
- 422 invalid input (an unknown field, a wrong type, a value out of range, a prompt over 77
  tokens, a word in neither prompt, a resolution outside the engines' profile), ``field`` named;
- 503 at once when the queue is full (with ``Retry-After``);
- 504 when the answer is not ready ``timeout`` seconds after the request arrived (a queued edit
  is then dropped; one already running finishes and its result is discarded);
- 500 an engine failure.

A client that goes away (mid-body or before its answer) is counted as code 499 in the metrics;
the server keeps serving after every one of these.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import signal
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from adapedit.config import EditConfig, SamplerConfig
from adapedit.errors import AdapEditError, ConfigError, InputError
from adapedit.io import png_bytes
from adapedit.runtime.api import Validator, parse_request, to_plain

if TYPE_CHECKING:
    from adapedit.engines.ort import OrtOptions
    from adapedit.runtime.session import EditSession

log = logging.getLogger("adapedit.server")

MAX_BODY = 64 * 1024
READ_TIMEOUT_S = 10.0  # a client that stalls mid-request frees its thread after this
DRAIN_LIMIT = 1 << 20  # bytes of an unread body read and dropped before closing (no TCP RST)
CLIENT_CLOSED = 499  # nginx's code for a client that went away; in the metrics only
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
IMAGES = {"source_image": "source_png", "edited_image": "edited_png"}
GET_PATHS = ("/healthz", "/metrics")


class Metrics:
    """Request counts by path and status code, the ``POST /edit`` latency histogram."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._buckets = [0] * len(LATENCY_BUCKETS)
        self._count = 0
        self._sum = 0.0

    def observe(self, path: str, code: int, seconds: float | None = None) -> None:
        """Count one answered request; ``seconds`` goes into the latency histogram."""
        with self._lock:
            self._requests[path, code] += 1
            if seconds is not None:
                self._count += 1
                self._sum += seconds
                for i, le in enumerate(LATENCY_BUCKETS):
                    self._buckets[i] += seconds <= le

    def counts(self) -> dict[tuple[str, int], int]:
        """A snapshot of the request counts by (path, status code)."""
        with self._lock:
            return dict(self._requests)

    def render(self, queue_depth: int, queue_capacity: int, running: int) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        name = "adapedit_edit_request_seconds"
        with self._lock:
            lines = [
                "# HELP adapedit_requests_total HTTP requests answered, by path and status code"
                " (499: the client went away).",
                "# TYPE adapedit_requests_total counter",
                *(
                    f'adapedit_requests_total{{path="{p}",code="{c}"}} {n}'
                    for (p, c), n in sorted(self._requests.items())
                ),
                f"# HELP {name} POST /edit latency, arrival to answer, every status.",
                f"# TYPE {name} histogram",
                *(
                    f'{name}_bucket{{le="{le}"}} {n}'
                    for le, n in zip(LATENCY_BUCKETS, self._buckets, strict=True)
                ),
                f'{name}_bucket{{le="+Inf"}} {self._count}',
                f"{name}_sum {self._sum:.6f}",
                f"{name}_count {self._count}",
            ]
        for metric, value, help_ in (
            ("adapedit_queue_depth", queue_depth, "Edits waiting for the worker."),
            ("adapedit_queue_capacity", queue_capacity, "Edits that may wait; more get 503."),
            ("adapedit_edits_running", running, "Edits the worker is running (0 or 1)."),
        ):
            lines += [f"# HELP {metric} {help_}", f"# TYPE {metric} gauge", f"{metric} {value}"]
        return "\n".join(lines) + "\n"


@dataclass(eq=False)
class _Job:
    source: str
    target: str
    edit: EditConfig
    sampler: SamplerConfig
    future: Future = field(default_factory=Future)
    started: float | None = None


class _ClientGone(Exception):
    """The client closed the connection or stalled while sending its request."""


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


class EditServer:
    """An HTTP server of edits on one session (engines loaded once, by the caller).

    Args:
        session: an :class:`~adapedit.runtime.session.EditSession` (anything with its ``edit``,
            ``latent_hw``, ``prepare``, ``folder`` and ``manifest``).
        host / port: where to listen; port 0 takes a free port (see :attr:`url`).
        queue_size: edits that may wait while one runs; one more is answered 503.
        timeout: seconds from a request's arrival to its answer; later, 504.
        max_body: the largest request body accepted, in bytes; larger, 413.

    Use :meth:`start` (serve from a background thread) or :meth:`serve_forever`, then
    :meth:`close`; or ``with EditServer(...).start() as server``.
    """

    def __init__(
        self,
        session: EditSession,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        queue_size: int = 8,
        timeout: float = 120.0,
        max_body: int = MAX_BODY,
    ) -> None:
        for name, value, ok in (
            ("queue_size", queue_size, isinstance(queue_size, int) and queue_size >= 1),
            ("timeout", timeout, isinstance(timeout, (int, float)) and timeout > 0),
            ("max_body", max_body, isinstance(max_body, int) and max_body >= 1),
        ):
            if not ok:
                raise ConfigError(
                    f"{name} must be positive", where="EditServer", expected="> 0", got=value
                )
        self.session, self.model = session, session.manifest.model
        self.validate = Validator(session)
        self.queue_size, self.timeout, self.max_body = queue_size, float(timeout), max_body
        self.metrics = Metrics()
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._running = 0
        self._closed = False
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.app = self  # type: ignore[attr-defined]
        self._served = False
        self._serving: threading.Thread | None = None
        self._worker = threading.Thread(target=self._work, name="adapedit-edit", daemon=True)
        self._worker.start()

    @property
    def url(self) -> str:
        """``http://host:port`` the server listens on."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def queue_depth(self) -> int:
        """Edits waiting for the worker (not the one running)."""
        return self._jobs.qsize()

    def start(self) -> EditServer:
        """Serve from a background thread; returns ``self``."""
        self._served = True
        self._serving = threading.Thread(
            target=self.serve_forever, name="adapedit-http", daemon=True
        )
        self._serving.start()
        return self

    def serve_forever(self) -> None:
        """Serve from this thread until :meth:`close` from another, or an exception here."""
        self._served = True
        self._httpd.serve_forever()

    def close(self) -> None:
        """Stop listening, drop the waiting edits, let the running one finish."""
        self._closed = True
        if self._served:  # (shutdown waits for a serving loop, which must have begun)
            self._httpd.shutdown()
        if self._serving is not None:
            self._serving.join()
        self._httpd.server_close()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
        self._jobs.put(None)
        self._worker.join(timeout=self.timeout)

    def __enter__(self) -> EditServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self) -> dict[str, Any]:
        """The ``GET /healthz`` document."""
        return {
            "status": "ok",
            "model": self.model,
            "queue_depth": self.queue_depth,
            "queue_size": self.queue_size,
            "running": self._running,
        }

    def metrics_text(self) -> str:
        """The ``GET /metrics`` document."""
        return self.metrics.render(self.queue_depth, self.queue_size, self._running)

    def _submit(self, job: _Job) -> bool:
        if self._closed:
            return False
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            return False
        return True

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue  # its client had its 504 already
            job.started = time.monotonic()
            self._running = 1
            try:
                job.future.set_result(
                    self.session.edit(job.source, job.target, job.edit, job.sampler)
                )
            except Exception as e:
                job.future.set_exception(e)
            finally:
                self._running = 0

    def answer_edit(self, body: bytes, arrival: float) -> tuple[int, dict[str, Any]]:
        """``(status, document)`` for the body of a ``POST /edit`` that arrived at ``arrival``
        (``time.monotonic()``); waits for the worker."""
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return 400, _error(400, f"malformed JSON: {e}")
        if not isinstance(request, dict):
            return 400, _error(400, f"the body must be a JSON object, got {type(request).__name__}")
        try:
            source, target, edit, sampler = parse_request(request, where="POST /edit")
            self.validate(source, target, edit, sampler)
        except InputError as e:
            return 422, _error_of(422, e)
        job = _Job(source, target, edit, sampler)
        if not self._submit(job):
            return 503, _error(503, f"the queue is full ({self.queue_size} waiting); retry later")
        try:
            result = job.future.result(timeout=arrival + self.timeout - time.monotonic())
        except TimeoutError:
            job.future.cancel()
            return 504, _error(504, f"no answer within the server's timeout of {self.timeout} s")
        except InputError as e:
            return 422, _error_of(422, e)
        except AdapEditError as e:
            return 500, _error_of(500, e)
        except Exception as e:
            log.exception("edit failed")
            return 500, _error(500, f"internal error: {type(e).__name__}: {e}")
        doc = to_plain(result, self.model)
        for key, png_key in IMAGES.items():
            doc[png_key] = base64.b64encode(png_bytes(Image.fromarray(doc.pop(key)))).decode()
        doc["server"] = {"queue_s": job.started - arrival, "total_s": time.monotonic() - arrival}
        return 200, doc


class _Handler(BaseHTTPRequestHandler):
    server_version = "adapedit"
    timeout = READ_TIMEOUT_S

    @property
    def app(self) -> EditServer:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            code = self._send_json(200, self.app.health())
        elif self.path == "/metrics":
            text = self.app.metrics_text().encode()
            code = self._send(200, text, "text/plain; version=0.0.4; charset=utf-8")
        else:
            code = self._send_json(404, _error(404, f"no such path: GET {self.path}"))
        self.app.metrics.observe(self.path if self.path in GET_PATHS else "other", code)

    def do_POST(self) -> None:
        arrival = time.monotonic()
        self.body_read = False
        path = "/edit" if self.path == "/edit" else "other"
        if path == "other":
            status, doc = 404, _error(404, f"no such path: POST {self.path}")
        else:
            try:
                status, doc = self._post_edit(arrival)
            except _ClientGone:
                self.close_connection = True
                self.app.metrics.observe(path, CLIENT_CLOSED, time.monotonic() - arrival)
                return
        code = self._send_json(status, doc)
        if not self.body_read:
            self._drain()
        seconds = time.monotonic() - arrival if path == "/edit" else None
        self.app.metrics.observe(path, code, seconds)

    def _post_edit(self, arrival: float) -> tuple[int, dict[str, Any]]:
        length = self.headers.get("Content-Length")
        if length is None or self.headers.get("Transfer-Encoding"):
            return 411, _error(411, "a JSON body with a Content-Length header is required")
        try:
            n = int(length)
            if n < 0:
                raise ValueError(length)
        except ValueError:
            return 400, _error(400, f"Content-Length is not a byte count: {length!r}")
        if n > self.app.max_body:
            too_large = InputError(
                "request body too large",
                where="POST /edit",
                expected=f"at most {self.app.max_body} bytes",
                got=f"{n} bytes",
            )
            return 413, _error_of(413, too_large)
        try:
            body = self.rfile.read(n)
        except (ConnectionError, TimeoutError) as e:
            raise _ClientGone from e
        if len(body) < n:
            raise _ClientGone
        self.body_read = True
        return self.app.answer_edit(body, arrival)

    def _drain(self) -> None:
        """Read and drop a body not read (up to DRAIN_LIMIT bytes, until a second passes without
        data), then close: closing with unread data would reset the connection before the client
        reads its answer."""
        self.close_connection = True
        try:
            left = min(int(self.headers.get("Content-Length", 0)), DRAIN_LIMIT)
            self.connection.settimeout(1.0)
            while left > 0 and (chunk := self.rfile.read1(min(left, 65536))):
                left -= len(chunk)
        except (ValueError, ConnectionError, TimeoutError):
            pass

    def _send_json(self, status: int, doc: dict[str, Any]) -> int:
        return self._send(status, json.dumps(doc).encode(), "application/json")

    def _send(self, status: int, payload: bytes, content_type: str) -> int:
        """Send one answer; returns its status, or CLIENT_CLOSED if the client went away."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            if status == 503:
                self.send_header("Retry-After", "1")
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            return CLIENT_CLOSED
        return status


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve(
    engine_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    queue_size: int = 8,
    timeout: float = 120.0,
    ort: OrtOptions | None = None,
) -> None:
    """Load the engine folder once and serve until interrupted (Ctrl-C or SIGTERM); prints the
    URL (``serving http://HOST:PORT …``) on stdout once listening."""
    from adapedit.runtime.session import EditSession

    with EditSession(engine_dir, ort=ort) as session:
        server = EditServer(session, host=host, port=port, queue_size=queue_size, timeout=timeout)
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        print(
            f"serving {server.url} (model {server.model}, engines {engine_dir}, "
            f"queue {queue_size}, timeout {timeout:g} s)",
            flush=True,
        )
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.close()
