"""SegmentedUNet: the controller runs at every boundary, in order, with the right tensors."""

from __future__ import annotations

import torch


def test_controller_sees_every_boundary_in_order(tiny_session):
    m = tiny_session.manifest
    seen = []

    def spy(layer, is_cross, probs, hidden, step):
        assert step == 7
        seen.append(
            (layer, is_cross, tuple(probs.shape), None if hidden is None else tuple(hidden.shape))
        )
        return probs

    x = torch.randn(2, 4, 16, 16)
    tiny_session.reset_clocks()
    unet = tiny_session.segmented(2)
    out = unet(x, torch.tensor([10.0]), torch.randn(2, 77, 32), spy, step=7)
    assert out.shape == (2, 4, 16, 16)
    assert [s[0] for s in seen] == [b.layer for b in m.boundaries]
    for (_, is_cross, probs, hidden), b in zip(seen, m.boundaries, strict=True):
        assert is_cross == (b.kind == "cross")
        assert probs == (2 * b.heads, b.queries, b.keys)
        assert (hidden is None) == (b.kind == "self")
        if hidden:
            assert hidden == (2, b.queries, b.heads * b.head_dim)
    assert unet.clock.seconds() > 0 and tiny_session.controller_seconds() > 0
