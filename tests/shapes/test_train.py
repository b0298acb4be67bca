"""The training script: its noise schedule and loss weights, a run end to end that writes a
folder every model loader accepts, and an interrupted run that continues to the same weights."""

from __future__ import annotations

import json
import random

import pytest
import torch

from adapedit.config import SamplerConfig
from adapedit.errors import ConfigError
from adapedit.pipelines.models import load_folder, make_scheduler
from adapedit.pipelines.pipeline import ReferencePipeline
from adapedit.shapes import train as train_mod
from adapedit.shapes.train import (
    TrainConfig,
    _object_mask,
    checkpoint_path,
    loss_weights,
    noise_schedule,
    train,
)
from adapedit.shapes.world import BACKGROUND, render, sample_scene

TINY = {
    "vae_steps": 2,
    "vae_batch": 2,
    "steps": 4,
    "batch": 2,
    "eval_samples": 1,
    "eval_steps": 1,
    "decoder_steps": 3,
    "refine_steps": 3,
}


def _abar(config: dict) -> torch.Tensor:
    betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def test_the_schedule_leaves_almost_no_signal_at_the_last_step():
    sd = _abar(noise_schedule(TrainConfig(terminal_signal=0)))
    ours = _abar(noise_schedule(TrainConfig()))
    assert sd[-1].sqrt().item() == pytest.approx(0.068, abs=1e-3)  # SD v1.4's schedule
    assert ours[-1].sqrt().item() == pytest.approx(0.005)
    assert ours[0].item() == pytest.approx(sd[0].item())  # the clean end is unchanged
    assert (ours[1:] < ours[:-1]).all()
    config = noise_schedule(TrainConfig())
    assert config["prediction_type"] == "v_prediction"
    for kind in ("ddim", "pndm", "euler", "dpmpp"):  # every sampler reads the trained schedule
        sched = make_scheduler(kind, config)
        torch.testing.assert_close(sched.alphas_cumprod.double(), ours, rtol=1e-5, atol=1e-6)
    ddim = make_scheduler("ddim", config)
    ddim.set_timesteps(20)
    assert ddim.timesteps[0] == 999  # trailing: sampling starts where the noise is pure


def test_v_prediction_keeps_the_noisiest_steps():
    abar = _abar(noise_schedule(TrainConfig()))
    v = loss_weights(abar, TrainConfig())
    eps = loss_weights(abar, TrainConfig(prediction="epsilon"))
    assert v[-1] == pytest.approx(1.0) and v[0] < 0.01  # x0 weight min(SNR, 5) + 1
    snr = abar / (1 - abar)
    assert eps[-1] == pytest.approx(1.0)  # ε: min(SNR, 5) / SNR, an x0 weight of SNR → 0
    assert (eps * snr)[-1] < 1e-4 and (v * (snr + 1))[-1] == pytest.approx(1.0, abs=1e-4)


def test_train_config_is_validated():
    with pytest.raises(ConfigError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="prediction"):
        TrainConfig(prediction="sample")
    with pytest.raises(ConfigError, match="terminal_signal"):
        TrainConfig(terminal_signal=1.0)
    with pytest.raises(ConfigError, match="decoder_object_weight"):
        TrainConfig(decoder_object_weight=0.5)
    with pytest.raises(ConfigError, match="decoder_steps"):
        TrainConfig(decoder_steps=-1)
    with pytest.raises(ConfigError, match="refine_steps"):
        TrainConfig(refine_steps=-1)


def test_the_object_mask_is_what_is_not_background():
    scene = sample_scene(random.Random(0))[0]
    img = render(scene)  # [64, 64, 3]
    x = torch.from_numpy(img.copy()).permute(2, 0, 1).float()[None] / 127.5 - 1
    mask = _object_mask(x)[0, 0].numpy()  # [64, 64]
    assert mask.any() and not mask.all()
    assert (mask == (img != BACKGROUND).any(-1)).mean() > 0.99  # antialiased edges aside


@pytest.mark.slow
def test_a_few_training_steps_write_a_loadable_model(tmp_path):
    out = tmp_path / "shapes"
    record = train(out, TrainConfig(**TINY, eval_every=2))
    saved = json.loads((out / "training.json").read_text())
    assert saved["config"]["steps"] == 4 and len(saved["log"]) == 1
    # stage 2 at 2 and 4, after stage 3, stage 4 at 2 and 3
    assert [f["step"] for f in saved["fidelity"]] == [2, 4, 4, 2, 3]
    assert saved["fidelity"][2]["after"] == "decoder" and len(saved["decoder_log"]) == 1
    assert [f.get("stage") for f in saved["fidelity"]] == [None, None, None, 4, 4]
    assert saved["final"]["fidelity"] == saved["fidelity"][-1] and len(saved["refine_log"]) == 1
    trip = saved["final"]["round_trip_reading"]
    assert 0 <= trip["before"] <= 1 and 0 <= trip["after"] <= 1
    assert 0 <= saved["final"]["fidelity"]["all"] <= 1
    assert record["scaling_factor"] > 0
    assert not list(tmp_path.glob(".shapes.partial-*")) and not checkpoint_path(out).exists()
    card = (out / "README.md").read_text()
    assert "## Positions" in card and "3. VAE decoder alone" in card
    assert "4. UNet + text encoder again" in card and "| stage 4: 3 |" in card
    comps = load_folder(out, name="mine")
    assert comps.vae.config.scaling_factor == pytest.approx(record["scaling_factor"])
    assert comps.scheduler_config["prediction_type"] == "v_prediction"
    pipe = ReferencePipeline(comps)
    img = pipe.generate("a red circle", SamplerConfig(steps=2)).image
    assert img.shape == (64, 64, 3)
    with pytest.raises(ConfigError, match="exists"):
        train(out, TrainConfig(**TINY))


@pytest.mark.slow
def test_an_interrupted_run_continues_to_the_same_weights(tmp_path, monkeypatch):
    cfg = TrainConfig(**TINY, eval_every=3, checkpoint_every=2)
    whole = tmp_path / "whole"
    train(whole, cfg)

    def interrupt(*args):
        raise KeyboardInterrupt

    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(train_mod, "evaluate", interrupt)  # dies at step 3, after the checkpoint at 2
        with pytest.raises(KeyboardInterrupt):
            train(cut, cfg)
    assert checkpoint_path(cut).is_file() and not cut.exists()
    with pytest.raises(ConfigError, match="another training config"):
        train(cut, TrainConfig(**{**TINY, "seed": 1}, eval_every=3, checkpoint_every=2))
    train(cut, cfg)
    cut3 = tmp_path / "cut-in-stage-3"
    calls = []

    def interrupt_after_stage_3(vae):  # the second reading comes after the last decoder step
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return 0.5

    with monkeypatch.context() as m:
        m.setattr(train_mod, "round_trip_reading", interrupt_after_stage_3)
        with pytest.raises(KeyboardInterrupt):
            train(cut3, cfg)
    assert "decoder_opt" in torch.load(checkpoint_path(cut3), weights_only=False)
    train(cut3, cfg)
    cut4 = tmp_path / "cut-in-stage-4"
    evaluations = []

    def interrupt_in_stage_4(*args):  # stage 2 evaluates twice, stage 3 once, stage 4 at 3
        evaluations.append(1)
        if len(evaluations) == 4:
            raise KeyboardInterrupt
        return {"samples": 0, "attributes": {}, "all": 0.0}

    with monkeypatch.context() as m:
        m.setattr(train_mod, "evaluate", interrupt_in_stage_4)
        with pytest.raises(KeyboardInterrupt):
            train(cut4, cfg)
    assert torch.load(checkpoint_path(cut4), weights_only=False)["refine"]["step"] == 2
    train(cut4, cfg)
    for other in (cut, cut3, cut4):
        _same_weights(load_folder(whole), load_folder(other))


def _same_weights(a, b) -> None:
    for x, y in ((a.unet, b.unet), (a.text_encoder, b.text_encoder), (a.vae, b.vae)):
        for (name, p), q in zip(x.state_dict().items(), y.state_dict().values(), strict=True):
            assert torch.equal(p, q), name


@pytest.mark.slow
def test_later_stages_from_a_folder_are_those_of_a_whole_run(tmp_path):
    whole = tmp_path / "whole"
    train(whole, TrainConfig(**TINY))
    stages12 = tmp_path / "stages12"
    train(stages12, TrainConfig(**{**TINY, "decoder_steps": 0, "refine_steps": 0}))
    stages123 = tmp_path / "stages123"
    train(stages123, TrainConfig(decoder_steps=3, refine_steps=0), from_folder=stages12)
    stages1234 = tmp_path / "stages1234"
    train(stages1234, TrainConfig(refine_steps=3), from_folder=stages123)
    both = tmp_path / "stages34"
    train(both, TrainConfig(decoder_steps=3, refine_steps=3), from_folder=stages12)
    want = json.loads((whole / "training.json").read_text())
    for folder, runs in (
        (
            stages1234,
            [{"from": str(stages12), "stages": [3]}, {"from": str(stages123), "stages": [4]}],
        ),
        (both, [{"from": str(stages12), "stages": [3, 4]}]),
    ):
        record = json.loads((folder / "training.json").read_text())
        assert record["config"] == want["config"] and record["continued"] == runs
        assert record["machine"]["threads"] == 1 and record["machine"]["decoder_threads"] == 1
        assert [f.get("stage") for f in record["fidelity"]] == [
            f.get("stage") for f in want["fidelity"]
        ]
        assert "--from" in (folder / "README.md").read_text()
        _same_weights(load_folder(whole), load_folder(folder))
    a, c = load_folder(whole), load_folder(stages12)
    assert torch.equal(a.vae.encoder.conv_in.weight, c.vae.encoder.conv_in.weight)  # frozen
    assert not torch.equal(a.vae.decoder.conv_out.weight, c.vae.decoder.conv_out.weight)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)  # stage 4 trained it
    with pytest.raises(ConfigError, match=r"training\.json") as e:
        train(tmp_path / "x", TrainConfig(), from_folder=tmp_path)
    assert e.value.field == "from_folder" and not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="every stage"):
        train(tmp_path / "x", TrainConfig(), from_folder=whole)
    with pytest.raises(ConfigError, match="nothing to run"):
        train(tmp_path / "x", TrainConfig(decoder_steps=0, refine_steps=0), from_folder=stages12)
    assert not (tmp_path / "x").exists()
