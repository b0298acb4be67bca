"""ONNX Runtime runner: CPU, CUDA and TensorRT execution providers, I/O binding with torch
tensors, output buffers allocated once per shape and reused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapedit.engines.base import TORCH_DTYPES, Runner
from adapedit.errors import EngineError
from adapedit.spec import GraphSpec

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
OPT_LEVELS = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class OrtOptions:
    """Session options: providers (short names, in priority order), intra-op threads (0: ORT's
    default), graph optimisation level, and whether idle intra-op threads spin. Spinning is off
    by default: between UNet segments the controller runs torch code, and spinning ORT threads
    would take the cores from it. ``profile_prefix`` turns on ONNX Runtime's profiler (JSON
    traces written under that prefix)."""

    providers: tuple[str, ...] = ("cpu",)
    threads: int = 0
    optimization: str = "all"
    spinning: bool = False
    profile_prefix: str | None = None

    def __post_init__(self) -> None:
        unknown = [p for p in self.providers if p not in PROVIDERS]
        if unknown or not self.providers:
            raise EngineError(
                "unknown execution provider",
                where="OrtOptions",
                expected=" | ".join(PROVIDERS),
                got=list(self.providers),
            )
        if self.optimization not in OPT_LEVELS:
            raise EngineError(
                "unknown graph optimisation level",
                where="OrtOptions",
                expected=" | ".join(OPT_LEVELS),
                got=self.optimization,
            )
        if self.threads < 0:
            raise EngineError("threads must be ≥ 0", where="OrtOptions", got=self.threads)

    @property
    def device(self) -> torch.device:
        """Where the runner's tensors live: CUDA when a GPU provider comes first."""
        return torch.device("cuda" if self.providers[0] in ("cuda", "tensorrt") else "cpu")


#: Tensor dtypes bound in host memory whatever the provider (see ``OrtRunner._device``).
HOST_DTYPES = frozenset({"int64", "int32"})


class OrtRunner(Runner):
    """One ONNX graph in an ``onnxruntime.InferenceSession``."""

    def __init__(
        self,
        path: str | Path,
        spec: GraphSpec,
        options: OrtOptions = OrtOptions(),
        name: str | None = None,
    ) -> None:
        super().__init__(spec, name or str(path))
        self.path = Path(path)
        self.options = options
        self.session = None
        self._buffers: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def _activate(self) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = [PROVIDERS[p] for p in self.options.providers]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise EngineError(
                "execution provider not available in this onnxruntime",
                where=self.name,
                expected=missing,
                got=available,
            )
        if not self.path.is_file():
            raise EngineError(
                "engine file is missing",
                where=str(self.path),
                expected="an ONNX file",
                got="no such file",
            )
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = self.options.threads
        so.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.options.spinning else "0"
        )
        if self.options.profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = self.options.profile_prefix
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.options.optimization]
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=wanted)
        except Exception as e:  # onnxruntime raises its own exception types
            raise EngineError(
                "ONNX Runtime could not load the graph",
                where=str(self.path),
                expected="a valid ONNX file",
                got=str(e).splitlines()[0],
            ) from e

    def _deactivate(self) -> None:
        self.session = None
        self._buffers.clear()

    def _device(self, dtype: str) -> torch.device:
        """Where a tensor of ``dtype`` is bound: integer tensors crossing segment cuts are shapes
        and indices, kept in host memory (CUDA kernels such as Reshape read shapes there)."""
        return torch.device("cpu") if dtype in HOST_DTYPES else self.options.device

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        key = (name, shape)
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.empty(shape, dtype=TORCH_DTYPES[dtype], device=self._device(dtype))
            self._buffers[key] = buf
        return buf

    def _infer(
        self, feeds: dict[str, torch.Tensor], symbols: dict[str, int]
    ) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        keep = []
        for t in self.spec.inputs:
            dev = self._device(t.dtype)
            x = feeds[t.name].to(dev).contiguous()
            keep.append(x)
            binding.bind_input(
                t.name, dev.type, dev.index or 0, np.dtype(t.dtype), tuple(x.shape), x.data_ptr()
            )
        outputs = {}
        for t, shape in zip(self.spec.outputs, self.output_shapes(symbols).values(), strict=True):
            buf = self._buffer(t.name, shape, t.dtype)
            dev = buf.device
            binding.bind_output(
                t.name, dev.type, dev.index or 0, np.dtype(t.dtype), shape, buf.data_ptr()
            )
            outputs[t.name] = buf
        device = self.options.device
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:  # onnxruntime raises its own exception types
            raise EngineError(
                "ONNX Runtime failed to run the graph",
                where=self.name,
                expected="a successful run",
                got=str(e).splitlines()[0],
            ) from e
        return outputs
