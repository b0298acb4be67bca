"""Serving edits on Ray Serve, on one machine or a cluster (``adapedit serve --replicas N``;
needs ``pip install 'adapedit[serve]'``).

The HTTP application of :mod:`adapedit.runtime.server` is the ingress of a Ray Serve application
of two deployments:

- ``Ingress`` (one replica, no CPU reserved): the HTTP application. It parses and validates each
  request as it arrives (on a session of its own whose engines are never loaded: tokenizer,
  model and profile only), sends valid edits to the editors, answers 504 at the deadline (counted
  from the request's arrival, time waiting in Ray Serve's queue included) and keeps the metrics.
- ``Editor`` (``replicas``, or autoscaled between ``min_replicas`` and ``max_replicas``): each
  replica holds one :class:`~adapedit.runtime.session.EditSession` with its engines loaded
  (``num_gpus=1`` per replica where the cluster has GPUs, CPU otherwise) and runs one edit at a
  time (``max_ongoing_requests=1``). Edits wait in Ray Serve's queue at the ingress
  (``max_queued_requests`` = the queue size; one more is answered 503 at once) until a replica
  is free.

A replica that dies (its process killed, its node lost) is replaced by Ray Serve; an edit it was
running is sent again to another replica while the deadline allows (an edit is deterministic and
has no side effect), so its client gets its answer or a 504, not a dropped connection.

:func:`build` is the application builder for a Ray Serve config file or a KubeRay ``RayService``
(``import_path: adapedit.runtime.rayserve:build``, ``args``: the fields of :class:`ScaleOut`);
``deploy/`` has a documented example.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from adapedit.config import DEFAULT_CACHE_BYTES
from adapedit.errors import ConfigError
from adapedit.pipelines.pipeline import Progress, ProgressCallback
from adapedit.runtime.api import EditRequest
from adapedit.runtime.server import (
    Answer,
    HttpOptions,
    create_app,
    exit_on_sigterm,
    open_session,
    queue_full,
    run_edit,
    with_progress,
)

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.handle import DeploymentHandle
    from starlette.applications import Starlette

    from adapedit.engines.ort import OrtOptions

log = logging.getLogger("adapedit.rayserve")

APP_NAME = "adapedit"
#: HTTP requests the ingress holds at once (edits waiting for an editor included); beyond, they
#: wait in Ray Serve's proxy.
INGRESS_MAX_ONGOING = 1024


@dataclass(frozen=True)
class ScaleOut:
    """A Ray Serve deployment of an engine folder.

    Args:
        engine_dir: the engine folder (``adapedit build``), at this path on every node.
        replicas: editor replicas, one session each (with autoscaling: at start; default
            ``min_replicas``, else 1).
        min_replicas / max_replicas: autoscaling bounds (both or neither); Ray Serve adds
            replicas while more than one edit per replica is running or waiting.
        gpus_per_replica: GPUs reserved by each replica (default: 1 where the cluster has
            GPUs, else 0).
        cpus_per_replica: CPUs reserved by each replica.
        queue_size: edits that may wait at the ingress; one more is answered 503.
        timeout: seconds from a request's arrival to its answer; later, 504.
        ort: ONNX Runtime options overriding the engine folder's (not in :func:`build` args).
        calibration_cache: each replica's calibration cache bound in bytes (None: none); a
            replica keeps its own.
        page: serve the playground page at ``GET /`` (False: the API only).
    """

    engine_dir: str
    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    gpus_per_replica: float | None = None
    cpus_per_replica: float = 1.0
    queue_size: int = 8
    timeout: float = 120.0
    ort: OrtOptions | None = None
    calibration_cache: int | None = DEFAULT_CACHE_BYTES
    page: bool = True

    http: HttpOptions = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "engine_dir", str(self.engine_dir))
        autoscaled = (self.min_replicas, self.max_replicas) != (None, None)
        if autoscaled and None in (self.min_replicas, self.max_replicas):
            raise ConfigError(
                "autoscaling needs both bounds",
                where="ScaleOut",
                expected="min_replicas and max_replicas, or neither",
                got={"min_replicas": self.min_replicas, "max_replicas": self.max_replicas},
            )
        if self.replicas is None:
            object.__setattr__(self, "replicas", max(1, self.min_replicas or 0))
        n = self.replicas
        lo, hi = (self.min_replicas, self.max_replicas) if autoscaled else (n, n)
        if not all(type(v) is int for v in (lo, n, hi)) or not (0 <= lo <= n <= hi and n >= 1):
            raise ConfigError(
                "replica counts do not fit",
                where="ScaleOut",
                expected="integers, 0 ≤ min_replicas ≤ replicas ≤ max_replicas, replicas ≥ 1",
                got={"min_replicas": lo, "replicas": n, "max_replicas": hi},
            )
        for name in ("gpus_per_replica", "cpus_per_replica"):
            value = getattr(self, name)
            if value is not None and (type(value) not in (int, float) or value < 0):
                raise ConfigError(f"{name} must be a number ≥ 0", where="ScaleOut", got=value)
        object.__setattr__(
            self,
            "http",
            HttpOptions(queue_size=self.queue_size, timeout=self.timeout, page=self.page),
        )

    def editor_options(self, gpus: float) -> dict[str, Any]:
        """``Deployment.options`` of the editors with ``gpus`` per replica."""
        options: dict[str, Any] = {
            "max_ongoing_requests": 1,  # one edit at a time per session; the others wait in Ray
            "max_queued_requests": self.queue_size,
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": gpus},
            "graceful_shutdown_timeout_s": self.timeout,  # a running edit may finish
        }
        if self.max_replicas is None:
            options["num_replicas"] = self.replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "initial_replicas": self.replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": 1,
            }
        return options

    def describe(self) -> str:
        """``N replicas`` or ``A–B replicas (autoscaled)``."""
        if self.max_replicas is None:
            return f"{self.replicas} replica{'s' * (self.replicas != 1)}"
        return f"{self.min_replicas}–{self.max_replicas} replicas (autoscaled)"


class RayEditor:
    """The application's :class:`~adapedit.runtime.server.Editor` over the ``Editor``
    deployment: Ray Serve queues each edit (503 past ``queue_size``) and routes it to a free
    replica; an edit whose replica died is sent again. Cancelling :meth:`edit` cancels the call
    (a waiting edit is dropped). With ``progress``, the replica streams each
    :class:`~adapedit.pipelines.pipeline.Progress` back before the answer."""

    def __init__(self, handle: DeploymentHandle, queue_size: int) -> None:
        self.handle, self.queue_size = handle, queue_size
        self.in_flight = 0
        self.resent = 0

    async def edit(self, job: EditRequest, progress: ProgressCallback | None = None) -> Answer:
        self.in_flight += 1
        try:
            while True:
                stream = progress is not None
                call = self.handle.options(stream=True).edit_stream if stream else self.handle.edit
                response = call.remote(job)
                try:
                    if not stream:
                        return await response
                    async for item in response:
                        if isinstance(item, Answer):
                            return item
                        progress(item)
                except BackPressureError:
                    return queue_full(self.queue_size)
                except RayActorError as e:
                    log.warning("an editor replica died during an edit; sending it again: %s", e)
                    self.resent += 1
                except asyncio.CancelledError:
                    response.cancel()
                    raise
        finally:
            self.in_flight -= 1

    def health(self) -> dict[str, Any]:
        return {"in_flight": self.in_flight, "queue_size": self.queue_size}

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "adapedit_edits_in_flight",
            "Edits sent to the editor replicas and not answered yet (running or waiting).",
            value=self.in_flight,
        )
        yield GaugeMetricFamily(
            "adapedit_queue_capacity",
            "Edits that may wait for an editor replica; more get 503.",
            value=self.queue_size,
        )
        yield CounterMetricFamily(
            "adapedit_edits_resent",
            "Edits sent again to another replica after theirs died.",
            value=self.resent,
        )


@serve.deployment(name="Editor")
class EditorReplica:
    """One session, engines loaded at start; its edits run one at a time, always on the same
    thread (as ``adapedit serve`` runs them): ONNX Runtime's CUDA provider keeps its CUDA graphs
    and library handles per thread, so a new thread would capture every graph again."""

    def __init__(
        self, engine_dir: str, ort: OrtOptions | None, calibration_cache: int | None
    ) -> None:
        self.session = open_session(engine_dir, ort, calibration_cache)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapedit-edit")

    def _run(self, job: EditRequest, report: ProgressCallback | None = None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._pool, run_edit, self.session, job, report)

    async def edit(self, job: EditRequest) -> Answer:
        """The answer to one job (see :func:`~adapedit.runtime.server.run_edit`)."""
        return await self._run(job)

    async def edit_stream(self, job: EditRequest) -> AsyncIterator[Progress | Answer]:
        """Each :class:`~adapedit.pipelines.pipeline.Progress` of one job, then its answer."""
        async for item in with_progress(lambda report: self._run(job, report)):
            yield item


@serve.deployment(
    name="Ingress", max_ongoing_requests=INGRESS_MAX_ONGOING, ray_actor_options={"num_cpus": 0}
)
@serve.ingress()
class Ingress:
    """The HTTP application, with the ``Editor`` deployment as its editor."""

    def __init__(self, editor: DeploymentHandle, config: ScaleOut) -> None:
        from adapedit.runtime.session import EditSession

        # checks only: the ingress has no GPU (Ray hides every GPU from an actor asking none)
        self.session = EditSession(config.engine_dir, ort=config.ort, checks_only=True)
        self.editor = RayEditor(editor, config.queue_size)
        self.http = config.http

    def __serve_build_asgi_app__(self) -> Starlette:
        return create_app(self.session, self.editor, self.http)


def application(config: ScaleOut) -> Application:
    """The Ray Serve application of ``config`` (bound, not running). With
    ``gpus_per_replica=None``, asks the cluster this process is connected to for GPUs."""
    gpus = config.gpus_per_replica
    if gpus is None:
        gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    editor = EditorReplica.options(**config.editor_options(gpus))
    return Ingress.bind(
        editor.bind(config.engine_dir, config.ort, config.calibration_cache), config
    )


BUILD_ARGS = tuple(f.name for f in fields(ScaleOut) if f.init and f.name != "ort")


def build(args: Mapping[str, Any]) -> Application:
    """Application builder of Ray Serve config files and KubeRay (``import_path:
    adapedit.runtime.rayserve:build``): ``args`` are the fields of :class:`ScaleOut` but
    ``ort`` (the engine folder's own ONNX Runtime options apply).

    Raises:
        ConfigError: an unknown argument, a missing ``engine_dir``, a value :class:`ScaleOut`
            refuses.
    """
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown or "engine_dir" not in args:
        raise ConfigError(
            "unknown or missing application argument",
            where="adapedit.runtime.rayserve:build",
            expected=f"engine_dir and any of {list(BUILD_ARGS[1:])}",
            got=unknown or "no engine_dir",
        )
    return application(ScaleOut(**args))


def start(
    config: ScaleOut,
    *,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    init: Mapping[str, Any] | None = None,
) -> str:
    """Connect to the Ray cluster at ``address`` (default: start a local one here), start Ray
    Serve's HTTP proxy on ``host:port``, deploy the application (``adapedit``, at ``/``) and wait
    until every replica is up; returns its URL. ``init``: more arguments of ``ray.init``. Undo
    with :func:`stop`, also after a failure.

    Raises:
        ConfigError: port 0 (Ray Serve needs a port number).
        ManifestError / EngineError: without ``address``, an engine folder that cannot be
            loaded (checked before any process starts).
    """
    if port == 0:
        raise ConfigError(
            "Ray Serve needs a port number", where="adapedit serve", expected="1–65535", got=0
        )
    if address is None:
        from adapedit.engines.folder import load_engine_folder

        load_engine_folder(Path(config.engine_dir))
    ray.init(address=address or "local", **(init or {}))
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(config), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop(*, cluster: bool) -> None:
    """Undo :func:`start`: remove the application, or with ``cluster`` (a local cluster that
    :func:`start` started) shut Ray Serve and the cluster down; then disconnect."""
    if not ray.is_initialized():
        return
    if cluster:
        serve.shutdown()
    else:
        serve.delete(APP_NAME)
    ray.shutdown()


def serve_ray(
    config: ScaleOut,
    *,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    quiet: bool = False,
) -> None:
    """:func:`start`, print the URL (``serving http://HOST:PORT …``), serve until interrupted
    (Ctrl-C or SIGTERM), then :func:`stop`."""
    try:
        url = start(
            config, address=address, host=host, port=port, init={"log_to_driver": not quiet}
        )
        exit_on_sigterm()  # after ray.init, which installs a SIGTERM handler that aborts
        print(
            f"serving {url} (Ray Serve, {config.describe()}, engines {config.engine_dir}, "
            f"queue {config.queue_size}, timeout {config.timeout:g} s)",
            flush=True,
        )
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(cluster=address is None)
