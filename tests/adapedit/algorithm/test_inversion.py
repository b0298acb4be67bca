"""The inversion's pure math (adapedit.algorithm.inversion) by hand on small tensors, and the
controller's
and the layout's parts in it."""

from __future__ import annotations

import math

import pytest
import torch

from adapedit.algorithm.fwt import fixed_tau
from adapedit.algorithm.inversion import (
    check_model,
    check_sampler,
    ddim_inversion_step,
    inversion_schedule,
    on_trajectory,
    to_epsilon,
)
from adapedit.algorithm.layout import EDIT, INVERSION, BatchLayout
from adapedit.algorithm.plan import build_plan
from adapedit.config import EditConfig, ImageConfig, SamplerConfig
from adapedit.errors import ConfigError, ModelError
from adapedit.pipelines.controller import EditController
from adapedit.pipelines.models import SD_SCHEDULER_CONFIG, make_scheduler


def test_one_inversion_step_by_hand():
    z, eps = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.25]])
    a, a_next = torch.tensor(0.81), torch.tensor(0.36)
    got = ddim_inversion_step(z, eps, a, a_next)
    for k in range(2):
        z0 = (z[0, k].item() - math.sqrt(0.19) * eps[0, k].item()) / 0.9
        assert got[0, k].item() == pytest.approx(0.6 * z0 + 0.8 * eps[0, k].item(), abs=1e-6)
    # with ᾱ unchanged the step is the identity; the inputs are left as they were
    assert torch.allclose(ddim_inversion_step(z, eps, a, a), z, atol=1e-6)
    assert torch.equal(z, torch.tensor([[1.0, -2.0]]))


def test_the_schedule_is_the_edits_timesteps_from_zero():
    scheduler = make_scheduler("ddim", SD_SCHEDULER_CONFIG)
    scheduler.set_timesteps(5)
    timesteps, alphas = inversion_schedule(scheduler)
    assert timesteps.tolist() == [0, *sorted(scheduler.timesteps.tolist())]  # 0, 1, 201, …
    assert timesteps.tolist()[:3] == [0, 1, 201]
    assert alphas[0].item() == pytest.approx(float(scheduler.final_alpha_cumprod))
    assert torch.equal(alphas[1:], scheduler.alphas_cumprod[timesteps[1:]])
    assert (alphas[1:] < alphas[:-1]).all()  # noisier and noisier


def test_a_ddim_sampler_step_undoes_an_inversion_step_with_the_same_noise():
    """The inversion step is the DDIM step run backwards: with the same ε, diffusers' DDIM step
    from t_{i+1} lands back on z_{t_i}, for every i (t_0's ᾱ included)."""
    scheduler = make_scheduler("ddim", SD_SCHEDULER_CONFIG)
    scheduler.set_timesteps(4)
    timesteps, alphas = inversion_schedule(scheduler)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 3, 3, generator=gen)
    for i in range(len(timesteps) - 1):
        eps = torch.randn(z.shape, generator=gen)
        z_next = ddim_inversion_step(z, eps, alphas[i], alphas[i + 1])
        back = scheduler.step(eps, timesteps[i + 1], z_next).prev_sample
        assert torch.allclose(back, z, atol=1e-5), i
        z = z_next


def test_v_prediction_reads_as_epsilon_and_inverts_a_trailing_schedule():
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 1, 4, 2, 2, generator=gen)
    a = torch.tensor(0.3)
    z = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    assert torch.allclose(to_epsilon(v, z, a, "v_prediction"), eps, atol=1e-6)
    assert to_epsilon(v, z, a, "epsilon") is v
    # the v2 shapes model's kind of schedule: v-prediction, trailing timesteps
    config = {**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}
    scheduler = make_scheduler("ddim", {**config, "timestep_spacing": "trailing"})
    scheduler.set_timesteps(4)
    timesteps, alphas = inversion_schedule(scheduler)
    assert timesteps.tolist() == [0, 249, 499, 749, 999]
    for i in range(4):  # the sampler's v at z_{t_{i+1}} that reads as the same ε steps back
        z_next = ddim_inversion_step(z, eps, alphas[i], alphas[i + 1])
        a_next = alphas[i + 1]
        v_next = (eps - (1 - a_next).sqrt() * z_next) / a_next.sqrt()
        back = scheduler.step(v_next, timesteps[i + 1], z_next).prev_sample
        assert torch.allclose(back, z, atol=1e-4), i
        z = z_next
    check_model(config, "m")
    with pytest.raises(ModelError, match="prediction type cannot be inverted") as e:
        check_model({"prediction_type": "sample"}, "m")
    assert "model m" in e.value.where


def test_on_trajectory_replaces_the_source_latent_only():
    latents = torch.arange(2 * 2 * 2, dtype=torch.float32).reshape(2, 1, 2, 2)  # [src, edt]
    before = latents.clone()
    z_star = torch.full((1, 2, 2), -1.0)
    out = on_trajectory(latents, EDIT, z_star)
    assert torch.equal(out[0], z_star) and torch.equal(out[1], latents[1])
    assert torch.equal(latents, before)  # the input is untouched
    swapped = BatchLayout(("edit", "source"))
    out = on_trajectory(latents, swapped, z_star)
    assert torch.equal(out[1], z_star) and torch.equal(out[0], latents[0])


def test_the_controller_puts_the_source_back_on_the_trajectory_after_each_step(tokenizer):
    plan = build_plan(tokenizer, "a red circle", "a blue circle", EditConfig())
    n = 3
    trajectory = torch.arange(n + 1.0)[:, None, None, None].expand(n + 1, 4, 2, 2)
    ctl = EditController(plan, fixed_tau(plan, plan.config, "test"), None, n, (2, 2))
    direct = EditController(
        plan, fixed_tau(plan, plan.config, "test"), None, n, (2, 2), trajectory=trajectory
    )
    latents = torch.full((2, 4, 2, 2), 7.0)
    for step in range(n):  # step 0 lands on t_{N-1}, the last on t_0 (z0)
        out = direct.after_step(step, latents)
        assert (out[0] == n - 1 - step).all() and (out[1] == 7.0).all()
        assert torch.equal(ctl.after_step(step, latents), latents)


def test_stack_gives_a_prompt_its_own_unconditional_embedding():
    u, c_src, c_edt = (torch.full((1, 2, 3), v) for v in (0.0, 1.0, 2.0))
    plain = EDIT.stack(u, {"source": c_src, "edit": c_edt})  # [u, u, c_src, c_edt]
    assert plain[:, 0, 0].tolist() == [0.0, 0.0, 1.0, 2.0]
    npi = EDIT.stack(u, {"source": c_src, "edit": c_edt}, {"source": c_src})
    assert npi[:, 0, 0].tolist() == [1.0, 0.0, 1.0, 2.0]
    assert INVERSION.stack(None, {"source": c_src})[:, 0, 0].tolist() == [1.0]


def test_images_need_the_ddim_scheduler_and_known_names():
    check_sampler(SamplerConfig())
    for scheduler in ("pndm", "euler", "dpmpp"):
        with pytest.raises(ConfigError, match="needs the DDIM scheduler") as e:
            check_sampler(SamplerConfig(scheduler=scheduler))
        assert e.value.field == "scheduler"
    for field, value in (("inversion", "null-text"), ("resize", "zoom")):
        with pytest.raises(ConfigError, match=f"unknown {field}") as e:
            ImageConfig(**{field: value})
        assert e.value.field == field and "expected: " in str(e.value)
