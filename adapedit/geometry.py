"""Where an attention layer works: its query grid relative to the latent, whether it is
cross-attention, and whether AdapEdit controls it (ALGORITHM.md §5). Plain arithmetic on module
paths and sizes, shared by the reference, the exporter and the runtime."""

from __future__ import annotations

import math

#: Downscale (relative to the latent) of the maps used by LocalBlend and the visualisation:
#: 16×16 at 512 px, as in P2P.
BLEND_DOWNSCALE = 4


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


def is_controlled_by_rule(is_cross: bool, queries: int, self_max_queries: int) -> bool:
    """ALGORITHM.md §5: every cross-attention layer; self-attention with ≤ 256 queries."""
    return is_cross or queries <= self_max_queries
