"""The fused UNet on an engine: one engine call per step, the edit inside the graph
(:mod:`adapedit.pipelines.fused`), fed from and read back into the same controllers as every other
path.

Every input is copied into a buffer of its own before the call and every output lives in the
runner's buffers, so the engine sees the same addresses on every call: ONNX Runtime's CUDA graphs
(``enable_cuda_graph``) replay them. The per-edit controls are loaded once per edit, the gates
once per step (a few hundred bytes).
"""

from __future__ import annotations

import torch

from adapedit.algorithm.geometry import BLEND_DOWNSCALE, is_cross_layer, layer_downscale
from adapedit.engines.base import TORCH_DTYPES, Runner
from adapedit.errors import EngineError
from adapedit.pipelines.controller import CalibrationRecorder, Controller, EditController
from adapedit.pipelines.fused import (
    CONTROLS,
    DPS_WEIGHT,
    MODES,
    hidden_output,
    key_input,
    map_output,
)
from adapedit.runtime.segmented import StageClock
from adapedit.spec import NOISE, Manifest, UNetGraphs

#: Which controller each fused mode feeds (None: a pass without one, e.g. plain generation).
ACCEPTS = {
    "edit": (EditController,),
    "calibration": (CalibrationRecorder, type(None)),
    "plain": (type(None),),
}


class FusedUNet:
    """The fused graph of one batch size (its mode: :data:`adapedit.pipelines.fused.MODES`) on a
    runner.

    Args:
        manifest: the engine folder's manifest (controlled layers and resolution).
        graphs: the batch's UNet graphs (``fused`` set).
        runner: the runner of ``graphs.fused``.
        device: where the buffers live.
    """

    def __init__(
        self, manifest: Manifest, graphs: UNetGraphs, runner: Runner, device: torch.device
    ) -> None:
        self.manifest, self.spec, self.runner, self.device = manifest, graphs.fused, runner, device
        self.mode = MODES[graphs.batch]
        latent_hw = (
            manifest.height // manifest.vae_scale_factor,
            manifest.width // manifest.vae_scale_factor,
        )
        self.cross = [x for x in manifest.controlled if is_cross_layer(x)]
        self.blend_layers = sum(
            layer_downscale(latent_hw, manifest.attention[x]) == BLEND_DOWNSCALE for x in self.cross
        )
        self.feeds = {
            t.name: torch.zeros(t.shape, dtype=TORCH_DTYPES[t.dtype], device=device)
            for t in self.spec.inputs
        }
        self._loaded: EditController | None = None  # whose per-edit controls are in the buffers
        self.clock = StageClock()  # the controller's share: inputs in, maps out

    def accepts(self, controller: Controller | None) -> bool:
        """Whether this graph can run ``controller``'s pass (AdapEdit's own controllers only:
        the fused graph holds their arithmetic, not an arbitrary Python controller's)."""
        return isinstance(controller, ACCEPTS[self.mode])

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controller: Controller | None = None,
        step: int = 0,
    ) -> torch.Tensor:
        """One UNet call, the ``step``-th of its pass.

        Raises:
            EngineError: a controller this graph cannot run.
        """
        if not self.accepts(controller):
            raise EngineError(
                "the fused UNet runs AdapEdit's own controllers only",
                where=f"fused UNet ({self.mode}, batch {self.spec.inputs[0].shape[0]})",
                expected=" or ".join(t.__name__ for t in ACCEPTS[self.mode]),
                got=type(controller).__name__,
            )
        f = self.feeds
        with self.clock.measure(self.device):
            f["sample"].copy_(sample)
            f["timestep"].copy_(timestep)
            f["encoder_hidden_states"].copy_(encoder_hidden_states)
            if self.mode == "edit":
                self._load(controller)
                _, schedule = controller.controls_like(f["ctl.cross_gate"])
                f["ctl.cross_gate"].copy_(schedule.cross[step])
                f["ctl.self_gate"].copy_(schedule.self[step : step + 1])
        out = self.runner.infer(f)
        with self.clock.measure(self.device):
            if self.mode == "edit":
                controller.record_maps(
                    out["maps.source"], out["maps.edit"], layers=self.blend_layers
                )
                if DPS_WEIGHT in out and controller.wants_dps_weight(step):
                    controller.record_dps(out[DPS_WEIGHT], layers=self.blend_layers)
            elif controller is not None:
                for layer in self.cross:
                    controller.record(
                        layer, step, out[map_output(layer)], out[hidden_output(layer)]
                    )
        return out[NOISE]

    def _load(self, controller: EditController) -> None:
        """The edit's per-edit controls into the input buffers (once per edit)."""
        if controller is self._loaded:
            return
        c, _ = controller.controls_like(self.feeds["ctl.carry"])
        for name, value in zip(CONTROLS, c.tensors().values(), strict=True):
            self.feeds[name].copy_(value.reshape(self.feeds[name].shape))
        for layer in self.cross:
            buf = self.feeds[key_input(layer)]
            if layer in c.keys:
                buf.copy_(c.keys[layer])
            else:
                buf.zero_()  # DPS off: dps_on = 0 ignores E_k
        self._loaded = controller
