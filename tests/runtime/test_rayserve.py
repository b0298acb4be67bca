"""Serving on Ray Serve: the deployment's configuration, the editor over a deployment handle
(back-pressure, a replica that dies, cancellation) without a cluster, then a local cluster of two
CPU replicas on the tiny engines."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from adapedit.cli import main
from adapedit.config import EditConfig, SamplerConfig
from adapedit.errors import ConfigError
from adapedit.runtime.api import EditRequest, plain_edit
from adapedit.runtime.rayserve import BUILD_ARGS, RayEditor, ScaleOut, build, start, stop
from adapedit.runtime.server import Answer
from tests.runtime.test_server import events, image, request

JOB = EditRequest("a cat on a mat", "a black cat on a mat", EditConfig(), SamplerConfig(steps=1))
OK = Answer(200, {"done": True}, 0.1, "host:1")


def test_scale_out_is_checked():
    assert ScaleOut("eng").replicas == 1
    assert ScaleOut("eng", min_replicas=2, max_replicas=4).replicas == 2
    for bad in (
        {"replicas": 0},
        {"replicas": 1.5},
        {"min_replicas": 1},
        {"min_replicas": 3, "max_replicas": 2},
        {"replicas": 5, "min_replicas": 1, "max_replicas": 4},
        {"gpus_per_replica": -1},
        {"cpus_per_replica": "2"},
        {"queue_size": 0},
        {"timeout": -1.0},
    ):
        with pytest.raises(ConfigError):
            ScaleOut("eng", **bad)


def test_editor_options_are_ray_serves_back_pressure_and_autoscaling():
    fixed = ScaleOut("eng", replicas=3, queue_size=5, timeout=30, cpus_per_replica=2)
    assert fixed.editor_options(gpus=1) == {
        "max_ongoing_requests": 1,
        "max_queued_requests": 5,
        "ray_actor_options": {"num_cpus": 2, "num_gpus": 1},
        "graceful_shutdown_timeout_s": 30,
        "num_replicas": 3,
    }
    scaled = ScaleOut("eng", min_replicas=1, max_replicas=8).editor_options(gpus=0)
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 8,
        "target_ongoing_requests": 1,
    }
    assert fixed.describe() == "3 replicas"


def test_serve_hands_its_http_options_to_ray_serve_as_to_one_machine(tiny_engines, monkeypatch):
    """``--no-page``, ``--queue`` and ``--timeout`` reach the ingress's HTTP options (the page
    was served whatever ``--no-page`` said)."""
    started: list[ScaleOut] = []
    monkeypatch.setattr(
        "adapedit.runtime.rayserve.serve_ray", lambda config, **kw: started.append(config)
    )
    args = ["serve", "--engine-dir", str(tiny_engines), "--replicas", "2", "--quiet"]
    assert main([*args, "--no-page", "--queue", "3", "--timeout", "9"]) == 0
    assert main(args) == 0
    assert [(c.http.page, c.http.queue_size, c.http.timeout) for c in started] == [
        (False, 3, 9.0),
        (True, 8, 120.0),
    ]


def test_build_takes_the_fields_of_scale_out():
    app = build({"engine_dir": "/models/eng", "replicas": 2, "gpus_per_replica": 1})
    assert type(app).__name__ == "Application"
    assert "ort" not in BUILD_ARGS and "engine_dir" in BUILD_ARGS
    for bad in ({"engine_dir": "e", "replica": 2}, {"replicas": 2}, {"engine_dir": "e", "ort": {}}):
        with pytest.raises(ConfigError, match="application argument"):
            build(bad)


class Response:
    """A deployment response: ``outcome`` (an answer, or an exception raised when awaited);
    ``None``: never ready."""

    def __init__(self, outcome: Any) -> None:
        self.outcome, self.cancelled = outcome, False

    def __await__(self):
        if self.outcome is None:
            yield from asyncio.get_running_loop().create_future().__await__()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        self.cancelled = True


class Handle:
    """A deployment handle whose ``edit.remote`` calls give ``outcomes`` in turn."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes, self.calls = list(outcomes), []
        self.edit = self

    def remote(self, job: EditRequest) -> Response:
        self.calls.append(Response(self.outcomes.pop(0)))
        return self.calls[-1]


def test_ray_editor_sends_again_what_a_dead_replica_ran():
    handle = Handle(ActorDiedError(), ActorDiedError(), OK)
    editor = RayEditor(handle, queue_size=4)
    assert asyncio.run(editor.edit(JOB)) == OK
    assert len(handle.calls) == 3 and editor.in_flight == 0
    metrics = {m.name: m.samples[0].value for m in editor.collect()}
    assert metrics == {
        "adapedit_edits_in_flight": 0,
        "adapedit_queue_capacity": 4,
        "adapedit_edits_resent": 2,
    }


def test_ray_editor_answers_503_when_ray_serves_queue_is_full():
    editor = RayEditor(Handle(BackPressureError(4, 4)), queue_size=4)
    answer = asyncio.run(editor.edit(JOB))
    assert answer.status == 503 and "queue is full (4 waiting)" in answer.doc["error"]["message"]
    assert editor.health() == {"in_flight": 0, "queue_size": 4}


def test_ray_editor_cancels_the_call_past_the_deadline():
    handle = Handle(None)
    editor = RayEditor(handle, queue_size=4)

    async def past_deadline() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(editor.edit(JOB), 0.05)

    asyncio.run(past_deadline())
    assert handle.calls[0].cancelled and editor.in_flight == 0


@pytest.fixture()
def no_process_start(monkeypatch):
    """Starting Ray (``ray.init``) or any process (``subprocess.Popen``, what Ray starts its
    processes with) raises and is recorded in the list this returns; a refusal "before starting
    Ray" leaves it empty (the raise alone would be caught: the command's exit code 1). The test
    checks too that Ray is not initialised and that this process has no new child."""
    started: list[str] = []
    children = descendants(os.getpid())

    def ray_init(*args, **kwargs):
        started.append("ray.init")
        raise AssertionError("Ray was started before the command was refused")

    def popen(self, args, *rest, **kwargs):
        started.append(f"process {args!r}")
        raise AssertionError(f"a process was started before the command was refused: {args!r}")

    monkeypatch.setattr(ray, "init", ray_init)
    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    assert not ray.is_initialized()
    yield started
    assert not ray.is_initialized()
    assert descendants(os.getpid()) <= children, "a child process was started"


def serve_refused(args: list[str], started: list[str], capsys) -> str:
    """``adapedit serve ARGS`` is refused (exit code 2) with nothing started (``started`` from
    ``no_process_start``); its error message."""
    code = main(["serve", *args])
    err = capsys.readouterr().err
    assert started == [], f"started before the refusal: {started}; {err}"
    assert code == 2, err
    return err


def test_serve_refuses_bad_scale_out_options_before_starting_ray(
    tiny_engines, capsys, no_process_start
):
    engines = ["--engine-dir", str(tiny_engines)]

    def refused(*args: str) -> str:
        return serve_refused([*engines, *args], no_process_start, capsys)

    assert "replica counts do not fit" in refused("--replicas", "0")
    assert "both bounds" in refused("--max-replicas", "2")
    assert "needs a port number" in refused("--replicas", "1", "--port", "0")


@pytest.mark.parametrize("folder", ["empty", "not-an-engine-folder", "missing"])
def test_serve_refuses_an_engine_folder_it_cannot_load_before_any_process_starts(
    tiny_export, tmp_path, capsys, no_process_start, folder
):
    where = {
        "empty": tmp_path / "empty",
        "not-an-engine-folder": tiny_export[0],  # an export: ONNX graphs, but not built
        "missing": tmp_path / "missing",
    }[folder]
    (tmp_path / "empty").mkdir()
    args = ["--replicas", "2", "--engine-dir", str(where), "--quiet"]
    err = serve_refused(args, no_process_start, capsys)
    assert "not an engine folder" in err and f"where: {where}" in err, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def command(pid: int) -> str:
    """``pid``'s command line ('' once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_two_cpu_replicas_on_a_local_cluster(tiny_engines, tiny_session):
    config = ScaleOut(tiny_engines, replicas=2, queue_size=2, timeout=60)
    body = {"source": "a cat on a mat", "target": "a black cat on a mat", "steps": 4, "seed": 5}
    ref = plain_edit(tiny_session, body["source"], body["target"], steps=4, seed=5)
    init = {"num_cpus": 2, "include_dashboard": False, "object_store_memory": 100 << 20}
    processes: set[int] = set()
    # an earlier test's export workers leave multiprocessing's resource tracker under this
    # process until it exits: only what the cluster's start adds is the cluster's
    before = descendants(os.getpid())
    try:
        url = start(config, port=free_port(), init={**init, "log_to_driver": False})
        processes = descendants(os.getpid()) - before
        status, _, doc = request(url, "GET", "/healthz")
        assert status == 200 and {k: doc[k] for k in doc if k not in ("engine", "limits")} == {
            "status": "ok",
            "model": "tiny",
            "in_flight": 0,
            "queue_size": 2,
        }
        assert doc["engine"]["form"] == "segmented" and "max_image_body" in doc["limits"]
        status, _, doc = request(url, "POST", "/edit", {"source": body["source"]})
        assert status == 422 and doc["error"]["field"] == "target"

        # a burst of 10 at once: 2 running + 2 waiting fit, the others are answered 503
        barrier, answers = threading.Barrier(10), []

        def client() -> None:
            barrier.wait()
            answers.append(request(url, "POST", "/edit", body))

        threads = [threading.Thread(target=client) for _ in range(10)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        codes = sorted(status for status, _, _ in answers)
        assert len(codes) == 10 and set(codes) == {200, 503} and codes.count(200) >= 2, codes
        ok = [doc for status, _, doc in answers if status == 200]
        for doc in ok:
            assert np.array_equal(image(doc["source_png"]), ref["source_image"])
            assert np.array_equal(image(doc["edited_png"]), ref["edited_image"])
            assert doc["tau"] == ref["tau"] and doc["keywords"] == ref["keywords"]
        assert len({doc["server"]["worker"] for doc in ok}) == 2  # both replicas edited
        busy = [headers for status, headers, _ in answers if status == 503]
        assert all(headers["Retry-After"] == "1" for headers in busy)
        metrics = request(url, "GET", "/metrics")[2]
        assert f'adapedit_requests_total{{code="503",path="/edit"}} {len(busy)}.0' in metrics
        assert f'adapedit_requests_total{{code="200",path="/edit"}} {len(ok)}.0' in metrics
        # progress streamed from a replica through the ingress, then the same answer; the page
        status, _, found = events(url, {**body, "seed": 6})  # a new target: it calibrates
        assert [e["done"] for kind, e in found if kind == "progress"] == list(range(1, 9))
        assert found[-1][0] == "result"
        ref6 = plain_edit(tiny_session, body["source"], body["target"], steps=4, seed=6)
        assert np.array_equal(image(found[-1][1]["edited_png"]), ref6["edited_image"])
        assert "/static/app.js" in request(url, "GET", "/")[2]
    finally:
        stop(cluster=True)
    assert processes, "the cluster's processes were not found"
    # 120 s: once a process counted as the cluster's outlived 60 s, most likely the resource
    # tracker that is no longer counted (that message did not name it)
    end = time.monotonic() + 120
    while (left := [p for p in processes if alive(p)]) and time.monotonic() < end:
        time.sleep(0.5)
    assert not left, f"processes left behind: {[(p, command(p)) for p in left]}"


def test_a_replica_runs_every_edit_on_one_thread_of_its_own(monkeypatch):
    """ONNX Runtime's CUDA provider keeps CUDA graphs per thread: a replica's edits, plain or
    streamed, all run on the replica's one edit thread (``asyncio.to_thread`` took whichever
    thread of the loop's pool was free, and each new one captured every graph again)."""
    from adapedit.runtime import rayserve

    threads: list[str] = []

    def fake_run_edit(session, job, report=None):
        threads.append(threading.current_thread().name)
        if report is not None:
            report("progress")
        return f"answer to {job}"

    monkeypatch.setattr(rayserve, "open_session", lambda *a: "session")
    monkeypatch.setattr(rayserve, "run_edit", fake_run_edit)
    replica = rayserve.EditorReplica.func_or_class("engines", None, None)

    async def edits() -> list:
        answers = [await replica.edit(f"job {k}") for k in range(3)]
        answers += await asyncio.gather(*(replica.edit(f"job {k}") for k in range(3, 6)))
        streamed = [item async for item in replica.edit_stream("job 6")]
        return [*answers, streamed]

    answers = asyncio.run(edits())
    assert answers[:6] == [f"answer to job {k}" for k in range(6)]
    assert answers[6] == ["progress", "answer to job 6"]
    assert len(threads) == 7 and len(set(threads)) == 1
    assert threads[0].startswith("adapedit-edit")
