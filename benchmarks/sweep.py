"""Many edit configurations of one edit in few passes, for sweeps.

``sweep_edit`` runs controlled configurations (P2P refine, AdapEdit and its ablations) of the
same source, edit prompt and seed K at a time as one sampling pass over the batch
``[u_src, u_1 … u_K, c_src, c_1 … c_K]``: the source branch is computed once per pass, and
each configuration's :class:`~adapedit.controller.EditController` sees its own four rows
``[u_src, u_k, c_src, c_k]`` exactly as in :meth:`~adapedit.pipeline.EditPipeline.edit`.
Configurations that record the same calibration (same ``calibration`` mode and downscale)
share one calibration pass: the recording does not depend on the other fields, which only
enter ``CalibrationRecorder.finish``.

The images equal those of separate ``edit`` calls bit for bit as long as the UNet's kernels
compute a sample the same way in the larger batch: on this CPU (torch 2.13) they do up to
K = 6 (14 rows) and not from K = 8 (18 rows; a pixel level off here and there), so a pass
takes at most ``PER_PASS`` = 4 configurations (``tests/benchmarks/test_sweep.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from adapedit.config import EditConfig, SamplerConfig
from adapedit.controller import CalibrationRecorder, EditController
from adapedit.errors import ConfigError
from adapedit.fwt import fixed_tau

#: Configurations per pass (10 rows; see the module docstring).
PER_PASS = 4


class MultiEdit:
    """The controller of a K-configuration pass: hands each inner controller its four rows
    ``[u_src, u_k, c_src, c_k]`` of the batch ``[u_src, u_1 … u_K, c_src, c_1 … c_K]`` and
    writes its edit rows back."""

    def __init__(self, controllers: list[EditController]) -> None:
        self.controllers = controllers
        k = len(controllers)
        self.rows = [[0, 1 + i, k + 1, k + 2 + i] for i in range(k)]  # per configuration
        self.latent_rows = [[0, 1 + i] for i in range(k)]  # latents [src, 1 … K]

    def __call__(
        self, layer_id: str, is_cross: bool, probs: torch.Tensor, hidden: torch.Tensor | None
    ) -> torch.Tensor:
        batch = 2 * len(self.controllers) + 2
        v = probs.view(batch, probs.shape[0] // batch, *probs.shape[1:])  # [B, H, P, T]
        for rows, controller in zip(self.rows, self.controllers, strict=True):
            mine = v[rows].reshape(-1, *probs.shape[1:])  # [4·H, P, T], a copy
            out = controller(layer_id, is_cross, mine, None if hidden is None else hidden[rows])
            out = out.view(4, -1, *probs.shape[1:])
            v[rows[1]], v[rows[3]] = out[1], out[3]
        return probs

    def end_step(self) -> None:
        for controller in self.controllers:
            controller.end_step()

    def after_scheduler_step(self, latents: torch.Tensor) -> torch.Tensor:
        out = latents.clone()
        for rows, controller in zip(self.latent_rows, self.controllers, strict=True):
            out[rows[1]] = controller.after_scheduler_step(latents[rows])[1]
        return out


@dataclass
class SweepResult:
    """The source image and one edited image per configuration (uint8 [H, W, 3]), and the
    source branch's final latent [1, 4, h, w]."""

    source_image: np.ndarray
    edited_images: list[np.ndarray]
    source_latent: torch.Tensor


def sweep_edit(
    pipe,
    source: str,
    target: str,
    configs: list[EditConfig],
    sampler: SamplerConfig,
    per_pass: int = PER_PASS,
) -> SweepResult:
    """Every configuration's edit as ``pipe.edit(source, target, config, sampler)`` gives it,
    from one edit pass per ``per_pass`` configurations and one calibration pass per distinct
    calibration."""
    if len({c.self_max_queries for c in configs}) != 1:
        raise ConfigError(
            "a sweep's configurations control the same layers",
            where="sweep_edit",
            expected="one self_max_queries",
            got=sorted({c.self_max_queries for c in configs}),
        )
    plans = [pipe.plan(source, target, c) for c in configs]  # bad prompts fail first
    x0 = pipe.initial_latent(sampler)  # [1, 4, h, w]
    latent_hw = tuple(x0.shape[-2:])
    pipe.prepare(configs[0], latent_hw)
    n = pipe.num_steps(sampler)
    uncond, c_src, c_edt = pipe.encode(["", source, target]).split(1)
    recorded: dict[tuple, CalibrationRecorder] = {}
    controllers = []
    for config, plan in zip(configs, plans, strict=True):
        keys = None
        if config.needs_calibration:
            shared = (config.calibration, config.calibration_downscale)
            if shared not in recorded:
                recorder = CalibrationRecorder(latent_hw, n, config)
                pipe.denoise(x0, torch.cat([uncond, c_edt]), sampler, recorder, desc="calibration")
                recorded[shared] = recorder
            tau, keys = replace(recorded[shared], config=config).finish(plan)
        else:
            tau = fixed_tau(plan, config, "FWT off")
        controllers.append(EditController(plan, tau, keys, n, latent_hw))
    images: list[np.ndarray] = []
    for i in range(0, len(controllers), per_pass):
        chunk = controllers[i : i + per_pass]
        k = len(chunk)
        latents = pipe.denoise(
            torch.cat([x0] * (k + 1)),
            torch.cat([uncond] * (k + 1) + [c_src] + [c_edt] * k),
            sampler,
            MultiEdit(chunk),
            desc="sweep",
        )
        images += pipe.decode(latents[1:])
    # the source branch is the same in every pass
    return SweepResult(pipe.decode(latents[:1])[0], images, latents[:1])
