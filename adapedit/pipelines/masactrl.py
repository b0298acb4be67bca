"""MasaCtrl — mutual self-attention control (Cao et al. 2023; ALGORITHM.md §12) on the PyTorch
reference pipeline, a baseline for non-rigid edits.

The source and the edit prompt are denoised together from the same seed (the edit batch
:data:`~adapedit.algorithm.layout.EDIT`, ``[u_src, u_edt, c_src, c_edt]``). From denoising step
``S`` on, and in the decoder's
self-attention layers from transformer layer ``L`` on (layers counted in call order: down, mid,
up), the edit branch's self-attention takes its own queries with the **source branch's keys and
values**, per classifier-free-guidance half (uncond edit ← uncond source, cond edit ← cond
source):

    MasaAttn(Q_edt, K_src, V_src) = softmax(Q_edt K_srcᵀ / √d) V_src

so the edit keeps the source's appearance (queried where the edit prompt wants its layout)
while the layout is free to change. Before ``S``, below ``L`` and outside the decoder the
self-attention is plain; cross-attention is never touched; the source branch is plain
generation of the source prompt, bit for bit.

The paper's defaults are ``S = 4`` of 50 steps and ``L = 10`` of SD's 16 transformer layers
(the decoder's two highest-resolution levels). Unless given, both are scaled: ``S`` to the
number of UNet calls of the pass, ``L`` to the UNet's count of transformer layers (10 of 16 →
``round(10 · n / 16)``, which on a UNet with one transformer per down level and two per up
level — ``tiny``, ``shapes`` — is again the first layer of the decoder's second level).

MasaCtrl runs on :class:`~adapedit.pipelines.pipeline.ReferencePipeline` only: its processors wrap
the UNet's for the duration of a run and are removed afterwards. They read the step index the
sampling loop passes (the pipeline's :class:`~adapedit.pipelines.processors.ControlSlot`) and act
only while their :class:`MasaCtrlSchedule` is the slot's controller; every batch index comes from
the schedule's :class:`~adapedit.algorithm.layout.BatchLayout`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from adapedit.algorithm.alignment import tokenize
from adapedit.algorithm.layout import EDIT, BatchLayout
from adapedit.config import EditConfig, SamplerConfig
from adapedit.errors import ConfigError, ModelError
from adapedit.pipelines.processors import ControlSlot, attention_layers, is_cross_layer

#: The paper's schedule on SD v1.4: from step 4 of 50, from transformer layer 10 of 16.
PAPER_START_STEP, PAPER_STEPS = 4, 50
PAPER_START_LAYER, PAPER_LAYERS = 10, 16


def default_start_step(num_steps: int) -> int:
    """The paper's start step (4 of 50) scaled to a pass of ``num_steps`` UNet calls."""
    return round(PAPER_START_STEP * num_steps / PAPER_STEPS)


def default_start_layer(num_layers: int) -> int:
    """The paper's start layer (10 of SD's 16 transformer layers) scaled to ``num_layers``."""
    return round(PAPER_START_LAYER * num_layers / PAPER_LAYERS)


@dataclass(frozen=True)
class MasaCtrlConfig:
    """MasaCtrl's switches: the first denoising step (index of the UNet call) and the first
    transformer layer (index in call order: down, mid, up) where the edit branch's decoder
    self-attention reads the source's keys and values. ``None`` scales the paper's default."""

    start_step: int | None = None
    start_layer: int | None = None

    def __post_init__(self) -> None:
        for name in ("start_step", "start_layer"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 0):
                raise ConfigError(
                    f"{name} must be a non-negative integer or None",
                    where="MasaCtrlConfig",
                    expected="e.g. 4 (None: the paper's default, scaled)",
                    got=value,
                )

    def resolved(self, num_steps: int, num_layers: int) -> tuple[int, int]:
        """(start step, start layer) for a pass of ``num_steps`` calls on ``num_layers``
        transformer layers."""
        step = default_start_step(num_steps) if self.start_step is None else self.start_step
        layer = default_start_layer(num_layers) if self.start_layer is None else self.start_layer
        return step, layer


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale) v. q: [..., P, d], k and v: [..., K, d] → [..., P, d]."""
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # [..., P, K]
    return probs @ v


def edit_rows(layout: BatchLayout = EDIT) -> list[int]:
    """The batch indices of the edit branch, one per CFG half (``[1, 3]`` in
    :data:`~adapedit.algorithm.layout.EDIT`)."""
    return [layout.index("edit", h) for h in layout.halves]


def lender_rows(layout: BatchLayout = EDIT) -> list[int]:
    """For each of :func:`edit_rows`, the source branch of the same CFG half, which lends its
    keys and values (``[0, 2]`` in :data:`~adapedit.algorithm.layout.EDIT`)."""
    return [layout.index("source", h) for h in layout.halves]


def mutual_self_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, layout: BatchLayout = EDIT
) -> torch.Tensor:
    """The edit rows' mutual self-attention: each edit row's queries over the keys and values
    of the source row of its CFG half. q, k, v: [B, H, P, d] in ``layout`` (B = its size) →
    [halves, H, P, d], in the order of :func:`edit_rows`."""
    edit, lend = edit_rows(layout), lender_rows(layout)
    return attention(q[edit], k[lend], v[lend], scale)  # [2, H, P, d]


def transformer_layers(unet) -> list[str]:
    """Module paths of the self-attention layers (``attn1``) of the UNet's transformer blocks in
    call order — down blocks, mid block, up blocks — which is how MasaCtrl counts layers."""
    part = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    names = [name for name, _ in attention_layers(unet) if not is_cross_layer(name)]
    return sorted(names, key=lambda name: part[name.split(".")[0]])  # stable within a part


@dataclass
class MasaCtrlSchedule:
    """Where and when the mutual self-attention is on. Passed to the sampling loop as its
    :class:`~adapedit.pipelines.controller.Controller` (layout
    :data:`~adapedit.algorithm.layout.EDIT`): it leaves the controlled layers' probabilities and the
    latents as they are — the work happens in :class:`MutualSelfAttnProcessor`, which asks
    :meth:`active` with the step the loop passed."""

    start_step: int
    start_layer: int
    #: the decoder's self-attention layers by module path → their index in call order
    layer_index: dict[str, int] = field(default_factory=dict)
    layout: BatchLayout = EDIT

    def active(self, layer_id: str, step: int) -> bool:
        """Whether layer ``layer_id`` mixes at UNet call ``step`` of the pass."""
        index = self.layer_index.get(layer_id)
        return index is not None and index >= self.start_layer and step >= self.start_step

    def __call__(
        self,
        layer_id: str,
        is_cross: bool,
        probs: torch.Tensor,
        hidden: torch.Tensor | None,
        step: int,
    ) -> torch.Tensor:
        return probs

    def after_step(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        return latents


class MutualSelfAttnProcessor:
    """Wraps a self-attention layer's processor: the whole batch goes through it as before (so
    the source rows are exactly what they would be), then, while ``schedule`` is the slot's
    controller and active at the slot's step, the edit rows are replaced by their mutual
    self-attention."""

    def __init__(self, inner, layer_id: str, schedule: MasaCtrlSchedule, slot: ControlSlot) -> None:
        self.inner, self.layer_id, self.schedule, self.slot = inner, layer_id, schedule, slot

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb=None,
        **kwargs,
    ) -> torch.Tensor:
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if self.slot.controller is not self.schedule or not self.schedule.active(
            self.layer_id, self.slot.step
        ):
            return out
        layout = self.schedule.layout
        # hidden_states: [B, P, C] in the schedule's layout
        batch, queries, _ = hidden_states.shape
        if batch != layout.size:
            raise ModelError(
                "MasaCtrl's batch does not fit its layout",
                where=f"MutualSelfAttnProcessor({self.layer_id})",
                expected=f"{layout.size} samples {layout.branches}",
                got=f"{batch} samples",
            )
        heads = attn.heads
        q, k, v = (
            x.view(batch, queries, heads, -1).transpose(1, 2)
            for x in (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states))
        )  # [4, H, P, d]
        rows = edit_rows(layout)
        mixed = mutual_self_attention(q, k, v, attn.scale, layout)  # [2, H, P, d]
        mixed = mixed.transpose(1, 2).reshape(len(rows), queries, -1)  # [2, P, H*d]
        mixed = attn.to_out[1](attn.to_out[0](mixed))
        if attn.residual_connection:
            mixed = mixed + hidden_states[rows]
        index = torch.tensor(rows, device=out.device)
        return out.index_copy(0, index, (mixed / attn.rescale_output_factor).to(out.dtype))


@contextmanager
def mutual_self_attention_installed(
    unet, schedule: MasaCtrlSchedule, slot: ControlSlot
) -> Iterator[None]:
    """Wrap the processors of the decoder's self-attention layers for the block (reading the
    step and the current controller from ``slot``, the one the UNet's processors share);
    restore the previous processors afterwards (also on error). Fills
    ``schedule.layer_index``."""
    order = transformer_layers(unet)
    modules = dict(attention_layers(unet))
    decoder = [name for name in order if name.startswith("up_blocks.")]
    schedule.layer_index = {name: order.index(name) for name in decoder}
    previous = {name: modules[name].processor for name in decoder}
    try:
        for name in decoder:
            modules[name].set_processor(
                MutualSelfAttnProcessor(previous[name], name, schedule, slot)
            )
        yield
    finally:
        for name, processor in previous.items():
            modules[name].set_processor(processor)


@dataclass
class MasaCtrlResult:
    """Both images [H, W, 3] uint8, the schedule used, and, if asked, the latents [2, C, h, w]
    (source, edit) after every step."""

    source_image: np.ndarray
    edited_image: np.ndarray
    start_step: int
    start_layer: int
    latents: list[torch.Tensor] = field(default_factory=list)


def masactrl_edit(
    pipe,
    source: str,
    target: str,
    config: MasaCtrlConfig = MasaCtrlConfig(),
    sampler: SamplerConfig = SamplerConfig(),
    *,
    record_latents: bool = False,
    progress: bool = False,
) -> MasaCtrlResult:
    """Edit ``source`` into ``target`` with MasaCtrl on a
    :class:`~adapedit.pipelines.pipeline.ReferencePipeline` (one pass, no calibration)."""
    for prompt in (source, target):
        tokenize(pipe.tokenizer, prompt)  # validates the length first
    x0 = pipe.initial_latent(sampler)  # [1, 4, h, w]; validates the resolution
    pipe.prepare(EditConfig(), tuple(x0.shape[-2:]), (EDIT.size,))
    unet = pipe.components.unet
    start_step, start_layer = config.resolved(
        pipe.num_steps(sampler), len(transformer_layers(unet))
    )
    schedule = MasaCtrlSchedule(start_step, start_layer)
    layout = schedule.layout
    uncond, c_src, c_edt = pipe.encode(["", source, target]).split(1)
    embeddings = layout.stack(uncond, {"source": c_src, "edit": c_edt})  # [4, 77, D]
    record: list[torch.Tensor] | None = [] if record_latents else None
    with mutual_self_attention_installed(unet, schedule, pipe.slot):
        latents = pipe.denoise(
            torch.cat([x0] * len(layout.prompts)),  # [2, 4, h, w] (source, edit)
            embeddings,
            sampler,
            schedule,
            desc="masactrl",
            progress=progress,
            record=record,
        )
    images = pipe.decode(latents)
    return MasaCtrlResult(
        images[layout.latent_index("source")],
        images[layout.latent_index("edit")],
        start_step,
        start_layer,
        record or [],
    )
