"""The controllers on small hand-built tensors with hand-worked expected values, the buffer rule,
and a mutation check: with any two branches of the layout swapped, the expected values fail.

Setup: 1 head; every branch of ``[u_src, u_edt, c_src, c_edt]`` holds one constant
(0.01, 0.02, 0.03, 0.04), so a value read from the wrong branch shows. The cross-attention
layer sits at 1/4 of an 8×8 latent (2×2 = 4 queries: the LocalBlend resolution). The edit
branch's hidden states point at angles 0°, 60°, 90°, 180° from ``E_k = e₀``, so
``S = [1, ½, 0, 0]``; every other branch's hidden states are orthogonal to ``E_k`` (S = 0).
τ = ½ for every token but "grass" (τ = 0), N = 4: injected at steps 0 and 1 (⌊½·5⌋ = 2);
τ_self = ½: self-attention injected at steps 0 and 1 (⌊½·4⌋ = 2). λ_S = 0.9.
"""

from __future__ import annotations

import math

import pytest
import torch

from adapedit.algorithm.fwt import TauPlan
from adapedit.algorithm.layout import CALIBRATION, EDIT, BatchLayout
from adapedit.config import EditConfig
from adapedit.pipelines.controller import CalibrationRecorder, Controller, EditController

SRC, TGT = "a dog standing on the grass", "a dog sitting on the grass"
DOG, SITTING, GRASS = 2, 3, 6
N, LATENT = 4, (8, 8)
CROSS = "down_blocks.2.attentions.0.transformer_blocks.0.attn2"
SELF = "down_blocks.2.attentions.0.transformer_blocks.0.attn1"
VALUES = (0.01, 0.02, 0.03, 0.04)  # u_src, u_edt, c_src, c_edt
S = torch.tensor([1.0, 0.5, 0.0, 0.0])
ORIGINAL_BRANCHES = BatchLayout.branches


def _branches(values, shape):
    return torch.cat([torch.full(shape, v) for v in values])  # [B·1, *shape]


def _hidden(batch=4, edit_index=3):
    h = torch.zeros(batch, 4, 4)
    h[..., 2] = 1.0  # orthogonal to E_k = e₀
    angles = (0.0, 60.0, 90.0, 180.0)
    h[edit_index] = torch.tensor(
        [[math.cos(math.radians(a)), math.sin(math.radians(a)), 0.0, 0.0] for a in angles]
    )
    return h


def _controller(tokenizer, **cfg):
    from adapedit.algorithm.plan import build_plan

    config = EditConfig(lambda_s=0.9, **cfg)
    plan = build_plan(tokenizer, SRC, TGT, config)
    token_tau = torch.full((77,), 0.5, dtype=torch.float64)
    token_tau[GRASS] = 0.0
    tau = TauPlan((), token_tau, tau_self=0.5, tau_default=0.5)
    keys = {CROSS: torch.tensor([1.0, 0.0, 0.0, 0.0])}
    return EditController(plan, tau, keys, N, LATENT)


def check_edit_controller(tokenizer) -> None:
    """The hand-worked expected values (module docstring); raises AssertionError."""
    ctrl = _controller(tokenizer, local_blend=("dog",))
    probs = _branches(VALUES, (1, 4, 77))  # [4·1, P=4, 77]
    hidden = _hidden()
    before = probs.clone()
    dps = 0.9 * (S * 0.04 + (1 - S) * 0.03) + 0.1 * 0.03  # Eq. 8 per pixel: [0.039, 0.0345, …]

    for step in range(N):
        out = ctrl(CROSS, True, probs, hidden, step)
        assert torch.equal(probs, before)  # the buffer rule: inputs untouched
        for b in range(3):
            assert torch.equal(out[b], probs[b])  # only c_edt changes
        edt = out[3]  # [P, 77]
        torch.testing.assert_close(edt[:, SITTING], torch.full((4,), 0.04))  # inserted
        torch.testing.assert_close(edt[:, GRASS], dps)  # τ = 0: never injected
        aligned = edt[:, [0, 1, DOG, 4, 5, 7, 40]]
        expected = torch.full((4,), 0.03) if step < 2 else dps
        torch.testing.assert_close(aligned, expected[:, None].expand(4, 7))

    self_probs = _branches(VALUES, (1, 4, 4))
    for step in range(N):
        out = ctrl(SELF, False, self_probs, None, step)
        expected = self_probs.clone()
        if step < 2:
            expected[3] = 0.03  # the source's self-attention
        assert torch.equal(out, expected)

    # LocalBlend maps summed over the steps: the source branch's "dog" column, and the edited
    # branch's (carried from the source at steps 0–1, Eq. 8 at steps 2–3)
    torch.testing.assert_close(ctrl.blend_maps[0].flatten(), torch.full((4,), N * 0.03))
    torch.testing.assert_close(ctrl.blend_maps[1].flatten(), 2 * 0.03 + 2 * dps)
    # the attention image: edited c_edt maps averaged over the 4 steps
    maps = ctrl.attention_maps()  # [77, 2, 2]
    torch.testing.assert_close(maps[SITTING], torch.full((2, 2), 0.04))
    torch.testing.assert_close(maps[GRASS].flatten(), dps)


def check_calibration_recorder() -> None:
    cfg = EditConfig(calibration_downscale=4)
    rec = CalibrationRecorder(LATENT, 2, cfg)
    probs = _branches((0.02, 0.04), (2, 4, 77))  # [u_edt, c_edt] × 2 heads
    hidden = _hidden(batch=2, edit_index=1)
    for step in range(2):
        assert rec(CROSS, True, probs, hidden + step, step) is probs  # unchanged: same object
        assert rec(SELF, False, probs, None, step) is probs
    torch.testing.assert_close(rec.map_sum, torch.full((4, 77), 0.08))  # c_edt, 2 steps
    assert rec.map_count == 2 and rec.last_calib_layer == CROSS
    torch.testing.assert_close(rec.final_maps[CROSS], torch.full((4, 77), 0.04))
    assert torch.equal(rec.final_hidden[CROSS], hidden[1] + 1)  # c_edt at the final step


def test_edit_controller_hand_worked_values(tokenizer):
    check_edit_controller(tokenizer)


def test_calibration_recorder_hand_worked_values():
    check_calibration_recorder()


def test_controllers_follow_the_protocol(tokenizer):
    ctrl = _controller(tokenizer)
    rec = CalibrationRecorder(LATENT, N, EditConfig())
    assert isinstance(ctrl, Controller) and isinstance(rec, Controller)
    assert ctrl.layout == EDIT and rec.layout == CALIBRATION
    x = torch.randn(2, 4, 8, 8)
    assert rec.after_step(0, x) is x
    assert ctrl.after_step(0, x) is x  # no LocalBlend words: latents pass unchanged


def _swap(pair):
    def branches(self):
        b = list(ORIGINAL_BRANCHES.fget(self))
        if all(p in b for p in pair):
            i, j = b.index(pair[0]), b.index(pair[1])
            b[i], b[j] = b[j], b[i]
        return tuple(b)

    return property(branches)


EDIT_PAIRS = [
    (("source", "uncond"), ("source", "cond")),
    (("source", "uncond"), ("edit", "cond")),
    (("edit", "uncond"), ("source", "cond")),
    (("edit", "uncond"), ("edit", "cond")),
    (("source", "cond"), ("edit", "cond")),
]


@pytest.mark.parametrize("pair", EDIT_PAIRS, ids=lambda p: f"{p[0][0]}-{p[0][1]}")
def test_swapping_two_edit_branches_fails_the_expected_values(tokenizer, monkeypatch, pair):
    monkeypatch.setattr(BatchLayout, "branches", _swap(pair))
    with pytest.raises(AssertionError):
        check_edit_controller(tokenizer)


def test_swapping_the_calibration_branches_fails_the_expected_values(monkeypatch):
    monkeypatch.setattr(BatchLayout, "branches", _swap((("edit", "uncond"), ("edit", "cond"))))
    with pytest.raises(AssertionError):
        check_calibration_recorder()


def test_swapping_the_two_unconditional_branches_is_no_mutation(tokenizer, monkeypatch):
    """Both unconditional branches get the same (empty-prompt) embedding and no controller reads
    them, so swapping them changes nothing — the one pair the mutation check cannot see."""
    ctrl = _controller(tokenizer)
    probs, hidden = _branches(VALUES, (1, 4, 77)), _hidden()
    plain = ctrl(CROSS, True, probs, hidden, 0)
    monkeypatch.setattr(BatchLayout, "branches", _swap((("source", "uncond"), ("edit", "uncond"))))
    assert torch.equal(_controller(tokenizer)(CROSS, True, probs, hidden, 0), plain)
