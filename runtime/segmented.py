"""The segmented UNet: engine segments run in order, the controller applied between them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from adapedit.engines.base import Runner, solve_symbols
from adapedit.errors import EngineError
from adapedit.pipelines.controller import Controller
from adapedit.spec import NOISE, UNET_INPUTS, Manifest, UNetGraphs


class StageClock:
    """Time spent in one stage of the runtime (the controller between segments): CUDA events on
    the GPU, so measuring adds no host synchronisation to a UNet call (read with
    :meth:`seconds`, which waits for them), the wall clock on the CPU. Events that have completed
    are folded into a sum once :data:`PENDING` of them pile up, so a long-running server's clock
    does not grow."""

    PENDING = 512

    def __init__(self) -> None:
        self._cpu_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def measure(self, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
            if len(self._events) > self.PENDING:
                self._fold()
        else:
            t = time.perf_counter()
            yield
            self._cpu_s += time.perf_counter() - t

    def _fold(self) -> None:
        """Completed events into the sum (``query`` does not wait for the device)."""
        done = 0
        while done < len(self._events) and self._events[done][1].query():
            start, end = self._events[done]
            self._cpu_s += start.elapsed_time(end) / 1000
            done += 1
        del self._events[:done]

    def seconds(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
        return self._cpu_s + sum(s.elapsed_time(e) for s, e in self._events) / 1000

    def reset(self) -> None:
        self._cpu_s, self._events = 0.0, []


class SegmentedUNet:
    """Runs the segments of one UNet variant; at each boundary hands the layer's probabilities
    ([B*H, P, K]) and, for cross-attention, its input hidden states ([B, P, C]) to the
    controller and feeds back what it returns.

    Tensors live across segments by name. Each runner reuses its own output buffers from one
    call to the next, and probabilities a controller replaces are copied into a fixed buffer
    per boundary, so every segment sees the same addresses on every call (bindings stay put).
    ``clock`` measures the time spent in the controller.
    """

    def __init__(self, manifest: Manifest, unet: UNetGraphs, runners: list[Runner]) -> None:
        if len(runners) != len(unet.segments):
            raise EngineError(
                "one runner per segment",
                where="SegmentedUNet",
                expected=f"{len(unet.segments)} runners",
                got=len(runners),
            )
        self.manifest, self.unet, self.runners = manifest, unet, runners
        self.inputs = [[t.name for t in s.inputs] for s in unet.segments]
        self.by_segment = {b.segment: b for b in manifest.boundaries}
        self.clock = StageClock()
        self._symbols: dict[torch.Size, dict[str, int]] = {}
        self._feeds: dict[str, torch.Tensor] = {}

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
        symbols = self._symbols.get(sample.shape)
        if symbols is None:
            symbols = solve_symbols(self.unet.segments[0], {"sample": tuple(sample.shape)})
            self._symbols[sample.shape] = symbols
        for k, (names, runner) in enumerate(zip(self.inputs, self.runners, strict=True)):
            env.update(runner.infer({n: env[n] for n in names}, symbols))
            b = self.by_segment.get(k)
            if b is not None and controller is not None:
                probs = env[b.probs]
                with self.clock.measure(probs.device):
                    hidden = env[b.hidden] if b.hidden else None
                    out = controller(b.layer, b.kind == "cross", probs, hidden, step)
                    if out is not probs:
                        env[b.probs] = self._feed(b.probs, out)
        return env[NOISE]

    def _feed(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` in the fixed buffer of boundary tensor ``name``."""
        buf = self._feeds.get(name)
        if buf is None or buf.shape != value.shape or buf.dtype != value.dtype:
            buf = self._feeds[name] = torch.empty_like(value)
        return buf.copy_(value)
