"""The latency benchmark's own decisions that only a GPU run takes (its measurements run in the
GPU script's dry run, ``test_gpu_script.py``)."""

from __future__ import annotations

import torch

from benchmarks.latency import _why_not_without_graphs


def _record(*timed: str) -> dict:
    return {"runs": {"20": {"stages_s": {name: {} for name in timed}}, "50": {"stages_s": {}}}}


def test_a_graph_failure_is_measured_again_without_graphs_only_before_its_timed_edits(
    monkeypatch,
):
    """A fused path whose CUDA-graph measurement failed is run again without graphs only when
    none of its timed edits was recorded and the device still answers: a failure after the
    edits (the sync count, the UNet call) must not repeat them all within the step's time, and
    after a sticky CUDA error every later call would fail."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)  # a device that answers
    assert _why_not_without_graphs(_record("ort-cpu-fused"), "ort-cuda-fused") is None
    why = _why_not_without_graphs(_record("ort-cuda-fused"), "ort-cuda-fused")
    assert why is not None and "recorded before the failure" in why

    def broken(*a):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", broken)
    why = _why_not_without_graphs(_record(), "ort-cuda-fused")
    assert why is not None and "no longer answers" in why and "illegal memory access" in why
