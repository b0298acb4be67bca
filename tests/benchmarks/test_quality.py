"""The edit-quality benchmark: its suite, scoring, the frontier and its distances, and a
two-edit run that writes its report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adapedit.shapes.reader import read_image
from adapedit.shapes.world import Scene, Thing, render
from benchmarks import quality


def test_the_suite_spans_the_kinds_and_pairs():
    suite = quality.SUITE
    assert len(suite) >= 24
    assert {c.kind for c in suite} == set(quality.KINDS)
    assert sum(c.source.is_pair for c in suite) >= 6
    assert {c.kind for c in suite if c.source.is_pair} >= {"colour", "shape", "size"}
    for c in suite:  # every edit changes exactly what it says
        before, after = c.source.attributes(), c.target.attributes()
        changed = {k for k in before if before[k] != after[k]}
        assert c.key in changed and changed <= {c.key, "position"}, c
    count = next(c for c in suite if c.kind == "count")
    assert count.prompts == ("one small red circle", "two small red circles")
    assert count.preserved() == ("shape", "colour", "size")
    pair = next(c for c in suite if c.source.is_pair and c.index == 1)
    assert pair.key.endswith(".1") and "count" in pair.preserved()
    assert len(pair.preserved()) == 8  # the other object's 4, this one's other 3, the count


def test_the_method_grid():
    p2p = [m for m in quality.METHODS if quality.family(m) == "p2p"]
    assert len(p2p) == 20
    cfg = quality.CONTROLLED["p2p c0.8 s0.4"]
    assert not cfg.use_fwt and not cfg.use_dps and cfg.tau_fixed == 0.8
    assert quality.CONTROLLED["adapedit"] == quality.EditConfig()
    sweep = [m for m in quality.METHODS if quality.family(m) == "adapedit-sweep"]
    assert len(sweep) == 8  # the 3 × 3 grid without the default
    assert {"prompt-only", "masactrl", "no-fwt", "no-dps", "no-dps-mask"} <= set(quality.METHODS)


def test_score_reads_success_preservation_and_psnr_outside():
    case = quality.SUITE[0]  # red → blue big circle on the left
    src = render(case.source, seed=0)
    good = quality.score(case, read_image(src), render(case.target, seed=0), src)
    assert good["success"] and good["preserved"] == 1.0
    assert good["psnr_outside_db"] == float("inf")  # the background is untouched
    moved = render(Scene.of(Thing("circle", "red", "big", "right")), seed=0)
    bad = quality.score(case, read_image(src), moved, src)
    assert not bad["success"] and bad["preserved"] == pytest.approx(3 / 4)
    noisy = np.clip(src.astype(int) + 4, 0, 255).astype(np.uint8)
    assert 30 < quality.score(case, read_image(src), noisy, src)["psnr_outside_db"] < 40


def test_score_on_one_object_of_two():
    case = next(c for c in quality.SUITE if c.source.is_pair and c.attribute == "colour")
    src = render(case.source, seed=1)
    good = quality.score(case, read_image(src), render(case.target, seed=1), src)
    assert good["success"] and good["preserved"] == 1.0
    # the edit lands on the wrong object: no success, the other object's colour is lost
    other = 1 - case.index
    wrong = quality.with_attribute(case.source, "colour", case.value, other)
    bad = quality.score(case, read_image(src), render(wrong, seed=1), src)
    assert not bad["success"] and bad["preserved"] == pytest.approx(7 / 8)


def test_pareto_frontier_and_signed_distance():
    pts = np.array([[10.0, 90.0], [50.0, 80.0], [40.0, 70.0], [90.0, 30.0], [50.0, 80.0]])
    assert quality.pareto(pts).tolist() == [0, 1, 3]  # [2] is beaten, [4] repeats [1]
    line = quality.frontier_line(pts[quality.pareto(pts)])
    assert line.tolist() == [[0, 90], [10, 90], [50, 80], [90, 30], [90, 0]]
    # above the segment (50, 80)–(90, 30) at x = 70 (height 55): by the distance to it
    d = quality.signed_distance(np.array([70.0, 65.0]), line)
    assert d == pytest.approx(10 * 40 / np.hypot(40, 50))
    assert quality.signed_distance(np.array([40.0, 70.0]), line) < 0  # a beaten P2P point
    assert quality.signed_distance(np.array([50.0, 80.0]), line) == 0.0  # on the frontier
    assert quality.signed_distance(np.array([95.0, 10.0]), line) == pytest.approx(5.0)
    assert quality.signed_distance(np.array([5.0, 95.0]), line) == pytest.approx(5.0)


@pytest.mark.slow
def test_a_two_edit_run_writes_its_report(tmp_path):
    args = ["--cases", "2", "--seeds", "0", "1", "--steps", "2", "--fidelity-samples", "2"]
    quality.main([*args, "--bootstrap", "20", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "quality.json").read_text())
    assert set(quality.METHODS) <= set(doc["summary"])
    assert len(doc["rows"]) == 2 * 2 * len(quality.METHODS)
    assert doc["summary"]["adapedit"]["colour"]["n"] == 4
    f = doc["frontier"]["colour"]
    assert f["frontier_methods"] and set(f["distance"]) == set(quality.METHODS)
    lo, hi = f["default_ci95"]
    assert lo <= hi
    md = (tmp_path / "quality.md").read_text()
    assert "frontier" in md and "| adapedit |" in md and "Text fidelity" in md
    assert (tmp_path / "quality.png").stat().st_size > 1000
    assert (tmp_path / "quality_frontier.png").stat().st_size > 10000
    assert doc["attention_limits"] == "scaled" and doc["local_blend"] == {}  # no pair edit


def test_local_blend_runs_on_the_edits_of_one_object_of_two_only():
    single = next(c for c in quality.SUITE if not c.source.is_pair)
    shape = next(c for c in quality.SUITE if c.source.is_pair and c.kind == "shape")
    assert quality.blended(single) == {}
    words = quality.blend_words(shape)  # the edited object's shape before and after
    assert words == (shape.source.things[shape.index].shape, shape.value)
    configs = quality.blended(shape)
    assert set(configs) == {f"{m} + local blend" for m in quality.BLENDED}
    assert all(c.local_blend == words for c in configs.values())
    assert configs["adapedit + local blend"].lambda_s == quality.CONTROLLED["adapedit"].lambda_s


def test_local_blend_effect_is_the_paired_change_with_an_interval():
    rows = []
    for case, seed in ((0, 0), (0, 1), (1, 0), (1, 1)):
        for method, preserved in (("adapedit", 0.5), ("adapedit + local blend", 0.75)):
            rows.append(
                {"case": case, "seed": seed, "method": method, "pair": True, "success": 1.0}
                | {"preserved": preserved + 0.25 * (case == 1 and "blend" in method)}
            )
    effect = quality.local_blend_effect(rows, resamples=200)["adapedit"]
    assert effect["n"] == 4
    assert effect["preserved"]["without"] == 0.5 and effect["preserved"]["with"] == 0.875
    assert effect["preserved"]["change_pp"] == pytest.approx(37.5)
    lo, hi = effect["preserved"]["ci95_pp"]
    assert 25.0 <= lo <= 37.5 <= hi <= 50.0
    assert effect["success"]["change_pp"] == 0.0
