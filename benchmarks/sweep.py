"""Many edit configurations of one edit in few passes, for sweeps.

``sweep_edit`` runs controlled configurations (P2P refine, AdapEdit and its ablations) of the
same source, edit prompt and seed K at a time as one sampling pass over the batch
``[u_src, u_1 … u_K, c_src, c_1 … c_K]``: the source branch is computed once per pass, and
each configuration's :class:`~adapedit.pipelines.controller.EditController` sees its own four rows
``[u_src, u_k, c_src, c_k]`` exactly as in :meth:`~adapedit.pipelines.pipeline.EditPipeline.edit`
(the
pass's :class:`~adapedit.algorithm.layout.BatchLayout` names the edit prompts ``edit:0 … edit:K-1``,
and
every index comes from it).
Configurations that record the same calibration (same ``calibration`` mode, downscale and steps)
share one calibration pass: the recording does not depend on the other fields, which only
enter ``CalibrationStats.finish``.

The images equal those of separate ``edit`` calls bit for bit as long as the UNet's kernels
compute a sample the same way in the larger batch: on this CPU (torch 2.13) they do up to
K = 6 (14 rows) and not from K = 8 (18 rows; a pixel level off here and there), so a pass
takes at most ``PER_PASS`` = 4 configurations (``tests/benchmarks/test_sweep.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adapedit.algorithm.fwt import fixed_tau
from adapedit.algorithm.layout import CALIBRATION, BatchLayout, numbered_edit
from adapedit.config import EditConfig, SamplerConfig, calibration_sampler
from adapedit.errors import ConfigError
from adapedit.pipelines.controller import CalibrationStats, EditController

#: Configurations per pass (10 rows; see the module docstring).
PER_PASS = 4


def sweep_layout(k: int) -> BatchLayout:
    """The batch of a ``k``-configuration pass: the source and ``k`` numbered edit prompts,
    ``[u_src, u_0 … u_{k-1}, c_src, c_0 … c_{k-1}]``."""
    return BatchLayout(("source", *(numbered_edit(i) for i in range(k))))


class MultiEdit:
    """The controller of a K-configuration pass (layout :func:`sweep_layout`): hands each inner
    controller the samples of its own layout (``[u_src, u_k, c_src, c_k]`` for
    :data:`~adapedit.algorithm.layout.EDIT`), in that layout's order, and takes back its edit
    branches."""

    def __init__(self, controllers: list[EditController]) -> None:
        self.controllers = controllers
        self.layout = sweep_layout(len(controllers))
        #: per configuration: its prompt names → the pass's
        self.names = [
            {"source": "source", "edit": numbered_edit(i)} for i in range(len(controllers))
        ]
        #: per configuration: the pass's index of each sample of the controller's layout
        self.rows = [
            [self.layout.index(names[p], h) for p, h in c.layout.branches]
            for names, c in zip(self.names, controllers, strict=True)
        ]

    def __call__(
        self,
        layer_id: str,
        is_cross: bool,
        probs: torch.Tensor,
        hidden: torch.Tensor | None,
        step: int,
    ) -> torch.Tensor:
        v = self.layout.split(probs)  # [B, H, P, T]
        parts = list(v.unbind(0))  # B × [H, P, T]
        for rows, controller in zip(self.rows, self.controllers, strict=True):
            mine = v[rows].reshape(-1, *probs.shape[1:])  # [4·H, P, T], a copy
            out = controller(
                layer_id, is_cross, mine, None if hidden is None else hidden[rows], step
            )
            out = controller.layout.split(out)  # [4, H, P, T]
            for j, (prompt, _) in enumerate(controller.layout.branches):
                if prompt == "edit":
                    parts[rows[j]] = out[j]
        return torch.stack(parts).reshape(probs.shape)  # a new tensor; probs is left as it is

    def after_step(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """Each controller's ``after_step`` on its own latents (source, its edit); latents
        [K + 1, C, h, w] in the order of the layout's prompts."""
        parts = list(latents.unbind(0))
        for names, controller in zip(self.names, self.controllers, strict=True):
            mine = [self.layout.latent_index(names[p]) for p in controller.layout.prompts]
            out = controller.after_step(step, latents[mine])
            i = controller.layout.latent_index("edit")
            parts[mine[i]] = out[i]
        return torch.stack(parts)


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
    if len({c.attention_limits for c in configs}) != 1:
        raise ConfigError(
            "a sweep's configurations control the same layers",
            where="sweep_edit",
            expected="one attention_limits",
            got=sorted({c.attention_limits for c in configs}),
            field="attention_limits",
        )
    plans = [pipe.plan(source, target, c) for c in configs]  # bad prompts fail first
    calib_samplers = [calibration_sampler(c, sampler) for c in configs]  # and bad steps
    x0 = pipe.initial_latent(sampler)  # [1, 4, h, w]
    latent_hw = tuple(x0.shape[-2:])
    chunks = [len(configs[i : i + per_pass]) for i in range(0, len(configs), per_pass)]
    batches = {sweep_layout(k).size for k in chunks}
    if any(c.needs_calibration for c in configs):
        batches.add(CALIBRATION.size)
    pipe.prepare(configs[0], latent_hw, tuple(sorted(batches)))
    n = pipe.num_steps(sampler)
    uncond, c_src, c_edt = pipe.encode(["", source, target]).split(1)
    calibrated: dict[tuple, CalibrationStats] = {}
    controllers = []
    for config, plan, calib in zip(configs, plans, calib_samplers, strict=True):
        keys = None
        if config.needs_calibration:
            shared = (config.calibration, config.calibration_downscale, calib.steps)
            if shared not in calibrated:
                calibrated[shared], _ = pipe.calibrate(x0, uncond, c_edt, target, config, calib)
            tau, keys = calibrated[shared].finish(plan, config)
        else:
            tau = fixed_tau(plan, config, "FWT off")
        controllers.append(EditController(plan, tau, keys, n, latent_hw, steps=sampler.steps))
    images: list[np.ndarray] = []
    for i in range(0, len(controllers), per_pass):
        multi = MultiEdit(controllers[i : i + per_pass])
        layout = multi.layout
        cond = {"source": c_src, **{p: c_edt for p in layout.prompts if p != "source"}}
        latents = pipe.denoise(
            torch.cat([x0] * len(layout.prompts)),  # [K + 1, 4, h, w]
            layout.stack(uncond, cond),
            sampler,
            multi,
            desc="sweep",
        )
        decoded = pipe.decode(latents)
        images += [decoded[layout.latent_index(names["edit"])] for names in multi.names]
        src = layout.latent_index("source")
    # the source branch is the same in every pass
    return SweepResult(decoded[src], images, latents[src : src + 1])
