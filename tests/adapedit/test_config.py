"""EditConfig / SamplerConfig validation: every invalid value raises ConfigError."""

from __future__ import annotations

import math
import re

import pytest

from adapedit.config import EditConfig, SamplerConfig
from adapedit.errors import ConfigError, InputError


def test_defaults_are_the_papers():
    cfg = EditConfig()
    assert (cfg.edit_type, cfg.use_fwt, cfg.use_dps, cfg.dps_mask) == ("refine", True, True, True)
    assert (cfg.lambda_tau, cfg.lambda_s, cfg.lambda_sv, cfg.alpha_m) == (1.0, 0.9, 1.0, 0.03)
    assert (cfg.tau_rule, cfg.tau_fixed, cfg.local_blend_threshold) == ("paper", 0.8, 0.3)
    s = SamplerConfig()
    assert (s.steps, s.guidance, s.scheduler) == (50, 7.5, "ddim")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lambda_s", 1.5),
        ("lambda_s", -0.1),
        ("lambda_tau", -1.0),
        ("lambda_tau", math.nan),
        ("lambda_sv", 101.0),
        ("alpha_m", 2.0),
        ("alpha_m", -0.01),
        ("tau_fixed", 1.1),
        ("tau_self_fixed", -0.1),
        ("local_blend_threshold", 1.5),
        ("lambda_s", "0.9"),
    ],
)
def test_edit_config_out_of_range(field, value):
    with pytest.raises(ConfigError, match=field):
        EditConfig(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [("edit_type", "swap"), ("tau_rule", "fancy"), ("calibration", "first")],
)
def test_edit_config_unknown_choice(field, value):
    with pytest.raises(ConfigError, match=f"unknown {field}") as info:
        EditConfig(**{field: value})
    assert value in str(info.value)


def test_edit_config_calibration_downscale_and_attention_limits():
    with pytest.raises(ConfigError, match="calibration_downscale"):
        EditConfig(calibration_downscale=3)
    with pytest.raises(ConfigError, match="unknown attention_limits") as e:
        EditConfig(attention_limits="p2p")
    assert e.value.field == "attention_limits" and e.value.got == "p2p"
    assert "scaled | p2p-literal" in e.value.expected


def test_reweight_without_words_raises():
    with pytest.raises(ConfigError, match="needs at least one word"):
        EditConfig(edit_type="reweight")


def test_reweight_words_without_reweight_type_raise():
    with pytest.raises(ConfigError, match="edit_type is not 'reweight'"):
        EditConfig(reweight=(("dog", 2.0),))


def test_reweight_factor_out_of_range():
    with pytest.raises(ConfigError, match="reweight factor"):
        EditConfig(edit_type="reweight", reweight=(("dog", 1000.0),))


def test_edit_config_normalises_sequences():
    cfg = EditConfig(edit_type="reweight", reweight=[["dog", 2]], local_blend=["dog"])
    assert cfg.reweight == (("dog", 2.0),)
    assert cfg.local_blend == ("dog",)
    assert cfg.to_dict()["reweight"] == {"dog": 2.0}


@pytest.mark.parametrize(
    ("field", "value", "text"),
    [
        ("scheduler", "lms", "unknown scheduler"),
        ("steps", 0, "steps"),
        ("steps", 1001, "steps"),
        ("steps", 2.5, "steps"),
        ("guidance", -1.0, "guidance"),
        ("seed", -1, "seed"),
        ("height", 500, "multiple of 8"),
        ("width", 0, "multiple of 8"),
        ("height", 512.0, "multiple of 8"),
    ],
)
def test_sampler_config_invalid(field, value, text):
    with pytest.raises(ConfigError, match=text):
        SamplerConfig(**{field: value})


def test_sampler_config_valid_sizes():
    s = SamplerConfig(height=256, width=512, scheduler="pndm")
    assert s.resolved(512) == (256, 512)
    assert SamplerConfig().resolved(512) == (512, 512)


def test_config_error_is_an_input_and_value_error():
    with pytest.raises(InputError):
        EditConfig(lambda_s=2.0)
    with pytest.raises(ValueError, match=re.escape("got: 2.0")):
        EditConfig(lambda_s=2.0)
