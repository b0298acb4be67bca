"""The real-image benchmark: its SSIM, its goals, and a one-edit run that writes its report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import real_images


def test_ssim_is_one_for_equal_images_and_falls_with_noise():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert real_images.ssim(a, a) == pytest.approx(1.0)
    noisy = [np.clip(a + rng.normal(0, s, a.shape), 0, 255).astype(np.uint8) for s in (5, 20, 60)]
    values = [real_images.ssim(a, b) for b in noisy]
    assert 1.0 > values[0] > values[1] > values[2] > 0.0
    # checked once against skimage.metrics.structural_similarity(gaussian_weights=True,
    # sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=2): equal to 1e-15


def test_the_suite_and_the_goals():
    assert {c.kind for c in real_images.CASES} == set(real_images.KINDS)

    def method(success, preserved, source, calls, samples, seconds):
        group = {
            "success": success,
            "preserved": preserved,
            "vae_psnr_db": 30.0,
            "source_psnr_db": source,
            "edit_branch_psnr_db": 25.0,
            "unet_calls": calls,
            "unet_samples": samples,
            "seconds": seconds,
        }
        return {"all": group, "hard": group}

    summary = {
        "direct": method(0.9, 0.9, 30.0, 60, 140, 1.2),
        "ddim": method(0.9, 0.8, 25.0, 60, 140, 1.2),
        "npi": method(0.9, 0.8, 29.0, 60, 140, 1.2),
        "generated": method(0.9, 0.9, float("nan"), 40, 120, 1.0),
    }
    verdicts = [met for _, met, _ in real_images.goals(summary)]
    assert verdicts == [True, True, True, False, True]  # 1.5× the calls, 1.17× the samples
    summary["direct"]["all"]["source_psnr_db"] = 29.4
    assert not real_images.goals(summary)[0][1]


@pytest.mark.slow
def test_a_one_edit_run_writes_its_report(tmp_path):
    args = ["--cases", "1", "--seeds", "0", "--steps", "2", "--no-photos"]
    real_images.main([*args, "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "real_images.json").read_text())
    assert {r["method"] for r in doc["rows"]} == set(real_images.METHODS)
    direct = doc["summary"]["direct"]["all"]
    assert direct["source_psnr_db"] == pytest.approx(direct["vae_psnr_db"])  # exact by design
    assert direct["unet_calls"] == 6 and doc["summary"]["generated"]["all"]["unet_calls"] == 4
    assert direct["unet_samples"] == 14 and doc["summary"]["generated"]["all"]["unet_samples"] == 12
    md = (tmp_path / "real_images.md").read_text()
    assert "## Goals" in md and "| direct |" in md and doc["photos"]["skipped"] == "not run"
    assert (tmp_path / "real_images.png").stat().st_size > 1000
