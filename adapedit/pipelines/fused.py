"""The fused UNet: the edit inside the UNet's forward, as tensor operations, so that one engine
call runs a whole step (ONNX export, CUDA graphs, ``torch.compile``).

The controlled layers call an in-graph hook instead of a Python controller between engine
segments. The hook applies the very functions the controllers apply
(:func:`adapedit.pipelines.controller.edit_layer`, :func:`adapedit.algorithm.edit.branch_mean`) to
control tensors that are inputs of the forward, and returns what the runtime's controllers need from
the step
as extra outputs. Three modes, by batch:

- ``edit`` (batch 4, ``[u_src, u_edt, c_src, c_edt]``): every controlled layer edited (§5);
  inputs: the per-edit controls (token map, alphas, equalizer, λ_S, λ_SV, the DPS switch, each
  cross-attention layer's ``E_k``) and the step's gates; outputs: the noise prediction, the
  LocalBlend-resolution maps of the source branch and of the edited branch, summed over those
  layers (LocalBlend and the attention image), and DPS's ``S`` (Eq. 9) summed over the same
  layers (the picture of ``S`` the runtime keeps from the last step).
- ``calibration`` (batch 2, ``[u_edt, c_edt]``): no edit; outputs each cross-attention layer's
  conditional head-mean map and input hidden states (FWT's τ and DPS's ``E_k``).
- ``plain`` (batch 1): the UNet alone (DDIM inversion).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adapedit.algorithm.edit import branch_mean
from adapedit.algorithm.geometry import BLEND_DOWNSCALE, is_cross_layer, layer_downscale
from adapedit.algorithm.layout import CALIBRATION, EDIT, INVERSION, BatchLayout
from adapedit.pipelines.controller import EditControls, edit_layer, edit_similarity
from adapedit.pipelines.processors import ControlSlot, attention_layers, install_processors

MODES = {4: "edit", 2: "calibration", 1: "plain"}
LAYOUTS = {"edit": EDIT, "calibration": CALIBRATION, "plain": INVERSION}
#: Per-edit control inputs of the edit graph, in order (then one ``<layer>.e_k`` per
#: cross-attention layer, then the step's gates).
CONTROLS = (
    "ctl.carry",
    "ctl.alphas",
    "ctl.equalizer",
    "ctl.lambda_s",
    "ctl.lambda_sv",
    "ctl.dps_on",
)
GATES = ("ctl.cross_gate", "ctl.self_gate")
BLEND_MAPS = ("maps.source", "maps.edit")
#: DPS's ``S`` [P] of the edit branch, summed over the LocalBlend-resolution layers.
DPS_WEIGHT = "dps.weight"


def key_input(layer: str) -> str:
    return f"{layer}.e_k"


def map_output(layer: str) -> str:
    return f"{layer}.map"


def hidden_output(layer: str) -> str:
    return f"{layer}.hidden"


class _EditHook:
    """The controller of an edit pass, inside the graph."""

    layout: BatchLayout = EDIT

    def __init__(
        self,
        controls: EditControls,
        cross_gate: torch.Tensor,
        self_gate: torch.Tensor,
        latent_hw: tuple[int, int],
    ) -> None:
        self.controls, self.cross_gate, self.self_gate = controls, cross_gate, self_gate
        self.latent_hw = latent_hw
        self.source: list[torch.Tensor] = []
        self.edited: list[torch.Tensor] = []
        self.dps: list[torch.Tensor] = []

    def __call__(self, layer_id, is_cross, probs, hidden, step):
        out = edit_layer(
            layer_id,
            is_cross,
            probs,
            hidden,
            self.layout,
            self.controls,
            self.cross_gate,
            self.self_gate,
        )
        if is_cross and layer_downscale(self.latent_hw, probs.shape[1]) == BLEND_DOWNSCALE:
            self.source.append(branch_mean(probs, self.layout, "source"))
            self.edited.append(branch_mean(out, self.layout, "edit"))
            self.dps.append(edit_similarity(layer_id, hidden, self.layout, self.controls))
        return out


class _CalibrationHook:
    """What the calibration pass keeps of each cross-attention layer, inside the graph."""

    layout: BatchLayout = CALIBRATION

    def __init__(self) -> None:
        self.outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, layer_id, is_cross, probs, hidden, step):
        if is_cross:
            self.outputs[layer_id] = (
                branch_mean(probs, self.layout, "edit"),  # [P, 77]
                hidden[self.layout.index("edit")],  # [P, C]
            )
        return probs


class FusedUNet(torch.nn.Module):
    """A UNet whose controlled layers run the edit of ``mode`` in its forward.

    ``forward(sample, timestep, encoder_hidden_states, *controls)`` returns the noise
    prediction followed by the mode's outputs (:func:`output_names`); ``controls`` are, in
    the edit mode, :data:`CONTROLS`, one ``E_k`` per cross-attention layer of ``layers`` and
    :data:`GATES` (:func:`input_names`).
    """

    def __init__(self, unet, layers: Sequence[str], mode: str, latent_hw: tuple[int, int]) -> None:
        super().__init__()
        self.unet, self.mode, self.latent_hw = unet, mode, latent_hw
        self.layers = list(layers)
        self.cross = [layer for layer in self.layers if is_cross_layer(layer)]
        self.slot = ControlSlot(controlled=frozenset(self.layers))
        install_processors(unet, self.slot)

    def forward(self, sample, timestep, encoder_hidden_states, *controls):
        hook = None
        if self.mode == "edit":
            carry, alphas, equalizer, lambda_s, lambda_sv, dps_on = controls[:6]
            keys = dict(zip(self.cross, controls[6 : 6 + len(self.cross)], strict=True))
            cross_gate, self_gate = controls[6 + len(self.cross) :]
            c = EditControls(carry, alphas, equalizer, lambda_s, lambda_sv, dps_on, keys)
            hook = _EditHook(c, cross_gate, self_gate, self.latent_hw)
        elif self.mode == "calibration":
            hook = _CalibrationHook()
        self.slot.controller = hook
        try:
            noise = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
        finally:
            self.slot.controller = None
        if self.mode == "edit":
            return noise, *(sum(x[1:], x[0]) for x in (hook.source, hook.edited, hook.dps))
        if self.mode == "calibration":
            return (noise, *(t for layer in self.cross for t in hook.outputs[layer]))
        return noise


def example_controls(module: FusedUNet, dtype: torch.dtype, device="cpu") -> list[torch.Tensor]:
    """Control inputs of the right shapes for ``module`` (an edit with DPS on, nothing injected;
    ``E_k`` random unit vectors): what the exporter traces with and benchmarks time with."""
    if module.mode != "edit":
        return []
    widths = {name: m.to_q.in_features for name, m in attention_layers(module.unet)}
    g = torch.Generator().manual_seed(0)
    one = torch.ones(1)
    controls = [torch.eye(77), torch.ones(77), torch.ones(77), 0.9 * one, one, one]
    controls += [
        torch.nn.functional.normalize(torch.randn(widths[x], generator=g), dim=0)
        for x in module.cross
    ]
    controls += [torch.zeros(77), torch.zeros(1)]  # the step's gates
    return [c.to(device=device, dtype=dtype) for c in controls]


def input_names(mode: str, layers: Sequence[str]) -> list[str]:
    """The fused graph's inputs in ``forward``'s order."""
    names = ["sample", "timestep", "encoder_hidden_states"]
    if mode == "edit":
        names += [*CONTROLS, *(key_input(x) for x in layers if is_cross_layer(x)), *GATES]
    return names


def output_names(mode: str, layers: Sequence[str]) -> list[str]:
    """The fused graph's outputs in ``forward``'s order."""
    if mode == "edit":
        return ["noise_pred", *BLEND_MAPS, DPS_WEIGHT]
    if mode == "calibration":
        cross = [x for x in layers if is_cross_layer(x)]
        return ["noise_pred", *(n for x in cross for n in (map_output(x), hidden_output(x)))]
    return ["noise_pred"]
