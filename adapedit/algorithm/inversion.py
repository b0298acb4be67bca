"""Editing real images with forward passes only (docs/algorithm.md, "Editing a given image"):
DDIM inversion and Direct Inversion's correction as tensor functions.

Notation: ``z0 = E(x)`` (the VAE encoder's posterior mean times the scaling factor); ``t_1 < … <
t_N`` the edit's DDIM timesteps and ``t_0 = 0``, whose ``ᾱ`` is the one the DDIM sampler's last
step lands on (``final_alpha_cumprod``); ``ᾱ_i`` short for ``ᾱ_{t_i}``.

- DDIM inversion (guidance 1, source prompt ``c``), one UNet call per step at batch 1:
  ``z_{t_{i+1}} = √ᾱ_{i+1} · ẑ0_i + √(1−ᾱ_{i+1}) · ε_i`` with ``ε_i = ε_θ(z_{t_i}, t_i, c)`` and
  ``ẑ0_i = (z_{t_i} − √(1−ᾱ_i) ε_i) / √ᾱ_i``, from ``z_{t_0} = z0``; every ``z*_{t_i}`` is kept
  (the *trajectory*, ``N + 1`` latents).
- Direct Inversion (Ju et al. 2023): after the edit pass's scheduler step at ``t_i`` the source
  branch is set to ``z*_{t_{i−1}}``, so it walks the trajectory and ends at ``z0``; the edit
  branch is left alone.
- Negative-prompt inversion (Miyake et al. 2023) changes only the embeddings of the passes (the
  source branch's unconditional embedding is the source prompt's), so nothing of it is here.

The inversion equation is DDIM's: images are refused with any other scheduler
(:func:`check_sampler`). The UNet may predict ε or v (the model's ``prediction_type``);
:func:`to_epsilon` turns either into ε.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from adapedit.algorithm.layout import BatchLayout
from adapedit.config import SamplerConfig
from adapedit.errors import ConfigError, ModelError

#: The scheduler the inversion equation belongs to.
INVERSION_SCHEDULER = "ddim"
#: The UNet outputs the inversion can turn into ε.
PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_model(scheduler_config: Mapping[str, Any], model: str) -> None:
    """Refuse a model whose UNet output :func:`to_epsilon` cannot read.

    Raises:
        ModelError: a prediction type other than ε or v.
    """
    kind = scheduler_config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ModelError(
            "the model's prediction type cannot be inverted",
            where=f"model {model}: scheduler config (prediction_type)",
            expected=" | ".join(PREDICTION_TYPES),
            got=kind,
        )


def check_sampler(
    sampler: SamplerConfig, where: str = "image edit", preset: str | None = None
) -> None:
    """Refuse a sampler whose steps the DDIM inversion does not invert; ``preset``: the preset
    whose scheduler it is, when none was asked for (the message then names the preset).

    Raises:
        ConfigError: a scheduler other than DDIM (``field`` ``scheduler``).
    """
    if sampler.scheduler == INVERSION_SCHEDULER:
        return
    why = (
        "the inversion is DDIM's equation run backwards, and the other schedulers' steps are "
        "not its inverse"
    )
    if preset is None:
        what, expected = f"editing an image needs the DDIM scheduler: {why}", INVERSION_SCHEDULER
    else:
        what = f"preset {preset!r} samples with {sampler.scheduler}, and editing an image needs "
        what += f"the DDIM scheduler: {why}"
        expected = f"scheduler {INVERSION_SCHEDULER} beside preset {preset!r}, or another preset"
    raise ConfigError(
        what, where=where, expected=expected, got=sampler.scheduler, field="scheduler"
    )


def inversion_schedule(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """The inversion's timesteps and cumulative alphas from a DDIM scheduler whose timesteps are
    set (descending, as the edit pass runs them).

    Returns:
        timesteps: [N + 1] ``t_0 = 0 < t_1 < … < t_N`` (int64).
        alphas: [N + 1] ``ᾱ_{t_0} = final_alpha_cumprod, ᾱ_{t_1}, …, ᾱ_{t_N}`` (float32).
    """
    ts = scheduler.timesteps.flip(0).to(torch.int64)  # [N] ascending
    timesteps = torch.cat([torch.zeros(1, dtype=torch.int64), ts])  # [N + 1]
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32).reshape(1)
    alphas = torch.cat([final, scheduler.alphas_cumprod[ts].float()])  # [N + 1]
    return timesteps, alphas


def to_epsilon(
    output: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The noise prediction ε [B, C, h, w] from a UNet ``output`` [B, C, h, w] at latents ``z``
    [B, C, h, w] with ``alpha`` = ``ᾱ_t`` (0-dim): the output itself for ``epsilon``,
    ``√ᾱ·v + √(1−ᾱ)·z`` for ``v_prediction`` (as diffusers' DDIM step reads it).

    (:func:`check_model` refuses other types before any model work.)
    """
    if prediction_type == "v_prediction":
        alpha = alpha.to(z)
        return alpha.sqrt() * output + (1 - alpha).sqrt() * z
    return output


def ddim_inversion_step(
    z: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, alpha_next: torch.Tensor
) -> torch.Tensor:
    """One DDIM inversion step: ``z`` = ``z_{t_i}`` [B, C, h, w] and its noise prediction
    ``eps`` = ``ε_θ(z_{t_i}, t_i, c)`` [B, C, h, w], ``alpha`` = ``ᾱ_i`` and ``alpha_next`` =
    ``ᾱ_{i+1}`` (0-dim) → ``z_{t_{i+1}}`` [B, C, h, w]."""
    alpha, alpha_next = alpha.to(z), alpha_next.to(z)
    z0_hat = (z - (1 - alpha).sqrt() * eps) / alpha.sqrt()  # [B, C, h, w]
    return alpha_next.sqrt() * z0_hat + (1 - alpha_next).sqrt() * eps


def on_trajectory(latents: torch.Tensor, layout: BatchLayout, z_star: torch.Tensor) -> torch.Tensor:
    """Direct Inversion's correction: ``latents`` [n, C, h, w] (one per prompt of ``layout``,
    after a scheduler step) with the source prompt's latent replaced by the stored inversion
    latent of the same timestep ``z_star`` [C, h, w]; a new tensor (``latents`` is left as it
    is). The same as adding back the difference ``z_star − latents[source]``, without its
    rounding."""
    i = layout.latent_index("source")
    parts = [latents[:i], z_star.to(latents)[None], latents[i + 1 :]]  # [i], [1], [n − i − 1]
    return torch.cat([p for p in parts if len(p)])
