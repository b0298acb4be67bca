"""The UNet graphs' weights, stored once.

The UNet graphs of an export (whole, segments; every batch variant of a static export) hold the
same weights. A :class:`WeightStore` moves each graph's large floating-point initializers into
a weights file as ONNX external data, storing each distinct tensor once (by a hash of its
content, type and shape), and
records which stored tensor every graph's initializer is. Variants exported in separate
processes each write a store of their own; :func:`merge_stores` then points every graph at the
first copy of each tensor, deletes the files no graph uses any more, and writes the index
``unet/weights.json``. The runtime gives each stored tensor one device buffer shared by every
session that uses it (``adapedit.engines.weights.WeightPool``), so batch variants do not
duplicate weights on the GPU either.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import onnx
from onnx.external_data_helper import set_external_data

from adapedit.io import write_json

WEIGHTS_JSON = "weights.json"
#: Initializers at least this large (bytes) and of a floating-point type are stored in the
#: weights file; smaller ones (shapes, scalars) stay inside each graph.
MIN_BYTES = 1024
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


class WeightStore:
    """Writes ``<folder>/weights-<tag>.bin`` for the graphs saved through it (all in
    ``folder``, so the external-data location is a plain file name)."""

    def __init__(self, folder: Path, tag: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.file = f"weights-{tag}.bin"
        self._out = open(folder / self.file, "wb")  # noqa: SIM115 - closed in close()
        self.tensors: dict[str, dict[str, Any]] = {}
        self.graphs: dict[str, dict[str, str]] = {}

    def save(self, model: onnx.ModelProto, path: Path, graph_file: str) -> None:
        """Move ``model``'s large float initializers into the weights file and save the rest to
        ``path``; ``graph_file`` is the graph's name in the index (its path in the export)."""
        refs: dict[str, str] = {}
        for init in model.graph.initializer:
            if init.data_type not in _FLOAT_TYPES or len(init.raw_data) < MIN_BYTES:
                continue
            # content, type and shape: equal bytes under two shapes are two tensors
            h = hashlib.sha256(init.raw_data)
            h.update(f"{init.data_type}:{list(init.dims)}".encode())
            key = h.hexdigest()[:32]
            if key not in self.tensors:
                self.tensors[key] = {
                    "file": self.file,
                    "offset": self._out.tell(),
                    "length": len(init.raw_data),
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name,
                    "shape": list(init.dims),
                }
                self._out.write(init.raw_data)
            t = self.tensors[key]
            set_external_data(init, t["file"], offset=t["offset"], length=t["length"])
            init.ClearField("raw_data")
            refs[init.name] = key
        self.graphs[graph_file] = refs
        onnx.save_model(model, str(path))

    def close(self) -> dict[str, Any]:
        """Finish the file; returns this store's part of the index."""
        self._out.close()
        return {"tensors": self.tensors, "graphs": self.graphs}


def merge_stores(root: Path, folder: str, parts: list[dict[str, Any]]) -> str:
    """Merge the stores' indexes into ``<root>/<folder>/weights.json`` (returned, relative to
    ``root``): every tensor is kept at its first copy; a graph pointing at a later copy is
    rewritten to the first; weight files no graph uses are deleted."""
    tensors: dict[str, dict[str, Any]] = {}
    for part in parts:
        for key, t in part["tensors"].items():
            tensors.setdefault(key, t)
    graphs: dict[str, dict[str, str]] = {}
    for part in parts:
        for graph_file, refs in part["graphs"].items():
            graphs[graph_file] = refs
            moved = {
                name: tensors[key]
                for name, key in refs.items()
                if tensors[key] is not part["tensors"][key]
            }
            if moved:
                _point_at(root / graph_file, moved)
    used = {tensors[k]["file"] for refs in graphs.values() for k in refs.values()}
    for part in parts:
        for t in part["tensors"].values():
            if t["file"] not in used:
                (root / folder / t["file"]).unlink(missing_ok=True)
    kept = {k: t for k, t in tensors.items() if any(k in r.values() for r in graphs.values())}
    write_json(root / folder / WEIGHTS_JSON, {"tensors": kept, "graphs": graphs})
    return f"{folder}/{WEIGHTS_JSON}"


def _point_at(path: Path, moved: dict[str, dict[str, Any]]) -> None:
    """Rewrite the external-data references of the initializers ``moved`` (name → stored
    tensor) in the graph at ``path`` (its data is not loaded)."""
    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        t = moved.get(init.name)
        if t is None:
            continue
        where = {"location": t["file"], "offset": str(t["offset"]), "length": str(t["length"])}
        for entry in init.external_data:
            if entry.key in where:
                entry.value = where[entry.key]
    onnx.save_model(model, str(path))
