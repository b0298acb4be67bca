"""Controllers: the glue that applies the pure edit functions at each controlled attention layer,
identified by its diffusers module path, step after step.

The same controllers serve the PyTorch reference (called from its attention processors), the
segmented runtime (called between engine segments) and, through :class:`EditControls` and the
``record_*`` methods, the fused graph (which runs the same functions inside the engine).

The contract (:class:`Controller`):

- ``controller(layer_id, is_cross, probs, hidden, step) -> probs`` at every controlled layer of
  every UNet call of a pass. ``probs`` [B·H, P, K] is laid out batch-major by the controller's
  :attr:`~Controller.layout` (sample ``b``, head ``h`` at ``b·H + h``); ``hidden`` [B, P, C] is
  the layer's input hidden states (cross-attention; ``None`` for self-attention); ``step`` is the
  index of the UNet call in the pass (0 = the noisiest), passed by the sampling loop — a
  controller never counts calls.
- Buffers: a controller never writes into the tensors it is given. It returns the probabilities
  to use: ``probs`` itself when it changes nothing, else a new tensor. Its inputs may be buffers
  the caller reuses after the call returns, so what it keeps beyond the call it copies.
- ``after_step(step, latents) -> latents`` after the scheduler step of call ``step`` (latents
  [n, C, h, w], one per prompt of the layout): Direct Inversion's correction and LocalBlend, or
  the latents unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from adapedit.algorithm.blend import apply_local_blend, local_blend_mask
from adapedit.algorithm.dps import pixel_similarity
from adapedit.algorithm.edit import branch_mean, edit_probs
from adapedit.algorithm.fwt import (
    TauPlan,
    compute_tau,
    cross_gates,
    fixed_tau,
    mean_embedding,
    self_steps,
    token_embeddings,
)
from adapedit.algorithm.geometry import BLEND_DOWNSCALE, blend_pool, layer_downscale, layer_hw
from adapedit.algorithm.inversion import on_trajectory
from adapedit.algorithm.layout import CALIBRATION, EDIT, BatchLayout
from adapedit.algorithm.plan import EditPlan
from adapedit.config import EditConfig
from adapedit.errors import ModelError


@runtime_checkable
class Controller(Protocol):
    """What the sampling loop and the attention layers call during a pass (module docstring)."""

    layout: BatchLayout

    def __call__(
        self,
        layer_id: str,
        is_cross: bool,
        probs: torch.Tensor,
        hidden: torch.Tensor | None,
        step: int,
    ) -> torch.Tensor: ...

    def after_step(self, step: int, latents: torch.Tensor) -> torch.Tensor: ...


@dataclass
class CalibrationRecorder:
    """Records, during the calibration pass (:data:`~adapedit.algorithm.layout.CALIBRATION`,
    ``[u_edt, c_edt]``), what FWT and DPS need: the conditional branch's cross-attention maps at
    the calibration resolution (mean over heads and layers, summed over steps) and each
    cross-attention layer's final-step maps and input hidden states."""

    latent_hw: tuple[int, int]
    num_steps: int
    config: EditConfig
    layout: BatchLayout = CALIBRATION
    map_sum: torch.Tensor | None = None
    map_count: int = 0
    last_calib_layer: str | None = None
    final_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    final_hidden: dict[str, torch.Tensor] = field(default_factory=dict)

    def __call__(
        self,
        layer_id: str,
        is_cross: bool,
        probs: torch.Tensor,
        hidden: torch.Tensor | None,
        step: int,
    ) -> torch.Tensor:
        if is_cross:
            cond_map = branch_mean(probs, self.layout, "edit")  # [P, T]
            self.record(layer_id, step, cond_map, hidden[self.layout.index("edit")])
        return probs

    def record(
        self, layer_id: str, step: int, cond_map: torch.Tensor, cond_hidden: torch.Tensor
    ) -> None:
        """One cross-attention layer at one step: its conditional head-mean map ``cond_map``
        [P, T] (float32) and conditional input hidden states ``cond_hidden`` [P, C]."""
        final = step == self.num_steps - 1
        if final:  # copies: on engines the inputs are output buffers reused by the next call
            self.final_maps[layer_id] = cond_map.float().clone()  # [P, T]
            self.final_hidden[layer_id] = cond_hidden.float().clone()  # [P, C]
        f = layer_downscale(self.latent_hw, cond_map.shape[0])
        if f == self.config.calibration_downscale and (self.config.calibration == "mean" or final):
            cond_map = cond_map.float()
            self.map_sum = cond_map.clone() if self.map_sum is None else self.map_sum + cond_map
            self.map_count += 1
            self.last_calib_layer = layer_id

    def after_step(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """The calibration pass is a plain generation: latents pass unchanged."""
        return latents

    def stats(self) -> CalibrationStats:
        """What the pass recorded, as :class:`CalibrationStats`.

        Raises:
            ModelError: no cross-attention layer ran at the calibration resolution.
        """
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
        return CalibrationStats(
            self.map_sum / self.map_count,
            self.final_hidden[self.last_calib_layer],
            dict(self.final_maps),
            dict(self.final_hidden),
        )


@dataclass(frozen=True, eq=False)
class CalibrationStats:
    """What FWT and DPS take from a calibration pass, before any edit-side option is applied:
    τ, ``τ_self`` and ``E_k^ℓ`` follow from it under any ``λ_τ``, τ rule, ``α_m``, mask and
    keyword set, so one pass serves every edit of the same target (the calibration cache).

    Attributes:
        mean_map: [P, T] the conditional cross-attention map at the calibration resolution,
            mean over heads, layers and steps (or the last step).
        e_v: [P, d] the input hidden states of the last such layer at the final step.
        final_maps / final_hidden: per cross-attention layer, its final-step map [P, T] and
            input hidden states [P, C].
    """

    mean_map: torch.Tensor
    e_v: torch.Tensor
    final_maps: dict[str, torch.Tensor]
    final_hidden: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes held (``e_v`` is one of ``final_hidden``'s tensors, counted once)."""
        held = [self.mean_map, *self.final_maps.values(), *self.final_hidden.values()]
        return sum(t.numel() * t.element_size() for t in held)

    def finish(
        self, plan: EditPlan, cfg: EditConfig
    ) -> tuple[TauPlan, dict[str, torch.Tensor] | None]:
        """τ (FWT, or the fixed τ without it) and the per-layer keyword embeddings ``E_k^ℓ``
        (DPS; None without DPS or without keywords)."""
        if cfg.use_fwt:
            tau = compute_tau(plan, token_embeddings(self.mean_map, self.e_v, cfg.alpha_m), cfg)
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


_CONTROL_TENSORS = ("carry", "alphas", "equalizer", "lambda_s", "lambda_sv", "dps_on")


@dataclass(frozen=True, eq=False)
class EditControls:
    """What the per-layer edit of one edit needs besides the step's gates, as tensors: the
    arguments of :func:`~adapedit.algorithm.edit.edit_probs` (the fused graph's per-edit inputs).

    Attributes:
        carry: [T, T] the token map's matrix; alphas: [T]; equalizer: [T] (ones unless
            reweighting).
        lambda_s, lambda_sv, dps_on: [] or [1] (``dps_on`` 1.0 when DPS runs).
        keys: per cross-attention layer, ``E_k`` [C]; empty without DPS.
    """

    carry: torch.Tensor
    alphas: torch.Tensor
    equalizer: torch.Tensor
    lambda_s: torch.Tensor
    lambda_sv: torch.Tensor
    dps_on: torch.Tensor
    keys: dict[str, torch.Tensor]

    @classmethod
    def build(cls, plan: EditPlan, keys: dict[str, torch.Tensor] | None) -> EditControls:
        cfg = plan.config
        n_tokens = plan.target.max_length
        eq = plan.equalizer if plan.equalizer is not None else torch.ones(n_tokens)
        return cls(
            carry=plan.token_map.matrix,
            alphas=plan.token_map.alphas,
            equalizer=eq,
            lambda_s=torch.tensor(cfg.lambda_s),
            lambda_sv=torch.tensor(cfg.lambda_sv),
            dps_on=torch.tensor(float(keys is not None)),
            keys=dict(keys or {}),
        )

    def to(self, like: torch.Tensor) -> EditControls:
        """The controls on ``like``'s device and in its dtype."""

        def cast(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=like.device, dtype=like.dtype)

        return EditControls(
            **{name: cast(getattr(self, name)) for name in _CONTROL_TENSORS},
            keys={k: cast(v) for k, v in self.keys.items()},
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The per-edit tensors by field name (keys apart)."""
        return {name: getattr(self, name) for name in _CONTROL_TENSORS}

    def key(self, layer_id: str, width: int, like: torch.Tensor) -> torch.Tensor:
        """The layer's ``E_k`` [C], or zeros when DPS does not run (``dps_on`` = 0 ignores it)."""
        return self.keys.get(layer_id, torch.zeros(width, device=like.device, dtype=like.dtype))


@dataclass(frozen=True, eq=False)
class EditSchedule:
    """The gates of every step of an edit pass: ``cross`` [N, T] (1 where token ``j`` is
    injected at step ``s``, ``s < ⌊τ_j · (N + 1)⌋``) and ``self`` [N] (``s < ⌊τ_self · N⌋``)."""

    cross: torch.Tensor
    self: torch.Tensor

    @classmethod
    def build(cls, tau: TauPlan, num_steps: int, steps: int | None = None) -> EditSchedule:
        """Gates for a pass of ``num_steps`` UNet calls of a sampler of ``steps`` nominal
        steps (default ``num_steps``; PNDM makes one call more), counted as P2P counts."""
        steps = num_steps if steps is None else steps
        n_self = self_steps(tau.tau_self, steps)
        return cls(
            cross_gates(tau.token_tau, steps, num_steps), (torch.arange(num_steps) < n_self).float()
        )


def edit_layer(
    layer_id: str,
    is_cross: bool,
    probs: torch.Tensor,
    hidden: torch.Tensor | None,
    layout: BatchLayout,
    controls: EditControls,
    cross_gate: torch.Tensor,
    self_gate: torch.Tensor,
) -> torch.Tensor:
    """:func:`~adapedit.algorithm.edit.edit_probs` for one controlled layer with an edit's controls
    and the step's gates (the controller between segments and the fused graph both call this)."""
    width = hidden.shape[-1] if hidden is not None else 0
    return edit_probs(
        probs,
        hidden,
        layout,
        is_cross=is_cross,
        carry=controls.carry,
        alphas=controls.alphas,
        equalizer=controls.equalizer,
        cross_gate=cross_gate,
        self_gate=self_gate,
        e_k=controls.key(layer_id, width, probs),
        lambda_s=controls.lambda_s,
        lambda_sv=controls.lambda_sv,
        dps_on=controls.dps_on,
    )


def edit_similarity(
    layer_id: str, hidden: torch.Tensor, layout: BatchLayout, controls: EditControls
) -> torch.Tensor:
    """DPS's ``S`` [P] (Eq. 9) of the edit branch of a controlled cross-attention layer, from
    its input ``hidden`` [B, P, C] (what the controller between segments keeps of the last step
    and the fused graph gives as an output, for the picture of ``S``)."""
    e_k = controls.key(layer_id, hidden.shape[-1], hidden)
    return pixel_similarity(hidden[layout.index("edit")], e_k, controls.lambda_sv)


@dataclass
class EditController:
    """Applies §5 to the edit branch of an edit pass (:data:`~adapedit.algorithm.layout.EDIT`,
    ``[u_src, u_edt, c_src, c_edt]``) and collects the maps LocalBlend and the attention image
    need (from the 1/4-resolution cross-attention layers, after the edit, as P2P's
    attention store sees them).

    ``trajectory`` (Direct Inversion, editing a given image): the inversion's latents
    [N + 1, C, h, w] (``z0``, ``z*_{t_1}`` … ``z*_{t_N}``); after each step the source branch is
    set back onto it (:func:`~adapedit.algorithm.inversion.on_trajectory`)."""

    plan: EditPlan
    tau: TauPlan
    keys: dict[str, torch.Tensor] | None
    num_steps: int
    latent_hw: tuple[int, int]
    layout: BatchLayout = EDIT
    trajectory: torch.Tensor | None = None
    steps: int | None = None  # the sampler's nominal steps (None: num_steps)
    controls: EditControls = field(init=False)
    schedule: EditSchedule = field(init=False)
    blend_pool: int = field(init=False)  # LocalBlend's max-pool window (the edit's rule)
    blend_maps: torch.Tensor | None = None  # [2, h, w] accumulated over steps
    vis_sum: torch.Tensor | None = None  # [h*w, T] edit-branch maps after the edit
    vis_count: int = 0
    dps_sum: torch.Tensor | None = None  # [h*w] DPS's S at the last step, summed over layers
    dps_count: int = 0
    _cast: dict[tuple[torch.device, torch.dtype], tuple[EditControls, EditSchedule]] = field(
        init=False, default_factory=dict
    )
    _blend_tokens: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        init=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        self.controls = EditControls.build(self.plan, self.keys)
        self.schedule = EditSchedule.build(self.tau, self.num_steps, self.steps)
        self.blend_pool = blend_pool(self.plan.config.attention_limits, self.latent_hw)

    def controls_like(self, like: torch.Tensor) -> tuple[EditControls, EditSchedule]:
        """The controls and the schedule on ``like``'s device and dtype (cast once each)."""
        key = (like.device, like.dtype)
        if key not in self._cast:
            cast = {"device": like.device, "dtype": like.dtype}
            s = EditSchedule(self.schedule.cross.to(**cast), self.schedule.self.to(**cast))
            self._cast[key] = (self.controls.to(like), s)
        return self._cast[key]

    def __call__(
        self,
        layer_id: str,
        is_cross: bool,
        probs: torch.Tensor,
        hidden: torch.Tensor | None,
        step: int,
    ) -> torch.Tensor:
        c, s = self.controls_like(probs)
        out = edit_layer(
            layer_id, is_cross, probs, hidden, self.layout, c, s.cross[step], s.self[step]
        )
        if is_cross and layer_downscale(self.latent_hw, probs.shape[1]) == BLEND_DOWNSCALE:
            self.record_maps(
                branch_mean(probs, self.layout, "source"), branch_mean(out, self.layout, "edit")
            )
            if self.wants_dps_weight(step):
                self.record_dps(edit_similarity(layer_id, hidden, self.layout, c))
        return out

    def wants_dps_weight(self, step: int) -> bool:
        """Whether ``step``'s ``S`` is kept for :meth:`dps_weight`: the last step, with DPS."""
        return self.keys is not None and step == self.num_steps - 1

    def record_dps(self, s: torch.Tensor, layers: int = 1) -> None:
        """DPS's ``S`` [P] of the LocalBlend-resolution layers at the last step, summed over
        ``layers`` layers (the fused graph sums them in its forward)."""
        self.dps_sum = s.float() + (0 if self.dps_sum is None else self.dps_sum)
        self.dps_count += layers

    def record_maps(self, src_map: torch.Tensor, edt_map: torch.Tensor, layers: int = 1) -> None:
        """Maps of the LocalBlend-resolution layers at one step: the source branch's and the
        edited branch's conditional head-mean maps [P, T], summed over ``layers`` layers."""
        hw = layer_hw(self.latent_hw, src_map.shape[0])
        src_map, edt_map = src_map.float(), edt_map.float()  # [P, T]
        self.vis_sum = edt_map.clone() if self.vis_sum is None else self.vis_sum + edt_map
        self.vis_count += layers
        if not self.plan.config.local_blend:
            return
        maps = torch.stack(
            [
                m[:, toks].sum(dim=-1) if len(toks) else torch.zeros_like(m[:, 0])
                for m, toks in zip((src_map, edt_map), self._blend_index(src_map), strict=True)
            ]
        ).reshape(2, *hw)  # [2, h, w]
        # The mask is max-normalised, so a sum over layers and steps gives P2P's mean's mask.
        self.blend_maps = maps if self.blend_maps is None else self.blend_maps + maps

    def _blend_index(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The LocalBlend words' token indices of the source and the edit prompt, as int64
        tensors on ``like``'s device (copied there once per edit, not at every step)."""
        index = self._blend_tokens.get(like.device)
        if index is None:
            index = self._blend_tokens[like.device] = tuple(
                torch.tensor(list(toks), dtype=torch.long).to(like.device)
                for toks in (self.plan.blend_source, self.plan.blend_target)
            )
        return index

    def after_step(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """After each scheduler step, on latents [2, C, H, W] (source, edit): the source back on
        the inversion trajectory (with one), then LocalBlend (identity without either)."""
        if self.trajectory is not None:  # step ``step`` landed on t_{N-1-step}
            z_star = self.trajectory[self.num_steps - 1 - step]  # [C, H, W]
            latents = on_trajectory(latents, self.layout, z_star)
        if not self.plan.config.local_blend or self.blend_maps is None:
            return latents
        threshold = self.plan.config.local_blend_threshold
        mask = local_blend_mask(self.blend_maps, self.latent_hw, threshold, self.blend_pool)
        mask = mask.to(latents.dtype)  # [1, 1, H, W]
        i, j = self.layout.latent_index("source"), self.layout.latent_index("edit")
        out = latents.clone()
        out[j] = apply_local_blend(latents[i], latents[j], mask)
        return out

    def dps_weight(self) -> torch.Tensor | None:
        """DPS's pixel weight ``S`` (Eq. 9) at the last step of the pass, averaged over the
        LocalBlend-resolution layers: [h, w] in [0, 1]; None without DPS (or from a fused graph
        exported before it gave ``S``)."""
        if self.dps_sum is None:
            return None
        hw = layer_hw(self.latent_hw, self.dps_sum.shape[0])
        return (self.dps_sum / self.dps_count).reshape(hw)

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
