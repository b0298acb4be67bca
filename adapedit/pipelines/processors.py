"""Attention processors of the PyTorch reference: explicit attention in controlled layers, whose
probabilities go through the current controller, identified by the layer's module path."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adapedit.algorithm.geometry import is_controlled_by_rule, is_cross_layer, self_max_queries

#: What a controlled layer calls: ``hook(layer_id, is_cross, probs, hidden, step) -> probs`` —
#: a :class:`~adapedit.pipelines.controller.Controller`, or the exporter's capture of the tensors.
LayerHook = Callable[[str, bool, torch.Tensor, "torch.Tensor | None", int], torch.Tensor]


def sdpa_heads(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    """Softmax attention of ``heads`` heads by SDPA, on and to the layer's own layout: ``query``
    [B, P, H·d], ``key`` and ``value`` [B, K, H·d] → [B, P, H·d]. What the layers no edit reads
    attend with."""
    batch, queries, _ = query.shape
    q, k, v = (
        x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (query, key, value)
    )  # [B, H, ·, d]
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # [B, H, P, d]
    return out.transpose(1, 2).reshape(batch, queries, -1)  # [B, P, H·d]


#: What the layers outside the edit attend with: ``(query, key, value, heads, scale) -> out``,
#: as :func:`sdpa_heads` (its arithmetic; an export may put one operator in its place).
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


@dataclass
class ControlSlot:
    """Shared by all processors of a UNet: the controller of the current UNet call (or None),
    the call's step index in its pass, which layers are controlled, and what the others attend
    with (``attend``: :func:`sdpa_heads` unless an export traces an operator of its own)."""

    controller: LayerHook | None = None
    step: int = 0
    self_max_queries: int = 256
    controlled: frozenset[str] | None = None
    attend: Attend = sdpa_heads

    def is_controlled(self, layer_id: str, is_cross: bool, queries: int) -> bool:
        """The fixed set ``controlled`` if one is given (an export's layers); else cross-attention
        always and self-attention with at most ``self_max_queries`` queries."""
        if self.controlled is not None:
            return layer_id in self.controlled
        return is_controlled_by_rule(is_cross, queries, self.self_max_queries)


class ControlledAttnProcessor:
    """Explicit softmax attention (diffusers ``AttnProcessor`` math) for controlled layers, SDPA
    for the others. The choice depends only on the layer, never on whether a controller is set,
    so plain generation and the source branch of an edit run the same arithmetic."""

    def __init__(self, layer_id: str, slot: ControlSlot) -> None:
        self.layer_id = layer_id
        self.slot = slot

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb=None,
        **kwargs,
    ) -> torch.Tensor:
        is_cross = encoder_hidden_states is not None
        # hidden_states: [B, P, C] (transformer blocks of the SD UNet)
        queries = hidden_states.shape[1]
        context = encoder_hidden_states if is_cross else hidden_states  # [B, K, Cc]
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        if self.slot.is_controlled(self.layer_id, is_cross, queries):
            q, k, v = (attn.head_to_batch_dim(x) for x in (query, key, value))  # [B*H, ·, d]
            probs = attention_probs(attn, q, k)  # [B*H, P, K]
            if self.slot.controller is not None:
                probs = self.slot.controller(
                    self.layer_id,
                    is_cross,
                    probs,
                    hidden_states if is_cross else None,
                    self.slot.step,
                )
            out = attn.batch_to_head_dim(torch.bmm(probs, v))  # [B, P, H*d]
        else:
            out = self.slot.attend(query, key, value, attn.heads, attn.scale)  # [B, P, H*d]
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def attention_probs(attn, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities [B·H, P, K] from ``q`` [B·H, P, d] and ``k`` [B·H, K, d]:
    diffusers' ``Attention.get_attention_scores`` without a mask, bit for bit, except that the
    ignored ``baddbmm`` input (β = 0) is a broadcast scalar rather than an empty [B·H, P, K]
    tensor, which a static export would otherwise store as a constant of zeros."""
    dtype = q.dtype
    if attn.upcast_attention:
        q, k = q.float(), k.float()
    zero = torch.zeros(1, 1, 1, dtype=q.dtype, device=q.device)
    scores = torch.baddbmm(zero, q, k.transpose(-1, -2), beta=0, alpha=attn.scale)
    if attn.upcast_softmax:
        scores = scores.float()
    return scores.softmax(dim=-1).to(dtype)


def attention_layers(unet) -> list[tuple[str, object]]:
    """(module path, module) of every attention layer of the UNet, in module order."""
    from diffusers.models.attention_processor import Attention

    return [(name, m) for name, m in unet.named_modules() if isinstance(m, Attention)]


def _shared_time_embedding(module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output[:1]  # [1, C]: every sample of a call has the same timestep


def install_processors(unet, slot: ControlSlot) -> None:
    """Give every attention layer a :class:`ControlledAttnProcessor` sharing ``slot``, and make
    the UNet batch-invariant: the timestep embedding (the same for every sample of a call) is
    computed once as [1, C] and broadcast by the ResNet blocks, so no matrix product has a
    batch-sized M dimension whose BLAS kernel could change with the batch. A sample's
    arithmetic is then the same in a batch of 2 (plain generation) and of 4 (an edit)."""
    for name, module in attention_layers(unet):
        module.set_processor(ControlledAttnProcessor(name, slot))
    if not getattr(unet.time_proj, "_adapedit_shared", False):
        unet.time_proj.register_forward_hook(_shared_time_embedding)
        unet.time_proj._adapedit_shared = True


def controlled_layers(
    unet, latent_hw: tuple[int, int], attention_limits: str = "scaled"
) -> list[str]:
    """Module paths of the layers controlled at a latent size under ``attention_limits``, in
    module order: every cross-attention layer and the self-attention layers with at most
    :func:`~adapedit.algorithm.geometry.self_max_queries` queries (ALGORITHM.md §5)."""
    limit = self_max_queries(attention_limits, latent_hw)
    return [
        name
        for name, _, queries in attention_geometry(unet, latent_hw)
        if is_controlled_by_rule(is_cross_layer(name), queries, limit)
    ]


def attention_geometry(unet, latent_hw: tuple[int, int]) -> list[tuple[str, object, int]]:
    """(module path, module, query count) of every attention layer at a latent size. A layer in
    ``down_blocks.i`` / ``up_blocks.j`` / ``mid_block`` works at the latent downsampled once per
    level above it."""
    levels = len(unet.config.block_out_channels)
    out = []
    for name, module in attention_layers(unet):
        block, index = name.split(".")[0], name.split(".")[1]
        if block == "down_blocks":
            f = 2 ** int(index)
        elif block == "up_blocks":
            f = 2 ** (levels - 1 - int(index))
        else:
            f = 2 ** (levels - 1)
        out.append((name, module, (latent_hw[0] // f) * (latent_hw[1] // f)))
    return out
