"""Shared weights for ONNX Runtime sessions: one buffer per stored weight tensor of an export's
UNet graphs (``unet/weights.json``, written by the exporter), handed to every session that uses
it with ``SessionOptions.add_initializer``. ONNX Runtime then uses that buffer in place instead of
loading a copy per session — on the GPU when the buffer lives on the device the session plans the
initializer on — so the segments and the batch variants of a static export hold one copy of the
weights between them.

ONNX Runtime accepts only buffers its caller owns (``add_initializer`` refuses an ``OrtValue``
whose memory ONNX Runtime allocated, as ``OrtValue.ortvalue_from_numpy(array, "cuda")`` does). So
every weight is a torch tensor on the pool's device, wrapped without a copy by
``OrtValue.from_dlpack`` and kept alive by the pool: one ownership path on the CPU and the GPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapedit.errors import EngineError


class WeightPool:
    """The stored weights of one folder, loaded on first use onto ``device`` (torch-owned)."""

    def __init__(self, folder: Path, index: str, device: torch.device) -> None:
        self.folder = (folder / index).parent
        doc = json.loads((folder / index).read_text())
        self.tensors: dict[str, dict[str, Any]] = doc["tensors"]
        self.graphs: dict[str, dict[str, str]] = doc["graphs"]
        self.device = torch.device(device)
        self._owned: dict[str, torch.Tensor] = {}  # key → the buffer ONNX Runtime reads
        self._values: dict[str, Any] = {}  # key → OrtValue over that buffer

    def adopt(self, folder: Path, index: str) -> None:
        """Serve the graphs of another index over the same stored tensors too (the export an
        engine folder was built from: its whole UNet reads the weights the session's graphs
        read, stored under the same content keys), so they share these buffers.

        Raises:
            EngineError: that index names a stored tensor this pool does not have.
        """
        doc = json.loads((folder / index).read_text())
        missing = {k for refs in doc["graphs"].values() for k in refs.values()} - set(self.tensors)
        if missing:
            raise EngineError(
                "another folder's weights are not this pool's",
                where=str(folder / index),
                expected=f"stored tensors of {self.folder}",
                got=f"{len(missing)} other tensors",
            )
        self.graphs = {**doc["graphs"], **self.graphs}

    def initializers(self, graph_file: str) -> dict[str, Any]:
        """``{initializer name: OrtValue}`` for a graph of the folder (empty if it has none)."""
        return {name: self._value(key) for name, key in self.graphs.get(graph_file, {}).items()}

    @property
    def loaded_bytes(self) -> int:
        """Bytes of weights loaded so far (one copy each)."""
        return sum(self.tensors[k]["length"] for k in self._values)

    def buffer(self, key: str) -> torch.Tensor:
        """The torch tensor that holds stored tensor ``key`` (loaded on first use)."""
        self._value(key)
        return self._owned[key]

    def _read(self, t: dict[str, Any]) -> np.ndarray:
        """Stored tensor ``t`` read from its file into memory of its own: a plain read, never a
        mapping, so the file's pages are not counted again in the process's resident memory.

        Raises:
            EngineError: the file ends before the tensor does.
        """
        array = np.empty(t["shape"], dtype=t["dtype"])
        path = self.folder / t["file"]
        with open(path, "rb") as f:
            f.seek(t["offset"])
            got = f.readinto(array.reshape(-1).view(np.uint8))
        if got != t["length"]:
            raise EngineError(
                "a weights file ends before one of its tensors",
                where=str(path),
                expected=f"{t['length']} bytes at offset {t['offset']}",
                got=f"{got} bytes",
            )
        return array

    def _value(self, key: str):
        import onnxruntime as ort

        value = self._values.get(key)
        if value is None:
            t = self.tensors[key]
            host = torch.from_numpy(self._read(t))
            owned = host.to(self.device) if self.device.type != "cpu" else host
            value = ort.OrtValue.from_dlpack(owned)
            self._owned[key], self._values[key] = owned, value
        return value
