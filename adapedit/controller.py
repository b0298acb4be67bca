"""Controllers: the stateful glue that applies the pure edit functions at each controlled
attention layer, identified by its diffusers module path, step after step.

The same controllers serve the PyTorch reference (called from its attention processors) and the
runtime (called between engine segments). A controller is called as
``controller(layer_id, is_cross, probs, hidden) -> probs`` with ``probs`` [B*H, P, T] laid out
batch-major (``b*H + h``) and ``hidden`` [B, P, C] the layer's input hidden states, then
``end_step()`` after each UNet call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from adapedit.blend import apply_local_blend, local_blend_mask
from adapedit.config import EditConfig
from adapedit.dps import pixel_similarity
from adapedit.edit import edit_cross_attention, edit_self_attention
from adapedit.errors import ModelError
from adapedit.fwt import (
    TauPlan,
    compute_tau,
    cross_gates,
    fixed_tau,
    mean_embedding,
    self_steps,
    token_embeddings,
)
from adapedit.plan import EditPlan

#: Downscale (relative to the latent) of the maps used by LocalBlend and the visualisation:
#: 16×16 at 512 px, as in P2P.
BLEND_DOWNSCALE = 4


def layer_downscale(latent_hw: tuple[int, int], queries: int) -> int:
    """How many times smaller than the latent a layer with ``queries`` pixels is (1, 2, 4, …)."""
    return round(math.sqrt(latent_hw[0] * latent_hw[1] / queries))


def layer_hw(latent_hw: tuple[int, int], queries: int) -> tuple[int, int]:
    """The (h, w) of a layer's query grid."""
    f = layer_downscale(latent_hw, queries)
    return (latent_hw[0] // f, latent_hw[1] // f)


@dataclass
class CalibrationRecorder:
    """Records, during the calibration pass (batch ``[u_edt, c_edt]``), what FWT and DPS need:
    the cond-branch cross-attention maps at the calibration resolution (mean over heads and
    layers, summed over steps) and each cross-attention layer's final-step maps and input hidden
    states."""

    latent_hw: tuple[int, int]
    num_steps: int
    config: EditConfig
    step: int = 0
    map_sum: torch.Tensor | None = None
    map_count: int = 0
    last_calib_layer: str | None = None
    final_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    final_hidden: dict[str, torch.Tensor] = field(default_factory=dict)

    def __call__(
        self, layer_id: str, is_cross: bool, probs: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        if not is_cross:
            return probs
        heads = probs.shape[0] // 2
        cond = probs[heads:].float().mean(dim=0)  # [P, T]
        final = self.step == self.num_steps - 1
        if final:
            self.final_maps[layer_id] = cond
            # a copy: on engines, `hidden` lives in an output buffer reused by the next call
            self.final_hidden[layer_id] = hidden[1].float().clone()  # [P, C]
        f = layer_downscale(self.latent_hw, probs.shape[1])
        if f == self.config.calibration_downscale and (self.config.calibration == "mean" or final):
            self.map_sum = cond if self.map_sum is None else self.map_sum + cond
            self.map_count += 1
            self.last_calib_layer = layer_id
        return probs

    def end_step(self) -> None:
        self.step += 1

    def after_scheduler_step(self, latents: torch.Tensor) -> torch.Tensor:
        """The calibration pass is a plain generation: latents pass unchanged."""
        return latents

    def finish(self, plan: EditPlan) -> tuple[TauPlan, dict[str, torch.Tensor] | None]:
        """τ (FWT, or the fixed τ without it) and the per-layer keyword embeddings ``E_k^ℓ``
        (DPS; None without DPS or without keywords)."""
        cfg = self.config
        if self.map_sum is None:
            raise ModelError(
                "no cross-attention layer at the calibration resolution",
                where="calibration pass",
                expected=f"cross-attention at 1/{cfg.calibration_downscale} of the latent "
                f"{self.latent_hw}",
                got=sorted(
                    {layer_hw(self.latent_hw, m.shape[0]) for m in self.final_maps.values()}
                ),
            )
        if cfg.use_fwt:
            mean_map = self.map_sum / self.map_count  # [P, T]
            e_v = self.final_hidden[self.last_calib_layer]  # [P, d]
            tau = compute_tau(plan, token_embeddings(mean_map, e_v, cfg.alpha_m), cfg)
        else:
            tau = fixed_tau(plan, cfg, "FWT off")
        keys = None
        if cfg.use_dps and plan.keywords:
            alpha_m = cfg.alpha_m if cfg.dps_mask else None
            keys = {
                layer: mean_embedding(
                    token_embeddings(m, self.final_hidden[layer], alpha_m), plan.keywords
                )
                for layer, m in self.final_maps.items()
            }
        return tau, keys


@dataclass
class EditController:
    """Applies §5 to the edit branch (batch ``[u_src, u_edt, c_src, c_edt]``) and collects the
    maps LocalBlend and the visualisation need."""

    plan: EditPlan
    tau: TauPlan
    keys: dict[str, torch.Tensor] | None
    num_steps: int
    latent_hw: tuple[int, int]
    step: int = 0
    gates: torch.Tensor = field(init=False)  # [N, T]
    n_self: int = field(init=False)
    blend_maps: torch.Tensor | None = None  # [2, h, w] accumulated over steps
    vis_sum: torch.Tensor | None = None  # [h*w, T] edit-branch maps after the edit
    vis_count: int = 0

    def __post_init__(self) -> None:
        self.gates = cross_gates(self.tau.token_tau, self.num_steps)
        self.n_self = self_steps(self.tau.tau_self, self.num_steps)

    def __call__(
        self, layer_id: str, is_cross: bool, probs: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        heads = probs.shape[0] // 4
        v = probs.view(4, heads, *probs.shape[1:])  # [4, H, P, T]
        if not is_cross:
            v[3] = edit_self_attention(v[2], v[3], self.step < self.n_self)
            return probs
        cfg = self.plan.config
        blend_layer = layer_downscale(self.latent_hw, probs.shape[1]) == BLEND_DOWNSCALE
        if blend_layer and cfg.local_blend:
            self._record_blend(v)
        s = None
        if self.keys is not None:
            s = pixel_similarity(hidden[3], self.keys[layer_id], cfg.lambda_sv)  # [P]
        v[3] = edit_cross_attention(
            v[2],
            v[3],
            self.plan.token_map,
            self.gates[self.step],
            s=s,
            lambda_s=cfg.lambda_s,
            equalizer=self.plan.equalizer,
        )
        if blend_layer:
            m = v[3].float().mean(dim=0)  # [P, T]
            self.vis_sum = m if self.vis_sum is None else self.vis_sum + m
            self.vis_count += 1
        return probs

    def _record_blend(self, v: torch.Tensor) -> None:
        hw = layer_hw(self.latent_hw, v.shape[2])
        maps = []
        for b, toks in ((2, self.plan.blend_source), (3, self.plan.blend_target)):
            m = (
                v[b][..., list(toks)].sum(dim=-1).float().mean(dim=0)
                if toks
                else torch.zeros(v.shape[2], device=v.device)
            )  # [P]
            maps.append(m.reshape(hw))
        # Each layer contributes its head-mean; the mask is max-normalised, so a sum over
        # layers and steps gives the same mask as P2P's mean.
        maps = torch.stack(maps)  # [2, h, w]
        self.blend_maps = maps if self.blend_maps is None else self.blend_maps + maps

    def end_step(self) -> None:
        self.step += 1

    def after_scheduler_step(self, latents: torch.Tensor) -> torch.Tensor:
        """LocalBlend on latents [2, C, H, W] after each scheduler step (identity without it)."""
        if not self.plan.config.local_blend or self.blend_maps is None:
            return latents
        mask = local_blend_mask(
            self.blend_maps, self.latent_hw, self.plan.config.local_blend_threshold
        )
        return apply_local_blend(latents, mask.to(latents.dtype))

    def attention_maps(self) -> torch.Tensor:
        """Mean edit-branch maps per token at the LocalBlend resolution: [T, h, w]."""
        if self.vis_sum is None:
            return torch.zeros(0)
        p = self.vis_sum.shape[0]
        return (
            (self.vis_sum / self.vis_count)
            .transpose(0, 1)
            .reshape(-1, *layer_hw(self.latent_hw, p))
        )
