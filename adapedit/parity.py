"""Parity between two edits of the same inputs (the reference and a backend): per-step latent
differences, τ differences, image PSNR and pixel differences, attention-map agreement."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (∞ when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def compare_edits(ref, other) -> dict[str, Any]:
    """Compare two :class:`~adapedit.pipelines.pipeline.EditResult` of the same inputs (both run
    with ``record_latents=True`` for the per-step numbers, and the same ``observe_step`` for the
    per-layer probabilities)."""
    steps = []
    for a, b in zip(ref.latents, other.latents, strict=True):
        d = (a.float() - b.float()).abs()
        steps.append(
            {
                "max_abs": float(d.max()),
                "max_rel": float(d.max() / a.float().abs().max().clamp_min(1e-12)),
            }
        )
    taus_ref = [w.tau for w in ref.tau.words]
    taus_other = [w.tau for w in other.tau.words]
    maps = None
    if ref.attention_maps.numel() and ref.attention_maps.shape == other.attention_maps.shape:
        ra, oa = ref.attention_maps.flatten(1), other.attention_maps.flatten(1)
        maps = {
            "max_abs": float((ra - oa).abs().max()),
            "min_cosine": float(torch.nn.functional.cosine_similarity(ra, oa).min()),
        }
    per_layer = {
        layer: float((probs - other.layer_probs[layer]).abs().max())
        for layer, probs in ref.layer_probs.items()
        if layer in other.layer_probs
    }
    return {
        "latents_max_abs": max((s["max_abs"] for s in steps), default=0.0),
        "latents_max_rel": max((s["max_rel"] for s in steps), default=0.0),
        "per_step": steps,
        "tau_max_abs": max(
            (abs(x - y) for x, y in zip(taus_ref, taus_other, strict=True)), default=0.0
        ),
        "tau_self_abs": abs(ref.tau.tau_self - other.tau.tau_self),
        "psnr_source_db": psnr(ref.source_image, other.source_image),
        "psnr_edited_db": psnr(ref.edited_image, other.edited_image),
        "max_pixel_diff": int(
            max(
                np.abs(ref.source_image.astype(int) - other.source_image.astype(int)).max(),
                np.abs(ref.edited_image.astype(int) - other.edited_image.astype(int)).max(),
            )
        ),
        "attention_maps": maps,
        "per_layer_probs_max_abs": per_layer,
    }
