"""The playground page (``GET /``) in a real browser: headless Chromium from the operating
system's packages, driven by Playwright, against servers on loopback with the tiny engines and
the shapes engines. Every test ends with no console message of type error and no uncaught page
error (the ``page`` fixture checks)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.page import launch_chromium
from tests.runtime.test_server import request, running

pytestmark = pytest.mark.browser

#: Records, in the page, every change of the progress bar and of the edited image (the test
#: reads them back in order): [kind, value, milliseconds since the page's start].
RECORDER = """
window.__log = [];
new MutationObserver((records) => {
  for (const r of records) {
    const el = r.target;
    const t = performance.now();
    if (el.id === "progress" && r.attributeName === "value")
      window.__log.push(["value", Number(el.getAttribute("value")), t]);
    if (el.id === "edited-img" && r.attributeName === "src") window.__log.push(["image", 0, t]);
  }
}).observe(document, { subtree: true, attributes: true, attributeFilter: ["value", "src"] });
"""


def chromium() -> str:
    """The Chromium to drive: ``ADAPEDIT_CHROMIUM`` (CI sets it: a missing browser fails
    there), else ``chromium`` on the PATH."""
    path = os.environ.get("ADAPEDIT_CHROMIUM") or shutil.which("chromium")
    if not path or not Path(path).exists():
        if os.environ.get("ADAPEDIT_CHROMIUM"):
            pytest.fail(f"ADAPEDIT_CHROMIUM={path} does not exist (apt-get install chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = chromium()
    with sync_api.sync_playwright() as p:
        b = launch_chromium(p, executable, tmp_path_factory.mktemp("chromium-home"))
        yield b
        b.close()


@pytest.fixture
def page(browser) -> Iterator[Any]:
    """A new page that records the progress bar; after the test, no console error."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    p = context.new_page()
    p.add_init_script(RECORDER)
    problems: list[str] = []
    p.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    p.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
    p.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    p.set_default_timeout(120_000)
    p.expected_console = []  # a test that provokes a network failure names Chrome's line here
    yield p
    context.close()
    assert [m for m in problems if m not in p.expected_console] == []


@pytest.fixture(scope="module")
def tiny_url(tiny_session) -> Iterator[str]:
    with running(tiny_session, max_body=8192, max_image_body=64 * 1024) as (url, _):
        yield url


@pytest.fixture(scope="module")
def shapes_session(tmp_path_factory):
    """ONNX Runtime engines of the shapes model, static, segmented UNet (its layers one by one:
    the page shows DPS's S)."""
    from adapedit.engines.folder import build_engines
    from adapedit.export.api import ExportOptions, export_model
    from adapedit.pipelines.models import load_model
    from adapedit.runtime.session import EditSession

    export = tmp_path_factory.mktemp("exports") / "shapes-static"
    options = ExportOptions(shapes="static", forms=("segmented",))
    export_model(load_model("shapes"), export, options, progress=False)
    engines = tmp_path_factory.mktemp("engines") / "shapes-ort"
    build_engines(export, engines, backend="ort", progress=False)
    return EditSession(engines)


def run_edit(page: Any, *, size: int) -> None:
    """Press Run and wait for the answer: both images decoded at the model's size."""
    page.click("#run")
    page.wait_for_selector("#progress[data-state=done], #progress[data-state=failed]")
    assert page.get_attribute("#progress", "data-state") == "done", page.inner_text("#error")
    for img in ("#source-img", "#edited-img"):
        natural = page.eval_on_selector(img, "e => [e.complete, e.naturalWidth, e.naturalHeight]")
        assert natural == [True, size, size], (img, natural)


def words(page: Any) -> list[str]:
    return [w.strip().lstrip("★ ") for w in page.locator(".word .label").all_inner_texts()]


def test_an_edit_from_the_page(page, tiny_url):
    page.goto(tiny_url)
    page.wait_for_selector("#engine:has-text('backend ort')")
    assert "segmented UNet" in page.inner_text("#engine")
    page.fill("#source", "a cat sitting on a mat")
    page.fill("#target", "a black cat sitting on a mat")
    page.fill("#steps", "6")
    page.fill("#local_blend", "cat")
    posted: list[dict] = []
    page.on("request", lambda r: posted.append(r.post_data_json) if r.method == "POST" else None)
    run_edit(page, size=128)
    # the options as typed, and the engine folder's attention rule (from /healthz)
    assert posted[0]["steps"] == 6 and posted[0]["local_blend"] == ["cat"]
    assert posted[0]["attention_limits"] == "scaled"
    # one τ bar per word of the edit prompt, the keyword marked
    assert words(page) == ["a", "black", "cat", "sitting", "on", "a", "mat"]
    assert page.locator(".word.keyword .label").all_inner_texts() == ["★ black"]
    # the bar moved with the sampling loop before the images arrived, and ended full
    log = page.evaluate("() => window.__log")
    first_image = next(i for i, (kind, _, _) in enumerate(log) if kind == "image")
    before = [v for kind, v, _ in log[:first_image] if kind == "value" and v > 0]
    assert len(set(before)) >= 2 and before == sorted(before), log
    assert page.get_attribute("#progress", "value") == page.get_attribute("#progress", "max")
    # a word's attention map over the edited image
    assert page.is_hidden("#overlay")
    page.click(".word:has-text('cat')")
    assert page.is_visible("#overlay")
    assert page.get_attribute("#overlay", "alt") == 'attention map of "cat"'
    assert page.eval_on_selector("#overlay", "e => e.complete && e.naturalWidth") == 4
    # S of the last step (the segmented UNet) and the timings
    assert page.is_visible("#dps-img")
    stages = page.locator("#timings th").all_inner_texts()
    assert stages[:5] == ["text", "calibration", "edit", "decode", "total"]


def test_an_image_picked_or_dropped_is_edited(page, tiny_url, photo, png, tmp_path):
    page.goto(tiny_url)
    path = tmp_path / "photo.png"
    path.write_bytes(png(photo(128)))
    page.set_input_files("#image", str(path))
    page.wait_for_selector("#given:not([hidden])")
    page.fill("#source", "a red circle")
    page.fill("#target", "a blue circle")
    page.fill("#steps", "3")
    run_edit(page, size=128)
    assert page.eval_on_selector("#given-img", "e => e.naturalWidth") == 128
    # dropped on the drop zone instead (a picture of another size: resized by the server)
    page.click("#clear-image")
    assert page.is_hidden("#given")
    b64 = base64.b64encode(png(photo(96))).decode()
    transfer = page.evaluate_handle(
        """(b64) => {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          const dt = new DataTransfer();
          dt.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
          return dt;
        }""",
        b64,
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    page.wait_for_selector("#image-name:has-text('dropped.png')")
    page.select_option("#resize", "pad")
    run_edit(page, size=128)


def test_an_image_over_the_limit_is_refused_before_upload(page, tiny_url, tmp_path):
    page.goto(tiny_url)
    page.wait_for_selector("#engine:has-text('backend ort')")  # the limits are known
    noise = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    path = tmp_path / "big.png"
    from PIL import Image

    Image.fromarray(noise).save(path)  # ~77 KB: over the server's 64 KiB
    posted: list[str] = []
    page.on("request", lambda r: posted.append(r.url) if r.method == "POST" else None)
    page.set_input_files("#image", str(path))
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error .field") == "image"
    assert "at most 65536 bytes" in page.inner_text("#error")
    assert page.is_hidden("#given")
    run_edit(page, size=128)  # still usable: edits the generated source
    assert len(posted) == 1


def test_an_over_long_prompt_is_named_inline_and_the_page_stays_usable(page, tiny_url):
    page.goto(tiny_url)
    page.fill("#source", "a cat")
    page.fill("#target", "a cat " + "very " * 80)
    page.fill("#steps", "2")
    page.click("#run")
    page.wait_for_selector("#progress[data-state=failed]")
    assert page.inner_text("#error .field") == "target"
    assert "prompt is too long" in page.inner_text("#error")
    assert page.get_attribute("#target", "aria-invalid") == "true"
    # a bad reweight is named before anything is sent
    page.fill("#target", "a black cat")
    page.fill("#reweight", "black=lots")
    page.click("#run")
    page.wait_for_selector("#error .field:has-text('reweight')")
    page.fill("#reweight", "")
    run_edit(page, size=128)
    assert page.is_hidden("#error")


def test_prompts_and_server_strings_are_text_never_html(page, tiny_url):
    page.goto(tiny_url)
    markup = "<img src=x onerror=alert(1)>"
    page.fill("#source", "a cat")
    page.fill("#target", f"a cat {markup}")
    page.fill("#steps", "2")
    run_edit(page, size=128)
    body = {"source": "a cat", "target": f"a cat {markup}", "steps": 2}
    assert words(page) == [w["word"] for w in request(tiny_url, "POST", "/edit", body)[2]["tau"]]
    # the same markup in an error message the server sends back: shown as it is
    page.fill("#target", markup + " x" * 80)
    page.click("#run")
    page.wait_for_selector("#progress[data-state=failed]")
    assert markup in page.inner_text("#error")
    assert page.locator("img[src=x], #error *:not(strong, span)").count() == 0


def test_a_server_that_goes_away_mid_edit_leaves_a_message(page, tiny_engines):
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "adapedit.cli", "serve", "--engine-dir", str(tiny_engines)),
            *("--port", "0", "--quiet"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = re.search(r"serving (http://\S+)", proc.stdout.readline()).group(1)
        page.goto(url)
        page.fill("#steps", "500")
        page.click("#run")
        page.wait_for_selector("#stage:has-text('calibration')")  # the sampling loop runs
        # Chrome's own log line of the stream cut short: what this test provokes
        page.expected_console.append(
            "Failed to load resource: net::ERR_INCOMPLETE_CHUNKED_ENCODING"
        )
        proc.kill()
        page.wait_for_selector("#progress[data-state=failed]", timeout=30_000)
        assert "connection" in page.inner_text("#error")
        assert page.is_enabled("#run")
    finally:
        proc.kill()
        proc.wait(30)


def test_a_shapes_edit_then_a_slider_change_served_from_the_calibration_cache(page, shapes_session):
    with running(shapes_session) as (url, _):
        page.goto(url)
        page.wait_for_selector("#engine:has-text('model shapes')")
        page.fill("#steps", "20")
        run_edit(page, size=64)
        assert page.inner_text("#timings tr[data-stage=calibration] td").endswith(" s")
        # λ_S only changes the edit pass: moving its slider edits again, calibration cached
        page.fill("#lambda_s", "0.5")
        page.wait_for_selector("#note:not([hidden])")
        page.wait_for_selector("#progress[data-state=done]")
        assert page.inner_text("#timings tr[data-stage=calibration] td").endswith("(cached)")
        assert "reused from the server's cache" in page.inner_text("#note")
        assert page.input_value("#lambda_s") == "0.5"
        doc = request(url, "GET", "/healthz")[2]
        assert doc["engine"]["form"] == "segmented" and page.is_visible("#dps-img")
