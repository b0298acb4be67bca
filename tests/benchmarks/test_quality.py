"""The edit-quality benchmark: its scoring, and a two-edit run that writes its report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adapedit.shapes.reader import read_image
from adapedit.shapes.world import Scene, render
from benchmarks import quality


def test_suite_prompts_and_what_each_edit_must_preserve():
    kinds = {c.kind for c in quality.SUITE}
    assert kinds == set(quality.KINDS)
    add = next(c for c in quality.SUITE if c.kind == "add-colour")
    assert add.prompts == ("a big circle on the left", "a big red circle on the left")
    count = next(c for c in quality.SUITE if c.kind == "count")
    assert count.prompts == ("one small red circle", "two small red circles")
    assert count.preserved() == ("shape", "colour", "size")
    assert {c.hard for c in quality.SUITE if c.kind in ("colour", "shape")} == {True}


def test_score_reads_success_preservation_and_psnr_outside():
    src = render(Scene("circle", "red", "big", "left"), seed=0)
    case = quality.SUITE[0]  # red → blue circle on the left
    good = quality.score(case, read_image(src), render(case.target, seed=0), src)
    assert good["success"] and good["preserved"] == 1.0
    assert good["psnr_outside_db"] == float("inf")  # the background is untouched
    moved = render(Scene("circle", "red", "big", "right"), seed=0)
    bad = quality.score(case, read_image(src), moved, src)
    assert not bad["success"] and bad["preserved"] == pytest.approx(3 / 4)
    noisy = np.clip(src.astype(int) + 4, 0, 255).astype(np.uint8)
    assert 30 < quality.score(case, read_image(src), noisy, src)["psnr_outside_db"] < 40


@pytest.mark.slow
def test_a_two_edit_run_writes_its_report(tmp_path):
    args = ["--cases", "2", "--seeds", "0", "--steps", "3", "--fidelity-samples", "2"]
    quality.main([*args, "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "quality.json").read_text())
    assert set(quality.METHODS) <= set(doc["summary"])
    assert len(doc["rows"]) == 2 * len(quality.METHODS)
    assert doc["summary"]["adapedit"]["colour"]["n"] == 1
    md = (tmp_path / "quality.md").read_text()
    assert "Edit success" in md and "| adapedit |" in md and "Text fidelity" in md
    assert (tmp_path / "quality.png").stat().st_size > 1000
