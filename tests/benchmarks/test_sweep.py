"""Many configurations of one edit in few passes give the images of separate edits."""

from __future__ import annotations

import pytest

from adapedit.config import EditConfig, SamplerConfig
from adapedit.errors import ConfigError
from benchmarks.sweep import sweep_edit

SRC, TGT = "a dog standing on the grass", "a cat sitting on the grass"
CONFIGS = [
    EditConfig(use_fwt=False, use_dps=False, tau_fixed=0.6, tau_self_fixed=0.2),
    EditConfig(),
    EditConfig(lambda_tau=2.0, lambda_s=0.5),
    EditConfig(use_fwt=False),
    EditConfig(dps_mask=False),
]


def test_a_sweep_equals_separate_edits_bit_for_bit(tiny_pipeline):
    sampler = SamplerConfig(steps=4, seed=3)
    # 5 configurations: one pass of 3 and one of 2, one shared calibration
    sweep = sweep_edit(tiny_pipeline, SRC, TGT, CONFIGS, sampler, per_pass=3)
    assert len(sweep.edited_images) == len(CONFIGS)
    for config, edited in zip(CONFIGS, sweep.edited_images, strict=True):
        r = tiny_pipeline.edit(SRC, TGT, config, sampler)
        assert (r.source_image == sweep.source_image).all()
        assert (r.edited_image == edited).all(), config
    assert sweep.source_latent.shape == (1, 4, 16, 16)


def test_a_sweep_controls_one_set_of_layers(tiny_pipeline):
    with pytest.raises(ConfigError, match="attention_limits"):
        sweep_edit(
            tiny_pipeline,
            SRC,
            TGT,
            [EditConfig(), EditConfig(attention_limits="p2p-literal")],
            SamplerConfig(steps=2),
        )
