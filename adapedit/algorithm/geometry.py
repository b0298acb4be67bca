"""Where an attention layer works: its query grid relative to the latent, whether it is
cross-attention, and whether AdapEdit controls it (ALGORITHM.md §5). Plain arithmetic on module
paths and sizes, shared by the reference, the exporter and the runtime."""

from __future__ import annotations

import math

#: P2P's constants, written for SD at 512 px (a 64×64 latent): self-attention is controlled in
#: the layers with at most 16×16 queries (the 1/4- and 1/8-resolution ones); LocalBlend reads
#: the cross-attention maps of the 1/4-resolution layers (16×16), max-pooled over 3×3 cells.
P2P_SELF_MAX_QUERIES = 256
P2P_BLEND_POOL = 3
#: Downscale (relative to the latent) of the maps used by LocalBlend and the visualisation:
#: 16×16 at 512 px, as in P2P, under either rule.
BLEND_DOWNSCALE = 4


def self_max_queries(rule: str, latent_hw: tuple[int, int]) -> int:
    """The most queries a controlled self-attention layer has (``EditConfig.attention_limits``):
    ``p2p-literal`` 256 at any size; ``scaled`` those of a layer at 1/4 of the latent,
    ``(h/4)·(w/4)`` — 256 at 512 px, 16 on a 16×16 latent — so the same layers are controlled
    at every resolution (the 1/4 ones and coarser, never the full- or half-resolution ones)."""
    if rule == "p2p-literal":
        return P2P_SELF_MAX_QUERIES
    return (latent_hw[0] // BLEND_DOWNSCALE) * (latent_hw[1] // BLEND_DOWNSCALE)


def blend_pool(rule: str, latent_hw: tuple[int, int]) -> int:
    """LocalBlend's max-pool window side, in map cells: ``p2p-literal`` 3 at any size;
    ``scaled`` the same share of the map as P2P's 3 of 16 cells, ``⌊3·s/16⌋`` made odd for a
    map of side ``s`` (3 at 512 px; 1, no pooling, on a 16×16 latent's 4×4 map, where a 3×3
    window covers the whole map at almost every step)."""
    if rule == "p2p-literal":
        return P2P_BLEND_POOL
    side = min(latent_hw) // BLEND_DOWNSCALE
    return (P2P_BLEND_POOL * side // 16) | 1


def layer_downscale(latent_hw: tuple[int, int], queries: int) -> int:
    """How many times smaller than the latent a layer with ``queries`` pixels is (1, 2, 4, …)."""
    return round(math.sqrt(latent_hw[0] * latent_hw[1] / queries))


def layer_hw(latent_hw: tuple[int, int], queries: int) -> tuple[int, int]:
    """The (h, w) of a layer's query grid."""
    f = layer_downscale(latent_hw, queries)
    return (latent_hw[0] // f, latent_hw[1] // f)


def is_cross_layer(layer_id: str) -> bool:
    """In SD's transformer blocks ``attn1`` is self-attention and ``attn2`` cross-attention."""
    return layer_id.endswith("attn2")


def is_controlled_by_rule(is_cross: bool, queries: int, max_queries: int) -> bool:
    """ALGORITHM.md §5: every cross-attention layer; self-attention with at most
    ``max_queries`` queries (:func:`self_max_queries`)."""
    return is_cross or queries <= max_queries
