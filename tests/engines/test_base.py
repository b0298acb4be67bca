"""The engines' shared pieces: ordering a runner's stream with its caller's."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from adapedit.engines.base import ordered_with_caller


class FakeStream:
    """A CUDA stream's ordering calls, recorded (no GPU here)."""

    def __init__(self, name: str) -> None:
        self.name, self.device, self.waited = name, torch.device("cuda", 0), []

    def wait_stream(self, other: FakeStream) -> None:
        self.waited.append(other.name)


@pytest.mark.parametrize("fails", [False, True])
def test_the_caller_waits_for_the_runner_s_stream_even_when_the_run_fails(monkeypatch, fails):
    """A run that raises may have queued kernels reading the caller's tensors (inputs moved to
    the device for it, freed as the error unwinds): the caller's stream is ordered after the
    runner's either way, or its allocator could hand that memory out while they read it."""
    caller, runner = FakeStream("caller"), FakeStream("runner")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    with pytest.raises(RuntimeError) if fails else nullcontext(), ordered_with_caller(runner):
        assert runner.waited == ["caller"] and caller.waited == []
        if fails:
            raise RuntimeError("the run failed")
    assert caller.waited == ["runner"]
