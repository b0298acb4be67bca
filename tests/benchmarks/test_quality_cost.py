"""The cost axis of the quality benchmark: UNet samples, τ deviation, the paired intervals and
which setting is the cheapest that holds; a two-edit run that writes its report; and the
presets benchmark's report."""

from __future__ import annotations

import json

import pytest

from benchmarks import presets, quality, quality_cost
from benchmarks.quality_cost import Setting


def test_settings_parse_and_name():
    assert Setting.parse("dpmpp:20:5") == Setting("dpmpp", 20, 5)
    assert Setting.parse("ddim:50:full") == quality_cost.PAPER
    assert quality_cost.PAPER.name == "ddim 50, K full"
    assert quality_cost.SETTINGS[0] == quality_cost.PAPER  # the baseline comes first


def test_unet_samples_count_calls_at_their_batch(tiny_pipeline):
    assert quality_cost.unet_samples(tiny_pipeline, quality_cost.PAPER) == 300
    assert quality_cost.unet_samples(tiny_pipeline, Setting("dpmpp", 20, 5)) == 90
    assert quality_cost.unet_samples(tiny_pipeline, Setting("pndm", 20, 5)) == 4 * 21 + 2 * 6


def test_tau_deviation():
    full = {"0:a": 0.5, "1:dog": 0.0, "2:sat": 0.05}
    d = quality_cost.tau_deviation({"0:a": 0.7, "1:dog": 0.0, "2:sat": 0.05}, full)
    assert d == pytest.approx({"mean_abs": 0.2 / 3, "max_abs": 0.2, "protected_kept": True})
    assert not quality_cost.tau_deviation({**full, "2:sat": 0.2}, full)["protected_kept"]


def _rows(settings, success, preserved):
    """Rows of every setting on the first 4 suite edits × 3 seeds, with per-setting
    success / preservation callables of (case, seed)."""
    rows = []
    for s in settings:
        for c in range(4):
            for seed in range(3):
                rows.append(
                    {
                        "case": c,
                        "kind": quality.SUITE[c].kind,
                        "pair": quality.SUITE[c].source.is_pair,
                        "seed": seed,
                        "setting": s.name,
                        "unet_samples": 4 * s.steps + 2 * s.k,
                        "seconds": 1.0,
                        "success": success[s](c, seed),
                        "preserved": preserved[s](c, seed),
                    }
                )
    return rows


def test_the_cheapest_setting_that_holds_on_hard_and_soft_is_chosen():
    cases = quality.SUITE[:4]
    paper, same, worse, cheap_same = (
        quality_cost.PAPER,
        Setting("ddim", 20, 20),
        Setting("dpmpp", 10, 5),
        Setting("dpmpp", 20, 5),
    )
    settings = [paper, same, worse, cheap_same]
    ok = {s: (lambda c, seed: True) for s in settings}
    ok[worse] = lambda c, seed: False  # fails every edit: its interval is all below 0
    keep = {s: (lambda c, seed: 0.9) for s in settings}
    summary = quality_cost.summarise(
        _rows(settings, ok, keep), cases, [0, 1, 2], settings, resamples=200
    )
    groups = {k.kind in ("colour", "shape") for k in cases}
    assert groups == {True}  # the first four edits are hard ones
    assert summary[same.name]["groups"]["hard"]["holds"]
    assert summary[same.name]["groups"]["hard"]["diff_ci95"] == [[0.0, 0.0], [0.0, 0.0]]
    bad = summary[worse.name]["groups"]["hard"]
    assert not bad["holds"] and bad["diff"][0] == -100.0
    assert summary[paper.name]["unet_samples"] == 300
    # only hard edits here: nothing holds on soft ones, so no fast setting
    assert quality_cost.fast_setting(summary) is None
    for v in summary.values():
        v["groups"]["soft"] = v["groups"]["hard"]
    assert quality_cost.fast_setting(summary) == cheap_same.name


def test_a_two_edit_run_writes_its_report(tmp_path):
    quality_cost.main(
        [
            "--model",
            "tiny",
            "--cases",
            "2",
            "--seeds",
            "0",
            "--settings",
            "ddim:2:full",
            "ddim:2:1",
            "--bootstrap",
            "20",
            "--out",
            str(tmp_path),
        ]
    )
    doc = json.loads((tmp_path / "quality_cost.json").read_text())
    assert doc["settings"] == ["ddim 2, K full", "ddim 2, K 1"]
    assert doc["summary"]["ddim 2, K 1"]["unet_samples"] == 10
    assert "tau_deviation" in doc["summary"]["ddim 2, K 1"]
    assert {r["calibration"] for r in doc["rows"]} == {"computed"}
    assert "| ddim 2, K 1 | 10 |" in (tmp_path / "quality_cost.md").read_text()
    assert (tmp_path / "quality_cost.png").stat().st_size > 0
    again = quality_cost.main(
        [
            "--from-json",
            str(tmp_path / "quality_cost.json"),
            "--bootstrap",
            "20",
            "--out",
            str(tmp_path / "again"),
        ]
    )  # no edits: the same rows summarised again
    assert again["summary"] == doc["summary"] and again["rows"] == doc["rows"]


def test_the_presets_report_names_its_goals(tmp_path):
    t = {"median": 2.0, "p90": 2.5, "n": 1, "all": [2.0]}
    f = {"median": 0.5, "p90": 0.6, "n": 1, "all": [0.5]}
    rec = {
        "machine": {
            "cpu": "cpu",
            "cpus": 2,
            "gpu": None,
            "versions": {"torch": "t", "onnxruntime": "o"},
        },
        "omp_threads": "1",
        "repeats": 1,
        "presets": {"reference:shapes": {"paper": t, "fast": f}},
        "cached": {"reference:shapes": {"first": t, "cached": f}},
        "cached_preset": "paper",
        "memory": {
            "reference:shapes": {"peak_rss_gb": 1.0},
            "runtime:e:fused": {"peak_rss_gb": 1.5},
        },
    }
    md = presets.markdown(rec)
    assert "| reference:shapes | 2.00 (2.50) | 0.50 (0.60) | 4.00 |" in md
    assert "| reference:shapes | 2.00 | 0.50 | 0.25 |" in md
    assert "| runtime:e:fused | 1.50 | 1.50 |" in md
    presets.plot(rec, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
