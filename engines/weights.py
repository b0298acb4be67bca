"""Shared weights for ONNX Runtime sessions: one ``OrtValue`` per stored weight tensor of an
export's UNet graphs (``unet/weights.json``, written by the exporter), handed to every session
that uses it with ``SessionOptions.add_initializer``. ONNX Runtime then uses that buffer in place
instead of loading a copy per session — on the GPU when the value lives on the device the
session plans the initializer on — so the segments and the batch variants of a static export
hold one copy of the weights between them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch


class WeightPool:
    """The stored weights of one folder, loaded on first use onto ``device``."""

    def __init__(self, folder: Path, index: str, device: torch.device) -> None:
        self.folder = (folder / index).parent
        doc = json.loads((folder / index).read_text())
        self.tensors: dict[str, dict[str, Any]] = doc["tensors"]
        self.graphs: dict[str, dict[str, str]] = doc["graphs"]
        self.device = device
        self._values: dict[str, Any] = {}  # key → OrtValue (kept alive as long as the pool)
        self._arrays: list[np.ndarray] = []  # what CPU OrtValues wrap (they do not copy)
        self._maps: dict[str, np.memmap] = {}

    def initializers(self, graph_file: str) -> dict[str, Any]:
        """``{initializer name: OrtValue}`` for a graph of the folder (empty if it has none)."""
        return {name: self._value(key) for name, key in self.graphs.get(graph_file, {}).items()}

    @property
    def loaded_bytes(self) -> int:
        """Bytes of weights loaded so far (one copy each)."""
        return sum(self.tensors[k]["length"] for k in self._values)

    def _value(self, key: str):
        import onnxruntime as ort

        value = self._values.get(key)
        if value is None:
            t = self.tensors[key]
            if t["file"] not in self._maps:
                self._maps[t["file"]] = np.memmap(self.folder / t["file"], mode="r")
            raw = self._maps[t["file"]][t["offset"] : t["offset"] + t["length"]]
            array = np.ascontiguousarray(raw.view(t["dtype"]).reshape(t["shape"]))
            if self.device.type == "cuda":
                value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", self.device.index or 0)
            else:
                value = ort.OrtValue.ortvalue_from_numpy(array)
                self._arrays.append(array)
            self._values[key] = value
        return value
