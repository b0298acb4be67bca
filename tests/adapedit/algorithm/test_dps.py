"""DPS: pixel similarity (Eq. 9) and the blend C (Eq. 8), ALGORITHM.md §7."""

from __future__ import annotations

import torch

from adapedit.algorithm.dps import dps_blend, pixel_similarity

F64 = torch.float64

# [P=4, d=2] hidden states; E_k = [0.6, 0.8] (unit norm)
HIDDEN = torch.tensor([[3.0, 4.0], [0.0, -2.0], [10.0, 0.0], [0.0, 0.0]], dtype=F64)
E_K = torch.tensor([0.6, 0.8], dtype=F64)


def test_pixel_similarity_normalises_and_clamps():
    s = pixel_similarity(HIDDEN, E_K, 1.0)
    # normalize rows: [0.6, 0.8], [0, −1], [1, 0], [0, 0] (zero row stays zero)
    # · E_k:           1.0,      −0.8,     0.6,    0
    # clamp [0, 1]:    1.0,       0.0,     0.6,    0
    torch.testing.assert_close(s, torch.tensor([1.0, 0.0, 0.6, 0.0], dtype=F64))


def test_pixel_similarity_lambda_sv():
    # λ_SV = 0.5: [0.5, −0.4 → 0, 0.3, 0]
    torch.testing.assert_close(
        pixel_similarity(HIDDEN, E_K, 0.5), torch.tensor([0.5, 0.0, 0.3, 0.0], dtype=F64)
    )
    # λ_SV = 1.5: [1.5 → 1, −1.2 → 0, 0.9, 0]
    torch.testing.assert_close(
        pixel_similarity(HIDDEN, E_K, 1.5), torch.tensor([1.0, 0.0, 0.9, 0.0], dtype=F64)
    )


def test_pixel_similarity_scale_free():
    # only the direction of a pixel's feature counts: scaling the hidden states changes nothing
    torch.testing.assert_close(
        pixel_similarity(7.0 * HIDDEN, E_K, 1.0), pixel_similarity(HIDDEN, E_K, 1.0)
    )


def test_dps_blend_by_hand():
    # H=1, P=2, T=2
    carried = torch.tensor([[[0.2, 0.4], [0.6, 0.1]]], dtype=F64)  # Mc
    own = torch.tensor([[[0.8, 0.0], [0.2, 0.5]]], dtype=F64)  # Mc*
    s = torch.tensor([0.5, 0.25], dtype=F64)
    out = dps_blend(carried, own, s, 0.8)
    # λ_S [S·Mc* + (1−S)·Mc] + (1−λ_S)·Mc, λ_S = 0.8
    # p0 (S=0.5):  t0: 0.8·(0.4 + 0.1) + 0.2·0.2 = 0.40 + 0.04 = 0.44
    #              t1: 0.8·(0.0 + 0.2) + 0.2·0.4 = 0.16 + 0.08 = 0.24
    # p1 (S=0.25): t0: 0.8·(0.05 + 0.45) + 0.2·0.6 = 0.40 + 0.12 = 0.52
    #              t1: 0.8·(0.125 + 0.075) + 0.2·0.1 = 0.16 + 0.02 = 0.18
    expected = torch.tensor([[[0.44, 0.24], [0.52, 0.18]]], dtype=F64)
    torch.testing.assert_close(out, expected)


def test_dps_blend_limits():
    carried = torch.tensor([[[0.2, 0.4], [0.6, 0.1]]], dtype=F64)
    own = torch.tensor([[[0.8, 0.0], [0.2, 0.5]]], dtype=F64)
    # S = 0 everywhere → Mc; λ_S = 0 → Mc; S = 1 and λ_S = 1 → Mc*
    torch.testing.assert_close(dps_blend(carried, own, torch.zeros(2, dtype=F64), 0.9), carried)
    torch.testing.assert_close(dps_blend(carried, own, torch.rand(2, dtype=F64), 0.0), carried)
    torch.testing.assert_close(dps_blend(carried, own, torch.ones(2, dtype=F64), 1.0), own)


def test_dps_blend_shares_s_over_heads():
    # two heads with different maps; S is per pixel, the same for both heads
    carried = torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]], dtype=F64)  # [H=2, P=2, T=1]
    own = torch.zeros(2, 2, 1, dtype=F64)
    s = torch.tensor([0.5, 1.0], dtype=F64)
    # λ_S = 0.5: out = 0.5·(1−S)·Mc + 0.5·Mc = (1 − S/2)·Mc → p0 factor 0.75, p1 factor 0.5
    expected = torch.tensor([[[0.75], [0.0]], [[0.0], [0.5]]], dtype=F64)
    torch.testing.assert_close(dps_blend(carried, own, s, 0.5), expected)
