"""PyTorch → ONNX for the text encoder, the VAE (decoder and encoder) and the UNet, with
``torch.onnx.export(..., dynamo=True)``: opset ≥ 17, fp32 or fp16, and either dynamic batch and
resolution or static (``batch`` given: every shape a constant of the graph, specialised to that
batch and to the example's resolution — no shape arithmetic left for an engine to do).

The UNet is exported once with explicit attention in the controlled layers and extra outputs:
each controlled layer's attention probabilities (``<layer>.probs``, [B*H, P, K]) and each
controlled cross-attention layer's input hidden states (``<layer>.hidden``, [B, P, C]). The
whole and the segmented forms are both cut from that one graph.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import onnx
import torch

from adapedit.algorithm.geometry import is_cross_layer, layer_downscale
from adapedit.errors import ExportError
from adapedit.pipelines.models import Components
from adapedit.pipelines.processors import (
    ControlSlot,
    attention_geometry,
    controlled_layers,
    install_processors,
    sdpa_heads,
)
from adapedit.spec import NOISE, UNET_INPUTS

MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 17, 23, 18
_SYMBOL = re.compile(r"[A-Za-z_]\w*")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}


def check_opset(opset: int) -> None:
    if not (isinstance(opset, int) and MIN_OPSET <= opset <= MAX_OPSET):
        raise ExportError(
            "unsupported ONNX opset",
            where="export",
            expected=f"{MIN_OPSET} ≤ opset ≤ {MAX_OPSET}",
            got=opset,
        )


@torch.library.custom_op("adapedit::ort_multi_head_attention", mutates_args=())
def ort_multi_head_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    """:func:`~adapedit.pipelines.processors.sdpa_heads` as one operator, which the exporter
    writes as ONNX Runtime's ``com.microsoft.MultiHeadAttention``: ``query`` [B, P, H·d],
    ``key`` and ``value`` [B, K, H·d] → [B, P, H·d]."""
    return sdpa_heads(query, key, value, heads, scale)


@ort_multi_head_attention.register_fake
def _(query, key, value, heads, scale):
    return query.new_empty((*query.shape[:2], value.shape[-1]))  # [B, P, H·d]


@cache
def _microsoft_opset():
    """onnxscript's opset ``com.microsoft``, knowing ``MultiHeadAttention`` (onnxscript writes
    an operator only by its schema, and onnx has none for ONNX Runtime's own operators: the one
    registered here declares the inputs and attributes written, a subset of ONNX Runtime's)."""
    import onnxscript
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema("MultiHeadAttention", 1, "com.microsoft")
    except onnx.defs.SchemaError:
        arg = OpSchema.FormalParameter
        onnx.defs.register_schema(
            OpSchema(
                "MultiHeadAttention",
                "com.microsoft",
                1,
                inputs=[arg("query", "T"), arg("key", "T"), arg("value", "T")],
                outputs=[arg("output", "T")],
                type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
                attributes=[
                    OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "heads"),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "softmax scale"),
                ],
            )
        )
    return onnxscript.values.Opset("com.microsoft", 1)


def _multi_head_attention_onnx(query, key, value, heads: int, scale: float):
    return _microsoft_opset().MultiHeadAttention(
        query, key, value, num_heads=heads, scale=scale
    )  # [B, P, H·d]


def _attend(attention_op: str):
    """What a UNet's uncontrolled layers attend with in an export of ``attention_op``."""
    return torch.ops.adapedit.ort_multi_head_attention if attention_op == "ort" else sdpa_heads


def _to_onnx(
    module: torch.nn.Module,
    args: tuple,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes,
    opset: int,
) -> onnx.ModelProto:
    # how the custom operator is written, where a module calls it (``_attend``); a module that
    # does not is exported as without the table
    table = {torch.ops.adapedit.ort_multi_head_attention.default: _multi_head_attention_onnx}
    with warnings.catch_warnings(), torch.no_grad(), _quiet_loggers("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=table,
            verbose=False,
        )
    model = program.model_proto
    _name_dims(model, program.exported_program, input_names)
    return model


def _name_dims(model: onnx.ModelProto, program, input_names: list[str]) -> None:
    """Write every symbolic dim in terms of the input dims' names (``batch``, ``lh``, ``lw``).

    The exporter names the graph inputs' dims after the ``Dim`` objects but leaves tracer
    symbols (``s24``, ``s92``) in intermediate shapes; the placeholders of the exported program
    tell which tracer symbol each named dim is. Shapes in the manifest are then expressions of
    the input dims alone, which the runtime and the TensorRT profiles evaluate.
    """
    user_inputs = set(program.graph_signature.user_inputs)
    placeholders = [
        n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs
    ]
    graph_inputs = {v.name: v for v in model.graph.input}
    rename: dict[str, str] = {}
    for name, node in zip(input_names, placeholders, strict=True):
        value = graph_inputs.get(name)
        if value is None:
            continue
        for dim, traced in zip(
            value.type.tensor_type.shape.dim, node.meta["val"].shape, strict=True
        ):
            ours = _SYMBOL.findall(dim.dim_param)
            expr = getattr(getattr(traced, "node", None), "expr", None)
            theirs = sorted(str(s) for s in expr.free_symbols) if expr is not None else []
            if len(ours) == 1 and len(theirs) == 1:
                rename[theirs[0]] = ours[0]
    if not rename:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, rename)) + r")\b")
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: rename[m.group(1)], dim.dim_param)


@contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the given loggers to ERROR for the duration (export chatter users cannot act on:
    torchvision ops not registered, diffusers' notes on casting modules)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _copy_as(module: torch.nn.Module, precision: str) -> torch.nn.Module:
    with _quiet_loggers("diffusers"):
        return copy.deepcopy(module).to(PRECISIONS[precision]).eval()


class _TextEncoder(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        return self.encoder(input_ids)[0]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent / self.vae.config.scaling_factor).sample


class _VaeEncoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image).latent_dist.mean * self.vae.config.scaling_factor


def export_text_encoder(
    c: Components, precision: str, opset: int, batch: int | None = None
) -> onnx.ModelProto:
    """``input_ids`` [B, 77] int64 → ``text_embeddings`` [B, 77, D]; static when ``batch`` is
    given."""
    ids = torch.tensor([c.tokenizer("", padding="max_length", max_length=77).input_ids])
    ids = ids.expand(batch or 2, -1).contiguous()
    dims = None if batch else ({0: torch.export.Dim("batch", min=1, max=64)},)
    return _to_onnx(
        _TextEncoder(_copy_as(c.text_encoder, precision)),
        (ids,),
        input_names=["input_ids"],
        output_names=["text_embeddings"],
        dynamic_shapes=dims,
        opset=opset,
    )


def _latent_dims(c: Components, scale: int = 1) -> tuple[dict[int, object]]:
    """The dynamic dims of a [B, C, H, W] input whose H and W are ``scale`` × the latent's."""
    m = 2 ** (len(c.unet.config.block_out_channels) - 1) * scale  # UNet downsampling
    return (
        {
            0: torch.export.Dim("batch", min=1, max=64),
            2: m * torch.export.Dim("lh", min=1, max=64),
            3: m * torch.export.Dim("lw", min=1, max=64),
        },
    )


def export_vae_decoder(
    c: Components, precision: str, opset: int, latent_hw: tuple[int, int], batch: int | None = None
) -> onnx.ModelProto:
    """``latent`` [B, 4, h, w] (sampler scale) → ``image`` [B, 3, 8h, 8w] in [-1, 1]; static
    (``batch`` × ``latent_hw``) when ``batch`` is given."""
    z = torch.randn(
        batch or 2, c.vae.config.latent_channels, *latent_hw, dtype=PRECISIONS[precision]
    )
    return _to_onnx(
        _VaeDecoder(_copy_as(c.vae, precision)),
        (z,),
        input_names=["latent"],
        output_names=["image"],
        dynamic_shapes=None if batch else _latent_dims(c),
        opset=opset,
    )


def export_vae_encoder(
    c: Components, precision: str, opset: int, latent_hw: tuple[int, int], batch: int | None = None
) -> onnx.ModelProto:
    """``image`` [B, 3, H, W] in [-1, 1] → ``latent`` [B, 4, H/8, W/8] (mean, sampler scale);
    static when ``batch`` is given."""
    f = c.vae_scale_factor
    x = torch.randn(batch or 2, 3, latent_hw[0] * f, latent_hw[1] * f, dtype=PRECISIONS[precision])
    return _to_onnx(
        _VaeEncoder(_copy_as(c.vae, precision)),
        (x,),
        input_names=["image"],
        output_names=["latent"],
        dynamic_shapes=None if batch else _latent_dims(c, f),
        opset=opset,
    )


@dataclass(frozen=True)
class LayerExport:
    """A controlled layer as exported: its geometry at the export resolution and the names of
    its probability and (cross-attention) hidden-state outputs."""

    layer: str
    kind: str
    probs: str
    hidden: str | None
    heads: int
    head_dim: int
    queries: int
    keys: int
    resolution: tuple[int, int]
    downscale: int


class _CapturingUNet(torch.nn.Module):
    """The UNet returning, after the noise prediction, each controlled layer's probabilities and
    (cross-attention) input hidden states, in call order."""

    def __init__(self, unet, controlled: list[str]):
        super().__init__()
        self.unet = unet
        self.slot = ControlSlot(controlled=frozenset(controlled))
        install_processors(unet, self.slot)
        self.order: list[str] = []

    def forward(self, sample, timestep, encoder_hidden_states):
        captured: list[torch.Tensor] = []
        self.order.clear()

        def capture(layer_id, is_cross, probs, hidden, step):
            self.order.append(layer_id)
            captured.append(probs)
            if is_cross:
                captured.append(hidden)
            return probs

        self.slot.controller = capture
        try:
            out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
        finally:
            self.slot.controller = None
        return (out, *captured)


def export_unet(
    c: Components,
    precision: str,
    opset: int,
    latent_hw: tuple[int, int],
    attention_limits: str = "scaled",
    batch: int | None = None,
    attention_op: str = "onnx",
) -> tuple[onnx.ModelProto, list[LayerExport]]:
    """The UNet with probability and hidden-state outputs for every layer controlled at
    ``latent_hw`` (the export resolution), its other attention layers written as
    ``attention_op`` says; see the module docstring. Static (``batch`` × ``latent_hw``) when
    ``batch`` is given."""
    controlled = controlled_layers(c.unet, latent_hw, attention_limits)
    wrapper = _CapturingUNet(_copy_as(c.unet, precision), controlled).eval()
    wrapper.slot.attend = _attend(attention_op)
    dtype = PRECISIONS[precision]
    sample = torch.randn(batch or 2, c.unet.config.in_channels, *latent_hw, dtype=dtype)
    t = torch.tensor([500.0])
    ctx = torch.randn(batch or 2, 77, c.unet.config.cross_attention_dim, dtype=dtype)
    m = 2 ** (len(c.unet.config.block_out_channels) - 1)
    with torch.no_grad():  # a small eager call records the call order (down, mid, up)
        wrapper(sample[:1, :, :m, :m], t, ctx[:1])
    order = list(wrapper.order)
    if sorted(order) != sorted(controlled):
        raise ExportError(
            "controlled layers were not each called once",
            where="UNet export",
            expected=sorted(controlled),
            got=sorted(order),
        )
    names = [NOISE]
    for layer in order:
        names.append(f"{layer}.probs")
        if is_cross_layer(layer):
            names.append(f"{layer}.hidden")
    dims = None
    if batch is None:
        (sample_dims,) = _latent_dims(c)
        dims = (sample_dims, None, {0: sample_dims[0]})
    model = _to_onnx(
        wrapper,
        (sample, t, ctx),
        input_names=list(UNET_INPUTS),
        output_names=names,
        dynamic_shapes=dims,
        opset=opset,
    )
    geometry = {name: (module, q) for name, module, q in attention_geometry(c.unet, latent_hw)}
    layers = []
    for layer in order:
        module, queries = geometry[layer]
        is_cross = is_cross_layer(layer)
        f = layer_downscale(latent_hw, queries)
        heads = module.heads
        layers.append(
            LayerExport(
                layer=layer,
                kind="cross" if is_cross else "self",
                probs=f"{layer}.probs",
                hidden=f"{layer}.hidden" if is_cross else None,
                heads=heads,
                head_dim=module.to_q.out_features // heads,
                queries=queries,
                keys=77 if is_cross else queries,
                resolution=(latent_hw[0] // f, latent_hw[1] // f),
                downscale=f,
            )
        )
    return model, layers


def export_fused(
    c: Components,
    precision: str,
    opset: int,
    latent_hw: tuple[int, int],
    attention_limits: str,
    batch: int,
    attention_op: str = "onnx",
) -> onnx.ModelProto:
    """The fused UNet (:mod:`adapedit.pipelines.fused`) of ``batch``'s mode, static at ``batch`` ×
    ``latent_hw``: the edit inside the graph (batch 4), the calibration pass's maps (batch 2),
    or the plain UNet (batch 1); the uncontrolled attention layers as ``attention_op`` says.

    Raises:
        ExportError: a batch with no fused mode.
    """
    from adapedit.pipelines.fused import (
        MODES,
        FusedUNet,
        example_controls,
        input_names,
        output_names,
    )

    if batch not in MODES:
        raise ExportError(
            "no fused UNet for this batch size",
            where="fused export",
            expected=f"one of {sorted(MODES)} ({', '.join(MODES.values())})",
            got=batch,
            field="batches",
        )
    mode = MODES[batch]
    layers = controlled_layers(c.unet, latent_hw, attention_limits)
    module = FusedUNet(_copy_as(c.unet, precision), layers, mode, latent_hw).eval()
    module.slot.attend = _attend(attention_op)
    dtype = PRECISIONS[precision]
    args = [
        torch.randn(batch, c.unet.config.in_channels, *latent_hw, dtype=dtype),
        torch.tensor([500.0]),
        torch.randn(batch, 77, c.unet.config.cross_attention_dim, dtype=dtype),
    ]
    args += example_controls(module, dtype)
    return _to_onnx(
        module,
        tuple(args),
        input_names=input_names(mode, layers),
        output_names=output_names(mode, layers),
        dynamic_shapes=None,
        opset=opset,
    )
