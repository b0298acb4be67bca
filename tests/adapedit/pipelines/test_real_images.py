"""Editing a given image with the PyTorch reference (tiny model): what each inversion does to
the source branch, the UNet calls it adds, the result record, and the checks made before any
model work."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from adapedit.algorithm.layout import GENERATION
from adapedit.cli import main
from adapedit.config import EditConfig, ImageConfig, SamplerConfig
from adapedit.errors import ConfigError, InputError, ModelError
from adapedit.pipelines.models import load_folder
from adapedit.pipelines.pipeline import ReferencePipeline, from_uint8

SRC, TGT = "a big red circle on the left", "a big blue circle on the left"
SAMPLER = SamplerConfig(steps=4, seed=1)
CFG = EditConfig(alpha_m=0.0)


@pytest.fixture(scope="module")
def image(photo):
    return photo(128)  # the tiny model's size


def edit_image(pipe, image, inversion: str, **kw):
    cfg = ImageConfig(inversion=inversion)
    return pipe.edit(SRC, TGT, CFG, SAMPLER, image=image, image_config=cfg, **kw)


@pytest.fixture(scope="module")
def runs(tiny_pipeline, image):
    return {
        inv: edit_image(tiny_pipeline, image, inv, record_latents=True)
        for inv in ("direct", "ddim")
    }


def test_direct_keeps_the_source_branch_on_the_inversion_trajectory(tiny_pipeline, runs, image):
    r = runs["direct"]
    z0 = tiny_pipeline.encode_image_one(from_uint8(image))  # [1, 4, 16, 16]
    assert r.trajectory.shape == (SAMPLER.steps + 1, 4, 16, 16)
    assert torch.equal(r.trajectory[0], z0[0])
    for k, latents in enumerate(r.latents):  # the edit pass's step k lands on t_{N-1-k}
        assert torch.equal(latents[0], r.trajectory[SAMPLER.steps - 1 - k])
    assert (r.latents[-1][0] - z0[0]).abs().max() <= 1e-4  # ends on the encoded latent
    round_trip = tiny_pipeline.decode(z0)[0]
    assert np.array_equal(r.source_image, round_trip)  # the source is the VAE's round trip
    assert not torch.equal(r.latents[-1][1], r.latents[-1][0])  # the edit branch is its own


def test_the_inversion_loop_reads_only_what_was_put_on_the_device_before_it(
    tiny_pipeline, image, monkeypatch
):
    """The timesteps and every ᾱ the inversion steps read are copied to the device once, before
    the loop (:meth:`~adapedit.pipelines.pipeline.EditPipeline.to_device`): a host tensor moved
    there inside the loop makes the host wait for the GPU at every step."""
    import adapedit.pipelines.pipeline as module

    moved, read = set(), []
    real_step = module.ddim_inversion_step

    def to_device(x):  # a copy, as on a GPU: what the loop reads must come from it
        y = x.clone()
        moved.add(y.untyped_storage().data_ptr())
        return y

    def step(z, eps, alpha, alpha_next):
        read.extend(a.untyped_storage().data_ptr() for a in (alpha, alpha_next))
        return real_step(z, eps, alpha, alpha_next)

    monkeypatch.setattr(tiny_pipeline, "to_device", to_device)
    monkeypatch.setattr(module, "ddim_inversion_step", step)
    z0 = tiny_pipeline.encode_image_one(from_uint8(image))
    tiny_pipeline.invert(z0, tiny_pipeline.encode([SRC]), SAMPLER)
    assert len(read) == 2 * SAMPLER.steps and set(read) <= moved


def test_plain_ddim_drifts_from_the_encoded_latent(runs):
    r = runs["ddim"]
    assert torch.equal(r.trajectory, runs["direct"].trajectory)  # the same inversion
    assert (r.latents[-1][0] - r.trajectory[0]).abs().max() > 1e-3


def test_npi_source_branch_is_the_conditional_sampling_from_the_inverted_latent(
    tiny_pipeline, image
):
    r = edit_image(tiny_pipeline, image, "npi", record_latents=True)
    c_src = tiny_pipeline.encode([SRC])
    record: list[torch.Tensor] = []
    tiny_pipeline.denoise(
        r.trajectory[-1:], GENERATION.stack(c_src, {"source": c_src}), SAMPLER, record=record
    )
    for a, b in zip(record, r.latents, strict=True):
        assert torch.equal(a[0], b[0])


def test_inversion_adds_one_batch_one_call_per_step(tiny_pipeline, image, monkeypatch):
    batches: list[int] = []
    unet = tiny_pipeline.unet

    def counting(x, *args):
        batches.append(x.shape[0])
        return unet(x, *args)

    monkeypatch.setattr(tiny_pipeline, "unet", counting)
    monkeypatch.setattr(tiny_pipeline, "calibration_cache", None)  # every pass runs
    edit_image(tiny_pipeline, image, "direct")
    n = SAMPLER.steps
    assert batches == [1] * n + [2] * n + [4] * n
    batches.clear()
    tiny_pipeline.edit(SRC, TGT, CFG, SAMPLER)
    assert batches == [2] * n + [4] * n


def test_the_result_records_the_image_and_the_inversion(runs, image):
    r = runs["direct"]
    doc = r.to_json("tiny")
    assert doc["image"] == {
        "inversion": "direct",
        "format": "array",
        "mode": "RGB",
        "size": [128, 128],
        "orientation": None,
        "upright_size": [128, 128],
        "resize": "crop",
        "resized_to": [128, 128],
        "box": [0, 0, 128, 128],
        "out_size": [128, 128],
    }
    assert np.array_equal(r.input_image, image)
    assert set(r.timings) == {"text", "inversion", "calibration", "edit", "decode", "total"}


def test_an_encoded_photo_of_another_size_is_resized_and_recorded(tiny_pipeline, photo):
    wide = Image.fromarray(photo(256)).crop((0, 64, 256, 192))  # 256 × 128
    buf = io.BytesIO()
    wide.save(buf, format="JPEG")
    r = tiny_pipeline.edit(
        SRC,
        TGT,
        CFG,
        SamplerConfig(steps=1),
        image=buf.getvalue(),
        image_config=ImageConfig(resize="pad"),
    )
    assert r.image["format"] == "JPEG" and r.image["size"] == [256, 128]
    assert r.image["resize"] == "pad" and r.image["box"] == [0, 32, 128, 96]
    assert r.source_image.shape == r.edited_image.shape == r.input_image.shape == (128, 128, 3)


@pytest.fixture()
def no_model_work(tiny_pipeline, monkeypatch, forbid_model_work):
    """The reference pipeline, with every PyTorch module call forbidden (``forbid_model_work``)
    and its four model steps too."""

    def forbidden(*a, **k):
        raise AssertionError("model work before the input was checked")

    for name in ("unet", "encode", "encode_image_one", "decode_one"):
        monkeypatch.setattr(tiny_pipeline, name, forbidden)
    return tiny_pipeline


@pytest.mark.parametrize(
    ("kwargs", "error", "field", "match"),
    [
        ({"image": b"not an image"}, InputError, "image", "not a PNG, JPEG or WebP image"),
        ({"image": lambda im: im[:60]}, InputError, "image", "too small"),
        ({"image": "/no/such/image.png"}, InputError, "image", "cannot read the image file"),
        ({"sampler": SamplerConfig(scheduler="pndm")}, ConfigError, "scheduler", "DDIM"),
    ],
)
def test_bad_input_is_refused_before_model_work(no_model_work, image, kwargs, error, field, match):
    sampler = kwargs.get("sampler", SAMPLER)
    bad = kwargs.get("image", image)
    with pytest.raises(error, match=match) as e:
        no_model_work.edit(SRC, TGT, CFG, sampler, image=bad(image) if callable(bad) else bad)
    assert e.value.field == field


def test_a_model_folder_without_a_vae_encoder_cannot_edit_images(
    tiny_components, tmp_path, image, capsys
):
    tiny_components.save(tmp_path / "m")
    weights = tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file(
        {k: v for k, v in state.items() if not k.startswith(("encoder.", "quant_conv."))}, weights
    )
    components = load_folder(tmp_path / "m")
    assert tiny_components.has_vae_encoder and not components.has_vae_encoder
    pipe = ReferencePipeline(components)
    with pytest.raises(ModelError, match="VAE has no encoder") as e:
        pipe.edit(SRC, TGT, CFG, SAMPLER, image=image)
    assert "vae/" in e.value.where
    assert pipe.edit(SRC, TGT, CFG, SamplerConfig(steps=1)).edited_image.shape == (128, 128, 3)
    Image.fromarray(image).save(tmp_path / "in.png")  # the CLI: exit 2, nothing written
    out = tmp_path / "out"
    args = ["edit", SRC, TGT, "--model", str(tmp_path / "m"), "--image", str(tmp_path / "in.png")]
    assert main([*args, "--steps", "2", "--quiet", "--out", str(out)]) == 2
    assert "VAE has no encoder" in capsys.readouterr().err and not out.exists()
