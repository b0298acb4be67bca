"""``export_model``: a model → an export folder (ONNX graphs, tokenizer, scheduler config and
``manifest.json``), written to a temporary folder and renamed at the end, so an interrupted
export never leaves anything that looks complete.

A dynamic export takes any batch and any resolution that is a multiple of the model's; a
static one is specialised to one resolution and, for the UNet, to the batch sizes an edit runs
(one variant per batch, traced separately — in parallel processes with ``jobs`` > 1). All UNet
graphs share one weights file (:mod:`adapedit.export.weights`).
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import onnx
from tqdm.auto import tqdm

from adapedit.algorithm.geometry import self_max_queries
from adapedit.config import ATTENTION_LIMITS, check_choice
from adapedit.errors import ConfigError, ExportError
from adapedit.export.onnx_export import (
    DEFAULT_OPSET,
    PRECISIONS,
    LayerExport,
    check_opset,
    export_fused,
    export_text_encoder,
    export_unet,
    export_vae_decoder,
    export_vae_encoder,
)
from adapedit.export.segment import fold, load_graph, prune, split
from adapedit.export.weights import WeightStore, merge_stores
from adapedit.io import atomic_folder
from adapedit.pipelines.models import Components, load_model
from adapedit.pipelines.processors import attention_geometry, controlled_layers
from adapedit.spec import (
    ATTENTION_OPS,
    NOISE,
    Boundary,
    GraphSpec,
    Manifest,
    TensorSpec,
    UNetGraphs,
)

FORMS = ("segmented", "whole", "fused")
SHAPES = ("dynamic", "static")
#: The UNet batches of an edit: 2 for the calibration pass and plain generation, 4 for the edit.
DEFAULT_BATCHES = (2, 4)
#: Above this many bytes of weights a graph is saved with external data (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1_800_000_000


def _shape(v: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    return tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)


def _dtype(v: onnx.ValueInfoProto) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name


def graph_spec(model: onnx.ModelProto, file: str) -> GraphSpec:
    """The manifest entry of a graph: its file and typed, symbolic inputs and outputs."""

    def specs(values):
        return tuple(TensorSpec(v.name, _dtype(v), _shape(v)) for v in values)

    return GraphSpec(file, specs(model.graph.input), specs(model.graph.output))


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Save ``model``; weights go to ``<file>.data`` beside it when they pass ~2 GB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if weights > EXTERNAL_DATA_BYTES:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{path.name}.data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


@dataclass(frozen=True)
class ExportOptions:
    """What to export: precision, UNet forms, shapes (with the static batches), the export
    resolution (pixels; it also fixes which self-attention layers are controlled), opset, and
    ``attention_limits``, the rule of the controlled layers and of LocalBlend's maps
    (:data:`~adapedit.config.ATTENTION_LIMITS`; the manifest records it, and the folder runs
    only edits asking for it), and ``attention_op``, how the other attention layers are written
    (:data:`~adapedit.spec.ATTENTION_OPS`: ``onnx`` standard operators for every
    backend, ``ort`` ONNX Runtime's fused MultiHeadAttention, which native TensorRT cannot
    build)."""

    precision: str = "fp32"
    forms: tuple[str, ...] = ("segmented", "whole")
    shapes: str = "dynamic"
    batches: tuple[int, ...] = DEFAULT_BATCHES
    opset: int = DEFAULT_OPSET
    attention_limits: str = "scaled"
    attention_op: str = "onnx"

    def __post_init__(self) -> None:
        w = "export"
        check_opset(self.opset)
        check_choice("precision", self.precision, tuple(PRECISIONS), w)
        object.__setattr__(self, "forms", tuple(dict.fromkeys(self.forms)))
        if not self.forms or any(f not in FORMS for f in self.forms):
            raise ConfigError(
                "unknown UNet form",
                where=w,
                expected=f"one or more of {' | '.join(FORMS)}",
                got=list(self.forms),
                field="forms",
            )
        check_choice("shapes", self.shapes, tuple(SHAPES), w)
        if "fused" in self.forms and self.shapes != "static":
            raise ConfigError(
                "the fused UNet is exported static only",
                where=w,
                expected="shapes 'static' (one resolution, the batches of an edit)",
                got=self.shapes,
                field="forms",
            )
        check_choice("attention_limits", self.attention_limits, ATTENTION_LIMITS, w)
        check_choice("attention_op", self.attention_op, ATTENTION_OPS, w)
        object.__setattr__(self, "batches", tuple(sorted(set(self.batches))))
        if not self.batches or any(
            not isinstance(b, int) or not 1 <= b <= 64 for b in self.batches
        ):
            raise ConfigError(
                "static batches must be integers in 1…64",
                where=w,
                expected="e.g. 2 4",
                got=list(self.batches),
                field="batches",
            )

    @property
    def unet_batches(self) -> tuple[int | None, ...]:
        """One UNet variant per batch (static), or one for any batch (None, dynamic)."""
        return self.batches if self.shapes == "static" else (None,)


def export_model(
    model: str | Components,
    out: str | Path,
    options: ExportOptions = ExportOptions(),
    *,
    height: int | None = None,
    width: int | None = None,
    jobs: int = 1,
    progress: bool = True,
) -> Manifest:
    """Export a model's text encoder, VAE and UNet to ``out`` (which must not exist).

    ``height``/``width`` (pixels, default the model's) are the export resolution: the static
    shapes, and which self-attention layers are controlled. With ``jobs`` > 1 the UNet variants
    of a static export are traced in that many processes at once (each needs the memory of a
    whole export), started first, while this process exports the text encoder and the VAE.

    Raises:
        ExportError: ``out`` exists, unsupported opset, or a graph that cannot be cut.
        ConfigError: bad options, or a resolution the model cannot take.
        ModelError: the model cannot be loaded.
    """
    out = Path(out)
    if out.exists():
        raise ExportError(
            "output folder exists",
            where=str(out),
            expected="a path that does not exist yet",
            got="an existing path",
        )
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError("jobs must be ≥ 1", where="export", got=jobs, field="jobs")
    c = load_model(model) if isinstance(model, str) else model
    h, w = height or c.default_size, width or c.default_size
    latent_hw = c.latent_hw(h, w)
    with atomic_folder(out) as tmp:
        # processes load a named model themselves rather than receive a pickled copy
        source = model if isinstance(model, str) else c
        return _export_into(tmp, c, source, options, latent_hw, (h, w), jobs, progress)


def _export_into(
    tmp: Path,
    c: Components,
    source: str | Components,
    o: ExportOptions,
    latent_hw: tuple[int, int],
    size: tuple[int, int],
    jobs: int,
    progress: bool,
) -> Manifest:
    one = 1 if o.shapes == "static" else None  # the text encoder and the VAE: batch 1 if static
    variants = o.unet_batches
    bar = tqdm(total=3 + len(variants), desc="export", disable=not progress)
    parallel = jobs > 1 and len(variants) > 1
    args = [(source if parallel else c, o, latent_hw, batch, tmp) for batch in variants]
    with ExitStack() as stack:
        pending = []
        if parallel:  # the UNet variants start first; the text encoder and the VAE meanwhile
            spawn = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(min(jobs, len(variants)), mp_context=spawn)
            stack.callback(pool.shutdown, cancel_futures=True)
            stack.push(_stopping_workers_on_error(pool))  # runs before the shutdown
            pending = [pool.submit(_unet_variant, *a) for a in args]
        graphs: dict[str, GraphSpec] = {}
        for key, fn in (
            ("text_encoder", lambda: export_text_encoder(c, o.precision, o.opset, one)),
            ("vae_decoder", lambda: export_vae_decoder(c, o.precision, o.opset, latent_hw, one)),
            ("vae_encoder", lambda: export_vae_encoder(c, o.precision, o.opset, latent_hw, one)),
        ):
            bar.set_postfix_str(key)
            m = fn()
            save_onnx(m, tmp / f"{key}.onnx")
            graphs[key] = graph_spec(m, f"{key}.onnx")
            bar.update(1)
        bar.set_postfix_str("UNet")
        results = []
        for k, a in enumerate(args):
            results.append(pending[k].result() if pending else _unet_variant(*a))
            bar.update(1)
    bar.close()
    unets = tuple(r[0] for r in results)
    weights = merge_stores(tmp, "unet", [r[2] for r in results])
    c.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    (tmp / "scheduler_config.json").write_text(json.dumps(c.scheduler_config, indent=2))
    manifest = Manifest(
        model=c.name,
        config_hash=c.config_hash(),
        precision=o.precision,
        opset=o.opset,
        height=size[0],
        width=size[1],
        latent_channels=int(c.unet.config.in_channels),
        text_hidden=int(c.unet.config.cross_attention_dim),
        vae_scale_factor=c.vae_scale_factor,
        size_multiple=c.size_multiple,
        shapes=o.shapes,
        attention={name: q for name, _, q in attention_geometry(c.unet, latent_hw)},
        controlled=tuple(controlled_layers(c.unet, latent_hw, o.attention_limits)),
        attention_limits=o.attention_limits,
        self_max_queries=self_max_queries(o.attention_limits, latent_hw),
        attention_op=o.attention_op,
        graphs=graphs,
        unet=unets,
        boundaries=_boundaries(unets, results[0][1]),
        weights=weights,
    )
    manifest.save(tmp)
    return manifest


def _stopping_workers_on_error(pool: ProcessPoolExecutor):
    """An exit callback that kills ``pool``'s processes when the block ends in an error, so the
    error reaches the caller at once rather than after every other variant's trace (minutes on
    SD 1.4); nothing they write outlives the temporary folder, which is removed after them."""

    def stop(exc_type, exc, tb) -> bool:
        if exc_type is not None:
            kill = getattr(pool, "kill_workers", None)  # Python ≥ 3.14
            if kill is not None:
                kill()
            else:
                for process in list((getattr(pool, "_processes", None) or {}).values()):
                    process.kill()
        return False

    return stop


def _unet_variant(
    c: str | Components, o: ExportOptions, latent_hw: tuple[int, int], batch: int | None, tmp: Path
) -> tuple[UNetGraphs, list[LayerExport], dict]:
    """Trace one UNet variant and write its forms into ``tmp/unet`` (graphs and a weight store
    of its own); returns its manifest entry, its layers (for the boundaries of the segmented
    form) and its store's index."""
    c = load_model(c) if isinstance(c, str) else c
    tag = f"b{batch}" if batch else "dynamic"
    store = WeightStore(tmp / "unet", tag)
    prefix = f"unet/b{batch}_" if batch else "unet/"

    def save(m: onnx.ModelProto, name: str) -> GraphSpec:
        spec = graph_spec(m, f"{prefix}{name}.onnx")
        store.save(m, tmp / spec.file, spec.file)
        return spec

    whole, fused = None, None
    segments: list[GraphSpec] = []
    layers: list[LayerExport] = []
    if {"whole", "segmented"} & set(o.forms):
        model, layers = export_unet(
            c, o.precision, o.opset, latent_hw, o.attention_limits, batch, o.attention_op
        )
        graph = load_graph(model)
        del model
        if "whole" in o.forms:
            whole = save(prune(graph, [NOISE]), "whole")
        if "segmented" in o.forms:
            for k, part in enumerate(split(graph, [layer.probs for layer in layers])):
                segments.append(save(part, f"segment_{k:02d}"))
        del graph
    if "fused" in o.forms:
        model = export_fused(
            c, o.precision, o.opset, latent_hw, o.attention_limits, batch, o.attention_op
        )
        fused = save(fold(model), "fused")
    return UNetGraphs(batch, whole, tuple(segments), fused), layers, store.close()


def _boundaries(unets: tuple[UNetGraphs, ...], layers: list[LayerExport]) -> tuple[Boundary, ...]:
    """The boundaries of the segmented form (the same segment indices in every variant)."""
    if not layers or not unets[0].segments:
        return ()
    names = {n for layer in layers for n in (layer.probs, layer.hidden) if n}
    produced = [
        {t.name: k for k, s in enumerate(u.segments) for t in s.outputs if t.name in names}
        for u in unets
    ]
    if any(p != produced[0] for p in produced[1:]):
        raise ExportError(
            "the UNet variants were cut differently",
            where="segmented export",
            expected="the same segments for every batch",
            got=[len(u.segments) for u in unets],
        )
    produced_in = produced[0]
    return tuple(
        Boundary(
            layer=layer.layer,
            kind=layer.kind,
            segment=produced_in[layer.probs],
            probs=layer.probs,
            hidden=layer.hidden,
            hidden_segment=produced_in[layer.hidden] if layer.hidden else None,
            resolution=layer.resolution,
            downscale=layer.downscale,
            heads=layer.heads,
            head_dim=layer.head_dim,
            queries=layer.queries,
            keys=layer.keys,
        )
        for layer in layers
    )
