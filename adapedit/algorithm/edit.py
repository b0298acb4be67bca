"""The per-step edit of one attention layer (ALGORITHM.md §5): pure tensor functions shared by
the PyTorch reference (attention processors), the segmented runtime (between engine segments)
and the fused graph (traced into the UNet).

They trace: every switch is a tensor (0.0 or 1.0) applied by multiplication, never a Python
branch on a value, and nothing calls ``.item()``. Multiplying finite probabilities by exact 0s
and 1s is exact, so a switched-off term leaves the result bit for bit as if it were absent.
"""

from __future__ import annotations

import torch

from adapedit.algorithm.dps import dps_blend, pixel_similarity
from adapedit.algorithm.layout import BatchLayout


def edit_cross_attention(
    src: torch.Tensor,
    edt: torch.Tensor,
    carry: torch.Tensor,
    alphas: torch.Tensor,
    gate: torch.Tensor,
    *,
    s: torch.Tensor,
    lambda_s: torch.Tensor,
    dps_on: torch.Tensor,
    equalizer: torch.Tensor,
) -> torch.Tensor:
    """The edit branch's cross-attention probabilities after the edit.

    For each edit token ``j``: injected (``gate_j = 1``) → P2P refine
    ``a_j · M_src→edt,j + (1 − a_j) · M_edt,j`` (times the equalizer for reweight); otherwise an
    aligned token gets DPS's ``C(M_src→edt,j, M_edt,j)`` (with ``dps_on = 1``; else ``M_edt,j``)
    and an inserted token ``M_edt,j``. No renormalisation.

    Args:
        src: [H, P, T] source-branch probabilities.
        edt: [H, P, T] edit-branch probabilities.
        carry: [T, T] ``M_src→edt = src @ carry`` (one-hot columns for refine).
        alphas: [T] ``a_j``: 1 aligned, 0 inserted.
        gate: [T] 1 where the token is injected at this step.
        s: [P] DPS pixel similarity.
        lambda_s, dps_on: [] λ_S and the DPS switch.
        equalizer: [T] reweight factors (ones unless reweighting).
    """
    carried = src @ carry  # [H, P, T]
    injected = (carried * alphas + edt * (1 - alphas)) * equalizer  # [H, P, T]
    blended = dps_blend(carried, edt, s, lambda_s) * alphas + edt * (1 - alphas)  # [H, P, T]
    after = blended * dps_on + edt * (1 - dps_on)  # [H, P, T]
    return injected * gate + (1 - gate) * after


def edit_self_attention(src: torch.Tensor, edt: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Self-attention of a controlled (≤ 256-query) layer: the source's probabilities while
    ``gate = 1`` (``s < ⌊τ_self · N⌋``), else the edit branch's own. ``src``, ``edt``:
    [H, P, P]; ``gate``: []."""
    return src * gate + edt * (1 - gate)


def edit_probs(
    probs: torch.Tensor,
    hidden: torch.Tensor | None,
    layout: BatchLayout,
    *,
    is_cross: bool,
    carry: torch.Tensor,
    alphas: torch.Tensor,
    equalizer: torch.Tensor,
    cross_gate: torch.Tensor,
    self_gate: torch.Tensor,
    e_k: torch.Tensor,
    lambda_s: torch.Tensor,
    lambda_sv: torch.Tensor,
    dps_on: torch.Tensor,
) -> torch.Tensor:
    """One controlled layer of an edit pass: a new probability tensor equal to ``probs``
    [B·H, P, K] except the conditional edit branch, edited from the conditional source branch
    (§5). ``hidden`` [B, P, C] is the layer's input (cross-attention: DPS's ``E_V``); ``e_k``
    [C] the layer's keyword embedding (any values when ``dps_on = 0``). ``probs`` is not
    modified."""
    v = layout.split(probs)  # [B, H, P, K]
    src, edt = v[layout.index("source")], v[layout.index("edit")]  # [H, P, K]
    if is_cross:
        s = pixel_similarity(hidden[layout.index("edit")], e_k, lambda_sv)  # [P]
        new = edit_cross_attention(
            src,
            edt,
            carry,
            alphas,
            cross_gate,
            s=s,
            lambda_s=lambda_s,
            dps_on=dps_on,
            equalizer=equalizer,
        )
    else:
        new = edit_self_attention(src, edt, self_gate)
    return layout.with_branch(probs, "edit", new)


def branch_mean(probs: torch.Tensor, layout: BatchLayout, prompt: str) -> torch.Tensor:
    """The conditional branch of ``prompt``'s probabilities [B·H, P, K], averaged over heads in
    float32: [P, K]. What the calibration pass, LocalBlend and the attention image keep of a
    layer."""
    return layout.split(probs)[layout.index(prompt)].float().mean(dim=0)
