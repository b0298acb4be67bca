"""``export_model``: a model → an export folder (ONNX graphs, tokenizer, scheduler config and
``manifest.json``), written to a temporary folder and renamed at the end, so an interrupted
export never leaves anything that looks complete."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from tqdm.auto import tqdm

from adapedit.errors import ConfigError, ExportError
from adapedit.export.onnx_export import (
    DEFAULT_OPSET,
    PRECISIONS,
    check_opset,
    export_text_encoder,
    export_unet,
    export_vae_decoder,
    export_vae_encoder,
)
from adapedit.export.segment import prune, split
from adapedit.io import atomic_folder
from adapedit.models import Components, load_model
from adapedit.spec import NOISE, Boundary, GraphSpec, Manifest, TensorSpec

FORMS = ("segmented", "whole", "both")
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


def export_model(
    model: str | Components,
    out: str | Path,
    *,
    precision: str = "fp32",
    form: str = "both",
    height: int | None = None,
    width: int | None = None,
    opset: int = DEFAULT_OPSET,
    self_max_queries: int = 256,
    progress: bool = True,
) -> Manifest:
    """Export a model's text encoder, VAE and UNet (``form``: segmented, whole or both) to
    ``out`` (which must not exist). ``height``/``width`` (pixels) fix which self-attention
    layers are controlled (≤ ``self_max_queries`` queries); the graphs accept any batch and any
    resolution that is a multiple of the model's size multiple.

    Raises:
        ExportError: ``out`` exists, unsupported opset, or a graph that cannot be cut.
        ConfigError: unknown precision or form, or a resolution the model cannot take.
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
    check_opset(opset)
    if precision not in PRECISIONS:
        raise ConfigError(
            "unknown precision", where="export", expected="fp32 | fp16", got=precision
        )
    if form not in FORMS:
        raise ConfigError("unknown form", where="export", expected=" | ".join(FORMS), got=form)
    c = load_model(model) if isinstance(model, str) else model
    h, w = height or c.default_size, width or c.default_size
    latent_hw = c.latent_hw(h, w)

    with atomic_folder(out) as tmp:
        return _export_into(
            tmp, c, precision, form, latent_hw, opset, self_max_queries, progress, (h, w)
        )


def _export_into(
    tmp: Path,
    c: Components,
    precision: str,
    form: str,
    latent_hw: tuple[int, int],
    opset: int,
    self_max_queries: int,
    progress: bool,
    size: tuple[int, int],
) -> Manifest:
    stages = ["text encoder", "VAE decoder", "VAE encoder", "UNet", "UNet forms"]
    bar = tqdm(stages, desc="export", disable=not progress)
    graphs: dict[str, GraphSpec] = {}

    def stage(name: str) -> None:
        bar.set_postfix_str(name)
        bar.update(0)

    for key, fn in (
        ("text_encoder", lambda: export_text_encoder(c, precision, opset)),
        ("vae_decoder", lambda: export_vae_decoder(c, precision, opset, latent_hw)),
        ("vae_encoder", lambda: export_vae_encoder(c, precision, opset, latent_hw)),
    ):
        stage(key)
        m = fn()
        save_onnx(m, tmp / f"{key}.onnx")
        graphs[key] = graph_spec(m, f"{key}.onnx")
        bar.update(1)

    stage("UNet (tracing)")
    unet, layers = export_unet(c, precision, opset, latent_hw, self_max_queries)
    bar.update(1)
    stage("UNet forms")
    if form in ("whole", "both"):
        whole = prune(unet, [NOISE])
        save_onnx(whole, tmp / "unet" / "whole.onnx")
        graphs["unet"] = graph_spec(whole, "unet/whole.onnx")
    segments: list[GraphSpec] = []
    boundaries: list[Boundary] = []
    if form in ("segmented", "both"):
        parts = split(unet, [layer.probs for layer in layers])
        for k, part in enumerate(parts):
            file = f"unet/segment_{k:02d}.onnx"
            save_onnx(part, tmp / file)
            segments.append(graph_spec(part, file))
        produced_in = {t.name: k for k, s in enumerate(segments) for t in s.outputs}
        boundaries = [
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
        ]
    bar.update(1)
    bar.close()

    c.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    (tmp / "scheduler_config.json").write_text(json.dumps(c.scheduler_config, indent=2))
    manifest = Manifest(
        model=c.name,
        config_hash=c.config_hash(),
        precision=precision,
        opset=opset,
        height=size[0],
        width=size[1],
        latent_channels=int(c.unet.config.in_channels),
        text_hidden=int(c.unet.config.cross_attention_dim),
        vae_scale_factor=c.vae_scale_factor,
        size_multiple=c.size_multiple,
        graphs=graphs,
        segments=tuple(segments),
        boundaries=tuple(boundaries),
    )
    manifest.save(tmp)
    return manifest
