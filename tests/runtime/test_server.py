"""The HTTP server on the tiny engines (loopback, port 0): answers, errors, survival, metrics."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from adapedit.cli import build_parser
from adapedit.errors import ConfigError
from adapedit.runtime.api import plain_edit
from adapedit.runtime.server import EditServer

SRC, TGT = "a dog standing on the grass", "a dog sitting on the grass"
REQUEST = {"source": SRC, "target": TGT, "steps": 2, "seed": 3, "lambda_s": 0.8}
QUICK = {"source": "a cat on a mat", "target": "a black cat on a mat", "steps": 1}


def request(
    url: str, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON document or text) of one request."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers=headers or {})
        r = conn.getresponse()
        text = r.read().decode()
        doc = json.loads(text) if r.getheader("Content-Type") == "application/json" else text
        return r.status, dict(r.getheaders()), doc
    finally:
        conn.close()


def raw(url: str, data: bytes, *, read: bool = True) -> bytes:
    """Send bytes on a fresh connection; the answer if ``read``, else close at once."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(data)
        if not read:
            return b""
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def healthy(url: str) -> None:
    status, _, doc = request(url, "GET", "/healthz")
    assert status == 200 and doc["status"] == "ok" and doc["model"] == "tiny"


def image(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def wait_for(predicate, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.02)


def counts(server: EditServer) -> dict[tuple[str, int], int]:
    return server.metrics.counts()


class GatedSession:
    """The tiny session, with edits held until ``release`` is set."""

    def __init__(self, session) -> None:
        self._session = session
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def edit(self, *args: Any, **kwargs: Any):
        self.calls += 1
        self.started.set()
        assert self.release.wait(30)
        return self._session.edit(*args, **kwargs)


@pytest.fixture(scope="module")
def server(tiny_session) -> Iterator[EditServer]:
    with EditServer(tiny_session, queue_size=4, timeout=60, max_body=4096).start() as s:
        yield s


@pytest.fixture
def gated(tiny_session) -> Iterator[GatedSession]:
    g = GatedSession(tiny_session)
    yield g
    g.release.set()


def in_thread(fn, *args) -> tuple[threading.Thread, list]:
    out: list = []
    th = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    th.start()
    return th, out


def test_edit_equals_the_python_api(server, tiny_session):
    status, _, doc = request(server.url, "POST", "/edit", REQUEST)
    assert status == 200, doc
    options = {k: v for k, v in REQUEST.items() if k not in ("source", "target")}
    ref = plain_edit(tiny_session, SRC, TGT, **options)
    assert np.array_equal(image(doc["source_png"]), ref["source_image"])
    assert np.array_equal(image(doc["edited_png"]), ref["edited_image"])
    for key in ("source", "target", "model", "tau", "tau_self", "keywords", "config"):
        assert doc[key] == ref[key], key
    assert set(doc["timings_s"]) >= {"text", "calibration", "edit", "decode", "total"}
    assert 0 <= doc["server"]["queue_s"] <= doc["server"]["total_s"]
    healthy(server.url)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"lambda_s": 3.0}, "lambda_s"),
        ({"steps": "four"}, "steps"),
        ({"stepz": 2}, "stepz"),
        ({"target": None}, "target"),
        ({"source": " ".join(["dog"] * 80)}, "source"),
        ({"local_blend": ["cat"]}, "local_blend"),
        ({"height": 256}, "height"),
    ],
)
def test_invalid_input_is_422_naming_the_field(server, change, field):
    body = {k: v for k, v in {**REQUEST, **change}.items() if v is not None}
    status, _, doc = request(server.url, "POST", "/edit", body)
    assert status == 422, doc
    assert doc["error"]["field"] == field
    message = doc["error"]["message"].replace("-", "_")
    assert field in message or f"{'edit' if field == 'target' else field} prompt" in message
    assert doc["error"]["type"] in ("ConfigError", "PromptError")
    healthy(server.url)


@pytest.mark.parametrize("body", [b"{bad json", b"\xff\xfe", b"[1, 2]", b""])
def test_malformed_json_is_400(server, body):
    status, _, doc = request(server.url, "POST", "/edit", body)
    assert status == 400 and doc["error"]["status"] == 400
    assert doc["error"]["message"].startswith(("malformed JSON", "the body must be"))
    healthy(server.url)


def test_oversized_body_is_413(server):
    body = json.dumps({**REQUEST, "source": "a " * 4000}).encode()
    status, _, doc = request(server.url, "POST", "/edit", body)
    assert status == 413 and "request body too large" in doc["error"]["message"]
    # a body announced far larger than sent: answered at once, without reading it
    head = b"POST /edit HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n{"
    assert raw(server.url, head).startswith(b"HTTP/1.0 413")
    healthy(server.url)


def test_missing_length_is_411_and_unknown_paths_404(server):
    assert raw(server.url, b"POST /edit HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.0 411")
    assert request(server.url, "GET", "/nope")[0] == 404
    assert request(server.url, "POST", "/nope", b"{}")[0] == 404
    healthy(server.url)


def test_clients_that_disconnect_mid_request(server, tiny_session):
    before = counts(server).get(("/edit", 499), 0)
    # mid-body: 10 of the announced 1000 bytes, then gone
    raw(server.url, b"POST /edit HTTP/1.1\r\nContent-Length: 1000\r\n\r\n0123456789", read=False)
    wait_for(lambda: counts(server).get(("/edit", 499), 0) == before + 1)
    healthy(server.url)
    # a whole request, gone before the answer: the edit runs, its answer goes nowhere
    n = sum(v for (p, _), v in counts(server).items() if p == "/edit")
    body = json.dumps(QUICK).encode()
    head = f"POST /edit HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    raw(server.url, head + body, read=False)
    wait_for(lambda: sum(v for (p, _), v in counts(server).items() if p == "/edit") == n + 1)
    healthy(server.url)
    status, _, doc = request(server.url, "POST", "/edit", QUICK)
    assert status == 200
    ref = plain_edit(tiny_session, QUICK["source"], QUICK["target"], steps=1)
    assert np.array_equal(image(doc["edited_png"]), ref["edited_image"])


def test_full_queue_is_503_at_once(gated):
    with EditServer(gated, queue_size=1, timeout=30).start() as s:
        first, first_out = in_thread(request, s.url, "POST", "/edit", QUICK)
        assert gated.started.wait(10)  # the worker holds the first edit
        second, second_out = in_thread(request, s.url, "POST", "/edit", QUICK)
        wait_for(lambda: s.queue_depth == 1)
        t = time.monotonic()
        status, headers, doc = request(s.url, "POST", "/edit", QUICK)
        assert status == 503 and time.monotonic() - t < 5
        assert headers["Retry-After"] == "1" and "queue is full" in doc["error"]["message"]
        healthy(s.url)
        gated.release.set()
        first.join(30)
        second.join(30)
        assert first_out[0][0] == second_out[0][0] == 200
        assert first_out[0][2]["edited_png"] == second_out[0][2]["edited_png"]
        assert counts(s)[("/edit", 503)] == 1 and counts(s)[("/edit", 200)] == 2


def test_past_the_deadline_is_504(gated):
    with EditServer(gated, queue_size=2, timeout=2.0).start() as s:
        running, running_out = in_thread(request, s.url, "POST", "/edit", QUICK)
        assert gated.started.wait(10)
        status, _, doc = request(s.url, "POST", "/edit", QUICK)  # queued behind it
        assert status == 504 and "timeout of 2.0 s" in doc["error"]["message"]
        running.join(10)
        assert running_out[0][0] == 504
        healthy(s.url)
        gated.release.set()
        wait_for(lambda: s.health()["running"] == 0 and s.queue_depth == 0)
        assert gated.calls == 1  # the queued edit was dropped, not run
        assert counts(s)[("/edit", 504)] == 2
        healthy(s.url)


def test_metrics_in_prometheus_text_format(server):
    request(server.url, "POST", "/edit", {"source": SRC})  # one 422
    status, headers, text = request(server.url, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="[^"]*",?)+\})? -?[0-9.e+]+$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert re.search(r'^adapedit_requests_total\{path="/edit",code="422"\} [1-9]', text, re.M)
    assert re.search(r'^adapedit_requests_total\{path="/healthz",code="200"\} \d+', text, re.M)
    assert "# TYPE adapedit_edit_request_seconds histogram" in text
    inf = re.search(r'^adapedit_edit_request_seconds_bucket\{le="\+Inf"\} (\d+)$', text, re.M)
    count = re.search(r"^adapedit_edit_request_seconds_count (\d+)$", text, re.M)
    assert inf and count and inf.group(1) == count.group(1) and int(count.group(1)) >= 1
    assert re.search(r"^adapedit_queue_depth 0$", text, re.M)
    assert re.search(r"^adapedit_queue_capacity 4$", text, re.M)
    assert re.search(r"^adapedit_edits_running [01]$", text, re.M)


def test_server_arguments_are_checked(tiny_session):
    for bad in ({"queue_size": 0}, {"timeout": 0}, {"max_body": -1}):
        with pytest.raises(ConfigError, match="must be positive"):
            EditServer(tiny_session, **bad)


def test_serve_command(tiny_engines):
    a = build_parser().parse_args(["serve", "--engine-dir", "eng"])
    assert (a.host, a.port, a.queue, a.timeout) == ("127.0.0.1", 8000, 8, 120.0)
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "adapedit.cli", "serve", "--engine-dir", tiny_engines),
            *("--port", "0", "--queue", "2", "--timeout", "30", "--quiet"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"serving (http://127\.0\.0\.1:\d+)", line)
        assert url, line
        healthy(url.group(1))
        assert request(url.group(1), "GET", "/metrics")[2].count("adapedit_queue_capacity 2")
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
