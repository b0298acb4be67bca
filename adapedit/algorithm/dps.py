"""DPS — dynamic pixel-level spatial blending (ALGORITHM.md §7, Eq. 8–9)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pixel_similarity(
    hidden: torch.Tensor, e_k: torch.Tensor, lambda_sv: torch.Tensor | float
) -> torch.Tensor:
    """Eq. 9: ``S(p) = clamp(λ_SV · ⟨normalize(E_V(p)), E_k⟩, 0, 1)``.

    Args:
        hidden: [P, d] the layer's input hidden states of the edit branch at this step.
        e_k: [d] the layer's keyword embedding (unit norm) from the calibration pass.
        lambda_sv: [] or a float.

    Returns:
        S: [P], one value per pixel, shared by all tokens and heads.
    """
    return (lambda_sv * (F.normalize(hidden, dim=-1) @ e_k.to(hidden.dtype))).clamp(0.0, 1.0)


def dps_blend(
    carried: torch.Tensor, own: torch.Tensor, s: torch.Tensor, lambda_s: torch.Tensor | float
) -> torch.Tensor:
    """Eq. 8: ``C(Mc, Mc*) = λ_S [S ⊙ Mc* + (1 − S) ⊙ Mc] + (1 − λ_S) Mc``.

    Args:
        carried: [H, P, T] ``Mc``, source probabilities carried onto edit tokens.
        own: [H, P, T] ``Mc*``, the edit branch's own probabilities.
        s: [P] pixel similarity.
        lambda_s: [] or a float.
    """
    s = s[None, :, None]  # [1, P, 1]
    return lambda_s * (s * own + (1.0 - s) * carried) + (1.0 - lambda_s) * carried
