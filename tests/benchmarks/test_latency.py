"""The latency benchmark's own decisions that only a GPU run takes (its measurements run in the
GPU script's dry run, ``test_gpu_script.py``)."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from benchmarks.gpu_run import WAITS_AT, goals, host_waits, read_lines
from benchmarks.latency import _why_not_without_graphs, count_syncs, whole_runs
from benchmarks.latency import goals as latency_goals


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


class _GpuClock:
    """CUDA events over a pretend GPU timeline: what the fake UNet's calls advance."""

    now = 0.0

    def __init__(self, **kw) -> None:
        self.at = None

    def record(self, stream=None) -> None:
        self.at = _GpuClock.now

    def elapsed_time(self, end: _GpuClock) -> float:
        return (end.at - self.at) * 1e3  # milliseconds, as torch's


class _Session:
    """Two passes (batches 2 and 4) of three steps; each UNet call is 10 ms of GPU work, and
    waits for it on the host when ``waits``; the loop after batch 4's second call syncs."""

    def __init__(self, waits: bool) -> None:
        self.waits = waits

    def num_steps(self, sampler) -> int:
        return 3

    def unet(self, x, t, embeddings, controller, step):
        _GpuClock.now += 0.010
        if self.waits:
            time.sleep(0.010)
        return x

    def edit(self, source, target, edit, sampler) -> None:
        for batch in (2, 4):
            for step in range(3):
                self.unet(torch.zeros(batch), None, None, None, step)
                if (batch, step) == (4, 1):
                    warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
                    warnings.warn("something else", DeprecationWarning, stacklevel=1)


def test_the_sync_count_sees_the_waits_torch_does_not_count(monkeypatch):
    """``count_syncs`` (CUDA only, so its pieces are faked here): torch's sync warnings are
    attributed to their pass and step, and a UNet call that waits for the GPU on the host (as
    ONNX Runtime's graph replay did before it honoured ``disable_synchronize_execution_providers``)
    is told from one that does not by its host time against its GPU time."""
    monkeypatch.setattr(torch.cuda, "Event", _GpuClock)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    found = {}
    for waits in (False, True):
        session = _Session(waits)
        found[waits] = count_syncs(session, None, None)
        assert "unet" not in vars(session)  # its own UNet call again
    quick = found[False]
    assert quick["passes"]["batch 4"]["between_first_and_last_step"] == 1
    assert quick["passes"]["batch 2"]["between_first_and_last_step"] == 0
    assert quick["total"] == 1 and quick["other_warnings"] == ["something else"]  # not a sync
    calls = quick["unet_calls_after_the_first_step"]
    assert calls["gpu_ms"] == pytest.approx(10.0) and calls["host_over_gpu"] < WAITS_AT
    assert "no wait inside the call" in host_waits(quick)
    assert found[True]["unet_calls_after_the_first_step"]["host_over_gpu"] >= 1.0
    assert "the host waits for the GPU inside the call" in host_waits(found[True])
    (goal,) = goals([{"kind": "syncs", "path": "ort-cuda-fused", **found[True]}])
    assert goal.startswith("ort-cuda-fused: 0.5 host syncs per step (goal 0); a UNet call after")


def test_the_fused_call_is_set_against_the_whole_unet_run_alike():
    """With CUDA graphs against with CUDA graphs, without against without (a replay saves the
    launches a plain run pays); only the other kind measured: the ratio says it is not alike."""
    call = [
        {"kind": "unet_call", "path": path, "seconds": {"median": s}}
        for path, s in (
            ("ort-cuda-fused", 0.11),
            ("ort-cuda-whole", 0.10),
            ("ort-cuda-whole-nograph", 0.20),
            ("ort-cuda-fused-nograph", 0.21),
        )
    ]
    assert goals(call) == [
        "ort-cuda-fused UNet call 1.10× the whole UNet's (goal ≤ 1.1×)",
        "ort-cuda-fused-nograph UNet call 1.05× the whole UNet's (goal ≤ 1.1×)",
    ]
    (nograph,) = goals(call[1:2], earlier=call[3:])
    assert nograph == (
        "ort-cuda-fused-nograph UNet call 2.10× the whole UNet's (goal ≤ 1.1×) (not alike: the "
        "whole UNet ran with CUDA graphs) (measured by command 1, the whole UNet by this one)"
    )
    stages = {
        "edit": {"median": 1.0},
        "total": {"median": 1.0},
        "controller_per_call": {"median": 0.0},
    }
    # what latency.py times beside each call, the last run alike
    assert list(whole_runs("fused", True, gpu=True).items())[-1] == ("", True)
    assert list(whole_runs("fused", False, gpu=True).items())[-1] == ("-nograph", False)
    assert whole_runs("segmented", True, gpu=True) == {"": True, "-nograph": False}
    assert whole_runs("fused", True, gpu=False) == whole_runs("segmented", True, False)
    assert whole_runs("fused", True, gpu=False) == {"": False}  # no CUDA graphs on the CPU
    rec = {
        "device": "cuda",
        "runs": {"50": {"stages_s": {"reference": stages, "ort-cuda-fused-nograph": stages}}},
        "unet_call_s": {x["path"]: x["seconds"] for x in call},
        "whole_alike": {"ort-cuda-fused-nograph": "ort-cuda-whole-nograph"},
    }
    (row,) = latency_goals(rec).values()
    assert row["unet_call_over_whole"] == pytest.approx(0.21 / 0.20)


def test_an_fp16_run_sets_the_reference_and_the_runtime_against_an_fp32_reference_too(
    tiny_fp16_fused_export, tmp_path
):
    """fp16 alone puts an fp16 path some way from the exact result (the tiny model's latents
    reach ~35, where fp16's step is 0.03): each fp16 run also edits with the reference in fp32,
    and sets the fp16 reference and the runtime against it — the scale the goal is read on."""
    from benchmarks.latency import main

    folder, _ = tiny_fp16_fused_export
    jsonl = tmp_path / "r.jsonl"
    args = ["--export-dir", str(folder), "--precision", "fp16", "--device", "cpu"]
    args += ["--forms", "fused", "--steps", "2", "--warmup", "0", "--repeats", "1"]
    main([*args, "--backends", "ort-cpu", "--jsonl", str(jsonl), "--results", str(tmp_path)])
    lines = read_lines(jsonl)
    against = {(x["path"], x["against"]): x for x in lines if x["kind"] == "parity"}
    assert set(against) == {
        ("reference", "reference-fp32"),
        ("ort-cpu-fused", "reference"),
        ("ort-cpu-fused", "reference-fp32"),
    }
    floor = against["reference", "reference-fp32"]
    assert floor["latents_max_abs"] > 0 and 0 < floor["latents_max_rel"] < 1e-2
    (goal,) = [g for g in goals(lines) if g.startswith("reference against the fp32")]
    assert "not a goal" in goal


def test_command_two_sets_its_paths_against_command_one_s_reference():
    """Command 2 measures no reference (``--no-reference``): its 50-step edits are set against
    the reference command 1 measured on the same machine, and say so."""
    edit = {"kind": "edit", "steps": 50}
    ref = {**edit, "path": "reference", "stages_s": {"total": {"median": 4.0}}}
    seg = {**edit, "path": "ort-cuda-segmented", "stages_s": {"total": {"median": 2.0}}}
    (line,) = goals([seg], earlier=[ref])
    assert line == "ort-cuda-segmented at 50 steps: 2.00× the reference measured by command 1 " + (
        "(goal ≥ 3.5×); 2.000 s (goal ≤ 1.0 s on an H100)"
    )
    assert goals([seg]) == [
        "ort-cuda-segmented at 50 steps: no reference; 2.000 s (goal ≤ 1.0 s on an H100)"
    ]


def test_a_whole_unet_that_fails_costs_the_path_only_its_comparison(
    tiny_static_export, tmp_path, monkeypatch
):
    """The whole UNet is timed beside a path's own call, before its edits: when it fails (a
    CUDA graph it cannot capture, say), the failure is recorded and the path's call and edits
    are measured all the same."""
    from benchmarks import latency

    class Broken:
        def infer(self, feeds):
            raise RuntimeError("no capture")

        def deactivate(self):
            pass

    monkeypatch.setattr(latency, "_whole_runner", lambda *a: Broken())
    folder, _ = tiny_static_export
    jsonl = tmp_path / "r.jsonl"
    args = ["--export-dir", str(folder), "--no-reference", "--device", "cpu", "--forms"]
    args += ["segmented", "--steps", "2", "--warmup", "0", "--repeats", "1", "--backends"]
    latency.main([*args, "ort-cpu", "--jsonl", str(jsonl), "--results", str(tmp_path)])
    lines = read_lines(jsonl)
    (failed,) = [x for x in lines if x["kind"] == "failed"]
    assert failed["path"] == "ort-cpu-segmented: beside ort-cpu-whole"
    assert "no capture" in failed["error"]
    assert [x["path"] for x in lines if x["kind"] == "unet_call"] == ["ort-cpu-segmented"]
    assert any(x["kind"] == "edit" and x["path"] == "ort-cpu-segmented" for x in lines)
    assert not any(x["kind"] == "edit" and x["path"] == "reference" for x in lines)
