"""LocalBlend (ALGORITHM.md §9): 3×3 max-pool, nearest upsampling, max-normalisation, threshold,
union over the two prompts, and the latent blend."""

from __future__ import annotations

import torch

from adapedit.algorithm.blend import apply_local_blend, local_blend_mask


def _maps(src: dict, edt: dict) -> torch.Tensor:
    m = torch.zeros(2, 4, 4)
    for (i, j), v in src.items():
        m[0, i, j] = v
    for (i, j), v in edt.items():
        m[1, i, j] = v
    return m


def _block(*ranges: tuple[int, int, int, int]) -> torch.Tensor:
    """An [1, 1, 8, 8] mask with ones in the given [r0:r1, c0:c1] blocks."""
    m = torch.zeros(1, 1, 8, 8)
    for r0, r1, c0, c1 in ranges:
        m[0, 0, r0:r1, c0:c1] = 1.0
    return m


# Source map: 2.0 at (0,0), 0.5 at (3,3). After the 3×3 max-pool (stride 1, padding 1):
#   2 2 0 0          normalised by the max (2):   1 1 0    0
#   2 2 0 0                                       1 1 0    0
#   0 0 .5 .5                                     0 0 0.25 0.25
#   0 0 .5 .5                                     0 0 0.25 0.25
# > 0.3 keeps only the top-left 2×2 → after nearest upsampling to 8×8: rows 0-3, cols 0-3.
SRC = {(0, 0): 2.0, (3, 3): 0.5}
# Edit map: 0.1 at (3,0), 0.04 at (0,3). Pooled: rows 2-3 × cols 0-1 = 0.1,
# rows 0-1 × cols 2-3 = 0.04; normalised 1 and 0.4, both > 0.3
# → 8×8: rows 4-7 × cols 0-3 and rows 0-3 × cols 4-7.
EDT = {(3, 0): 0.1, (0, 3): 0.04}


def test_source_map_alone():
    mask = local_blend_mask(_maps(SRC, {}), (8, 8), 0.3)
    assert mask.shape == (1, 1, 8, 8)
    torch.testing.assert_close(mask, _block((0, 4, 0, 4)))


def test_edit_map_alone():
    mask = local_blend_mask(_maps({}, EDT), (8, 8), 0.3)
    torch.testing.assert_close(mask, _block((4, 8, 0, 4), (0, 4, 4, 8)))


def test_union_of_both_prompts():
    mask = local_blend_mask(_maps(SRC, EDT), (8, 8), 0.3)
    # everything except the bottom-right 4×4 block
    torch.testing.assert_close(mask, _block((0, 4, 0, 8), (4, 8, 0, 4)))


def test_lower_threshold_admits_the_weaker_region():
    # with threshold 0.2 the normalised 0.25 region of the source passes too
    mask = local_blend_mask(_maps(SRC, {}), (8, 8), 0.2)
    torch.testing.assert_close(mask, _block((0, 4, 0, 4), (4, 8, 4, 8)))


def test_threshold_is_strict():
    # 1.0 at (0,0), 0.5 at (3,3): normalised 0.5 is not > 0.5
    mask = local_blend_mask(_maps({(0, 0): 1.0, (3, 3): 0.5}, {}), (8, 8), 0.5)
    torch.testing.assert_close(mask, _block((0, 4, 0, 4)))


def test_max_pool_is_3x3():
    # a single peak at (1,1) spreads to rows 0-2 × cols 0-2 → 8×8 rows 0-5 × cols 0-5
    mask = local_blend_mask(_maps({}, {(1, 1): 0.7}), (8, 8), 0.3)
    torch.testing.assert_close(mask, _block((0, 6, 0, 6)))


def test_all_zero_maps_give_empty_mask_without_nan():
    mask = local_blend_mask(torch.zeros(2, 4, 4), (8, 8), 0.3)
    assert torch.isfinite(mask).all()
    torch.testing.assert_close(mask, torch.zeros(1, 1, 8, 8))


def test_apply_local_blend():
    src = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])  # [C=2, 2, 2]
    edt = torch.tensor([[[10.0, 20.0], [30.0, 40.0]], [[50.0, 60.0], [70.0, 80.0]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # [1, 1, 2, 2]
    out = apply_local_blend(src, edt, mask)
    # the edit latent where mask = 1, the source latent elsewhere (both channels)
    expected = torch.tensor([[[10.0, 2.0], [3.0, 40.0]], [[50.0, 6.0], [7.0, 80.0]]])
    torch.testing.assert_close(out, expected)


def test_apply_local_blend_fractional_mask():
    src, edt = torch.tensor([[[2.0]]]), torch.tensor([[[10.0]]])  # [1, 1, 1]
    # x_src + 0.25·(x_edt − x_src) = 2 + 0.25·8 = 4
    out = apply_local_blend(src, edt, torch.full((1, 1, 1, 1), 0.25))
    torch.testing.assert_close(out, torch.tensor([[[4.0]]]))
