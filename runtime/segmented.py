"""The segmented UNet: engine segments run in order, the controller applied between them."""

from __future__ import annotations

import time

import torch

from adapedit.controller import Controller
from adapedit.engines.base import Runner, solve_symbols
from adapedit.errors import EngineError
from adapedit.spec import NOISE, UNET_INPUTS, Manifest


class SegmentedUNet:
    """Runs the segments of a manifest; at each boundary hands the layer's probabilities
    ([B*H, P, K]) and, for cross-attention, its input hidden states ([B, P, C]) to the controller
    and feeds back what it returns. Tensors live across segments by name; each runner reuses its
    own output buffers from one call to the next.

    ``controller_s`` accumulates the time spent in the controller (the runtime's overhead over
    the engines).
    """

    def __init__(self, manifest: Manifest, runners: list[Runner]) -> None:
        if len(runners) != len(manifest.segments):
            raise EngineError(
                "one runner per segment",
                where="SegmentedUNet",
                expected=f"{len(manifest.segments)} runners",
                got=len(runners),
            )
        self.manifest = manifest
        self.runners = runners
        self.by_segment = {b.segment: b for b in manifest.boundaries}
        self.controller_s = 0.0

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controller: Controller | None = None,
        step: int = 0,
    ) -> torch.Tensor:
        """One UNet call, the ``step``-th of its pass, with ``controller`` at every boundary."""
        env: dict[str, torch.Tensor] = dict(
            zip(UNET_INPUTS, (sample, timestep, encoder_hidden_states), strict=True)
        )
        symbols = solve_symbols(self.manifest.segments[0], {"sample": tuple(sample.shape)})
        for k, (spec, runner) in enumerate(zip(self.manifest.segments, self.runners, strict=True)):
            env.update(runner.infer({t.name: env[t.name] for t in spec.inputs}, symbols))
            b = self.by_segment.get(k)
            if b is not None and controller is not None:
                t0 = time.perf_counter()
                hidden = env[b.hidden] if b.hidden else None
                env[b.probs] = controller(b.layer, b.kind == "cross", env[b.probs], hidden, step)
                self.controller_s += time.perf_counter() - t0
        return env[NOISE]
