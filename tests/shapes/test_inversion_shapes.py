"""Editing an image no model made with the trained ``shapes`` model: the runtime (ONNX
Runtime CPU engines, encoder included) against the PyTorch reference end to end, for each
inversion."""

from __future__ import annotations

import pytest
import torch

from adapedit.config import EditConfig, ImageConfig, SamplerConfig
from adapedit.parity import compare_edits
from adapedit.pipelines.pipeline import ReferencePipeline, from_uint8

SRC, TGT = "a big red circle on the left", "a big blue circle on the left"
SAMPLER = SamplerConfig(steps=6, seed=0)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shapes():
    from adapedit.pipelines.models import load_model

    return load_model("shapes")


@pytest.fixture(scope="module")
def shapes_session(shapes, tmp_path_factory):
    """ORT CPU engines of the shapes model (dynamic shapes, segmented UNet only)."""
    from adapedit.engines.folder import build_engines
    from adapedit.export.api import ExportOptions, export_model
    from adapedit.runtime.session import EditSession

    work = tmp_path_factory.mktemp("shapes-engines")
    export_model(shapes, work / "export", ExportOptions(forms=("segmented",)), progress=False)
    build_engines(work / "export", work / "engines", backend="ort", progress=False)
    return EditSession(work / "engines")


@pytest.mark.parametrize("inversion", ["direct", "ddim", "npi"])
def test_runtime_matches_the_reference_end_to_end(shapes, shapes_session, photo, inversion):
    image = photo(64)  # the shapes model's size
    reference = ReferencePipeline(shapes)
    kw = {"image": image, "image_config": ImageConfig(inversion=inversion), "record_latents": True}
    ref = reference.edit(SRC, TGT, EditConfig(), SAMPLER, **kw)
    run = shapes_session.edit(SRC, TGT, EditConfig(), SAMPLER, **kw)
    assert (run.trajectory - ref.trajectory).abs().max() <= 1e-4
    p = compare_edits(ref, run)
    assert p["latents_max_abs"] <= 1e-4, p["per_step"]
    assert p["psnr_source_db"] >= 50 and p["psnr_edited_db"] >= 50
    if inversion == "direct":  # both end exactly on their encoding of the image
        z0 = reference.encode_image_one(from_uint8(image))[0]  # [4, 8, 8]
        assert torch.equal(ref.latents[-1][0], z0)
        assert (run.latents[-1][0] - z0).abs().max() <= 1e-4
