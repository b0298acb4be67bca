"""The training script runs end to end and writes a folder every model loader accepts."""

from __future__ import annotations

import json

import pytest

from adapedit.config import SamplerConfig
from adapedit.errors import ConfigError
from adapedit.models import load_folder
from adapedit.pipeline import ReferencePipeline
from adapedit.shapes.train import TrainConfig, train


@pytest.mark.slow
def test_a_few_training_steps_write_a_loadable_model(tmp_path):
    out = tmp_path / "shapes"
    record = train(out, TrainConfig(vae_steps=2, steps=3, batch=2))
    saved = json.loads((out / "training.json").read_text())
    assert saved["config"]["steps"] == 3 and len(saved["log"]) == 1
    assert record["scaling_factor"] > 0
    assert not list(tmp_path.glob(".shapes.partial-*"))
    comps = load_folder(out, name="mine")
    assert comps.vae.config.scaling_factor == pytest.approx(record["scaling_factor"])
    assert comps.default_size == 64
    pipe = ReferencePipeline(comps)
    img = pipe.generate("a red circle", SamplerConfig(steps=2)).image
    assert img.shape == (64, 64, 3)


def test_train_config_is_validated():
    with pytest.raises(ConfigError, match="steps"):
        TrainConfig(steps=0)
