"""The per-step edit of one attention layer (ALGORITHM.md §5), case by case.

Shared setup: H=1 head, P=2 pixels, T=4 tokens. Refine map: edit token 0 ← source 0 (aligned),
edit token 1 inserted (a=0), edit token 2 ← source 1 (aligned), edit token 3 ← source 3 (aligned).
DPS: S = [0.5, 0.25], λ_S = 0.8.
"""

from __future__ import annotations

import torch

from adapedit.algorithm.alignment import TokenMap
from adapedit.algorithm.edit import edit_cross_attention, edit_self_attention

F64 = torch.float64

SRC = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]], dtype=F64)  # [1, 2, 4]
EDT = torch.tensor([[[0.9, 0.15, 0.25, 0.35], [0.05, 0.45, 0.55, 0.65]]], dtype=F64)
# column j of the matrix: the source token edit token j takes (index [0, 1, 1, 3])
REFINE = TokenMap(
    alphas=torch.tensor([1.0, 0.0, 1.0, 1.0]),
    matrix=torch.eye(4)[:, [0, 1, 1, 3]],
)
S = torch.tensor([0.5, 0.25], dtype=F64)
LAMBDA_S = 0.8
ALL_IN = torch.ones(4)
ALL_OUT = torch.zeros(4)


def cross(src, edt, tm, gate, s=None, lambda_s=LAMBDA_S, equalizer=None):
    """``edit_cross_attention`` with float64 controls; ``s=None``: DPS off (switch 0)."""
    return edit_cross_attention(
        src,
        edt,
        tm.matrix.to(F64),
        tm.alphas.to(F64),
        gate.to(F64),
        s=torch.zeros(src.shape[1], dtype=F64) if s is None else s,
        lambda_s=torch.tensor(lambda_s, dtype=F64),
        dps_on=torch.tensor(0.0 if s is None else 1.0, dtype=F64),
        equalizer=torch.ones(4, dtype=F64) if equalizer is None else equalizer.to(F64),
    )


def col(x: torch.Tensor, j: int) -> torch.Tensor:
    return x[0, :, j]


def t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=F64)


def test_injected_aligned_tokens_take_carried_source_map():
    out = cross(SRC, EDT, REFINE, ALL_IN, s=S, lambda_s=LAMBDA_S)
    torch.testing.assert_close(col(out, 0), t(0.1, 0.5))  # source column 0
    torch.testing.assert_close(col(out, 2), t(0.2, 0.6))  # source column 1 (carried)
    torch.testing.assert_close(col(out, 3), t(0.4, 0.8))  # source column 3


def test_injected_inserted_token_takes_edit_map():
    out = cross(SRC, EDT, REFINE, ALL_IN, s=S, lambda_s=LAMBDA_S)
    torch.testing.assert_close(col(out, 1), t(0.15, 0.45))  # a = 0 → M_edt


def test_after_tau_aligned_tokens_with_dps_follow_eq8():
    out = cross(SRC, EDT, REFINE, ALL_OUT, s=S, lambda_s=LAMBDA_S)
    # C = 0.8·[S·Mc* + (1−S)·Mc] + 0.2·Mc
    # token 0: Mc = [0.1, 0.5], Mc* = [0.9, 0.05]
    #   p0: 0.8·(0.45 + 0.05) + 0.02 = 0.42;  p1: 0.8·(0.0125 + 0.375) + 0.1 = 0.41
    torch.testing.assert_close(col(out, 0), t(0.42, 0.41))
    # token 2: Mc = [0.2, 0.6] (source 1), Mc* = [0.25, 0.55]
    #   p0: 0.8·(0.125 + 0.1) + 0.04 = 0.22;  p1: 0.8·(0.1375 + 0.45) + 0.12 = 0.59
    torch.testing.assert_close(col(out, 2), t(0.22, 0.59))
    # token 3: Mc = [0.4, 0.8], Mc* = [0.35, 0.65]
    #   p0: 0.8·(0.175 + 0.2) + 0.08 = 0.38;  p1: 0.8·(0.1625 + 0.6) + 0.16 = 0.77
    torch.testing.assert_close(col(out, 3), t(0.38, 0.77))


def test_after_tau_inserted_token_takes_edit_map_even_with_dps():
    out = cross(SRC, EDT, REFINE, ALL_OUT, s=S, lambda_s=LAMBDA_S)
    torch.testing.assert_close(col(out, 1), t(0.15, 0.45))


def test_after_tau_without_dps_is_edit_map():
    out = cross(SRC, EDT, REFINE, ALL_OUT, s=None, lambda_s=LAMBDA_S)
    torch.testing.assert_close(out, EDT)


def test_gates_apply_per_token():
    gate = torch.tensor([1.0, 0.0, 0.0, 1.0])
    out = cross(SRC, EDT, REFINE, gate, s=S, lambda_s=LAMBDA_S)
    expected = torch.tensor([[[0.1, 0.15, 0.22, 0.4], [0.5, 0.45, 0.59, 0.8]]], dtype=F64)
    torch.testing.assert_close(out, expected)  # no renormalisation either


def test_heads_are_edited_alike():
    # DPS and injection are linear in the maps: a second head at 2× gives 2× the result
    src2, edt2 = torch.cat([SRC, 2 * SRC]), torch.cat([EDT, 2 * EDT])
    gate = torch.tensor([1.0, 0.0, 0.0, 1.0])
    out = cross(src2, edt2, REFINE, gate, s=S, lambda_s=LAMBDA_S)
    expected = torch.tensor([[0.1, 0.15, 0.22, 0.4], [0.5, 0.45, 0.59, 0.8]], dtype=F64)
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(out[1], 2 * expected)


# matrix[i, j]: source 0 → target 0; source 1 → targets 1, 2 (½ each); source 2 → target 3
REPLACE = TokenMap(
    alphas=torch.ones(4),
    matrix=torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    ),
)


def test_replace_injected_goes_through_matrix():
    out = cross(SRC, EDT, REPLACE, ALL_IN, s=S, lambda_s=LAMBDA_S)
    # M @ matrix: t0 = src0 = [0.1, 0.5]; t1 = t2 = ½·src1 = [0.1, 0.3]; t3 = src2 = [0.3, 0.7]
    expected = torch.tensor([[[0.1, 0.1, 0.1, 0.3], [0.5, 0.3, 0.3, 0.7]]], dtype=F64)
    torch.testing.assert_close(out, expected)


def test_replace_after_tau_blends_carried_map_by_dps():
    out = cross(SRC, EDT, REPLACE, ALL_OUT, s=S, lambda_s=LAMBDA_S)
    # token 1: Mc = [0.1, 0.3], Mc* = [0.15, 0.45]
    #   p0: 0.8·(0.075 + 0.05) + 0.02 = 0.12;  p1: 0.8·(0.1125 + 0.225) + 0.06 = 0.33
    torch.testing.assert_close(col(out, 1), t(0.12, 0.33))
    # token 3: Mc = [0.3, 0.7], Mc* = [0.35, 0.65]
    #   p0: 0.8·(0.175 + 0.15) + 0.06 = 0.32;  p1: 0.8·(0.1625 + 0.525) + 0.14 = 0.69
    torch.testing.assert_close(col(out, 3), t(0.32, 0.69))


EQ = torch.tensor([1.0, 2.0, 3.0, 0.5])


def test_equalizer_applies_inside_injection_window_only():
    gate = torch.tensor([1.0, 1.0, 0.0, 0.0])
    out = cross(SRC, EDT, REFINE, gate, s=None, equalizer=EQ)
    # t0: 1·src0; t1 (inserted, injected): 2·edt1 = [0.3, 0.9];
    # t2, t3 after τ: edit map unscaled (factors 3 and 0.5 not applied)
    expected = torch.tensor([[[0.1, 0.3, 0.25, 0.35], [0.5, 0.9, 0.55, 0.65]]], dtype=F64)
    torch.testing.assert_close(out, expected)


def test_equalizer_scales_every_injected_token():
    out = cross(SRC, EDT, REFINE, ALL_IN, s=None, equalizer=EQ)
    # t2: 3·src1 = [0.6, 1.8]; t3: 0.5·src3 = [0.2, 0.4]
    expected = torch.tensor([[[0.1, 0.3, 0.6, 0.2], [0.5, 0.9, 1.8, 0.4]]], dtype=F64)
    torch.testing.assert_close(out, expected)


def test_equalizer_not_applied_after_tau_with_dps():
    with_eq = cross(SRC, EDT, REFINE, ALL_OUT, s=S, lambda_s=LAMBDA_S, equalizer=EQ)
    expected = torch.tensor([[[0.42, 0.15, 0.22, 0.38], [0.41, 0.45, 0.59, 0.77]]], dtype=F64)
    torch.testing.assert_close(with_eq, expected)


def test_edit_self_attention():
    src = torch.full((1, 3, 3), 1 / 3, dtype=F64)
    edt = torch.eye(3, dtype=F64)[None]
    on, off = torch.tensor(1.0, dtype=F64), torch.tensor(0.0, dtype=F64)
    assert torch.equal(edit_self_attention(src, edt, on), src)
    assert torch.equal(edit_self_attention(src, edt, off), edt)
