"""The PyTorch reference pipeline on the tiny model: the source invariant, determinism, edit
types and LocalBlend (the P2P and AdapEdit oracles are in test_oracles.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from adapedit.algorithm.blend import local_blend_mask
from adapedit.algorithm.fwt import fixed_tau
from adapedit.config import DEFAULT_CACHE_BYTES, EditConfig, SamplerConfig
from adapedit.pipelines.controller import EditController
from adapedit.pipelines.pipeline import EditPipeline, ReferencePipeline

SRC, TGT = "a dog standing on the grass", "a dog sitting on the grass"
FAST = SamplerConfig(steps=6, seed=3)


def _edit_embeddings(pipe, src, tgt):
    u, c_src, c_edt = pipe.encode(["", src, tgt]).split(1)
    return torch.cat([u, u, c_src, c_edt])


def test_fwt_and_dps_change_the_edit(tiny_pipeline):
    off = tiny_pipeline.edit(
        SRC, TGT, EditConfig(use_fwt=False, use_dps=False, alpha_m=0.0), FAST, record_latents=True
    )
    on = tiny_pipeline.edit(SRC, TGT, EditConfig(alpha_m=0.0), FAST, record_latents=True)
    assert torch.equal(on.latents[-1][0], off.latents[-1][0])  # source untouched
    assert not torch.equal(on.latents[-1][1], off.latents[-1][1])


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler", "dpmpp"])
def test_source_branch_equals_plain_generation_bit_exact(tiny_pipeline, scheduler):
    sampler = SamplerConfig(steps=5, seed=7, scheduler=scheduler)
    plain = tiny_pipeline.generate(SRC, sampler, record_latents=True)
    edit = tiny_pipeline.edit(
        SRC, TGT, EditConfig(alpha_m=0.0, local_blend=("dog",)), sampler, record_latents=True
    )
    for a, b in zip(plain.latents, edit.latents, strict=True):
        assert torch.equal(a[0], b[0])
    assert (plain.image == edit.source_image).all()


def test_same_seed_same_images_twice(tiny_pipeline):
    a = tiny_pipeline.edit(SRC, TGT, EditConfig(alpha_m=0.0), FAST)
    b = tiny_pipeline.edit(SRC, TGT, EditConfig(alpha_m=0.0), FAST)
    assert (a.source_image == b.source_image).all() and (a.edited_image == b.edited_image).all()
    assert [w.tau for w in a.tau.words] == [w.tau for w in b.tau.words]
    c = tiny_pipeline.edit(SRC, TGT, EditConfig(alpha_m=0.0), SamplerConfig(steps=6, seed=4))
    assert not (a.source_image == c.source_image).all()


def test_fwt_gives_keywords_tau_zero_and_a_default(tiny_pipeline):
    r = tiny_pipeline.edit(SRC, TGT, EditConfig(alpha_m=0.0), FAST)
    by_word = {w.word: w for w in r.tau.words}
    assert r.keywords == ["sitting"]
    assert by_word["sitting"].tau == 0.0 and by_word["sitting"].keyword
    assert all(0.0 <= w.tau <= 1.0 for w in r.tau.words)
    n_low = sum(w.tau < 0.1 for w in r.tau.words)
    assert r.tau.tau_self == pytest.approx(min(max(0.8 - n_low / 6, 0.0), 1.0))
    assert r.attention_maps.shape[0] == len(r.attention_labels) == 7  # 6 words + end token
    assert r.attention_labels[2] == "sitting"
    assert set(r.timings) == {"text", "calibration", "edit", "decode", "total"}


def test_identical_prompts_fall_back_to_fixed_tau(tiny_pipeline):
    r = tiny_pipeline.edit(SRC, SRC, EditConfig(), FAST)
    assert r.tau.fallback and all(w.tau == 0.8 for w in r.tau.words)
    assert any("fixed τ" in n for n in r.notes)


def test_replace_and_reweight_edits_run(tiny_pipeline):
    rep = tiny_pipeline.edit(
        "a red dog on the grass",
        "a blue cat on the grass",
        EditConfig(edit_type="replace", alpha_m=0.0),
        FAST,
    )
    assert rep.keywords == ["blue", "cat"]
    rew = tiny_pipeline.edit(
        SRC,
        SRC,
        EditConfig(edit_type="reweight", reweight=(("grass", 3.0),)),
        FAST,
        record_latents=True,
    )
    plain = tiny_pipeline.edit(SRC, SRC, EditConfig(), FAST, record_latents=True)
    assert not torch.equal(rew.latents[-1][1], plain.latents[-1][1])


def test_local_blend_keeps_the_source_outside_the_mask(tiny_pipeline):
    # The random tiny model's maps are nearly flat: a high threshold leaves a partial mask.
    pipe, sampler = tiny_pipeline, SamplerConfig(steps=6, seed=3, height=256, width=256)
    cfg = EditConfig(alpha_m=0.0, local_blend=("dog",), local_blend_threshold=0.95)
    plan = pipe.plan(SRC, TGT, cfg)
    x0 = pipe.initial_latent(sampler)
    n = pipe.num_steps(sampler)
    ctrl = EditController(plan, fixed_tau(plan, cfg, None), None, n, tuple(x0.shape[-2:]))
    out = pipe.denoise(torch.cat([x0, x0]), _edit_embeddings(pipe, SRC, TGT), sampler, ctrl)
    mask = local_blend_mask(ctrl.blend_maps, tuple(x0.shape[-2:]), 0.95)[0, 0].bool()
    assert 0 < mask.sum() < mask.numel()
    assert torch.equal(out[1][:, ~mask], out[0][:, ~mask])
    assert not torch.equal(out[1][:, mask], out[0][:, mask])


def test_progress_reports_each_unet_step_and_changes_nothing(tiny_pipeline, photo):
    tiny_pipeline.use_calibration_cache(None)  # a cached calibration would skip its steps
    try:
        cfg, sampler = EditConfig(calibration_steps=2), SamplerConfig(steps=3, seed=11)
        seen: list = []
        r = tiny_pipeline.edit(
            "a cat on a mat", "a dog on a mat", cfg, sampler, on_progress=seen.append
        )
        quiet = tiny_pipeline.edit("a cat on a mat", "a dog on a mat", cfg, sampler)
        assert torch.equal(torch.as_tensor(r.edited_image), torch.as_tensor(quiet.edited_image))
        assert [(p.stage, p.step, p.steps, p.done, p.total) for p in seen] == [
            ("calibration", 1, 2, 1, 5),
            ("calibration", 2, 2, 2, 5),
            ("edit", 1, 3, 3, 5),
            ("edit", 2, 3, 4, 5),
            ("edit", 3, 3, 5, 5),
        ]
        # an edit of a given image inverts it first (one call per DDIM step); no FWT, no DPS:
        # no calibration pass
        seen.clear()
        off = EditConfig(use_fwt=False, use_dps=False)
        tiny_pipeline.edit(
            "a cat", "a dog", off, SamplerConfig(steps=2), image=photo(128), on_progress=seen.append
        )
        assert [(p.stage, p.done, p.total) for p in seen] == [
            ("inversion", 1, 4),
            ("inversion", 2, 4),
            ("edit", 3, 4),
            ("edit", 4, 4),
        ]
    finally:
        tiny_pipeline.use_calibration_cache(DEFAULT_CACHE_BYTES)


def test_dps_weight_is_s_at_the_last_step_of_the_blend_layers(monkeypatch):
    """On the trained model (the tiny one's random S is clamped to 0 everywhere): the result's
    map is the mean of the S that Eq. 8 used at the last step in the LocalBlend layers."""
    import adapedit.algorithm.edit
    from adapedit.algorithm.dps import pixel_similarity
    from adapedit.pipelines.pipeline import ReferencePipeline

    pipe = ReferencePipeline.from_model("shapes")
    used: list[torch.Tensor] = []

    def spy(*args, **kwargs):
        used.append(pixel_similarity(*args, **kwargs))
        return used[-1]

    monkeypatch.setattr(adapedit.algorithm.edit, "pixel_similarity", spy)
    source, target = "a small red circle on the left", "a big red circle on the left"
    r = pipe.edit(source, target, EditConfig(), SamplerConfig(steps=3, seed=2))
    blend = [s for s in used if s.numel() == r.attention_maps[0].numel()]  # the LocalBlend layers
    last = blend[-len(blend) // 3 :]  # one step's worth: the last
    assert r.dps_weight.shape == r.attention_maps.shape[1:]
    assert torch.allclose(r.dps_weight.flatten(), torch.stack(last).float().mean(0))
    assert r.dps_weight.max() > 0
    off = pipe.edit(source, target, EditConfig(use_dps=False), SamplerConfig(steps=3, seed=2))
    assert off.dps_weight is None


def test_a_pndm_edit_injects_by_the_nominal_steps(tiny_pipeline, monkeypatch):
    import adapedit.pipelines.pipeline

    built: list[EditController] = []

    class Recorded(EditController):
        def __post_init__(self) -> None:
            super().__post_init__()
            built.append(self)

    monkeypatch.setattr(adapedit.pipelines.pipeline, "EditController", Recorded)
    cfg = EditConfig(use_fwt=False, use_dps=False, tau_fixed=0.5, tau_self_fixed=0.5)
    for scheduler, calls in (("ddim", 4), ("pndm", 5)):
        tiny_pipeline.edit("a cat", "a big cat", cfg, SamplerConfig(steps=4, scheduler=scheduler))
        schedule = built[-1].schedule
        # ⌊0.5·(4+1)⌋ = 2 cross calls, ⌊0.5·4⌋ = 2 self calls, of 4 (DDIM) or 5 (PNDM) calls
        assert schedule.cross.shape[0] == schedule.self.shape[0] == calls
        assert schedule.cross[:, 2].sum().item() == 2.0 and schedule.self.sum().item() == 2.0


def test_stage_timings_wait_for_the_gpu_and_never_for_the_cpu(monkeypatch):
    """On a GPU the work of a stage is queued, not done, when its Python returns: each stage's
    clock waits for the device first (on the CPU there is nothing to wait for)."""
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    gpu = SimpleNamespace(device=torch.device("cuda", 0))
    assert isinstance(EditPipeline._clock(gpu), float)
    assert waited == [torch.device("cuda", 0)]
    EditPipeline._clock(SimpleNamespace(device=torch.device("cpu")))
    assert len(waited) == 1


def test_an_fp16_reference_steps_its_latents_in_fp32_as_the_runtime_does():
    """The modules run in their dtype, the sampler in fp32: an fp16 reference and an fp16
    engine folder differ by their UNets alone (DDIM steps in fp16 drift by ~1e-2 over a pass
    by themselves, past the GPU parity goal of 5e-3)."""
    from adapedit.pipelines.models import build_random

    half = ReferencePipeline(
        build_random("tiny", seed=0).to("cpu", torch.float16), calibration_cache=None
    )
    assert (half.dtype, half.model_dtype) == (torch.float32, torch.float16)
    sampler = SamplerConfig(steps=3, seed=0)
    r = half.edit(SRC, TGT, EditConfig(), sampler, record_latents=True)
    assert {x.dtype for x in r.latents} == {torch.float32}
    assert all(torch.isfinite(x).all() for x in r.latents)
    assert r.source_image.dtype == np.uint8
