"""The trained ``shapes`` model through static and dynamic exports: the segments chain to the
whole graph, and the runtime (segmented and, static, fused) matches the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from adapedit.config import EditConfig, SamplerConfig
from adapedit.defaults import DEMO_SOURCE, DEMO_TARGET
from adapedit.engines.base import solve_symbols
from adapedit.engines.folder import build_engines
from adapedit.engines.ort import OrtRunner
from adapedit.export.api import ExportOptions, export_model
from adapedit.parity import compare_edits
from adapedit.pipelines.pipeline import ReferencePipeline
from adapedit.runtime.session import EditSession


@pytest.fixture(scope="module")
def shapes_reference():
    return ReferencePipeline.from_model("shapes")


@pytest.mark.slow
@pytest.mark.parametrize("shapes", ["static", "dynamic"])
def test_shapes_exports_chain_and_match_the_reference(shapes_reference, tmp_path, shapes):
    forms = ("segmented", "whole", "fused") if shapes == "static" else ("segmented", "whole")
    c = shapes_reference.components
    m = export_model(c, tmp_path / "x", ExportOptions(shapes=shapes, forms=forms), progress=False)
    u = m.unet_graphs(4)
    g = torch.Generator().manual_seed(0)
    feeds = {
        "sample": torch.randn(4, 4, 16, 16, generator=g),
        "timestep": torch.tensor([421.0]),
        "encoder_hidden_states": torch.randn(4, 77, m.text_hidden, generator=g),
    }
    env = dict(feeds)
    # a dynamic segment's inputs may not fix the symbols; the whole graph's inputs do
    symbols = solve_symbols(u.whole, {k: tuple(x.shape) for k, x in feeds.items()})
    for seg in u.segments:
        with OrtRunner(tmp_path / "x" / seg.file, seg) as r:
            out = r.infer({t.name: env[t.name] for t in seg.inputs}, symbols)
            env.update({k: v.clone() for k, v in out.items()})
    with OrtRunner(tmp_path / "x" / u.whole.file, u.whole) as r:
        whole = r.infer(feeds)["noise_pred"]
    assert (env["noise_pred"] - whole).abs().max() <= 1e-4

    build_engines(tmp_path / "x", tmp_path / "e", progress=False)
    cfg, sampler = EditConfig(), SamplerConfig(steps=4, seed=0)
    ref = shapes_reference.edit(DEMO_SOURCE, DEMO_TARGET, cfg, sampler, record_latents=True)
    for form in ("fused", "segmented") if shapes == "static" else ("segmented",):
        run = EditSession(tmp_path / "e", form=form).edit(
            DEMO_SOURCE, DEMO_TARGET, cfg, sampler, record_latents=True
        )
        p = compare_edits(ref, run)
        assert p["latents_max_abs"] <= 1e-4, (form, p["per_step"])
        assert p["tau_max_abs"] <= 1e-6 and p["tau_self_abs"] <= 1e-6, form
