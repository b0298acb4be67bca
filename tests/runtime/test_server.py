"""The HTTP application under uvicorn on the tiny engines (loopback, port 0): answers, errors,
survival, metrics, the ``serve`` command."""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from email.message import Message
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from adapedit.cli import build_parser
from adapedit.errors import ConfigError, EngineError
from adapedit.runtime.api import plain_edit
from adapedit.runtime.server import HttpOptions, serving_in_thread

SRC, TGT = "a dog standing on the grass", "a dog sitting on the grass"
REQUEST = {"source": SRC, "target": TGT, "steps": 2, "seed": 3, "lambda_s": 0.8}
QUICK = {"source": "a cat on a mat", "target": "a black cat on a mat", "steps": 1}


def request(
    url: str, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None
) -> tuple[int, Message, Any]:
    """(status, headers (any case), JSON document or text) of one request."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers=headers or {})
        r = conn.getresponse()
        text = r.read().decode()
        doc = json.loads(text) if r.getheader("Content-Type") == "application/json" else text
        return r.status, r.headers, doc
    finally:
        conn.close()


def raw(url: str, data: bytes, *, read: bool = True) -> bytes:
    """Send bytes on a fresh connection; the answer (until the server closes) if ``read``, else
    close at once."""
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


def running(session, **options: Any):
    """The application on ``session`` with ``HttpOptions(**options)``, served from a thread on
    127.0.0.1, any free port: (URL, application)."""
    return serving_in_thread(session, HttpOptions(**options))


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


class FailingSession:
    """The tiny session, whose edits raise ``error``."""

    def __init__(self, session, error: Exception) -> None:
        self._session, self.error = session, error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def edit(self, *args: Any, **kwargs: Any):
        raise self.error


@pytest.fixture(scope="module")
def server(tiny_session) -> Iterator[tuple[str, Any]]:
    with running(tiny_session, queue_size=4, timeout=60, max_body=4096) as s:
        yield s


@pytest.fixture
def url(server) -> str:
    return server[0]


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


def count(app, path: str, code: int) -> int:
    return app.state.metrics.count(path, code)


def same_as_plain_edit(url: str, session, body: dict) -> tuple[dict, dict]:
    """POST ``body`` to /edit and ``plain_edit`` it: both images equal; (answer, plain_edit's)."""
    status, _, doc = request(url, "POST", "/edit", body)
    assert status == 200, doc
    options = {k: v for k, v in body.items() if k not in ("source", "target")}
    ref = plain_edit(session, body["source"], body["target"], **options)
    assert np.array_equal(image(doc["source_png"]), ref["source_image"])
    assert np.array_equal(image(doc["edited_png"]), ref["edited_image"])
    return doc, ref


def test_edit_equals_the_python_api(url, tiny_session):
    doc, ref = same_as_plain_edit(url, tiny_session, REQUEST)
    for key in ("source", "target", "model", "tau", "tau_self", "keywords", "config"):
        assert doc[key] == ref[key], key
    assert set(doc["timings_s"]) >= {"text", "calibration", "edit", "decode", "total"}
    assert 0 <= doc["server"]["queue_s"] <= doc["server"]["total_s"]
    assert doc["server"]["worker"] == f"{socket.gethostname()}:{os.getpid()}"
    healthy(url)


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
        ({"calibration_steps": 99}, "calibration_steps"),
        ({"preset": "fastest"}, "preset"),
    ],
)
def test_invalid_input_is_422_naming_the_field(url, change, field):
    body = {k: v for k, v in {**REQUEST, **change}.items() if v is not None}
    status, _, doc = request(url, "POST", "/edit", body)
    assert status == 422, doc
    assert doc["error"]["field"] == field
    message = doc["error"]["message"].replace("-", "_")
    assert field in message or f"{'edit' if field == 'target' else field} prompt" in message
    assert doc["error"]["type"] in ("ConfigError", "PromptError")
    healthy(url)


@pytest.mark.parametrize("body", [b"{bad json", b"\xff\xfe", b"[1, 2]", b""])
def test_malformed_json_is_400(url, body):
    status, _, doc = request(url, "POST", "/edit", body)
    assert status == 400 and doc["error"]["status"] == 400
    assert doc["error"]["message"].startswith(("malformed JSON", "the body must be"))
    # in the form of every other error: what, where, expected, got
    assert (
        doc["error"]["type"] == "InputError"
        and " | where: POST /edit: the body" in (doc["error"]["message"])
    )
    assert " | expected: " in doc["error"]["message"] and " | got: " in doc["error"]["message"]
    healthy(url)


def test_oversized_body_is_413(url):
    body = json.dumps({**REQUEST, "source": "a " * 4000}).encode()
    status, _, doc = request(url, "POST", "/edit", body)
    assert status == 413 and "request body too large" in doc["error"]["message"]
    # a body announced far larger than sent: answered at once, without reading it, then closed
    head = b"POST /edit HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n{"
    answer = raw(url, head)
    assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower()
    healthy(url)


def test_an_image_edit_equals_the_python_api(url, tiny_session, photo, png):
    b64 = base64.b64encode(png(photo(128))).decode()
    body = {**REQUEST, "image": b64, "inversion": "npi", "resize": "pad"}
    doc, ref = same_as_plain_edit(url, tiny_session, body)
    assert doc["image"] == ref["image"] and doc["image"]["inversion"] == "npi"
    healthy(url)


def test_an_image_body_has_its_own_limit_and_bad_images_are_422(tiny_session, photo, png):
    def png_b64(pixels: np.ndarray) -> str:
        return base64.b64encode(png(pixels)).decode()

    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    with running(tiny_session, max_body=1024, max_image_body=16384) as (url, _):
        big = json.dumps({**REQUEST, "image": png_b64(noise)}).encode()  # ~ 65 KB
        status, _, doc = request(url, "POST", "/edit", big)
        assert status == 413 and "16384 bytes for an edit with an image" in doc["error"]["message"]
        # the same size without an image is held to max_body
        plain = json.dumps({**REQUEST, "source": "a " * 1000}).encode()
        status, _, doc = request(url, "POST", "/edit", plain)
        assert status == 413
        assert "1024 bytes for an edit without an image" in doc["error"]["message"]
        for bad in ("not base64!", base64.b64encode(b"GIF89a not an image").decode()):
            status, _, doc = request(url, "POST", "/edit", {**REQUEST, "image": bad})
            assert status == 422 and doc["error"]["field"] == "image", doc
        tiny = png_b64(photo(128)[:32, :32])
        status, _, doc = request(url, "POST", "/edit", {**REQUEST, "image": tiny})
        assert status == 422 and doc["error"]["field"] == "image", doc
        status, _, doc = request(url, "POST", "/edit", {**REQUEST, "inversion": "direct"})
        assert status == 422 and doc["error"]["field"] == "inversion", doc
        healthy(url)


def test_missing_length_is_411_and_unknown_paths_404(url):
    assert raw(url, b"POST /edit HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 411")
    chunked = b"POST /edit HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n"
    assert raw(url, chunked).startswith(b"HTTP/1.1 411")
    status, _, doc = request(url, "GET", "/nope")
    assert status == 404 and doc["error"]["message"] == "no such path: GET /nope"
    assert request(url, "POST", "/nope", b"{}")[0] == 404
    assert request(url, "GET", "/edit")[0] == 405
    healthy(url)


def test_clients_that_disconnect_mid_request(server, tiny_session):
    url, app = server
    before = count(app, "/edit", 499)
    # mid-body: 10 of the announced 1000 bytes, then gone
    raw(url, b"POST /edit HTTP/1.1\r\nContent-Length: 1000\r\n\r\n0123456789", read=False)
    wait_for(lambda: count(app, "/edit", 499) == before + 1)
    healthy(url)
    # a whole request, gone before the answer
    body = json.dumps(QUICK).encode()
    head = f"POST /edit HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    raw(url, head + body, read=False)
    wait_for(lambda: count(app, "/edit", 499) == before + 2)
    healthy(url)
    status, _, doc = request(url, "POST", "/edit", QUICK)
    assert status == 200
    ref = plain_edit(tiny_session, QUICK["source"], QUICK["target"], steps=1)
    assert np.array_equal(image(doc["edited_png"]), ref["edited_image"])


def test_a_queued_edit_of_a_client_gone_is_dropped(gated):
    with running(gated, queue_size=2, timeout=30) as (url, app):
        first, first_out = in_thread(request, url, "POST", "/edit", QUICK)
        assert gated.started.wait(10)
        body = json.dumps(QUICK).encode()
        head = f"POST /edit HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        raw(url, head + body, read=False)  # queued behind the first, then gone
        wait_for(lambda: count(app, "/edit", 499) == 1)
        assert app.state.editor.health()["queue_depth"] == 0
        gated.release.set()
        first.join(30)
        assert first_out[0][0] == 200 and gated.calls == 1


def test_full_queue_is_503_at_once(gated):
    with running(gated, queue_size=1, timeout=30) as (url, app):
        first, first_out = in_thread(request, url, "POST", "/edit", QUICK)
        assert gated.started.wait(10)  # the worker holds the first edit
        second, second_out = in_thread(request, url, "POST", "/edit", QUICK)
        wait_for(lambda: app.state.editor.health()["queue_depth"] == 1)
        t = time.monotonic()
        status, headers, doc = request(url, "POST", "/edit", QUICK)
        assert status == 503 and time.monotonic() - t < 5
        assert headers["Retry-After"] == "1" and "queue is full" in doc["error"]["message"]
        healthy(url)
        gated.release.set()
        first.join(30)
        second.join(30)
        assert first_out[0][0] == second_out[0][0] == 200
        assert first_out[0][2]["edited_png"] == second_out[0][2]["edited_png"]
        assert count(app, "/edit", 503) == 1 and count(app, "/edit", 200) == 2


def test_past_the_deadline_is_504(gated):
    with running(gated, queue_size=2, timeout=2.0) as (url, app):
        running_edit, running_out = in_thread(request, url, "POST", "/edit", QUICK)
        assert gated.started.wait(10)
        status, _, doc = request(url, "POST", "/edit", QUICK)  # queued behind it
        assert status == 504 and "timeout of 2 s" in doc["error"]["message"]
        running_edit.join(10)
        assert running_out[0][0] == 504
        healthy(url)
        gated.release.set()
        editor = app.state.editor
        wait_for(lambda: editor.health() == {"queue_depth": 0, "queue_size": 2, "running": 0})
        assert gated.calls == 1  # the queued edit was dropped, not run
        assert count(app, "/edit", 504) == 2
        healthy(url)


@pytest.mark.parametrize(
    ("error", "kind"),
    [(EngineError("the engine fell over", where="unet"), "EngineError"), (OSError("disk"), None)],
)
def test_an_engine_failure_is_500(tiny_session, error, kind):
    with running(FailingSession(tiny_session, error)) as (url, app):
        status, _, doc = request(url, "POST", "/edit", QUICK)
        assert status == 500 and doc["error"]["status"] == 500
        if kind:
            assert (
                doc["error"]["type"] == kind and "the engine fell over" in doc["error"]["message"]
            )
        else:
            assert doc["error"]["message"] == "internal error: OSError: disk"
        healthy(url)
        assert count(app, "/edit", 500) == 1


def test_metrics_in_prometheus_text_format(url):
    healthy(url)  # one 200 on /healthz of its own, whatever ran before
    request(url, "POST", "/edit", {"source": SRC})  # one 422
    status, headers, text = request(url, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="[^"]*",?)+\})? -?[0-9.]+(e[+-][0-9]+)?$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert re.search(r'^adapedit_requests_total\{code="422",path="/edit"\} [1-9]', text, re.M)
    assert re.search(r'^adapedit_requests_total\{code="200",path="/healthz"\} \d', text, re.M)
    assert "# TYPE adapedit_edit_request_seconds histogram" in text
    inf = re.search(r'^adapedit_edit_request_seconds_bucket\{le="\+Inf"\} ([\d.]+)$', text, re.M)
    n = re.search(r"^adapedit_edit_request_seconds_count ([\d.]+)$", text, re.M)
    assert inf and n and inf.group(1) == n.group(1) and float(n.group(1)) >= 1
    assert re.search(r"^adapedit_queue_depth 0\.0$", text, re.M)
    assert re.search(r"^adapedit_queue_capacity 4\.0$", text, re.M)
    assert re.search(r"^adapedit_edits_running [01]\.0$", text, re.M)
    # OpenMetrics for a scraper that asks for it
    _, headers, text = request(
        url, "GET", "/metrics", headers={"Accept": "application/openmetrics-text"}
    )
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")


def test_http_options_are_checked():
    bad_options = [{"queue_size": 0}, {"queue_size": True}, {"max_body": -1}]
    for bad in [*bad_options, {"timeout": 0}, {"timeout": float("nan")}, {"timeout": math.inf}]:
        with pytest.raises(ConfigError, match="must be positive"):
            HttpOptions(**bad)
    with pytest.raises(ConfigError, match="max_image_body is below max_body"):
        HttpOptions(max_body=4096, max_image_body=1024)


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
        found = re.search(r"serving (http://127\.0\.0\.1:\d+)", line)
        assert found, line
        healthy(found.group(1))
        metrics = request(found.group(1), "GET", "/metrics")[2]
        assert re.search(r"^adapedit_queue_capacity 2\.0$", metrics, re.M)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_a_re_edit_changing_only_edit_side_options_says_calibration_cached(url):
    body = {**REQUEST, "seed": 4242}  # a seed no other test uses: this target is new here
    first = request(url, "POST", "/edit", body)[2]
    again = request(url, "POST", "/edit", {**body, "lambda_s": 0.5, "lambda_tau": 2.0})[2]
    assert (first["calibration"], again["calibration"]) == ("computed", "cached")
    assert again["config"]["edit"]["lambda_s"] == 0.5


def test_serve_refuses_a_cache_bound_that_is_not_positive(tiny_engines):
    p = subprocess.run(
        [
            *(sys.executable, "-m", "adapedit.cli", "serve", "--engine-dir", tiny_engines),
            *("--port", "0", "--calibration-cache-mb", "0", "--quiet"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert "calibration cache's size must be a positive byte count" in p.stderr


def test_the_command_line_stays_light():
    code = (
        "import sys; from adapedit.cli import build_parser; "
        "build_parser().parse_args(['serve', '--engine-dir', 'e', '--replicas', '2']); "
        "heavy = [m for m in ('ray', 'torch', 'uvicorn', 'starlette') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def events(url: str, body: dict | bytes) -> tuple[int, str, list[tuple[str, dict]]]:
    """POST ``body`` to /edit asking for server-sent events: (status, content type, events as
    (kind, document))."""
    status, headers, text = request(
        url, "POST", "/edit", body, headers={"Accept": "text/event-stream"}
    )
    found = []
    for block in text.split("\n\n"):
        if block.strip():
            lines = dict(line.split(": ", 1) for line in block.splitlines())
            found.append((lines["event"], json.loads(lines["data"])))
    return status, headers["Content-Type"], found


def test_a_streamed_edit_reports_every_step_then_the_plain_answer(url, tiny_session):
    body = {**REQUEST, "seed": 5151, "steps": 3, "calibration_steps": 2}
    status, kind, found = events(url, body)
    assert status == 200 and kind.startswith("text/event-stream")
    progress = [doc for k, doc in found[:-1] if k == "progress"]
    assert len(progress) == len(found) - 1 == 5  # 2 calibration steps + 3 edit steps
    assert [p["done"] for p in progress] == [1, 2, 3, 4, 5]
    assert {p["total"] for p in progress} == {5}
    assert [(p["stage"], p["step"], p["steps"]) for p in progress] == [
        ("calibration", 1, 2),
        ("calibration", 2, 2),
        ("edit", 1, 3),
        ("edit", 2, 3),
        ("edit", 3, 3),
    ]
    last, doc = found[-1]
    assert last == "result"
    plain = request(url, "POST", "/edit", body)[2]
    for key in ("source_png", "edited_png", "tau", "keywords", "attention_maps"):
        assert doc[key] == plain[key], key
    # the re-edit's calibration comes from the cache: its steps are done at once
    again = events(url, {**body, "lambda_s": 0.5})[2]
    assert again[0] == (
        "progress",
        {"stage": "calibration", "step": 2, "steps": 2, "done": 2, "total": 5},
    )
    assert again[-1][1]["calibration"] == "cached"


def test_a_streamed_edit_that_is_refused_says_so_in_its_last_event(server):
    url, app = server
    before = count(app, "/edit", 422)
    status, _, found = events(url, {**QUICK, "target": "word " * 90})
    assert status == 200 and len(found) == 1
    kind, doc = found[0]
    assert kind == "error" and doc["error"]["status"] == 422
    assert doc["error"]["field"] == "target"
    assert count(app, "/edit", 422) == before + 1  # the metrics count what the edit came to
    # a body the server does not read is refused as without a stream
    head = b"POST /edit HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
    assert raw(url, head + b"Content-Length: 100000000\r\n\r\n{").startswith(b"HTTP/1.1 413")


def test_an_answer_has_each_tokens_map_and_dps_weight(url, tiny_session, tiny_fused_session):
    doc = request(url, "POST", "/edit", REQUEST)[2]
    target_tokens = len(tiny_session.tokenizer(TGT).input_ids) - 1  # the start token left out
    maps = doc["attention_maps"]
    assert [m["token"] for m in maps][:3] == ["a", "dog", "sitting"]
    assert len(maps) == target_tokens
    sizes = {image(m["png"]).shape for m in maps}
    assert sizes == {(4, 4, 3)}  # 1/4 of the 16×16 latent
    assert image(doc["dps_weight_png"]).shape == (4, 4, 3)
    assert request(url, "POST", "/edit", {**REQUEST, "use_dps": False})[2]["dps_weight_png"] is None
    # the fused UNet runs its layers inside one graph, which gives S as an output
    with running(tiny_fused_session) as (fused_url, _):
        fused = request(fused_url, "POST", "/edit", REQUEST)[2]
    assert image(fused["dps_weight_png"]).shape == (4, 4, 3)
    assert len(fused["attention_maps"]) == target_tokens


@pytest.mark.parametrize("levels", [1000, 100_000])
def test_a_body_nested_too_deeply_is_400_naming_the_body(url, levels):
    for body in ("[" * levels + "]" * levels, '{"a":' * levels + "1" + "}" * levels):
        status, _, doc = request(url, "POST", "/edit", body.encode())
        assert status == 400, doc
        assert doc["error"]["message"].startswith("the JSON body nests too deeply")
        assert "where: POST /edit: the body" in doc["error"]["message"]
    healthy(url)


def test_brackets_inside_strings_are_not_nesting(url):
    deep = '{"source": "a cat", "target": "a cat on a mat", "steps": 1, "x": "' + "[{" * 500
    status, _, doc = request(url, "POST", "/edit", (deep + '"}').encode())
    assert status == 422 and doc["error"]["field"] == "x"  # parsed: an unknown field


def test_the_page_and_its_files_carry_a_content_security_policy(url):
    for path, kind in (("/", "text/html"), ("/static/app.js", "text/javascript")):
        status, headers, _ = request(url, "GET", path)
        assert status == 200 and headers["Content-Type"].startswith(kind)
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
    assert "/static/app.js" in request(url, "GET", "/")[2]
    for path in ("/static/server.py", "/static/..%2Fserver.py", "/static/%2e%2e/page.py"):
        status, _, doc = request(url, "GET", path)
        assert status == 404 and doc["error"]["status"] == 404, path


def test_an_api_only_server_has_no_page(tiny_session):
    with running(tiny_session, page=False) as (url, _):
        assert request(url, "GET", "/")[0] == 404
        assert request(url, "GET", "/static/app.js")[0] == 404
        healthy(url)
    with pytest.raises(ConfigError, match="page must be true or false"):
        HttpOptions(page="no")


def test_healthz_describes_the_engines_and_the_limits(url):
    doc = request(url, "GET", "/healthz")[2]
    assert doc["engine"] == {
        "model": "tiny",
        "backend": "ort",
        "form": "segmented",
        "precision": "fp32",
        "shapes": "dynamic",
        "attention_limits": "scaled",
        "device": "cpu",
        "height": 128,
        "width": 128,
    }
    assert doc["limits"] == {"max_body": 4096, "max_image_body": 16 * 1024 * 1024}


def test_an_edit_under_another_attention_rule_is_422_naming_both(url):
    status, _, doc = request(url, "POST", "/edit", {**QUICK, "attention_limits": "p2p-literal"})
    assert status == 422 and doc["error"]["field"] == "attention_limits"
    assert "'scaled' (the folder's)" in doc["error"]["message"]
    assert "'p2p-literal' (the edit's)" in doc["error"]["message"]
    status, _, doc = request(url, "POST", "/edit", {**QUICK, "attention_limits": "literal"})
    assert status == 422 and doc["error"]["field"] == "attention_limits"
    assert "scaled | p2p-literal" in doc["error"]["message"]
