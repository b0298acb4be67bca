"""Native TensorRT: a builder from (fp16) ONNX as a strongly-typed network with one optimisation
profile, plans cached by (ONNX hash, TensorRT version, GPU, profile), and a runner that binds
torch CUDA tensors with ``set_tensor_address`` and runs ``execute_async_v3`` on the runtime's
stream, with input shapes and output buffers set once per shape.

``tensorrt`` is imported lazily: this module imports on a machine without it, and everything but
``build_plan``/``TrtRunner.activate`` is plain Python (tested on the CPU). It is written against
the official Python API (TensorRT 10 and 11) and has not run on a GPU in this project yet.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from adapedit.engines.base import TORCH_DTYPES, Profile, Runner, eval_shape
from adapedit.engines.cache import PlanCache, PlanKey, file_digest
from adapedit.errors import EngineError
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


def profile_shapes(
    spec: GraphSpec, profile: Profile, vae_scale: int, unet_multiple: int
) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every input of a graph under a profile, from the manifest's
    symbolic shapes."""
    points = [profile.symbols(i, vae_scale, unet_multiple) for i in range(3)]
    return {t.name: tuple(eval_shape(t, p) for p in points) for t in spec.inputs}


def gpu_name() -> str:
    """The GPU a plan is built for (plans are not portable across GPU models)."""
    if not torch.cuda.is_available():
        return "no-gpu"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name} sm{p.major}{p.minor}"


def plan_key(onnx_path: Path, shapes: dict, version: str, gpu: str) -> PlanKey:
    return PlanKey(file_digest(onnx_path), version, gpu, json.dumps(shapes, sort_keys=True))


def build_plan(
    onnx_path: Path, shapes: dict[str, tuple[tuple[int, ...], ...]], workspace_gb: float = 8.0
) -> bytes:
    """Build a serialized plan from an ONNX file: strongly typed (the ONNX dtypes decide the
    precision: fp16 ONNX → fp16 engine; TensorRT 11 has no FP16 flag), one profile."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
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
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(
            "TensorRT failed to build the engine",
            where=str(onnx_path),
            expected="a serialized plan",
            got="None (see TensorRT's log)",
        )
    return bytes(plan)


def build_cached(
    onnx_path: Path,
    spec: GraphSpec,
    profile: Profile,
    vae_scale: int,
    unet_multiple: int,
    cache: PlanCache,
) -> Path:
    """The plan for one graph, from the cache or freshly built (stale/corrupt plans rebuilt)."""
    trt = _trt()
    shapes = profile_shapes(spec, profile, vae_scale, unet_multiple)
    key = plan_key(onnx_path, shapes, trt.__version__, gpu_name())
    path, built = cache.get_or_build(key, lambda: build_plan(onnx_path, shapes))
    log.info("%s plan for %s: %s", "built" if built else "cached", onnx_path.name, path)
    return path


class TrtRunner(Runner):
    """One TensorRT engine; tensors are CUDA torch tensors, run with ``execute_async_v3`` on
    ``stream`` (default: the current torch stream). Input shapes and output buffers are set
    once per plan; each call sets the input addresses and enqueues. With ``cuda_graph`` the
    enqueue is captured as a CUDA graph on the second call and replayed while the inputs stay at
    the same addresses (the fused UNet's fixed buffers)."""

    def __init__(
        self,
        plan_path: str | Path,
        spec: GraphSpec,
        name: str | None = None,
        *,
        stream: torch.cuda.Stream | None = None,
        cuda_graph: bool = False,
    ) -> None:
        super().__init__(spec, name or str(plan_path))
        self.plan_path = Path(plan_path)
        self.stream = stream
        self.cuda_graph = cuda_graph
        self._graph: tuple[tuple[int, ...], torch.cuda.CUDAGraph] | None = None
        self._runs = 0
        self.engine = self.context = None
        self._buffers: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}

    def _activate(self) -> None:
        trt = _trt()
        if not self.plan_path.is_file():
            raise EngineError(
                "engine plan is missing",
                where=str(self.plan_path),
                expected="a plan built by 'adapedit build --backend trt'",
                got="no such file",
            )
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise EngineError(
                "TensorRT could not load the plan (corrupt, or built for another TensorRT or GPU)",
                where=str(self.plan_path),
                expected=f"a plan for {gpu_name()}",
                got="deserialization failed",
            )
        self.context = self.engine.create_execution_context()

    def _deactivate(self) -> None:
        self.context = self.engine = None
        self._buffers.clear()
        self._outputs = {}
        self._graph, self._runs = None, 0

    def _device(self, name: str) -> str:
        """Shape tensors (shapes passed across the cuts of a dynamic export) live in host
        memory, as TensorRT reads them during shape inference; every other tensor on the GPU."""
        return "cpu" if self.engine.is_shape_inference_io(name) else "cuda"

    def _plan(
        self,
        input_shapes: dict[str, tuple[int, ...]],
        output_shapes: dict[str, tuple[int, ...]],
    ) -> None:
        for name, shape in input_shapes.items():
            self.context.set_input_shape(name, shape)
        outputs = {}
        for t in self.spec.outputs:
            shape = tuple(self.context.get_tensor_shape(t.name))
            key = (t.name, shape)
            if key not in self._buffers:
                self._buffers[key] = torch.empty(
                    shape, dtype=TORCH_DTYPES[t.dtype], device=self._device(t.name)
                )
            outputs[t.name] = self._buffers[key]
            self.context.set_tensor_address(t.name, outputs[t.name].data_ptr())
        self._outputs = outputs
        self._graph, self._runs = None, 0

    def _run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keep = []
        for t in self.spec.inputs:
            x = feeds[t.name].to(self._device(t.name)).contiguous()
            keep.append(x)
            self.context.set_tensor_address(t.name, x.data_ptr())
        stream = self.stream or torch.cuda.current_stream()
        ptrs = tuple(x.data_ptr() for x in keep)
        if self._graph is not None and self._graph[0] == ptrs:
            self._graph[1].replay()
            return self._outputs
        if self.cuda_graph and self._runs >= 1:  # warmed up: capture this enqueue
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                ok = self.context.execute_async_v3(stream.cuda_stream)
            if ok:
                self._graph = (ptrs, graph)
                graph.replay()
                return self._outputs
        self._runs += 1
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineError(
                "TensorRT execution failed",
                where=self.name,
                expected="execute_async_v3 to return True",
                got=False,
            )
        return self._outputs
