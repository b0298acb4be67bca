"""The attention rule (``EditConfig.attention_limits``): P2P's resolution constants scaled with
the latent, or taken as written — and the literal rule giving today's edits unchanged."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from adapedit.algorithm.geometry import blend_pool, self_max_queries
from adapedit.config import EditConfig, SamplerConfig
from adapedit.pipelines.processors import controlled_layers

DATA = Path(__file__).parent / "data"


def test_the_scaled_rule_is_p2ps_numbers_at_512_px():
    sd512, shapes = (64, 64), (16, 16)
    assert self_max_queries("scaled", sd512) == self_max_queries("p2p-literal", sd512) == 256
    assert blend_pool("scaled", sd512) == blend_pool("p2p-literal", sd512) == 3
    # on a 16×16 latent: self-attention in the 1/4 layers only (16 queries, not all ≤ 256);
    # LocalBlend's 4×4 maps not max-pooled (a 3×3 window nearly covers them)
    assert self_max_queries("scaled", shapes) == 16
    assert self_max_queries("p2p-literal", shapes) == 256
    assert blend_pool("scaled", shapes) == 1 and blend_pool("p2p-literal", shapes) == 3
    assert self_max_queries("scaled", (96, 64)) == 24 * 16  # 768 × 512 px
    assert blend_pool("scaled", (128, 128)) == 7  # 1024 px: 6 of 32 cells, made odd


def test_the_scaled_rule_controls_the_same_layers_at_every_size(tiny_components):
    unet = tiny_components.unet
    scaled = {hw: set(controlled_layers(unet, hw)) for hw in ((16, 16), (32, 32), (64, 64))}
    assert len({frozenset(s) for s in scaled.values()}) == 1
    literal = {hw: set(controlled_layers(unet, hw, "p2p-literal")) for hw in scaled}
    assert literal[(16, 16)] > scaled[(16, 16)]  # every self layer has ≤ 256 queries there
    assert literal[(64, 64)] == scaled[(64, 64)]  # 512 px: the same


@pytest.fixture(scope="module")
def shapes_pipeline():
    from adapedit.pipelines.pipeline import ReferencePipeline

    pipe = ReferencePipeline.from_model("shapes")
    pipe.use_calibration_cache(None)
    return pipe


def literal_cases() -> list[tuple[str, str, str, EditConfig, int]]:
    pair = (
        "a big red circle on the left and a big blue square on the right",
        "a big red circle on the left and a big green square on the right",
    )
    return [
        (
            "refine",
            "a small red circle on the left",
            "a big red circle on the left",
            EditConfig(),
            0,
        ),
        ("local_blend", *pair, EditConfig(local_blend=("square",)), 1),
    ]


def test_the_literal_rule_gives_todays_edits_unchanged(shapes_pipeline):
    """The final latents of two edits (one with LocalBlend) recorded before the rule existed
    (``data/p2p_literal_latents.npz``, on one thread, as they are made here), within 1e-4: float
    kernels round differently from one machine to another, even under one CPU name (an "AMD
    EPYC" with AVX2 gives them 7e-6 from the record, made where they were equal bit for bit),
    and a change of controlled layers or blend maps moves them by far more."""
    stored = np.load(DATA / "p2p_literal_latents.npz")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded: work split over threads rounds differently
    try:
        check_literal(shapes_pipeline, stored)
    finally:
        torch.set_num_threads(threads)


def check_literal(pipe, stored) -> None:
    for name, source, target, config, seed in literal_cases():
        literal = replace(config, attention_limits="p2p-literal")
        sampler = SamplerConfig(steps=10, seed=seed)
        r = pipe.edit(source, target, literal, sampler, record_latents=True)
        expected = torch.from_numpy(stored[name])
        torch.testing.assert_close(r.latents[-1], expected, atol=1e-4, rtol=0)
        scaled = pipe.edit(source, target, config, sampler, record_latents=True)
        assert (scaled.latents[-1] - expected).abs().max() > 1e-2, name  # the rules differ here
