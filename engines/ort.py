"""ONNX Runtime runner: CPU, CUDA and TensorRT execution providers, I/O binding with torch
tensors, output buffers allocated once per shape and reused."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import torch

from adapedit.engines.base import (
    TORCH_DTYPES,
    GraphSlots,
    Runner,
    ordered_with_caller,
    require_cuda,
)
from adapedit.engines.weights import WeightPool
from adapedit.errors import EngineError
from adapedit.spec import GraphSpec

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
OPT_LEVELS = ("disable", "basic", "extended", "all")
CPU_ARENAS = ("session", "shared", "off")


@dataclass(frozen=True)
class OrtOptions:
    """Session options: providers (short names, in priority order), intra-op threads (0: ORT's
    default), graph optimisation level, and whether idle intra-op threads spin. Spinning is off
    by default: between UNet segments the controller runs torch code, and spinning ORT threads
    would take the cores from it. ``profile_prefix`` turns on ONNX Runtime's profiler (JSON
    traces written under that prefix); ``optimized_model_prefix`` saves each graph as ONNX
    Runtime optimised it for its providers (to check, e.g., that no Memcpy node is left);
    ``cuda_graph`` captures the graph's kernels as a CUDA graph on the first runs and replays it
    (CUDA and TensorRT providers; one graph per set of bound addresses, see
    :class:`~adapedit.engines.base.GraphSlots`: the fused UNet binds fixed buffers, so one);
    ``prepacking`` off stops CPU kernels from keeping a re-laid-out copy of their weights per
    session (``session.disable_prepacking``: less memory where sessions share weights, each
    kernel packs on the fly); ``cpu_arena``: where CPU sessions keep their activations between
    runs — ``session`` (an arena each: many sessions, as the segmented UNet has, each keep
    their peak), ``shared`` (one arena of the process, registered once, that every session
    with this option allocates from: sessions that run one after another reuse the same memory;
    CPU-provider sessions only, a GPU session keeps its own) or ``off`` (freed after every
    run). ``log_severity``: what ONNX Runtime prints of its sessions (0 verbose, 1 info,
    2 warnings, 3 errors — the default —, 4 fatal); at 2 it says what it otherwise does
    silently: a shared weight it copied rather than used in place (its planned device differs
    from the buffer's), the Memcpy nodes it added, the nodes it left to the CPU.

    The defaults hold one copy of the weights on the CPU: optimisation level ``extended`` (``all``
    adds the CPU-only NCHWc layout pass, which keeps re-laid-out weights per session), no
    prepacking, one shared arena — on ``sd14-random`` at 256 px the fused runtime's peak went
    from 13.0 GB to 5.7 GB for about 5 % more time per edit (``docs/benchmarks.md``). On a GPU
    these options change nothing but the level, and ``all`` adds nothing there."""

    providers: tuple[str, ...] = ("cpu",)
    threads: int = 0
    optimization: str = "extended"
    spinning: bool = False
    profile_prefix: str | None = None
    optimized_model_prefix: str | None = None
    cuda_graph: bool = False
    prepacking: bool = False
    cpu_arena: str = "shared"
    log_severity: int = 3

    def __post_init__(self) -> None:
        unknown = [p for p in self.providers if p not in PROVIDERS]
        if unknown or not self.providers:
            raise EngineError(
                "unknown execution provider",
                where="OrtOptions",
                expected=" | ".join(PROVIDERS),
                got=list(self.providers),
            )
        for what, value, choices in (
            ("graph optimisation level", self.optimization, OPT_LEVELS),
            ("CPU arena", self.cpu_arena, CPU_ARENAS),
        ):
            if value not in choices:
                raise EngineError(
                    f"unknown {what}", where="OrtOptions", expected=" | ".join(choices), got=value
                )
        if self.threads < 0:
            raise EngineError("threads must be ≥ 0", where="OrtOptions", got=self.threads)
        if self.log_severity not in range(5):
            raise EngineError(
                "unknown log severity",
                where="OrtOptions",
                expected="0 (verbose) to 4 (fatal)",
                got=self.log_severity,
            )

    @property
    def device(self) -> torch.device:
        """Where the runner's tensors live: CUDA when a GPU provider comes first."""
        return torch.device("cuda" if self.providers[0] in ("cuda", "tensorrt") else "cpu")


def check_providers(options: OrtOptions, where: str) -> None:
    """Before any session is made: every provider asked for is in this onnxruntime, and a GPU
    provider has a CUDA device to run on (the runner's tensors live there).

    Raises:
        EngineError: naming the providers asked for and the ones available.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = [PROVIDERS[p] for p in options.providers]
    if options.device.type == "cuda" and hasattr(ort, "preload_dlls"):
        _preload(ort)
    missing = [p for p in wanted if p not in available]
    if missing:
        raise EngineError(
            "execution provider not available in this onnxruntime",
            where=where,
            expected=wanted,
            got=f"available: {available}",
        )
    if options.device.type == "cuda":
        require_cuda("a GPU execution provider", where, f"{wanted} with a CUDA device")


def check_attention_for_providers(attention_op: str, options: OrtOptions, where: str) -> None:
    """Before any session is made: ONNX Runtime's TensorRT provider is not asked to run an
    export of ONNX Runtime's own attention (``attention_op`` ``ort``), which TensorRT's parser
    does not know: it would hand each such node to the CUDA provider, cut the UNet into one
    TensorRT engine per stretch between them, and capture none of it as a CUDA graph.

    Raises:
        EngineError: naming the export's attention and the providers asked for.
    """
    if options.providers[0] == "tensorrt" and attention_op != "onnx":
        raise EngineError(
            "ONNX Runtime's TensorRT provider cannot run this export's attention (ONNX "
            "Runtime's MultiHeadAttention, which TensorRT's parser does not know)",
            where=where,
            expected="the CUDA provider for this folder, or for TensorRT an export made with "
            "'adapedit export --attention-op onnx' (the default)",
            got=f"attention_op {attention_op}, providers {list(options.providers)}",
            field="attention_op",
        )


@lru_cache(maxsize=1)
def _preload(ort) -> None:
    """onnxruntime-gpu's CUDA and cuDNN libraries from the NVIDIA pip packages torch brought
    (once): without them its CUDA provider fails to load."""
    ort.preload_dlls()


def provider_options(
    wanted: list[str], device_id: int, stream: int | None, *, cuda_graph: bool, fp32: bool
) -> list:
    """``InferenceSession``'s providers for a GPU run, each with its options under the keys and
    in the spelling that provider's parser reads (a key or value it does not know is an error):
    the device, the compute stream and CUDA graphs. CUDA: ``has_user_compute_stream`` with the
    handle, ``enable_cuda_graph`` as ``1``/``0``; TensorRT (whose Python parser knows no
    ``has_user_compute_stream``: the handle alone sets it) ``trt_cuda_graph_enable`` as
    ``True``/``False``. The CUDA provider runs an ``fp32`` graph's math in fp32 (``use_tf32``
    off, as torch's matmuls by default: an fp32 folder is the exact one) and leaves an fp16
    graph's at its default: ONNX Runtime's cuDNN convolutions without TF32 drop every tensor-core
    plan, fp16 ones included."""
    device = {"device_id": str(device_id)}
    handle = {} if stream is None else {"user_compute_stream": str(stream)}
    own = {
        PROVIDERS["cuda"]: device
        | ({"has_user_compute_stream": "1"} if handle else {})
        | handle
        | {"enable_cuda_graph": "1" if cuda_graph else "0"}
        | ({"use_tf32": "0"} if fp32 else {}),
        PROVIDERS["tensorrt"]: device
        | handle
        | {"trt_cuda_graph_enable": "True" if cuda_graph else "False"},
    }
    return [(p, own[p]) if p in own else p for p in wanted]


#: Tensor dtypes bound in host memory whatever the provider (see ``OrtRunner._device``).
HOST_DTYPES = frozenset({"int64", "int32"})


@cache
def _register_shared_cpu_arena() -> None:
    """Register one CPU arena allocator with ONNX Runtime's environment (once per process)."""
    import onnxruntime as ort

    info = ort.OrtMemoryInfo(
        "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
    )
    ort.create_and_register_allocator(info, None)


class OrtRunner(Runner):
    """One ONNX graph in an ``onnxruntime.InferenceSession``.

    On the CUDA (or TensorRT) provider with a ``stream``, ONNX Runtime runs its kernels on that
    stream (``user_compute_stream``) and does not synchronise after a run: callers issue their
    own torch work on the same stream, so nothing waits on the host (a caller on another stream
    is ordered before and after the run with events). ``weights`` shares the graph's stored
    weights with every other session of the folder.
    """

    def __init__(
        self,
        path: str | Path,
        spec: GraphSpec,
        options: OrtOptions = OrtOptions(),
        name: str | None = None,
        *,
        stream: torch.cuda.Stream | None = None,
        weights: WeightPool | None = None,
    ) -> None:
        super().__init__(spec, name or str(path))
        host = [t.name for t in spec.inputs if t.dtype in HOST_DTYPES]
        if options.cuda_graph and host:
            raise EngineError(
                "a CUDA graph cannot replay inputs bound in host memory (ONNX Runtime copies "
                "them to a new device buffer at every bind)",
                where=name or str(path),
                expected="cuda_graph only for graphs whose inputs live on the device",
                got=f"integer inputs {host}",
            )
        self.path = Path(path)
        self.options = options
        self._target = options.device  # with its index once activated
        self.stream = stream
        self.weights = weights
        self.session = None
        self._binding = None
        self._run_options = None
        self._buffers: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self._bound: dict[str, int] = {}  # input name → data pointer bound
        self._sync_after = False
        self._graphs = GraphSlots()
        self._graph_options: dict[int, object] = {}  # graph id → RunOptions naming it

    def _activate(self) -> None:
        import onnxruntime as ort

        check_providers(self.options, self.name)
        wanted = [PROVIDERS[p] for p in self.options.providers]
        if not self.path.is_file():
            raise EngineError(
                "engine file is missing",
                where=str(self.path),
                expected="an ONNX file",
                got="no such file",
            )
        so = ort.SessionOptions()
        so.log_severity_level = self.options.log_severity
        so.intra_op_num_threads = self.options.threads
        so.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.options.spinning else "0"
        )
        so.add_session_config_entry(
            "session.disable_prepacking", "0" if self.options.prepacking else "1"
        )
        so.enable_cpu_mem_arena = self.options.cpu_arena != "off"
        if self.options.cpu_arena == "shared" and self.options.device.type == "cpu":
            _register_shared_cpu_arena()
            so.add_session_config_entry("session.use_env_allocators", "1")
        if self.options.profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = self.options.profile_prefix
        if self.options.optimized_model_prefix:
            so.optimized_model_filepath = f"{self.options.optimized_model_prefix}{self.path.name}"
            so.add_session_config_entry(  # large weights beside it, as in the export
                "session.optimized_model_external_initializers_file_name",
                f"{self.path.name}.data",
            )
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.options.optimization]
        try:
            if self.weights is not None:
                for name, value in self.weights.initializers(self.spec.file).items():
                    so.add_initializer(name, value)
            # no fallback: on an error ONNX Runtime's wrapper would print it and build the
            # session again on the CPU (copying shared weights back) before anything is raised
            self.session = ort.InferenceSession(
                str(self.path), so, providers=self._providers(wanted), enable_fallback=0
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise EngineError(
                "ONNX Runtime could not load the graph",
                where=str(self.path),
                expected=f"a valid ONNX file on {wanted}",
                got=str(e).splitlines()[0],
            ) from e
        # ONNX Runtime falls back to other providers (and the CPU) when one fails to load (a
        # missing CUDA library, say), dropping their options: never run somewhere else silently
        used = self.session.get_providers()
        if any(p not in used for p in wanted):
            self.session = None
            raise EngineError(
                "ONNX Runtime did not use the execution providers asked for (it fell back; its "
                "log above says why: for CUDA, most often a CUDA or cuDNN library it could not "
                "load)",
                where=self.name,
                expected=wanted,
                got=used,
            )

    def _providers(self, wanted: list[str]) -> list:
        device = self.options.device
        if device.type != "cuda":
            return wanted
        index = device.index if device.index is not None else torch.cuda.current_device()
        # the device with its index: tensors on cuda:0 compare unequal to a bare "cuda"
        self._target = torch.device("cuda", index)
        stream = self.stream.cuda_stream if self.stream is not None else None
        # a graph with no fp16 tensor at its edges computes in fp32 (the folder's precision)
        fp32 = not any(t.dtype == "float16" for t in (*self.spec.inputs, *self.spec.outputs))
        return provider_options(
            wanted, index, stream, cuda_graph=self.options.cuda_graph, fp32=fp32
        )

    def _deactivate(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()  # no work in flight on what is released
        self.session = self._binding = self._run_options = None
        self._buffers.clear()
        self._outputs = {}
        self._bound.clear()
        self._graphs.clear()
        self._graph_options.clear()

    def _device(self, dtype: str) -> torch.device:
        """Where a tensor of ``dtype`` is bound: integer tensors (shapes and indices passed
        across the cuts of a dynamic export) in host memory, where ONNX Runtime's CUDA kernels
        read shapes; every other tensor on the runner's device."""
        return torch.device("cpu") if dtype in HOST_DTYPES else self._target

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        key = (name, shape)
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.empty(shape, dtype=TORCH_DTYPES[dtype], device=self._device(dtype))
            self._buffers[key] = buf
        return buf

    def _plan(
        self,
        input_shapes: dict[str, tuple[int, ...]],
        output_shapes: dict[str, tuple[int, ...]],
    ) -> None:
        binding = self.session.io_binding()
        outputs = {}
        for t in self.spec.outputs:
            shape = output_shapes[t.name]
            buf = self._buffer(t.name, shape, t.dtype)
            dev = buf.device
            binding.bind_output(
                t.name, dev.type, dev.index or 0, np.dtype(t.dtype), shape, buf.data_ptr()
            )
            outputs[t.name] = buf
        self._binding, self._outputs = binding, outputs
        self._bound.clear()
        # a CUDA kernel's output bound in host memory is copied there asynchronously: wait for
        # it before anyone reads it (dynamic exports only; static graphs have no such output)
        on_gpu = self.options.device.type == "cuda"
        self._sync_after = on_gpu and any(b.device.type == "cpu" for b in outputs.values())
        self._run_options = self._options_for_run()
        self._graph_options.clear()

    def _options_for_run(self, graph_id: int | None = None):
        """RunOptions: no device synchronisation after a run on the session's own stream, and
        with CUDA graphs the id of the graph this run replays (or captures)."""
        import onnxruntime as ort

        on_gpu = self.options.device.type == "cuda"
        options = ort.RunOptions()
        options.add_run_config_entry(
            "disable_synchronize_execution_providers",
            "1" if on_gpu and self.stream is not None and not self._sync_after else "0",
        )
        if graph_id is not None:
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return options

    def _run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        binding = self._binding
        device = self._target
        keep = []
        for t in self.spec.inputs:
            dev = self._device(t.dtype)
            x = feeds[t.name]
            if x.device != dev or not x.is_contiguous():
                x = x.to(dev).contiguous()
                keep.append(x)
            # ONNX Runtime copies an input bound on another device than its kernel's at bind
            # time: such inputs are bound again on every call, the others when they move
            if self._bound.get(t.name) != x.data_ptr() or dev != device:
                binding.bind_input(
                    t.name,
                    dev.type,
                    dev.index or 0,
                    np.dtype(t.dtype),
                    tuple(x.shape),
                    x.data_ptr(),
                )
                self._bound[t.name] = x.data_ptr()
        ordered = nullcontext()
        if device.type == "cuda" and self.stream is None:
            torch.cuda.current_stream(device).synchronize()  # no stream of its own: by hand
        elif device.type == "cuda":  # a caller on another stream: ordered with events
            ordered = ordered_with_caller(self.stream)
        run_options = self._run_options
        if self.options.cuda_graph:
            addresses = (
                *(self._bound[t.name] for t in self.spec.inputs),
                *(b.data_ptr() for b in self._outputs.values()),
            )
            graph_id, _ = self._graphs.slot(addresses)
            run_options = self._graph_options.get(graph_id)
            if run_options is None:
                run_options = self._graph_options[graph_id] = self._options_for_run(graph_id)
        try:
            with ordered:
                self.session.run_with_iobinding(binding, run_options)
        except Exception as e:  # onnxruntime raises its own exception types
            raise EngineError(
                "ONNX Runtime failed to run the graph",
                where=self.name,
                expected="a successful run",
                got=str(e).splitlines()[0],
            ) from e
        if self._sync_after:
            torch.cuda.synchronize(device)
        return self._outputs
