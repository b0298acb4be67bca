"""Native TensorRT: a builder from (fp16) ONNX of a static export as a strongly-typed network with
one optimisation profile and a timing cache shared by every graph, plans cached by (hash of the
graph and its weights, TensorRT version, GPU, profile, build recipe), and a runner that checks a
loaded plan's tensors against the manifest, binds aligned torch CUDA tensors with
``set_tensor_address`` and runs ``execute_async_v3`` on the runtime's stream and its own device,
with input shapes and output buffers set once per shape.

``tensorrt`` is imported lazily: this module imports on a machine without it, and everything but
``build_plan``/``TrtRunner.activate`` is plain Python (tested on the CPU). It is written against
the official Python API (TensorRT 10 and 11) and has not run on a GPU in this project yet.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch

from adapedit.engines.base import (
    TORCH_DTYPES,
    GraphSlots,
    Profile,
    Runner,
    eval_shape,
    ordered_with_caller,
)
from adapedit.engines.cache import PlanCache, PlanKey, graph_digest
from adapedit.errors import ConfigError, EngineError
from adapedit.io import atomic_write_bytes
from adapedit.spec import GraphSpec

log = logging.getLogger("adapedit.engines")


def _trt():
    try:
        import tensorrt
    except ImportError as e:
        raise EngineError(
            "TensorRT is not installed",
            where="adapedit.engines.trt",
            expected="the 'tensorrt' package (pip install 'adapedit[trt]') on a "
            "machine with an NVIDIA GPU",
            got=str(e),
        ) from e
    return tensorrt


@cache
def _logger():
    """One TensorRT logger per process (TensorRT keeps the first it is given and warns of any
    other)."""
    trt = _trt()
    return trt.Logger(trt.Logger.WARNING)


def profile_shapes(
    spec: GraphSpec, profile: Profile, vae_scale: int, unet_multiple: int
) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every input of a graph under a profile, from the manifest's
    symbolic shapes."""
    points = [profile.symbols(i, vae_scale, unet_multiple) for i in range(3)]
    return {t.name: tuple(eval_shape(t, p) for p in points) for t in spec.inputs}


def gpu_name() -> str:
    """The GPU a plan is built for, the current CUDA device (plans are not portable across GPU
    models)."""
    if not torch.cuda.is_available():
        return "no-gpu"
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return f"{p.name} sm{p.major}{p.minor}"


@dataclass(frozen=True)
class BuildRecipe:
    """How :func:`build_plan` builds a plan, beyond the graph and its profile: part of every
    plan's key, so a plan built another way (an older adapedit's flags, another workspace) is
    rebuilt, never loaded. Any change to the builder's network flags or config is a change here.

    Attributes:
        workspace_gib: the builder's workspace memory pool (GiB; tactics needing more are
            skipped).
        network: what the network and config are: strongly typed (the ONNX dtypes decide the
            precision), one optimisation profile, the builder's default optimisation level.
    """

    workspace_gib: float = 8.0
    network: str = "strongly typed; one optimization profile; default optimization level"

    def __post_init__(self) -> None:
        if not self.workspace_gib > 0:
            raise ConfigError(
                "the TensorRT workspace must be positive",
                where="BuildRecipe.workspace_gib",
                expected="GiB > 0",
                got=self.workspace_gib,
            )


def plan_key(
    onnx_path: Path, shapes: dict, version: str, gpu: str, recipe: BuildRecipe = BuildRecipe()
) -> PlanKey:
    """What a plan of ``onnx_path`` depends on: the graph and every weights file it reads (the
    shared ``unet/weights-*.bin`` of a static export too), TensorRT's version, the GPU, the
    profile's shapes and how it is built."""
    return PlanKey(
        graph_digest(onnx_path),
        version,
        gpu,
        json.dumps(shapes, sort_keys=True),
        json.dumps(asdict(recipe), sort_keys=True),
    )


def build_plan(
    onnx_path: Path,
    shapes: dict[str, tuple[tuple[int, ...], ...]],
    recipe: BuildRecipe = BuildRecipe(),
    *,
    timing_cache: Path | None = None,
) -> bytes:
    """Build a serialized plan from an ONNX file as ``recipe`` says: strongly typed (the ONNX
    dtypes decide the precision: fp16 ONNX → fp16 engine; TensorRT 11 has no FP16 flag), one
    profile. With
    ``timing_cache`` the build starts from the kernel timings stored there and adds its own
    (every graph of a folder shares one file: the UNet's segments time the same layers)."""
    trt = _trt()
    logger = _logger()
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(
            "TensorRT could not parse the ONNX graph",
            where=str(onnx_path),
            expected="a graph TensorRT supports",
            got=errors[:3],
        )
    shape_inputs = [
        network.get_input(i).name
        for i in range(network.num_inputs)
        if network.get_input(i).is_shape_tensor
    ]
    if shape_inputs:  # only a dynamic export passes shapes between graphs
        raise EngineError(
            "the graph takes shape tensors, which TensorRT needs values for",
            where=str(onnx_path),
            expected="a static export ('adapedit export --shapes static')",
            got=f"shape-tensor inputs {shape_inputs}",
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(
        trt.MemoryPoolType.WORKSPACE, int(recipe.workspace_gib * (1 << 30))
    )
    cache = None
    if timing_cache is not None:
        stored = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(stored)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise EngineError(
                "TensorRT refused the timing cache (another TensorRT or GPU wrote it?)",
                where=str(timing_cache),
                expected="a timing cache of this TensorRT and GPU",
                got="set_timing_cache returned False (delete the file to start a new one)",
            )
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        opt_profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(opt_profile) < 0:
        raise EngineError(
            "TensorRT refused the optimization profile",
            where=str(onnx_path),
            expected="a profile of the graph's inputs (min ≤ opt ≤ max, static dims as built)",
            got=str(shapes),
        )
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(
            "TensorRT failed to build the engine",
            where=str(onnx_path),
            expected="a serialized plan",
            got="None (see TensorRT's log)",
        )
    if cache is not None:
        atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(plan)


def build_cached(
    onnx_path: Path,
    spec: GraphSpec,
    profile: Profile,
    vae_scale: int,
    unet_multiple: int,
    cache: PlanCache,
    recipe: BuildRecipe = BuildRecipe(),
) -> Path:
    """The plan for one graph, from the cache or freshly built (stale/corrupt plans, and plans
    built by another recipe, rebuilt), with the cache's shared timing cache."""
    trt = _trt()
    shapes = profile_shapes(spec, profile, vae_scale, unet_multiple)
    gpu = gpu_name()
    key = plan_key(onnx_path, shapes, trt.__version__, gpu, recipe)
    timing = cache.timing_cache(trt.__version__, gpu)
    path, built = cache.get_or_build(
        key, lambda: build_plan(onnx_path, shapes, recipe, timing_cache=timing)
    )
    log.info("%s plan for %s: %s", "built" if built else "cached", onnx_path.name, path)
    return path


#: The ``tensorrt.DataType`` member of each manifest dtype.
_TRT_DTYPES = {
    "float32": "FLOAT",
    "float16": "HALF",
    "int64": "INT64",
    "int32": "INT32",
    "bool": "BOOL",
}

#: TensorRT requires every tensor address it is given to be aligned to this many bytes.
ALIGNMENT = 256


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor whose data starts on an :data:`ALIGNMENT`-byte boundary, on any
    device (a view into a slightly larger allocation)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = itemsize * int(torch.Size(shape).numel())
    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, device=device)
    skip = -raw.data_ptr() % ALIGNMENT
    return raw[skip : skip + nbytes].view(dtype).view(shape)


def capture_graph(enqueue, stream) -> torch.cuda.CUDAGraph:
    """``enqueue()`` captured as a CUDA graph on ``stream`` (a torch CUDA stream), in
    thread-local mode as trtexec captures (another thread's CUDA calls do not spoil it).

    Raises:
        EngineError: the enqueue failed, or the capture did (torch's error at the capture's
            end, which would otherwise hide the enqueue's).
    """
    graph = torch.cuda.CUDAGraph()
    ok = False
    try:
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            ok = enqueue()  # no raise in here: the capture must end before anything is said
    except RuntimeError as e:  # torch's, on ending a capture CUDA invalidated
        raise EngineError(
            "TensorRT's enqueue could not be captured as a CUDA graph",
            where="TrtRunner",
            expected="a capture (or the session's cuda_graphs off)",
            got=f"enqueue returned {ok}; {str(e).splitlines()[0]}",
        ) from e
    if not ok:
        raise EngineError(
            "TensorRT could not enqueue the engine inside a CUDA graph capture",
            where="TrtRunner",
            expected="execute_async_v3 to return True",
            got=False,
        )
    return graph


class TrtRunner(Runner):
    """One TensorRT engine; tensors are CUDA torch tensors, run with ``execute_async_v3`` on
    ``stream`` (default: the current torch stream).

    Input shapes and output buffers are set once per plan; each call binds the inputs. TensorRT
    reads only :data:`ALIGNMENT`-aligned, contiguous inputs on the device: any other input (a
    view such as ``ids.split(1)[1]``, a CPU tensor) is copied into a staging buffer of the
    runner's first, never handed over as it is, and every address or shape TensorRT refuses is
    an :class:`EngineError` naming the tensor. With ``cuda_graph`` each set of bound addresses
    (:class:`~adapedit.engines.base.GraphSlots`) runs once to warm up, is captured as a CUDA
    graph on its second call and replayed after that: new data at the same addresses (the fused
    UNet's fixed buffers) replays, a changed address captures a graph of its own.

    ``device`` is the CUDA device the engine runs on.
    """

    def __init__(
        self,
        plan_path: str | Path,
        spec: GraphSpec,
        name: str | None = None,
        *,
        stream: torch.cuda.Stream | None = None,
        cuda_graph: bool = False,
        device: torch.device | str = "cuda",
    ) -> None:
        super().__init__(spec, name or str(plan_path))
        self.plan_path = Path(plan_path)
        self.stream = stream
        self.cuda_graph = cuda_graph
        self.device = torch.device(device)
        self.engine = self.context = None
        self._slots = GraphSlots()
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._buffers: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self._staging: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}

    def _activate(self) -> None:
        trt = _trt()
        if self.device.type == "cuda" and self.device.index is None:
            # with its index: a tensor on cuda:0 compares unequal to a bare "cuda", and every
            # input would be staged (copied) on every call
            self.device = torch.device("cuda", torch.cuda.current_device())
        if not self.plan_path.is_file():
            raise EngineError(
                "engine plan is missing",
                where=str(self.plan_path),
                expected="a plan built by 'adapedit build --backend trt'",
                got="no such file",
            )
        with self._on_device():  # an engine belongs to the device current when it loads
            runtime = trt.Runtime(_logger())
            self.engine = runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
            if self.engine is None:
                raise EngineError(
                    "TensorRT could not load the plan (corrupt, or built for another TensorRT "
                    "or GPU)",
                    where=str(self.plan_path),
                    expected=f"a plan for {gpu_name()}",
                    got="deserialization failed",
                )
            self.context = self.engine.create_execution_context()
        try:
            if self.context is None:
                raise EngineError(
                    "TensorRT could not make an execution context (out of GPU memory?)",
                    where=str(self.plan_path),
                    expected="an execution context",
                    got="None",
                )
            self._check_tensors(trt)
        except EngineError:
            self.context = self.engine = None  # not active: nothing of the plan is kept
            raise
        if self.stream is None and self.device.type == "cuda":
            # a stream of its own: CUDA graphs cannot be captured on the default stream, and
            # TensorRT synchronises the device after each enqueue on it
            self.stream = torch.cuda.Stream(self.device)

    def _on_device(self):
        """The runner's CUDA device made current (TensorRT runs an engine on the device that
        was current when it was loaded, whatever device the caller has current)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()

    def _check_tensors(self, trt) -> None:
        """The plan's tensors as the manifest's graph has them: the same names, each an input
        or an output as in the graph, of its dtype and read from the device (a plan built from
        another export, or by a TensorRT that placed a tensor on the host, would otherwise run
        on buffers of the wrong size or kind)."""
        tensors = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        graph = {t.name for t in (*self.spec.inputs, *self.spec.outputs)}
        if tensors != graph:
            raise EngineError(
                "the plan's tensors are not the graph's (a plan built from another export?)",
                where=str(self.plan_path),
                expected=sorted(graph),
                got=sorted(tensors),
            )
        roles = [(trt.TensorIOMode.INPUT, t) for t in self.spec.inputs]
        roles += [(trt.TensorIOMode.OUTPUT, t) for t in self.spec.outputs]
        for mode, t in roles:
            want = (mode, getattr(trt.DataType, _TRT_DTYPES[t.dtype]), trt.TensorLocation.DEVICE)
            got = (
                self.engine.get_tensor_mode(t.name),
                self.engine.get_tensor_dtype(t.name),
                self.engine.get_tensor_location(t.name),
            )
            if got != want:
                raise EngineError(
                    f"the plan's tensor {t.name!r} is not the graph's (role, dtype, location)",
                    where=str(self.plan_path),
                    expected=", ".join(map(str, want)),
                    got=", ".join(map(str, got)),
                )

    def _deactivate(self) -> None:
        if self.stream is not None and self.device.type == "cuda":
            self.stream.synchronize()  # no work in flight on what is released
        self.context = self.engine = None
        self._buffers.clear()
        self._staging.clear()
        self._outputs = {}
        self._slots.clear()
        self._graphs.clear()

    def _plan(
        self,
        input_shapes: dict[str, tuple[int, ...]],
        output_shapes: dict[str, tuple[int, ...]],
    ) -> None:
        for name, shape in input_shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise EngineError(
                    f"TensorRT refused the shape of input {name!r}",
                    where=self.name,
                    expected="a shape inside the engine's optimisation profile",
                    got=list(shape),
                )
        outputs = {}
        for t in self.spec.outputs:
            shape = tuple(self.context.get_tensor_shape(t.name))
            if any(d < 0 for d in shape):  # known only after the run: no buffer to bind
                raise EngineError(
                    f"TensorRT gives output {t.name!r} a shape known only at run time",
                    where=self.name,
                    expected="every output's shape fixed by the input shapes (a static export)",
                    got=list(shape),
                )
            key = (t.name, shape)
            if key not in self._buffers:
                self._buffers[key] = aligned_empty(shape, TORCH_DTYPES[t.dtype], self.device)
            outputs[t.name] = self._buffers[key]
            self._bind(t.name, outputs[t.name])
        self._outputs = outputs
        self._staging.clear()

    def _bind(self, name: str, x: torch.Tensor) -> None:
        if not self.context.set_tensor_address(name, x.data_ptr()):
            raise EngineError(
                f"TensorRT refused the address of tensor {name!r}",
                where=self.name,
                expected=f"a {ALIGNMENT}-byte aligned device address",
                got=hex(x.data_ptr()),
            )

    def _input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` as TensorRT may read it: itself when it is aligned, contiguous and on the
        device; else a copy in the runner's staging buffer for ``name``."""
        if x.device == self.device and x.is_contiguous() and x.data_ptr() % ALIGNMENT == 0:
            return x
        buf = self._staging.get(name)
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
            buf = self._staging[name] = aligned_empty(tuple(x.shape), x.dtype, self.device)
        return buf.copy_(x)

    def _run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stage, bind and run on the runner's stream, ordered after the caller's stream (where
        the inputs were written) and before it (where the outputs are read), with events: no
        host wait."""
        if self.device.type != "cuda":  # the fake TensorRT of the CPU tests
            return self._enqueue(feeds, self.stream)
        with self._on_device(), ordered_with_caller(self.stream):
            return self._enqueue(feeds, self.stream)

    def _enqueue(self, feeds: dict[str, torch.Tensor], stream) -> dict[str, torch.Tensor]:
        bound = []
        for t in self.spec.inputs:
            x = self._input(t.name, feeds[t.name])
            self._bind(t.name, x)
            bound.append(x.data_ptr())

        def enqueue() -> bool:
            return self.context.execute_async_v3(stream.cuda_stream)

        if self.cuda_graph:
            addresses = (*bound, *(b.data_ptr() for b in self._outputs.values()))
            graph_id, runs = self._slots.slot(addresses)
            graph = self._graphs.get(graph_id)
            if graph is None and graph_id >= 0 and runs >= 1:  # warmed up: capture
                graph = self._graphs[graph_id] = capture_graph(enqueue, stream)
            if graph is not None:
                graph.replay()
                return self._outputs
        if not enqueue():
            raise EngineError(
                "TensorRT execution failed",
                where=self.name,
                expected="execute_async_v3 to return True",
                got=False,
            )
        return self._outputs
