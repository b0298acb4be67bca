"""Load test of ``adapedit serve`` on loopback: N concurrent clients, M requests in all.

Starts ``adapedit serve`` on an engine folder (``--engine-dir``, or the tiny model exported and
built into a temporary folder) on 127.0.0.1 with a free port, or uses a server already running
on loopback (``--url``). First sends each distinct request alone (the single-request results,
and the warm-up), then M requests from N client threads, cycling through the same inputs, and
checks that every answer equals the single-request answer for its inputs (both images pixel for
pixel, τ, τ_self, keywords). Records throughput, p50/p99 latency, status counts and mismatches
in ``benchmarks/results/<stem>.json`` and ``.md``. Bounded: at most ``--max-seconds`` (no request
is started after it), at most 1000 requests and 64 clients; the server it started is stopped at
the end. Exits 1 if any answer is not 200 or differs from the single-request one.

    python -m benchmarks.loadtest --clients 4 --requests 24 --steps 4
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import math
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from benchmarks.common import machine_info, write_results

LOOPBACK = ("127.0.0.1", "localhost", "::1")
JOBS = (
    {"source": "a dog standing on the grass", "target": "a dog sitting on the grass", "seed": 0},
    {"source": "a cat on a mat", "target": "a black cat on a mat", "seed": 1},
    {
        "source": "a red car in the street",
        "target": "a blue car in the street",
        "seed": 2,
        "edit_type": "replace",
    },
)
COMPARED = ("tau", "tau_self", "keywords")


def post_edit(url: str, body: dict[str, Any], timeout: float) -> tuple[int, dict[str, Any], float]:
    """(status, JSON answer, seconds) of one ``POST /edit`` on a fresh connection."""
    u = urlsplit(url)
    t = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", "/edit", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        doc = json.loads(r.read())
        return r.status, doc, time.perf_counter() - t
    finally:
        conn.close()


def get_text(url: str, path: str) -> str:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def decoded(doc: dict[str, Any]) -> dict[str, Any]:
    """What must be equal between two answers for the same inputs: images and τ."""
    out = {k: doc[k] for k in COMPARED}
    for key in ("source_png", "edited_png"):
        out[key] = np.asarray(Image.open(io.BytesIO(base64.b64decode(doc[key]))))
    return out


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(
        np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a
    )


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0–100)."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def tiny_engines(folder: Path) -> Path:
    """Export the tiny model and build ONNX Runtime engines under ``folder``."""
    from adapedit.engines.folder import build_engines
    from adapedit.export.api import ExportOptions, export_model

    export_model("tiny", folder / "export", ExportOptions(forms=("segmented",)), progress=False)
    build_engines(folder / "export", folder / "engines", backend="ort", progress=False)
    return folder / "engines"


def start_server(engine_dir: Path, queue: int, timeout: float) -> tuple[subprocess.Popen, str]:
    """``adapedit serve`` on 127.0.0.1, any free port; (process, URL) once it listens."""
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "adapedit.cli", "serve", "--engine-dir", str(engine_dir)),
            *("--port", "0", "--queue", str(queue), "--timeout", str(timeout), "--quiet"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("serving http://"):
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.split()[1]


def load(
    url: str, clients: int, requests: int, steps: int, timeout: float, deadline: float
) -> dict[str, Any]:
    """Single-request answers first, then the concurrent phase; the record."""
    jobs = [{**job, "steps": steps} for job in JOBS]
    reference, alone_s = [], []
    for job in jobs:
        status, doc, seconds = post_edit(url, job, timeout)
        if status != 200:
            raise SystemExit(f"single request failed with {status}: {doc}")
        reference.append(decoded(doc))
        alone_s.append(seconds)

    lock = threading.Lock()
    issued = 0
    results: list[dict[str, Any]] = []

    def client() -> None:
        nonlocal issued
        while True:
            with lock:
                if issued >= requests or time.monotonic() > deadline:
                    return
                i, issued = issued, issued + 1
            k = i % len(jobs)
            try:
                status, doc, seconds = post_edit(url, jobs[k], timeout)
            except (OSError, http.client.HTTPException) as e:
                status, doc, seconds = 0, {"error": repr(e)}, float("nan")
            row = {"index": i, "job": k, "status": status, "latency_s": seconds}
            if status == 200:
                row["equal"] = same(decoded(doc), reference[k])
                row["server_edit_s"] = doc["timings_s"]["total"]
                row["server_queue_s"] = doc["server"]["queue_s"]
            with lock:
                results.append(row)

    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t

    ok = [r for r in results if r["status"] == 200]
    latencies = [r["latency_s"] for r in ok]
    return {
        "clients": clients,
        "requests_asked": requests,
        "requests_done": len(results),
        "distinct_inputs": len(jobs),
        "steps": steps,
        "image_hw": list(reference[0]["edited_png"].shape[:2]),
        "wall_s": wall,
        "throughput_rps": len(ok) / wall,
        "latency_s": {
            "p50": statistics.median(latencies) if ok else None,
            "p99": percentile(latencies, 99) if ok else None,
            "mean": statistics.fmean(latencies) if ok else None,
            "max": max(latencies) if ok else None,
        },
        "single_request_s": alone_s,
        "server_edit_s_median": statistics.median(r["server_edit_s"] for r in ok) if ok else None,
        "server_queue_s_median": statistics.median(r["server_queue_s"] for r in ok) if ok else None,
        "status_counts": {
            str(k): v for k, v in sorted(Counter(r["status"] for r in results).items())
        },
        "equal_to_single_request": sum(r.get("equal", False) for r in ok),
        "mismatches": sum(not r["equal"] for r in ok),
        "requests": sorted(results, key=lambda r: r["index"]),
    }


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.0f} ms"


def markdown(record: dict[str, Any]) -> str:
    r, lat, ms = record["load"], record["load"]["latency_s"], _ms
    alone = ", ".join(ms(s) for s in r["single_request_s"])
    server = (
        f"`adapedit serve` started here on ONNX Runtime CPU engines of the `{record['model']}` "
        f"model, one worker, queue {record['queue']}, timeout "
        f"{record['timeout_s']:g} s"
        if record["server_started_here"]
        else f"{record['url']} (model `{record['model']}`, queue {record['queue']})"
    )
    return f"""# Load test: `adapedit serve`, {record["model"]} model

Measured {record["date"]} on {record["machine"]["description"]} (CPU only); server and clients
on the same machine, over loopback.

- Server: {server}.
- Edits: {"×".join(map(str, r["image_hw"]))} px, DDIM, {r["steps"]} steps, FWT + DPS (calibration
  pass and edit pass), {r["distinct_inputs"]} distinct inputs cycled.
- Load: {r["clients"]} concurrent clients, {r["requests_done"]} requests in all (one connection
  each), wall {r["wall_s"]:.1f} s.

| | |
|---|---|
| throughput | {r["throughput_rps"]:.2f} requests/s |
| latency p50 / p99 / max (client, 200s) | {ms(lat["p50"])} / {ms(lat["p99"])} / {ms(lat["max"])} |
| server edit time, median | {ms(r["server_edit_s_median"])} |
| server queue wait, median | {ms(r["server_queue_s_median"])} |
| single request alone (each input, first is warm-up) | {alone} |
| status counts | {", ".join(f"{k}: {v}" for k, v in r["status_counts"].items())} |
| answers equal to the single-request one | {r["equal_to_single_request"]} of {r["requests_done"]} |

p99 is nearest-rank (the {math.ceil(0.99 * r["requests_done"])}th of {r["requests_done"]} latencies
in order). The worker runs one edit at a time, so throughput is about 1 / edit time and latency
grows with the clients waiting in the queue.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--url", help="a server already running on loopback")
    g.add_argument("--engine-dir", type=Path, help="engines to serve (default: build tiny)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=24, help="in all, over every client")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--queue", type=int, default=8, help="queue of the server started here")
    p.add_argument("--timeout", type=float, default=300.0, help="per request, server and client")
    p.add_argument("--max-seconds", type=float, default=900.0, help="no request starts after")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--stem", default="loadtest_tiny")
    a = p.parse_args(argv)
    if not (1 <= a.clients <= 64 and 1 <= a.requests <= 1000 and a.max_seconds > 0):
        p.error("needs 1 ≤ clients ≤ 64, 1 ≤ requests ≤ 1000, max-seconds > 0")
    if a.url and urlsplit(a.url).hostname not in LOOPBACK:
        p.error(f"--url must be on loopback ({', '.join(LOOPBACK)}), got {a.url}")

    deadline = time.monotonic() + a.max_seconds
    with tempfile.TemporaryDirectory(prefix="adapedit-loadtest-") as tmp:
        proc = None
        url = a.url
        if url is None:
            engines = a.engine_dir or tiny_engines(Path(tmp))
            proc, url = start_server(engines, a.queue, a.timeout)
        try:
            health = json.loads(get_text(url, "/healthz"))
            record = {
                "date": time.strftime("%Y-%m-%d"),
                "machine": machine_info(),
                "url": url,
                "model": health["model"],
                "queue": health["queue_size"],
                "timeout_s": a.timeout,
                "server_started_here": proc is not None,
                "load": load(url, a.clients, a.requests, a.steps, a.timeout, deadline),
                "metrics": get_text(url, "/metrics"),
            }
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    write_results(a.out, a.stem, record, markdown(record))
    r = record["load"]
    return 0 if r["mismatches"] == 0 and r["status_counts"] == {"200": r["requests_done"]} else 1


if __name__ == "__main__":
    sys.exit(main())
