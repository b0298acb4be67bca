"""The playground page in headless Chromium: how long an edit takes from the Run button to the
images, and a slider change that only touches the edit pass (λ_S, calibration cached) — side by
side, interleaved, in one run — plus the screenshot the README shows.

    python -m benchmarks.page --engine-dir ENGINES [--repeats 3] [--screenshot docs/playground.png]

The server is ``adapedit serve`` on a free loopback port, started as a user starts it (the
seconds until it serves, and from opening the page to the first edit's images, are recorded
too); Chromium is the operating system's (``apt-get install chromium``; ``--chromium``),
driven by Playwright. Writes ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.request import urlopen

from benchmarks.common import machine_info, write_results

RESULTS = Path(__file__).parent / "results"
#: Chromium's flags for a closed network and a root user (the tests use them too).
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def launch_chromium(playwright: Any, executable: str, home: Path) -> Any:
    """Headless ``executable`` under Playwright, its caches under ``home`` (not ~/.cache)."""
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / "cache")}
    return playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS), env=env)


def wait_done(page: Any) -> float:
    """Seconds from the action to the images shown, as the page measured them."""
    page.wait_for_selector("#progress[data-state=done], #progress[data-state=failed]")
    if page.get_attribute("#progress", "data-state") != "done":
        raise SystemExit(f"the page reports an error: {page.inner_text('#error')}")
    return float(page.get_attribute("#progress", "data-seconds"))


def shown(page: Any) -> dict[str, Any]:
    """What the page's timings table says: seconds per stage and the calibration's state."""
    rows = dict(
        zip(
            page.locator("#timings th").all_inner_texts(),
            page.locator("#timings td").all_inner_texts(),
            strict=True,
        )
    )
    calibration = rows.get("calibration", "")
    return {
        "calibration": "cached" if calibration.endswith("(cached)") else "computed",
        "page_total_s": float(rows["total"].split()[0]),
        "calibration_s": float(calibration.split()[0]),
    }


def measure(page: Any, repeats: int) -> list[dict[str, Any]]:
    """``repeats`` × (an edit of a new seed from the Run button, then λ_S moved)."""
    runs = []
    for r in range(repeats):
        page.fill("#seed", str(100 + r))  # a new initial latent: the calibration runs
        page.evaluate("() => { document.getElementById('progress').dataset.state = 'idle'; }")
        page.click("#run")
        first = {"wall_s": wait_done(page), **shown(page)}
        page.evaluate("() => { document.getElementById('progress').dataset.state = 'idle'; }")
        page.fill("#lambda_s", ("0.5", "0.9")[r % 2])  # its change event edits again
        slider = {"wall_s": wait_done(page), **shown(page)}
        slider["note"] = page.inner_text("#note")
        runs.append({"seed": 100 + r, "first": first, "slider": slider})
    return runs


def markdown(rec: dict) -> str:
    m, e = rec["machine"], rec["engine"]
    first = rec["median"]["first_wall_s"]
    slider = rec["median"]["slider_wall_s"]
    lines = [
        "# The playground page: an edit, then a slider change",
        "",
        f"Measured on {m['cpu']}, {m['cpus']} CPUs, GPU: {m['gpu'] or 'none'}; torch "
        f"{m['versions']['torch']}, onnxruntime {m['versions']['onnxruntime']}; "
        f"OMP_NUM_THREADS={rec['omp_threads']}; headless Chromium {rec['browser']} on loopback. "
        f"Engines: {e['model']}, {e['backend']}, {e['form']} UNet, {e['precision']}, "
        f"{e['shapes']} shapes, {e['device']}, {e['width']}×{e['height']}. "
        f"`{rec['source']}` → `{rec['target']}`, {rec['steps']} DDIM steps, the page's defaults.",
        "",
        f"`adapedit serve` printed that it serves {rec['server_start_s']:.1f} s after it was "
        f"started; from opening the page to the first edit's images (the page's defaults, seed "
        f"0): {rec['first_edit_s']:.1f} s.",
        "",
        "Seconds from the action (Run with a new seed; then λ_S moved, 0.9 ↔ 0.5) to the images "
        "shown, as the page measures them (`performance.now()`, through the decoded images), and "
        "the edit's `total` as the page's timings table shows it:",
        "",
        "| seed | Run s | its total s | calibration | λ_S moved s | its total s | calibration |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in rec["runs"]:
        f, s = run["first"], run["slider"]
        lines.append(
            f"| {run['seed']} | {f['wall_s']:.2f} | {f['page_total_s']:.2f} | "
            f"{f['calibration']} | {s['wall_s']:.2f} | {s['page_total_s']:.2f} | "
            f"{s['calibration']} |"
        )
    lines += [
        "",
        f"Median: Run {first:.2f} s, λ_S moved {slider:.2f} s ({slider / first:.2f} of it). "
        f"The page's note after the slider change: “{rec['runs'][-1]['slider']['note']}”",
    ]
    return "\n".join(lines) + "\n"


def plot(rec: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    seeds = [str(r["seed"]) for r in rec["runs"]]
    x = np.arange(len(seeds))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(x - 0.2, [r["first"]["wall_s"] for r in rec["runs"]], 0.4, label="Run (calibrates)")
    ax.bar(x + 0.2, [r["slider"]["wall_s"] for r in rec["runs"]], 0.4, label="λ_S moved (cached)")
    ax.set_xticks(x, [f"seed {s}" for s in seeds])
    ax.set_ylabel("seconds to the images")
    ax.set_title(f"Playground, {rec['engine']['model']} engines, {rec['machine']['cpu'][:28]}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine-dir", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--screenshot", default=None, help="the page after the last edit (PNG)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--stem", default="page")
    a = ap.parse_args(argv)
    if a.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {a.repeats}")
    if not Path(a.chromium).exists():
        raise SystemExit(f"no Chromium at {a.chromium} (apt-get install chromium, or --chromium)")
    from playwright.sync_api import sync_playwright

    from adapedit.runtime.server import HttpOptions
    from benchmarks.loadtest import start_server

    defaults = HttpOptions()  # the server a user starts: adapedit serve's own queue and timeout
    start = time.perf_counter()
    proc, url = start_server(Path(a.engine_dir), defaults.queue_size, defaults.timeout, None, None)
    startup = time.perf_counter() - start
    try:
        with sync_playwright() as p, tempfile.TemporaryDirectory(prefix="adapedit-chrome-") as home:
            browser = launch_chromium(p, a.chromium, Path(home))
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(600_000)
            start = time.perf_counter()
            page.goto(url)
            page.wait_for_selector("#engine:has-text('backend')")
            page.click("#run")  # the first edit after the server started (the page's seed 0)
            wait_done(page)  # (Playwright polls: a fraction of a second late at most)
            first_edit = time.perf_counter() - start
            runs = measure(page, a.repeats)
            if a.screenshot:
                page.click(".word.keyword >> nth=0")  # its attention map over the edited image
                page.screenshot(path=a.screenshot, full_page=True)
            rec = {
                "machine": machine_info(),
                "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                "browser": browser.version,
                "engine": json.loads(urlopen(f"{url}/healthz").read())["engine"],
                "source": page.input_value("#source"),
                "target": page.input_value("#target"),
                "steps": int(page.input_value("#steps")),
                "server_start_s": startup,
                "first_edit_s": first_edit,
                "runs": runs,
                "median": {
                    "first_wall_s": statistics.median(r["first"]["wall_s"] for r in runs),
                    "slider_wall_s": statistics.median(r["slider"]["wall_s"] for r in runs),
                },
            }
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
    out = Path(a.out)
    write_results(out, a.stem, rec, markdown(rec))
    plot(rec, out / f"{a.stem}.png")
    return rec


if __name__ == "__main__":
    main()
