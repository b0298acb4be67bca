"""The contract between the exporter, the engines and the runtime: the I/O names of the
exported graphs and ``manifest.json`` — what an export folder holds: the model, the precision,
the graphs and, for the segmented UNet, the segments in order and the attention boundaries
between them. Plain data, no ONNX: the runtime reads it without loading the exporter.

A manifest is validated when loaded: format, files present, and (when the caller says what it
expects) model and precision. Every mismatch is a :class:`~adapedit.errors.ManifestError`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapedit.errors import EngineError, ManifestError

FORMAT = "adapedit-export/2"
MANIFEST = "manifest.json"
#: Inputs of every UNet graph, in order.
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
#: The UNet's noise prediction output.
NOISE = "noise_pred"

#: How an export writes the attention layers no edit reads: ``onnx``, standard operators
#: (MatMul, Softmax; every backend reads them, TensorRT fuses them itself); ``ort``, ONNX
#: Runtime's ``com.microsoft.MultiHeadAttention`` (flash or memory-efficient kernels on CUDA;
#: ONNX Runtime only).
ATTENTION_OPS = ("onnx", "ort")


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, dtype (numpy name) and symbolic shape."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX file and its inputs and outputs."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class Boundary:
    """A cut of the segmented UNet at a controlled attention layer's softmax output.

    Segment ``segment`` outputs ``probs`` ([B*H, P, K]); segment ``segment + 1`` takes it back as
    an input. ``hidden`` ([B, P, C], cross-attention only) is the layer's input hidden states,
    an output of segment ``hidden_segment``. Geometry is at the export resolution.
    """

    layer: str
    kind: str  # "cross" | "self"
    segment: int
    probs: str
    hidden: str | None
    hidden_segment: int | None
    resolution: tuple[int, int]
    downscale: int
    heads: int
    head_dim: int
    queries: int
    keys: int


@dataclass(frozen=True)
class UNetGraphs:
    """The UNet graphs of one batch size: ``batch`` None in a dynamic export (any batch), the
    batch the graphs are specialised to in a static one. ``whole``: the UNet alone (no edit);
    ``segments``: the UNet cut at the boundaries, in order; ``fused``: the UNet with the edit
    of the batch's pass inside (``adapedit.pipelines.fused``; static exports only)."""

    batch: int | None
    whole: GraphSpec | None = None
    segments: tuple[GraphSpec, ...] = ()
    fused: GraphSpec | None = None

    @property
    def specs(self) -> list[GraphSpec]:
        return [g for g in (self.whole, *self.segments, self.fused) if g is not None]


@dataclass(frozen=True)
class Manifest:
    """The contents of an export folder.

    ``shapes`` is ``dynamic`` (any batch, any resolution that is a multiple of
    ``size_multiple``) or ``static`` (every graph specialised to ``height`` × ``width``; the
    UNet to the batches in :attr:`batches`, the text encoder and the VAE to batch 1).
    ``attention``: every attention layer (module path → queries at the export resolution);
    ``controlled``: those controlled under ``attention_limits`` (the rule, see
    :data:`~adapedit.config.ATTENTION_LIMITS`; ``self_max_queries`` its limit at the export
    resolution); ``attention_op``: how the other attention layers are written (``onnx``
    standard operators, ``ort`` ONNX Runtime's MultiHeadAttention). ``weights`` is the index of
    the UNet graphs' shared weights file, relative to the folder.
    """

    model: str
    config_hash: str
    precision: str
    opset: int
    height: int
    width: int
    latent_channels: int
    text_hidden: int
    vae_scale_factor: int
    size_multiple: int
    shapes: str = "dynamic"
    attention: dict[str, int] = field(default_factory=dict)
    controlled: tuple[str, ...] = ()
    attention_limits: str = "p2p-literal"  # folders from before the rule was recorded
    self_max_queries: int = 256
    attention_op: str = "onnx"  # folders from before the choice: standard operators
    graphs: dict[str, GraphSpec] = field(default_factory=dict)
    unet: tuple[UNetGraphs, ...] = ()
    boundaries: tuple[Boundary, ...] = ()
    weights: str | None = None
    format: str = FORMAT

    @property
    def controlled_layers(self) -> list[str]:
        return [b.layer for b in self.boundaries]

    @property
    def static(self) -> bool:
        return self.shapes == "static"

    @property
    def batches(self) -> tuple[int, ...]:
        """The UNet batch sizes of a static export (empty for a dynamic one)."""
        return tuple(u.batch for u in self.unet if u.batch is not None)

    @property
    def has_segments(self) -> bool:
        return any(u.segments for u in self.unet)

    @property
    def has_fused(self) -> bool:
        return any(u.fused for u in self.unet)

    def unet_graphs(self, batch: int) -> UNetGraphs:
        """The UNet graphs that run a batch of ``batch`` samples.

        Raises:
            EngineError: a static export built for other batch sizes.
        """
        for u in self.unet:
            if u.batch is None or u.batch == batch:
                return u
        wanted = " ".join(map(str, sorted({*self.batches, batch})))
        raise EngineError(
            "the engines are static and were not built for this batch size (the UNet runs "
            "batch 1 to invert a given image, 2 for the calibration pass and plain "
            "generation, 4 for the edit)",
            where=f"{self.model} export ({self.height}×{self.width}, static)",
            expected=f"batch {' or '.join(map(str, self.batches))}; for batch {batch}, export "
            f"again with 'adapedit export --shapes static --batches {wanted}'",
            got=f"batch {batch}",
            # the request's field behind it: batch 1 only inverts a given image; the others
            # are the edit's own, the folder's lack alone
            field="image" if batch == 1 else None,
        )

    def all_graphs(self) -> list[GraphSpec]:
        """Every graph the folder holds."""
        return [*self.graphs.values(), *(g for u in self.unet for g in u.specs)]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, folder: str | Path) -> None:
        from adapedit.io import write_json

        write_json(Path(folder) / MANIFEST, self.to_json())

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Manifest:
        def spec(d: dict | None) -> GraphSpec | None:
            if d is None:
                return None
            return GraphSpec(
                d["file"],
                tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in d["inputs"]),
                tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in d["outputs"]),
            )

        d = dict(doc)
        d["graphs"] = {k: spec(v) for k, v in d.get("graphs", {}).items()}
        d["unet"] = tuple(
            UNetGraphs(
                u["batch"],
                spec(u["whole"]),
                tuple(spec(s) for s in u["segments"]),
                spec(u.get("fused")),
            )
            for u in d.get("unet", ())
        )
        d["controlled"] = tuple(d.get("controlled", ()))
        d["boundaries"] = tuple(
            Boundary(**{**b, "resolution": tuple(b["resolution"])}) for b in d.get("boundaries", ())
        )
        return cls(**d)

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        model_hash: str | None = None,
        precision: str | None = None,
        check_files: bool = True,
    ) -> Manifest:
        """Read and validate ``folder/manifest.json`` (and, with ``check_files``, that every
        graph it lists is there: an engine folder of TensorRT plans holds no ONNX file, and its
        reader checks the plans instead).

        Raises:
            ManifestError: missing or unreadable manifest, other format, a listed file missing,
                or a model/precision other than the caller expects.
        """
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise ManifestError(
                "no manifest",
                where=str(folder),
                expected=f"{MANIFEST} written by 'adapedit export'",
                got="none",
            )
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != FORMAT:
                raise ManifestError(
                    "unknown manifest format",
                    where=str(path),
                    expected=FORMAT,
                    got=doc.get("format"),
                )
            m = cls.from_json(doc)
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(
                "unreadable manifest", where=str(path), expected=f"a {FORMAT} manifest", got=repr(e)
            ) from None
        for g in m.all_graphs() if check_files else ():
            if not (folder / g.file).is_file():
                raise ManifestError(
                    "a file listed in the manifest is missing",
                    where=str(folder / g.file),
                    expected="the exported ONNX file",
                    got="no such file",
                )
        if model_hash is not None and model_hash != m.config_hash:
            raise ManifestError(
                "the export is of another model",
                where=str(path),
                expected=f"config hash {model_hash}",
                got=f"{m.config_hash} ({m.model})",
            )
        if precision is not None and precision != m.precision:
            raise ManifestError(
                "the export has another precision",
                where=str(path),
                expected=precision,
                got=m.precision,
            )
        return m
