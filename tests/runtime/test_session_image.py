"""Editing a given image through the runtime (ONNX Runtime CPU engines of the tiny model)
against the PyTorch reference, the plain API's image fields, and engine folders that cannot
edit images."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest
import torch

from adapedit.cli import main
from adapedit.config import EditConfig, ImageConfig, SamplerConfig
from adapedit.engines.cache import file_digest
from adapedit.errors import ConfigError, EngineError, InputError, ManifestError
from adapedit.image_io import load_image
from adapedit.parity import compare_edits
from adapedit.pipelines.pipeline import from_uint8
from adapedit.runtime.api import Validator, parse_edit_request, parse_request, plain_edit
from adapedit.runtime.session import EditSession

SRC, TGT = "a big red circle on the left", "a big blue circle on the left"
SAMPLER = SamplerConfig(steps=4, seed=2)
CFG = EditConfig(alpha_m=0.0)


IMG, SMALL = "<the image>", "<the image cut to 40 rows, as base64 PNG>"  # stand-ins


@pytest.fixture(scope="module")
def image(photo):
    return photo(128)  # the tiny model's size


def test_the_encoder_engine_matches_the_reference(tiny_pipeline, tiny_session, image):
    x = from_uint8(image)  # [1, 3, 128, 128]
    z_ref, z_run = tiny_pipeline.encode_image_one(x), tiny_session.encode_image_one(x)
    assert z_run.shape == (1, 4, 16, 16)
    assert (z_run - z_ref).abs().max() <= 1e-4


@pytest.mark.parametrize("inversion", ["direct", "ddim", "npi"])
def test_runtime_matches_the_reference(tiny_pipeline, tiny_session, image, inversion, monkeypatch):
    # Both from the reference's encoding: the tiny model's random weights amplify the encoders'
    # ~1e-5 difference about 40 times over a 4-step inversion (its own Jacobian: the reference
    # inverting both encodings differs as much), and its edit pass from the inverted latent
    # grows latents of magnitude ~8, so the edit's latents are judged relative to it. The
    # trained shapes model is held to 1e-4 absolute end to end (tests/shapes/).
    monkeypatch.setattr(tiny_session, "encode_image_one", tiny_pipeline.encode_image_one)
    cfg = ImageConfig(inversion=inversion)
    kw = {"image": image, "image_config": cfg, "record_latents": True}
    ref = tiny_pipeline.edit(SRC, TGT, CFG, SAMPLER, **kw)
    run = tiny_session.edit(SRC, TGT, CFG, SAMPLER, **kw)
    assert (run.trajectory - ref.trajectory).abs().max() <= 1e-4  # the inversion
    p = compare_edits(ref, run)
    assert len(run.latents) == SAMPLER.steps
    assert p["latents_max_rel"] <= 1e-4, p["per_step"]
    assert p["tau_max_abs"] <= 1e-5 and p["psnr_edited_db"] >= 50
    assert run.image == ref.image and run.keywords == ref.keywords
    if inversion == "direct":  # the source branch ends on the encoded latent
        z0 = tiny_pipeline.encode_image_one(from_uint8(image))[0]
        assert (run.latents[-1][0] - z0).abs().max() <= 1e-4
        assert torch.equal(run.latents[-1][0], run.trajectory[0])


def test_plain_edit_takes_the_image_as_bytes_base64_or_array(tiny_session, image, png):
    options = {"steps": 2, "seed": 3, "inversion": "npi", "resize": "stretch"}
    from_bytes = plain_edit(tiny_session, SRC, TGT, image=png(image), **options)
    b64 = base64.b64encode(png(image)).decode()
    from_b64 = plain_edit(tiny_session, SRC, TGT, image=f"data:image/png;base64,{b64}", **options)
    from_array = plain_edit(tiny_session, SRC, TGT, image=image, **options)
    ref = tiny_session.edit(
        SRC,
        TGT,
        EditConfig(),
        SamplerConfig(steps=2, seed=3),
        image=image,
        image_config=ImageConfig(inversion="npi", resize="stretch"),
    )
    for r in (from_bytes, from_b64, from_array):
        assert np.array_equal(r["edited_image"], ref.edited_image)
        assert r["image"]["inversion"] == "npi" and r["image"]["resize"] == "stretch"
    assert from_bytes["image"]["format"] == "PNG" and from_array["image"]["format"] == "array"
    rest = {k: v for k, v in from_bytes.items() if not k.endswith("_image")}
    assert json.loads(json.dumps(rest)) == rest  # JSON-able as it is


@pytest.mark.parametrize(
    ("request_fields", "error", "field", "match"),
    [
        ({"image": "not base64!"}, ConfigError, "image", "not base64"),
        ({"image": 12}, ConfigError, "image", "wrong type"),
        (
            {"image": base64.b64encode(b"GIF89a...").decode()},
            InputError,
            "image",
            "not a PNG, JPEG or WebP image",
        ),
        ({"image": SMALL}, InputError, "image", "too small"),
        ({"image": IMG, "inversion": "null-text"}, ConfigError, "inversion", "unknown inversion"),
        ({"image": IMG, "resize": 3}, ConfigError, "resize", "wrong type"),
        ({"inversion": "ddim"}, ConfigError, "inversion", "only for an edit of a given image"),
        ({"image": IMG, "scheduler": "euler"}, ConfigError, "scheduler", "DDIM"),
        # a preset's scheduler, none asked for: the message names the preset
        ({"image": IMG, "preset": "fast"}, ConfigError, "scheduler", "preset 'fast' samples"),
        ({"image": IMG, "preset": "fast", "scheduler": "euler"}, ConfigError, "scheduler", "^edit"),
    ],
)
def test_bad_image_requests_name_the_field(image, request_fields, error, field, match, png):
    stand_in = {IMG: image, SMALL: base64.b64encode(png(image[:40])).decode()}
    fields = {k: stand_in.get(v, v) if isinstance(v, str) else v for k, v in request_fields.items()}
    with pytest.raises(error, match=match) as e:
        parse_edit_request({"source": SRC, "target": TGT, **fields}, where="POST /edit")
    assert e.value.field == field


def test_a_server_can_lower_the_pixel_limit(image, png):
    request = {"source": SRC, "target": TGT, "image": png(image)}
    assert parse_edit_request(request, max_pixels=128 * 128).image.pixels.shape == (128, 128, 3)
    with pytest.raises(InputError, match="too many pixels") as e:
        parse_edit_request(request, max_pixels=128 * 127)
    assert e.value.field == "image" and "at most 16256 pixels" in str(e.value)


def test_parse_request_refuses_an_image_it_could_not_pass_on():
    with pytest.raises(ConfigError, match="does not edit given images") as e:
        parse_request({"source": SRC, "target": TGT, "image": "aGk="})
    assert e.value.field == "image"
    r = parse_edit_request({"source": SRC, "target": TGT, "steps": 3})
    assert r.image is None and r.sampler.steps == 3 and r.image_config == ImageConfig()


def _without_encoder(engines, folder):
    shutil.copytree(engines, folder)
    doc = json.loads((folder / "manifest.json").read_text())
    (folder / doc["graphs"].pop("vae_encoder")["file"]).unlink()
    (folder / "manifest.json").write_text(json.dumps(doc, indent=2))
    config = json.loads((folder / "engine.json").read_text())
    config["manifest_sha256"] = file_digest(folder / "manifest.json")
    (folder / "engine.json").write_text(json.dumps(config))
    return folder


def test_an_engine_folder_without_a_vae_encoder_refuses_images(
    tiny_engines, tmp_path, capsys, image, png
):
    folder = _without_encoder(tiny_engines, tmp_path / "engines")
    session = EditSession(folder)
    with pytest.raises(ManifestError, match="no VAE encoder"):
        session.edit(SRC, TGT, CFG, SAMPLER, image=image)
    with pytest.raises(ConfigError, match="no VAE encoder") as e:
        Validator(session)(SRC, TGT, CFG, SAMPLER, load_image(image))
    assert e.value.field == "image"
    assert session.edit(SRC, TGT, CFG, SamplerConfig(steps=1)).edited_image.shape == (128, 128, 3)
    (tmp_path / "in.png").write_bytes(png(image))
    out = tmp_path / "out"
    args = ["edit", SRC, TGT, "--engine-dir", str(folder), "--image", str(tmp_path / "in.png")]
    assert main([*args, "--steps", "2", "--quiet", "--out", str(out)]) == 2
    assert "no VAE encoder" in capsys.readouterr().err and not out.exists()


def test_a_static_folder_without_batch_one_says_so_before_model_work(
    tiny_static_session, image, tmp_path, capsys, forbid_model_work, png
):
    # no engine may run before the refusal: not the runners the session has, nor the VAE
    # encoder's, made on its first image, nor any of the CLI's own session below
    with pytest.raises(EngineError, match="batch") as e:
        tiny_static_session.edit(SRC, TGT, CFG, SAMPLER, image=image)
    assert e.value.got == "batch 1" and e.value.field == "image"  # what asked for batch 1
    assert "adapedit export --shapes static --batches 1 2 4" in str(e.value)  # how to fix it
    validate = Validator(tiny_static_session)
    with pytest.raises(ConfigError, match="batch") as e:
        validate(SRC, TGT, CFG, SAMPLER, load_image(image))
    assert e.value.field == "image"  # a server's 422 names the request's field
    validate(SRC, TGT, CFG, SAMPLER)  # a generated source needs batches 2 and 4 only
    (tmp_path / "in.png").write_bytes(png(image))
    out = tmp_path / "out"
    folder = str(tiny_static_session.folder)
    args = ["edit", SRC, TGT, "--engine-dir", folder, "--image", str(tmp_path / "in.png")]
    assert main([*args, "--steps", "2", "--quiet", "--out", str(out)]) == 2
    assert "--batches 1 2 4" in capsys.readouterr().err and not out.exists()
    assert forbid_model_work == []


@pytest.fixture(scope="module")
def tiny_static_batch_one(tiny_components, tmp_path_factory):
    """ORT CPU engines of the tiny model exported static with UNet batches 1, 2 and 4, fused
    and segmented."""
    from adapedit.engines.folder import build_engines
    from adapedit.export.api import ExportOptions, export_model

    work = tmp_path_factory.mktemp("tiny-static-1-2-4")
    options = ExportOptions(shapes="static", forms=("fused", "segmented"), batches=(1, 2, 4))
    export_model(tiny_components, work / "export", options, progress=False)
    build_engines(work / "export", work / "engines", backend="ort", progress=False)
    return work / "engines"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("form", "inversion"),
    [("fused", "direct"), ("fused", "ddim"), ("fused", "npi"), ("segmented", "direct")],
)
def test_a_static_folder_with_batch_one_inverts_on_its_engines(
    tiny_pipeline, tiny_static_batch_one, image, form, inversion, monkeypatch
):
    session = EditSession(tiny_static_batch_one, form=form)
    monkeypatch.setattr(session, "encode_image_one", tiny_pipeline.encode_image_one)  # as above
    kw = {"image": image, "image_config": ImageConfig(inversion=inversion), "record_latents": True}
    ref = tiny_pipeline.edit(SRC, TGT, CFG, SAMPLER, **kw)
    run = session.edit(SRC, TGT, CFG, SAMPLER, **kw)
    ran = session._fused if form == "fused" else session._unets
    assert 1 in ran  # the inversion ran on the batch-1 UNet of this form
    assert (run.trajectory - ref.trajectory).abs().max() <= 1e-4
    p = compare_edits(ref, run)
    assert p["latents_max_rel"] <= 1e-4, p["per_step"]
    assert p["tau_max_abs"] <= 1e-5 and p["psnr_edited_db"] >= 50
    if inversion == "direct":
        assert torch.equal(run.latents[-1][0], run.trajectory[0])
