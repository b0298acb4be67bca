"""The per-step edit of one attention layer (ALGORITHM.md §5): pure tensor functions shared by
the PyTorch reference (attention processors) and the runtime (between engine segments)."""

from __future__ import annotations

import torch

from adapedit.alignment import TokenMap
from adapedit.dps import dps_blend


def edit_cross_attention(
    src: torch.Tensor,
    edt: torch.Tensor,
    token_map: TokenMap,
    gate: torch.Tensor,
    *,
    s: torch.Tensor | None = None,
    lambda_s: float = 0.9,
    equalizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """The edit branch's cross-attention probabilities after the edit.

    For each edit token ``j``: injected (``gate_j = 1``) → P2P refine
    ``a_j · M_src→edt,j + (1 − a_j) · M_edt,j`` (times the equalizer for reweight); otherwise an
    aligned token gets DPS's ``C(M_src→edt,j, M_edt,j)`` (or ``M_edt,j`` without DPS) and an
    inserted token ``M_edt,j``. No renormalisation.

    Args:
        src: [H, P, T] source-branch probabilities.
        edt: [H, P, T] edit-branch probabilities.
        gate: [T] 1.0 where the token is injected at this step.
        s: [P] DPS pixel similarity, or None for no DPS.
    """
    alphas = token_map.alphas.to(edt)  # [T], on edt's device and dtype
    gate = gate.to(edt)  # [T]
    carried = token_map.carry(src)  # [H, P, T]
    injected = carried * alphas + edt * (1 - alphas)
    if equalizer is not None:
        injected = injected * equalizer.to(edt)
    if s is None:
        after = edt
    else:
        after = dps_blend(carried, edt, s, lambda_s) * alphas + edt * (1 - alphas)
    return injected * gate + (1 - gate) * after


def edit_self_attention(src: torch.Tensor, edt: torch.Tensor, inject: bool) -> torch.Tensor:
    """Self-attention of a controlled (≤ 256-query) layer: the source's probabilities while
    ``inject`` (``s < ⌊τ_self · N⌋``), else the edit branch's own. Shapes [H, P, P]."""
    return src if inject else edt
