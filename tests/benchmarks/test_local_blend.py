"""The LocalBlend coverage study: every map resolution and pool window, the rules' own rows
labelled, and the controller's constant and mask function restored after it."""

from __future__ import annotations

import json

import adapedit.pipelines.controller as controller
from benchmarks import local_blend


def test_a_short_study_writes_its_table_and_leaves_the_controller_alone(tmp_path):
    before = controller.BLEND_DOWNSCALE, controller.local_blend_mask
    local_blend.main(["--steps", "2", "--seeds", "0", "--out", str(tmp_path), "--stem", "lb"])
    assert (controller.BLEND_DOWNSCALE, controller.local_blend_mask) == before
    rec = json.loads((tmp_path / "lb.json").read_text())
    rows = {(r["downscale"], r["pool"]): r for r in rec["rows"]}
    assert set(rows) == {(d, p) for d in local_blend.DOWNSCALES for p in local_blend.POOLS}
    assert rows[(4, 3)]["rule"] == "p2p-literal" and rows[(4, 1)]["rule"] == "scaled"
    assert all(r["steps"] == rec["edits"] * 2 for r in rows.values())  # every step, every edit
    assert all(0.0 <= r["below_70"] <= 1.0 and 0.0 < r["mean"] <= 1.0 for r in rows.values())
    # a wider pool never makes the mask smaller
    assert all(rows[(d, 3)]["mean"] >= rows[(d, 1)]["mean"] for d in local_blend.DOWNSCALES)
    assert "| 4×4 (1/4) | 1×1 | scaled |" in (tmp_path / "lb.md").read_text()
