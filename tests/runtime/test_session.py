"""The runtime (ONNX Runtime CPU engines of the tiny model) against the PyTorch reference."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adapedit.config import EditConfig, SamplerConfig
from adapedit.errors import EngineError, ManifestError
from adapedit.parity import compare_edits
from adapedit.runtime.session import EditSession

SRC, TGT = "a dog standing on the grass", "a dog sitting on the grass"
SAMPLER = SamplerConfig(steps=6, seed=5)

CASES = {
    "adapedit": ("refine", SRC, TGT, EditConfig(alpha_m=0.0)),
    "p2p": ("refine", SRC, TGT, EditConfig(use_fwt=False, use_dps=False)),
    "no-dps-mask": ("refine", SRC, TGT, EditConfig(dps_mask=False, local_blend=("dog",))),
    "replace": (
        "replace",
        "a red dog on the grass",
        "a blue cat on the grass",
        EditConfig(edit_type="replace", alpha_m=0.0),
    ),
    "reweight": (
        "reweight",
        SRC,
        SRC,
        EditConfig(edit_type="reweight", reweight=(("grass", 2.0),)),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_runtime_matches_the_reference(tiny_pipeline, tiny_session, case):
    _, src, tgt, cfg = CASES[case]
    ref = tiny_pipeline.edit(src, tgt, cfg, SAMPLER, record_latents=True)
    run = tiny_session.edit(src, tgt, cfg, SAMPLER, record_latents=True)
    p = compare_edits(ref, run)
    assert len(run.latents) == len(ref.latents) == 6
    assert p["latents_max_abs"] <= 1e-4, p["per_step"]
    assert p["tau_max_abs"] <= 1e-5 and p["tau_self_abs"] <= 1e-5
    assert p["psnr_source_db"] >= 50 and p["psnr_edited_db"] >= 50
    assert run.keywords == ref.keywords
    assert p["attention_maps"]["max_abs"] <= 1e-4


@pytest.mark.parametrize(("scheduler", "calls"), [("pndm", 5), ("euler", 4), ("dpmpp", 4)])
def test_runtime_matches_the_reference_with_other_schedulers(
    tiny_pipeline, tiny_session, scheduler, calls
):
    sampler = SamplerConfig(steps=4, seed=2, scheduler=scheduler)
    ref = tiny_pipeline.edit(SRC, TGT, EditConfig(alpha_m=0.0), sampler, record_latents=True)
    run = tiny_session.edit(SRC, TGT, EditConfig(alpha_m=0.0), sampler, record_latents=True)
    assert len(run.latents) == calls
    p = compare_edits(ref, run)
    # Euler and DPM-Solver++ keep latents at σ scale (σ_max ≈ 14.6): judge them relative to it.
    assert p["latents_max_rel"] <= 1e-5
    if scheduler == "pndm":
        assert p["latents_max_abs"] <= 1e-4
    assert min(p["psnr_source_db"], p["psnr_edited_db"]) >= 50


def test_second_edit_on_a_session_equals_a_fresh_session(tiny_engines, tiny_session):
    cfg = EditConfig(alpha_m=0.0)
    tiny_session.edit("a cat on a mat", "a black cat on a mat", cfg, SAMPLER)  # dirty buffers
    again = tiny_session.edit(SRC, TGT, cfg, SAMPLER, record_latents=True)
    fresh = EditSession(tiny_engines).edit(SRC, TGT, cfg, SAMPLER, record_latents=True)
    for a, b in zip(again.latents, fresh.latents, strict=True):
        assert torch.equal(a, b)
    assert (again.edited_image == fresh.edited_image).all()


def test_concurrent_callers_are_serialised(tiny_session):
    cfg = EditConfig(alpha_m=0.0)
    jobs = [(SRC, TGT, 1), ("a cat on a mat", "a black cat on a mat", 2)]
    alone = [tiny_session.edit(s, t, cfg, SamplerConfig(steps=4, seed=k)) for s, t, k in jobs]
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(tiny_session.edit, s, t, cfg, SamplerConfig(steps=4, seed=k))
            for s, t, k in jobs * 2
        ]
        results = [f.result() for f in futures]  # re-raises what a thread raised
    assert len(results) == 4
    for i, r in enumerate(results):
        assert (r.edited_image == alone[i % 2].edited_image).all()


def test_engine_folder_of_another_model_or_precision_is_refused(tiny_engines):
    with pytest.raises(ManifestError, match="another model"):
        EditSession(tiny_engines, model_hash="f" * 16)
    with pytest.raises(ManifestError, match="another precision"):
        EditSession(tiny_engines, precision="fp16")


def test_missing_engine_file_and_stale_folder(tiny_engines, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_engines, broken)
    (broken / "unet" / "segment_03.onnx").unlink()
    with pytest.raises(ManifestError, match="missing"):
        EditSession(broken)
    stale = tmp_path / "stale"
    shutil.copytree(tiny_engines, stale)
    text = (stale / "manifest.json").read_text().replace('"opset": 18', '"opset": 18 ')
    (stale / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match="stale"):
        EditSession(stale)
    with pytest.raises(ManifestError, match="not an engine folder"):
        EditSession(tmp_path)


def test_resolution_outside_the_profile_is_refused(tiny_session):
    with pytest.raises(EngineError, match="outside the built profile"):
        tiny_session.edit(SRC, TGT, EditConfig(), SamplerConfig(steps=2, height=256, width=256))
    # inside the profile (128 down to 2 × 64 px): runs
    r = tiny_session.edit(SRC, TGT, EditConfig(), SamplerConfig(steps=2, height=128, width=128))
    assert r.edited_image.shape == (128, 128, 3)


@pytest.mark.parametrize("case", ["adapedit", "replace"])
def test_static_runtime_matches_the_reference(tiny_pipeline, tiny_static_session, case):
    _, src, tgt, cfg = CASES[case]
    ref = tiny_pipeline.edit(src, tgt, cfg, SAMPLER, record_latents=True)
    run = tiny_static_session.edit(src, tgt, cfg, SAMPLER, record_latents=True)
    p = compare_edits(ref, run)
    assert p["latents_max_abs"] <= 1e-4, p["per_step"]
    assert p["tau_max_abs"] <= 1e-5 and p["tau_self_abs"] <= 1e-5
    assert p["psnr_source_db"] >= 50 and p["psnr_edited_db"] >= 50


@pytest.mark.parametrize("form", ["segmented", "fused"])
def test_short_calibration_matches_the_reference_on_both_forms(
    tiny_pipeline, tiny_engines, tiny_fused_engines, form
):
    cfg = EditConfig(alpha_m=0.0, calibration_steps=2)
    folder = tiny_engines if form == "segmented" else tiny_fused_engines
    with EditSession(folder, form=form, calibration_cache=None) as session:
        run = session.edit(SRC, TGT, cfg, SAMPLER, record_latents=True)
    ref = tiny_pipeline.edit(SRC, TGT, cfg, SAMPLER, record_latents=True)
    full = tiny_pipeline.edit(SRC, TGT, EditConfig(alpha_m=0.0), SAMPLER)
    p = compare_edits(ref, run)
    assert len(run.latents) == 6 and p["latents_max_abs"] <= 1e-4, p["per_step"]
    assert p["tau_max_abs"] <= 1e-5
    assert [w.tau for w in ref.tau.words] != [w.tau for w in full.tau.words]


def test_a_shared_cache_never_serves_another_engine_folder(
    tiny_engines, tiny_fused_engines, tmp_path
):
    from adapedit.pipelines.calibration_cache import CalibrationCache

    cache = CalibrationCache()
    copy = tmp_path / "copy"
    shutil.copytree(tiny_engines, copy)
    cfg = EditConfig(alpha_m=0.0)
    with EditSession(tiny_engines, calibration_cache=cache) as a:
        assert a.edit(SRC, TGT, cfg, SAMPLER).calibration == "computed"
        seen: list = []
        again = a.edit(
            SRC, TGT, EditConfig(alpha_m=0.0, lambda_s=0.5), SAMPLER, on_progress=seen.append
        )
        assert again.calibration == "cached"  # no calibration step ran: all done at once
        assert [p.step for p in seen if p.stage == "calibration"] == [SAMPLER.steps]
    for folder in (tiny_fused_engines, copy):
        with EditSession(folder, calibration_cache=cache) as b:
            assert b.calibration_cache is cache
            assert b.edit(SRC, TGT, cfg, SAMPLER).calibration == "computed", folder
    assert len(cache) == 3
    (copy / "manifest.json").touch()  # the same folder, changed on disk: a new identity
    with EditSession(copy, calibration_cache=cache) as c:
        assert c.edit(SRC, TGT, cfg, SAMPLER).calibration == "computed"


def test_a_bad_cache_size_is_refused_before_the_folder_is_read(tmp_path):
    from adapedit.errors import ConfigError

    with pytest.raises(ConfigError, match="positive byte count"):
        EditSession(tmp_path / "nowhere", calibration_cache=0)


def test_a_checks_only_session_touches_no_device_and_runs_nothing(tiny_engines, monkeypatch):
    """The Ray ingress's session, on a node with no GPU (Ray hides every GPU from an actor that
    asks none), over a folder of CUDA engines: built, described and checking requests with no
    CUDA device; an edit on it is an error. A session that runs is refused there."""
    from adapedit.engines.ort import OrtOptions
    from adapedit.runtime.api import Validator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: pytest.fail("a CUDA stream"))
    cuda = OrtOptions(providers=("cuda",))
    with pytest.raises(EngineError):
        EditSession(tiny_engines, ort=cuda)
    session = EditSession(tiny_engines, ort=cuda, checks_only=True)
    assert session.describe()["device"] == "cuda" and session.weights is None
    Validator(session)(SRC, TGT, EditConfig(), SamplerConfig(steps=2))
    with pytest.raises(EngineError, match="only checks requests"):
        session.edit(SRC, TGT, EditConfig(), SamplerConfig(steps=2))


def test_the_tensorrt_provider_is_refused_an_export_of_onnx_runtime_attention(
    tiny_ort_attention_export, tiny_engines, tmp_path, monkeypatch
):
    """A folder whose attention is ONNX Runtime's MultiHeadAttention asked to run on ONNX
    Runtime's TensorRT provider: refused before any engine or provider check, naming both (the
    provider would cut the UNet at each such node and capture none of it); the CUDA provider
    passes this check, and a folder of standard operators passes it on the TensorRT provider."""
    import adapedit.runtime.session as session_module
    from adapedit.engines.folder import build_engines
    from adapedit.engines.ort import OrtOptions

    folder = tmp_path / "eng"
    build_engines(tiny_ort_attention_export[0], folder, backend="ort", progress=False)
    checked = []
    monkeypatch.setattr(
        session_module, "check_providers", lambda options, where: checked.append(options)
    )

    def stream(*a, **k):
        raise RuntimeError("past the checks: a CUDA stream")

    monkeypatch.setattr(torch.cuda, "Stream", stream)
    trt = OrtOptions(providers=("tensorrt", "cuda"))
    with pytest.raises(EngineError, match="TensorRT provider cannot run") as e:
        EditSession(folder, ort=trt)
    assert "--attention-op onnx" in e.value.expected and "attention_op ort" in e.value.got
    assert checked == []  # refused before the providers were even looked for
    with pytest.raises(RuntimeError, match="past the checks"):  # standard operators pass
        EditSession(tiny_engines, ort=trt)
    with pytest.raises(RuntimeError, match="past the checks"):  # and so does the CUDA provider
        EditSession(folder, ort=OrtOptions(providers=("cuda",)))
    assert len(checked) == 2
