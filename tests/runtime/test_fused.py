"""The fused UNet (the edit inside one graph per pass) against the PyTorch reference and the
segmented runtime, on the tiny model: every edit type and switch, every scheduler; the in-graph
math is the reference's own; bad input."""

from __future__ import annotations

import pytest
import torch

from adapedit.config import EditConfig, SamplerConfig
from adapedit.errors import EngineError
from adapedit.parity import compare_edits
from adapedit.runtime.fused import FusedUNet
from adapedit.runtime.session import EditSession

SRC, TGT = "a dog standing on the grass", "a dog sitting on the grass"
CASES = {
    "adapedit": (SRC, TGT, EditConfig(alpha_m=0.0)),
    "fwt-off": (SRC, TGT, EditConfig(use_fwt=False, alpha_m=0.0)),
    "dps-off": (SRC, TGT, EditConfig(use_dps=False, alpha_m=0.0)),
    "dps-mask-off": (SRC, TGT, EditConfig(dps_mask=False)),
    "local-blend": (SRC, TGT, EditConfig(alpha_m=0.0, local_blend=("dog",))),
    "replace": (
        "a red dog on the grass",
        "a blue cat on the grass",
        EditConfig(edit_type="replace", alpha_m=0.0),
    ),
    "reweight": (SRC, SRC, EditConfig(edit_type="reweight", reweight=(("grass", 2.0),))),
}


def _check(ref, run, steps, relative=False):
    p = compare_edits(ref, run)
    assert len(run.latents) == len(ref.latents) == steps
    if relative:  # Euler and DPM-Solver++ keep latents at σ scale (σ_max ≈ 14.6)
        assert p["latents_max_rel"] <= 1e-5, p["per_step"]
    else:
        assert p["latents_max_abs"] <= 1e-4, p["per_step"]  # every step
    assert p["tau_max_abs"] <= 1e-6 and p["tau_self_abs"] <= 1e-6
    assert run.keywords == ref.keywords
    assert p["attention_maps"]["max_abs"] <= 1e-4
    # DPS's S at the last step, from the graph's own output
    assert (run.dps_weight is None) == (ref.dps_weight is None)
    if ref.dps_weight is not None:
        torch.testing.assert_close(run.dps_weight, ref.dps_weight, rtol=0, atol=1e-5)
    return p


@pytest.fixture()
def own_fused_session(tiny_fused_engines):
    """A session of this test's own on the fused folder: the UNets it made (``_fused``,
    ``_unets``, made on first use) are those this test's edits ran, whatever other tests ran
    before on the shared ``tiny_fused_session``, in any order."""
    with EditSession(tiny_fused_engines) as session:
        assert not session._fused and not session._unets
        yield session


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_matches_the_reference(tiny_pipeline, own_fused_session, case):
    src, tgt, cfg = CASES[case]
    sampler = SamplerConfig(steps=5, seed=4)
    ref = tiny_pipeline.edit(src, tgt, cfg, sampler, record_latents=True)
    run = own_fused_session.edit(src, tgt, cfg, sampler, record_latents=True)
    _check(ref, run, 5)
    assert set(own_fused_session._fused) >= {4}  # the edit pass's fused UNet was made …
    assert not own_fused_session._unets  # … and no segmented one: every UNet call ran fused


@pytest.mark.parametrize(("scheduler", "calls"), [("pndm", 5), ("euler", 4), ("dpmpp", 4)])
def test_fused_matches_the_reference_with_other_schedulers(
    tiny_pipeline, tiny_fused_session, scheduler, calls
):
    sampler = SamplerConfig(steps=4, seed=2, scheduler=scheduler)
    cfg = EditConfig(alpha_m=0.0)
    ref = tiny_pipeline.edit(SRC, TGT, cfg, sampler, record_latents=True)
    run = tiny_fused_session.edit(SRC, TGT, cfg, sampler, record_latents=True)
    _check(ref, run, calls, relative=scheduler != "pndm")


def test_fused_matches_the_segmented_form_of_the_same_folder(tiny_fused_engines):
    cfg, sampler = EditConfig(alpha_m=0.0), SamplerConfig(steps=3, seed=6)
    fused = EditSession(tiny_fused_engines, form="fused")
    seg = EditSession(tiny_fused_engines, form="segmented")
    a = fused.edit(SRC, TGT, cfg, sampler, record_latents=True)
    b = seg.edit(SRC, TGT, cfg, sampler, record_latents=True)
    assert compare_edits(b, a)["latents_max_abs"] <= 1e-4
    assert fused._fused and not fused._unets and seg._unets and not seg._fused


def test_a_python_controller_runs_segmented_beside_the_fused_form(own_fused_session):
    # observe_step wraps the controller in an observer the fused graph cannot run: the
    # session falls back to the folder's segmented UNet for that pass
    r = own_fused_session.edit(
        SRC, TGT, EditConfig(alpha_m=0.0), SamplerConfig(steps=2), observe_step=0
    )
    assert r.layer_probs and own_fused_session._unets


def test_every_fused_call_of_an_edit_replays_one_cuda_graph(own_fused_session, monkeypatch):
    """A CUDA graph replays the addresses it captured, and a runner names its graph by the
    addresses a call binds (``GraphSlots``): every call of an edit, and of the next edit, must
    bind the same buffers, or each step would capture a graph of its own (and past four, run
    uncaptured). The runners choose their graphs on the CPU by the same addresses a GPU
    session binds; ONNX Runtime ignores the choice here."""
    from dataclasses import replace

    from adapedit.engines.base import GraphSlots

    session = own_fused_session
    runners = {b: session.fused(b).runner for b in (2, 4)}
    for r in runners.values():
        r.options = replace(r.options, cuda_graph=True)  # a GPU session's runners
    owner = {id(r._graphs): b for b, r in runners.items()}
    slot, ids = GraphSlots.slot, {2: [], 4: []}

    def recording(self, addresses):
        got = slot(self, addresses)
        ids[owner[id(self)]].append(got[0])
        return got

    monkeypatch.setattr(GraphSlots, "slot", recording)
    sampler = SamplerConfig(steps=3, seed=1)
    session.edit(SRC, TGT, EditConfig(), sampler)
    session.edit(SRC, "a cat sitting on the grass", EditConfig(local_blend=("cat",)), sampler)
    assert ids == {2: [0] * 6, 4: [0] * 6}  # calibration and edit: 3 calls an edit, one graph


def test_fused_unet_refuses_a_foreign_controller(tiny_fused_session):
    unet = tiny_fused_session.fused(4)
    assert isinstance(unet, FusedUNet)
    with pytest.raises(EngineError, match="AdapEdit's own controllers"):
        unet(torch.zeros(4, 4, 16, 16), torch.zeros(1), torch.zeros(4, 77, 32), object(), 0)


def test_control_inputs_of_the_wrong_shape_name_the_input(tiny_fused_session):
    unet = tiny_fused_session.fused(4)
    feeds = dict(unet.feeds)
    feeds["ctl.carry"] = torch.zeros(76, 77)
    with pytest.raises(EngineError, match=r"'ctl\.carry' has the wrong shape") as e:
        unet.runner.infer(feeds)
    assert e.value.expected == [77, 77]


def test_another_attention_rule_is_refused_before_any_engine_call(
    tiny_fused_session, forbid_model_work
):
    literal = EditConfig(attention_limits="p2p-literal")
    with pytest.raises(EngineError, match="exported under another attention rule") as e:
        tiny_fused_session.edit(SRC, TGT, literal, SamplerConfig(steps=2))
    assert e.value.field == "attention_limits" and forbid_model_work == []
    assert "'scaled' (the folder's)" in e.value.expected
    assert "'p2p-literal' (the edit's)" in e.value.got


def test_a_fused_folder_names_its_forms(tiny_engines):
    with pytest.raises(EngineError, match="no UNet of this form"):
        EditSession(tiny_engines, form="fused")  # a dynamic, segmented-only folder


@pytest.mark.slow
def test_a_change_to_one_equation_moves_all_three_paths(
    tiny_components, tiny_pipeline, tiny_session, tmp_path, monkeypatch
):
    """The reference, the segmented runtime and the fused graph all apply
    ``adapedit.algorithm.edit.edit_cross_attention``: halve its result, and all three move alike."""
    import adapedit.algorithm.edit as edit_module
    from adapedit.engines.folder import build_engines
    from adapedit.export.api import ExportOptions, export_model

    cfg, sampler = EditConfig(use_fwt=False, use_dps=False), SamplerConfig(steps=3, seed=1)
    before = tiny_pipeline.edit(SRC, TGT, cfg, sampler, record_latents=True)
    original = edit_module.edit_cross_attention
    monkeypatch.setattr(
        edit_module, "edit_cross_attention", lambda *a, **k: 0.5 * original(*a, **k)
    )
    options = ExportOptions(shapes="static", forms=("fused",), batches=(4,))
    export_model(tiny_components, tmp_path / "x", options, progress=False)
    build_engines(tmp_path / "x", tmp_path / "e", progress=False)
    ref = tiny_pipeline.edit(SRC, TGT, cfg, sampler, record_latents=True)
    seg = tiny_session.edit(SRC, TGT, cfg, sampler, record_latents=True)
    monkeypatch.undo()  # the fused graph holds the changed equation by itself
    fused = EditSession(tmp_path / "e").edit(SRC, TGT, cfg, sampler, record_latents=True)
    assert compare_edits(before, ref)["latents_max_abs"] > 1e-3  # the change shows…
    assert compare_edits(ref, seg)["latents_max_abs"] <= 1e-4  # …in every path alike
    assert compare_edits(ref, fused)["latents_max_abs"] <= 1e-4
