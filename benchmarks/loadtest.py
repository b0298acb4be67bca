"""Load test of ``adapedit serve`` on loopback: N concurrent clients, M requests in all; with
``--replicas``, on Ray Serve, optionally killing one replica's process mid-load.

Starts ``adapedit serve`` on an engine folder (``--engine-dir``, or the tiny model exported and
built into a temporary folder) on 127.0.0.1 (uvicorn, any free port; with ``--replicas N``, Ray
Serve on a local cluster with N replicas), or uses a server already running on loopback
(``--url``). First sends each distinct request alone (the single-request results, and the
warm-up), then M requests from N client threads, cycling through the same inputs, and checks that
every 200 equals the single-request answer for its inputs (both images pixel for pixel, τ,
τ_self, keywords). With ``--kill-after S`` (a server started here with ``--replicas`` ≥ 2), S
seconds into the concurrent phase the process of the replica that answered last is killed
(SIGKILL); then the run checks that a new replica answers. Records throughput, p50/p99 latency,
status counts, requests lost (no HTTP status: a dropped connection or a client timeout) and
mismatches in ``benchmarks/results/<stem>.json`` and ``.md``. Bounded: at most ``--max-seconds``
(no request is started after it), at most 1000 requests and 64 clients; the server it started is
stopped at the end. Exits 1 if an answer differs from the single-request one, or if any answer is
not 200 (with ``--kill-after``: if a request is lost, answered other than 200/503/504, or no new
replica answered).

    python -m benchmarks.loadtest --clients 4 --requests 24 --steps 4
    python -m benchmarks.loadtest --replicas 2 --threads 1 --kill-after 5 --requests 60 \\
        --timeout 60 --stem loadtest_tiny_ray_fault
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import math
import os
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
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


def mixed_jobs(targets: int) -> list[dict[str, Any]]:
    """``targets`` distinct (prompt pair, seed) edits, each also asked again with edit-side
    options changed (λ_S, λ_τ: the calibration cache's case); the fixed three with 0."""
    if targets == 0:
        return [dict(job) for job in JOBS]
    jobs = []
    for i in range(targets):
        job = {**JOBS[i % len(JOBS)], "seed": 100 + i}
        jobs += [job, {**job, "lambda_s": 0.5, "lambda_tau": 2.0}]
    return jobs


class RssSampler:
    """The resident memory of process ``pid`` (``/proc/PID/status``, VmRSS) every ``every``
    seconds, in a thread, as (monotonic time, MB) pairs."""

    def __init__(self, pid: int, every: float = 2.0) -> None:
        self.pid, self.every, self.samples = pid, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.samples.append((time.monotonic(), int(line.split()[1]) / 1024))
            except OSError:
                return
            self._stop.wait(self.every)

    def stop(self, warm_at: float | None) -> dict[str, Any]:
        """Stop; the samples and a summary: RSS when the warm-up ended, at the end, the most
        after the warm-up, and growth after the warm-up (MB)."""
        self._stop.set()
        self._thread.join()
        after = [mb for t, mb in self.samples if warm_at is not None and t >= warm_at]
        t0 = self.samples[0][0] if self.samples else 0.0
        out: dict[str, Any] = {"every_s": self.every}
        out["samples"] = [[round(t - t0, 1), round(mb, 1)] for t, mb in self.samples]
        if after:
            out.update(
                after_warmup_mb=after[0],
                end_mb=after[-1],
                max_after_warmup_mb=max(after),
                growth_after_warmup_mb=max(after) - after[0],
            )
        return out


FAULT_OK = {"200", "503", "504"}  # what a request may get while a replica is killed
REPLACEMENT_S = 180.0  # how long a new replica may take to answer after the kill


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    engine_dir: Path,
    queue: int,
    timeout: float,
    replicas: int | None,
    threads: int | None,
    cache_mb: float | None = None,
) -> tuple[subprocess.Popen, str]:
    """``adapedit serve`` on 127.0.0.1 (uvicorn, any free port; with ``replicas``, Ray Serve on a
    local cluster and a free port picked here); (process, URL) once it serves."""
    cmd = [
        *(sys.executable, "-m", "adapedit.cli", "serve", "--engine-dir", str(engine_dir)),
        *("--port", str(free_port() if replicas else 0), "--queue", str(queue)),
        *("--timeout", str(timeout), "--quiet"),
        *(("--replicas", str(replicas)) if replicas else ()),
        *(("--threads", str(threads)) if threads else ()),
        *(("--calibration-cache-mb", str(cache_mb)) if cache_mb is not None else ()),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    end, line = time.monotonic() + 300, ""
    while not line.startswith("serving http://"):
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
        line = proc.stdout.readline() if ready else ""
        if not line and (not ready or proc.poll() is not None):
            proc.kill()
            raise SystemExit(f"the server did not start: {' '.join(cmd)}")
    return proc, line.split()[1]


def kill_replica(worker: str) -> None:
    """SIGKILL the process ``host:pid`` of a replica on this machine."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname():
        raise SystemExit(f"the replica to kill, {worker}, is not on this machine")
    os.kill(int(pid), signal.SIGKILL)


def await_replacement(
    url: str, jobs: list[dict[str, Any]], known: set[str], timeout: float, end: float
) -> str | None:
    """Pairs of concurrent requests until a replica not in ``known`` answers (or ``end``)."""
    while time.monotonic() < end:
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda job: post_edit(url, job, timeout), jobs[:2]))
        new = {doc["server"]["worker"] for status, doc, _ in answers if status == 200} - known
        if new:
            return min(new)
        time.sleep(1.0)
    return None


def load(
    url: str,
    clients: int,
    requests: int,
    steps: int,
    timeout: float,
    deadline: float,
    kill_after: float | None = None,
    targets: int = 0,
) -> dict[str, Any]:
    """Single-request answers first, then the concurrent phase (killing a replica
    ``kill_after`` seconds into it, if given); the record. Clients wait ``timeout`` + 30 s.
    ``targets``: the inputs of :func:`mixed_jobs` instead of the fixed three."""
    jobs = [{**job, "steps": steps} for job in mixed_jobs(targets)]
    reference, alone_s, known = [], [], set()
    for job in jobs:
        status, doc, seconds = post_edit(url, job, timeout + 30)
        if status != 200:
            raise SystemExit(f"single request failed with {status}: {doc}")
        reference.append(decoded(doc))
        alone_s.append(seconds)
        known.add(doc["server"]["worker"])

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
                status, doc, seconds = post_edit(url, jobs[k], timeout + 30)
            except (OSError, http.client.HTTPException) as e:
                status, doc, seconds = 0, {"error": repr(e)}, float("nan")
            row = {"index": i, "job": k, "status": status, "latency_s": seconds}
            if status == 200:
                row["equal"] = same(decoded(doc), reference[k])
                row["calibration"] = doc.get("calibration")
                row["server_edit_s"] = doc["timings_s"]["total"]
                row["server_queue_s"] = doc["server"]["queue_s"]
                row["worker"] = doc["server"]["worker"]
            row["done_s"] = time.perf_counter() - t
            with lock:
                results.append(row)

    fault: dict[str, Any] = {}

    def killer() -> None:
        time.sleep(kill_after)
        with lock:
            answered = [r["worker"] for r in results if "worker" in r]
            known.update(answered)
            fault["killed"] = (answered or sorted(known))[-1]
            fault["killed_at_s"] = time.perf_counter() - t
            fault["replicas_before"] = sorted(known)
        kill_replica(fault["killed"])

    warm_at = time.monotonic()
    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    if kill_after is not None:
        threads.append(threading.Thread(target=killer))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    if fault:
        after = [r for r in results if r.get("worker", fault["killed"]) not in known]
        new = min(after, key=lambda r: r["done_s"]) if after else None
        fault["replacement"] = new["worker"] if new else None
        fault["replacement_answered_s"] = new["done_s"] - fault["killed_at_s"] if new else None
        if new is None:
            end = time.monotonic() + REPLACEMENT_S
            fault["replacement"] = await_replacement(url, jobs, known, timeout + 30, end)
            if fault["replacement"] is not None:
                fault["replacement_answered_s"] = time.perf_counter() - t - fault["killed_at_s"]

    ok = [r for r in results if r["status"] == 200]
    latencies = [r["latency_s"] for r in ok]
    return {
        "clients": clients,
        "requests_asked": requests,
        "requests_done": len(results),
        "distinct_inputs": len(jobs),
        "warmup_done_monotonic": warm_at,
        "calibration_counts": dict(Counter(r.get("calibration") for r in ok)),
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
        "lost": sum(r["status"] == 0 for r in results),
        "equal_to_single_request": sum(r.get("equal", False) for r in ok),
        "mismatches": sum(not r["equal"] for r in ok),
        "workers": sorted({r["worker"] for r in ok}),
        "fault": fault or None,
        "requests": sorted(results, key=lambda r: r["index"]),
    }


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.0f} ms"


def _fault_rows(r: dict[str, Any]) -> str:
    f = r["fault"]
    if f is None:
        return ""
    killed = f"`{f['killed']}`, {f['killed_at_s']:.1f} s into the load"
    new = "**none answered**"
    if f["replacement"]:
        new = (
            f"`{f['replacement']}`, first answer {f['replacement_answered_s']:.1f} s after the kill"
        )
    return f"""| replica killed (SIGKILL) | {killed} |
| replicas before the kill | {", ".join(f"`{w}`" for w in f["replicas_before"])} |
| edits sent again to another replica (`adapedit_edits_resent_total`) | {f["resent"]} |
| new replica | {new} |
"""


def _rss_rows(record: dict[str, Any]) -> str:
    m = record.get("server_rss")
    if not m or "end_mb" not in m:
        return ""
    values = " / ".join(f"{m[k]:.0f}" for k in ("after_warmup_mb", "end_mb", "max_after_warmup_mb"))
    bound = record["cache_mb"] or "the default"
    return (
        f"| server RSS after warm-up / at the end / most after warm-up | {values} MB (sampled "
        f"every {m['every_s']:g} s; calibration cache bound {bound} MB) |\n"
        f"| server RSS growth after warm-up | {m['growth_after_warmup_mb']:.1f} MB |\n"
    )


def markdown(record: dict[str, Any]) -> str:
    r, lat, ms = record["load"], record["load"]["latency_s"], _ms
    alone = ", ".join(ms(s) for s in r["single_request_s"])
    if not record["server_started_here"]:
        server = f"{record['url']} (model `{record['model']}`, queue {record['queue']})"
    else:
        where = (
            f"Ray Serve on a local cluster, {record['replicas']} editor replicas (one process, "
            "one session and one edit at a time each)"
            if record["replicas"]
            else "uvicorn, one worker thread"
        )
        threads = f", ONNX Runtime threads {record['threads']}" if record["threads"] else ""
        if record["omp_num_threads"]:
            threads += f", OMP_NUM_THREADS={record['omp_num_threads']}"
        server = (
            f"`adapedit serve` started here on ONNX Runtime CPU engines of the "
            f"`{record['model']}` model: {where}; queue {record['queue']}, timeout "
            f"{record['timeout_s']:g} s{threads}"
        )
    load_avg = ", ".join(f"{x:.1f}" for x in record["load_average"])
    n_ok = r["status_counts"].get("200", 0)
    return f"""# Load test: `adapedit serve`, {record["model"]} model

Measured {record["date"]} on {record["machine"]["description"]} (CPU only); server and clients
on the same machine, over loopback. Load average (1, 5, 15 min) when it started: {load_avg}.

- Server: {server}.
- Edits: {"×".join(map(str, r["image_hw"]))} px, DDIM, {r["steps"]} steps, FWT + DPS (calibration
  pass and edit pass), {r["distinct_inputs"]} distinct inputs cycled.
- Load: {r["clients"]} concurrent clients, {r["requests_done"]} requests in all (one connection
  each), wall {r["wall_s"]:.1f} s.

| | |
|---|---|
| throughput (200s) | {r["throughput_rps"]:.2f} requests/s |
| latency p50 / p99 / max (client, 200s) | {ms(lat["p50"])} / {ms(lat["p99"])} / {ms(lat["max"])} |
| server edit time, median | {ms(r["server_edit_s_median"])} |
| server queue wait, median | {ms(r["server_queue_s_median"])} |
| single request alone (each input, first is warm-up) | {alone} |
| status counts | {", ".join(f"{k}: {v}" for k, v in r["status_counts"].items())} |
| lost (no HTTP status) | {r["lost"]} |
| 200s equal to the single-request answer | {r["equal_to_single_request"]} of {n_ok} |
| processes that answered | {", ".join(f"`{w}`" for w in r["workers"])} |
| calibration (200s) | {", ".join(f"{k}: {v}" for k, v in r["calibration_counts"].items())} |
{_rss_rows(record)}{_fault_rows(r)}
p99 is nearest-rank (the {math.ceil(0.99 * r["requests_done"])}th of {r["requests_done"]} latencies
in order). Each session runs one edit at a time, so throughput is about replicas / edit time and
latency grows with the clients waiting in the queue.
"""


def passed(r: dict[str, Any]) -> bool:
    """Every 200 equal to the single-request answer, and every request answered 200 (with a
    fault: none lost, only 200/503/504, and a new replica answered)."""
    if r["mismatches"]:
        return False
    if r["fault"] is None:
        return r["status_counts"] == {"200": r["requests_done"]}
    return (
        r["lost"] == 0 and set(r["status_counts"]) <= FAULT_OK and bool(r["fault"]["replacement"])
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--url", help="a server already running on loopback")
    g.add_argument("--engine-dir", type=Path, help="engines to serve (default: build tiny)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=24, help="in all, over every client")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--queue", type=int, default=8, help="queue of the server started here")
    p.add_argument("--timeout", type=float, default=300.0, help="per request (clients: + 30 s)")
    p.add_argument("--replicas", type=int, default=None, help="serve on Ray Serve, N replicas")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per session")
    p.add_argument(
        "--kill-after", type=float, default=None, help="seconds into the load; kill a replica"
    )
    p.add_argument("--max-seconds", type=float, default=900.0, help="no request starts after")
    p.add_argument(
        "--targets",
        type=int,
        default=0,
        help="N distinct targets, each also re-asked with edit-side options changed (default: "
        "the fixed three inputs)",
    )
    p.add_argument(
        "--cache-mb", type=float, default=None, help="the server's calibration cache bound"
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--stem", default="loadtest_tiny")
    a = p.parse_args(argv)
    if not (1 <= a.clients <= 64 and 1 <= a.requests <= 10000 and a.max_seconds > 0):
        p.error("needs 1 ≤ clients ≤ 64, 1 ≤ requests ≤ 10000, max-seconds > 0")
    if not 0 <= a.targets <= 500:
        p.error("needs 0 ≤ targets ≤ 500")
    if a.url and urlsplit(a.url).hostname not in LOOPBACK:
        p.error(f"--url must be on loopback ({', '.join(LOOPBACK)}), got {a.url}")
    if a.kill_after is not None and (a.url or (a.replicas or 0) < 2):
        p.error("--kill-after needs a server started here with --replicas 2 or more")

    deadline = time.monotonic() + a.max_seconds
    with tempfile.TemporaryDirectory(prefix="adapedit-loadtest-") as tmp:
        proc = None
        url = a.url
        if url is None:
            engines = a.engine_dir or tiny_engines(Path(tmp))
            proc, url = start_server(engines, a.queue, a.timeout, a.replicas, a.threads, a.cache_mb)
        rss = RssSampler(proc.pid) if proc is not None and not a.replicas else None
        try:
            health = json.loads(get_text(url, "/healthz"))
            record = {
                "date": time.strftime("%Y-%m-%d"),
                "machine": machine_info(),
                "load_average": os.getloadavg(),
                "url": url,
                "model": health["model"],
                "queue": health["queue_size"],
                "timeout_s": a.timeout,
                "server_started_here": proc is not None,
                "replicas": a.replicas,
                "threads": a.threads,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "load": load(
                    url,
                    a.clients,
                    a.requests,
                    a.steps,
                    a.timeout,
                    deadline,
                    a.kill_after,
                    a.targets,
                ),
                "metrics": get_text(url, "/metrics"),
                "cache_mb": a.cache_mb,
            }
            if rss is not None:
                record["server_rss"] = rss.stop(record["load"]["warmup_done_monotonic"])
            if fault := record["load"]["fault"]:
                resent = re.search(r"^adapedit_edits_resent_total (\S+)$", record["metrics"], re.M)
                fault["resent"] = int(float(resent.group(1))) if resent else None
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    write_results(a.out, a.stem, record, markdown(record))
    return 0 if passed(record["load"]) else 1


if __name__ == "__main__":
    sys.exit(main())
