"""LocalBlend (ALGORITHM.md §9, from P2P): keep the edit inside the region of chosen words."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def local_blend_mask(
    maps: torch.Tensor, latent_hw: tuple[int, int], threshold: float, pool: int = 3
) -> torch.Tensor:
    """The blend mask from accumulated word maps.

    Args:
        maps: [2, h, w] per prompt (source, edit): the chosen words' cross-attention maps at the
            LocalBlend resolution, summed over their tokens, averaged over heads and layers and
            accumulated over the steps so far. A prompt without chosen words has all zeros.
        latent_hw: the latent's (height, width).
        pool: the max-pool window's side (odd; P2P's ``k = 1`` is 3, 1 is no pooling).

    Returns:
        [1, 1, H, W] float mask: 1 where either prompt's normalised, max-pooled, upsampled map
        exceeds ``threshold``.
    """
    m = F.max_pool2d(maps[:, None], kernel_size=pool, stride=1, padding=pool // 2)  # [2,1,h,w]
    m = F.interpolate(m, size=latent_hw)  # [2, 1, H, W]
    peak = m.amax(dim=(2, 3), keepdim=True)  # [2, 1, 1, 1]
    m = torch.where(peak > 0, m / peak.clamp_min(torch.finfo(m.dtype).tiny), 0.0)
    return (m > threshold).any(dim=0, keepdim=True).to(maps.dtype)  # [1, 1, H, W]


def apply_local_blend(src: torch.Tensor, edt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x_edt = x_src + mask · (x_edt − x_src)``: the blended edit latent from the source and
    edit latents [C, H, W] and the mask [1, 1, H, W] → [C, H, W]."""
    return (src + mask * (edt - src))[0]
