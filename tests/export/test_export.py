"""The exporter on the tiny model: segments chain back to the whole graph and to PyTorch, the
boundaries carry the reference's probabilities, edits fed back act as in the reference, the
manifest is exact, and bad input fails cleanly."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from adapedit.algorithm.fwt import fixed_tau
from adapedit.config import EditConfig
from adapedit.errors import ConfigError, ExportError, ManifestError, ModelError
from adapedit.export.api import ExportOptions, export_model
from adapedit.pipelines.controller import EditController
from adapedit.pipelines.processors import controlled_layers
from adapedit.spec import Manifest

SRC, TGT = "a dog standing on the grass", "a dog sitting on the grass"


@pytest.fixture(scope="session")
def sessions(tiny_export):
    folder, manifest = tiny_export
    so = ort.SessionOptions()
    so.log_severity_level = 3
    (unet,) = manifest.unet  # dynamic: one variant for any batch
    segs = [ort.InferenceSession(str(folder / s.file), so) for s in unet.segments]
    whole = ort.InferenceSession(str(folder / unet.whole.file), so)
    return segs, whole


def _chain(manifest, segs, feeds, controller=None):
    """Run the segments in order; at each boundary hand the probabilities (and hidden states)
    to ``controller`` and feed back what it returns."""
    env = dict(feeds)
    by_segment = {b.segment: b for b in manifest.boundaries}
    for k, (spec, sess) in enumerate(zip(manifest.unet[0].segments, segs, strict=True)):
        outs = sess.run(None, {t.name: env[t.name] for t in spec.inputs})
        env.update(zip([t.name for t in spec.outputs], outs, strict=True))
        b = by_segment.get(k)
        if b is not None and controller is not None:
            hidden = torch.from_numpy(env[b.hidden]) if b.hidden else None
            probs = controller(
                b.layer, b.kind == "cross", torch.from_numpy(env[b.probs]), hidden, 0
            )
            env[b.probs] = probs.numpy()
    return env


def _feeds(batch, latent_hw, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, *latent_hw, generator=g).numpy(),
        "timestep": np.array([601.0], np.float32),
        "encoder_hidden_states": torch.randn(batch, 77, 32, generator=g).numpy(),
    }


def _torch_unet(pipe, feeds, controller=None):
    # the layers the default rule controls at this size, whatever the shared pipeline ran last
    pipe.prepare(EditConfig(), tuple(feeds["sample"].shape[-2:]), ())
    pipe.slot.controller, pipe.slot.step = controller, 0  # the chain's step too
    try:
        with torch.no_grad():
            return pipe.components.unet(
                torch.from_numpy(feeds["sample"]),
                torch.from_numpy(feeds["timestep"]),
                encoder_hidden_states=torch.from_numpy(feeds["encoder_hidden_states"]),
            ).sample.numpy()
    finally:
        pipe.slot.controller = None


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("latent_hw", [(16, 16), (24, 32)])
def test_chained_segments_equal_whole_graph_and_pytorch(
    tiny_pipeline, tiny_export, sessions, batch, latent_hw
):
    _, manifest = tiny_export
    segs, whole = sessions
    feeds = _feeds(batch, latent_hw)
    chained = _chain(manifest, segs, feeds)["noise_pred"]
    ref_onnx = whole.run(None, feeds)[0]
    # The reference controls the export's layers, whatever the resolution.
    tiny_pipeline.slot.controlled = frozenset(manifest.controlled_layers)
    try:
        ref_torch = _torch_unet(tiny_pipeline, feeds)
    finally:
        tiny_pipeline.slot.controlled = None
    assert chained.shape == (batch, 4, *latent_hw)
    assert np.abs(chained - ref_onnx).max() <= 1e-4
    assert np.abs(chained - ref_torch).max() <= 1e-4


def test_boundaries_carry_the_reference_probabilities(tiny_pipeline, tiny_export, sessions):
    _, manifest = tiny_export
    segs, _ = sessions
    feeds = _feeds(2, (16, 16), seed=1)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(layer, is_cross, probs, hidden, step):
        seen[layer] = (probs.clone(), hidden.clone() if is_cross else None)
        return probs

    _torch_unet(tiny_pipeline, feeds, record)
    env = _chain(manifest, segs, feeds)
    assert set(seen) == set(manifest.controlled_layers)
    for b in manifest.boundaries:
        probs, hidden = seen[b.layer]
        assert env[b.probs].shape == (2 * b.heads, b.queries, b.keys)
        torch.testing.assert_close(torch.from_numpy(env[b.probs]), probs, atol=1e-5, rtol=0)
        if b.hidden:
            torch.testing.assert_close(
                torch.from_numpy(env[b.hidden]), hidden, atol=1e-5, rtol=1e-5
            )


def test_edited_probabilities_fed_back_act_as_in_the_reference(
    tiny_pipeline, tiny_export, sessions
):
    _, manifest = tiny_export
    segs, _ = sessions
    cfg = EditConfig(use_fwt=False, use_dps=False, local_blend=("dog",))
    plan = tiny_pipeline.plan(SRC, TGT, cfg)
    keys = {
        b.layer: torch.nn.functional.normalize(torch.randn(b.heads * b.head_dim), dim=0)
        for b in manifest.boundaries
        if b.kind == "cross"
    }
    feeds = _feeds(4, (16, 16), seed=2)

    def controller():
        return EditController(plan, fixed_tau(plan, cfg, None), keys, 10, (16, 16))

    ref_ctrl, chain_ctrl = controller(), controller()
    ref = _torch_unet(tiny_pipeline, feeds, ref_ctrl)
    out = _chain(manifest, segs, feeds, chain_ctrl)["noise_pred"]
    plain = _chain(manifest, segs, feeds)["noise_pred"]
    assert np.abs(out - ref).max() <= 1e-4
    assert np.abs(out[3] - plain[3]).max() > 1e-3  # the edit changed the edit branch…
    assert np.abs(out[:3] - plain[:3]).max() <= 1e-5  # …and nothing else
    torch.testing.assert_close(chain_ctrl.blend_maps, ref_ctrl.blend_maps, atol=1e-5, rtol=1e-5)


def test_manifest_lists_exactly_the_reference_controlled_layers(tiny_pipeline, tiny_export):
    folder, manifest = tiny_export
    unet = tiny_pipeline.components.unet
    # the scaled rule at 128 px (a 16×16 latent): self-attention at 1/4 and coarser, ≤ 16
    assert (manifest.attention_limits, manifest.self_max_queries) == ("scaled", 16)
    selfs = [b for b in manifest.boundaries if b.kind == "self"]
    assert selfs and all(b.downscale >= 4 for b in selfs)
    assert manifest.controlled_layers == [b.layer for b in manifest.boundaries]
    assert set(manifest.controlled_layers) == set(controlled_layers(unet, (16, 16)))
    cross = [b for b in manifest.boundaries if b.kind == "cross"]
    assert len(cross) == 10 and all(b.hidden and b.keys == 77 for b in cross)
    assert all(b.hidden is None for b in manifest.boundaries if b.kind == "self")
    assert [b.segment for b in manifest.boundaries] == list(range(len(manifest.boundaries)))
    assert len(manifest.unet[0].segments) == len(manifest.boundaries) + 1
    mid = next(b for b in manifest.boundaries if b.layer.startswith("mid_block"))
    assert (mid.resolution, mid.downscale, mid.heads, mid.head_dim) == ((2, 2), 8, 2, 32)
    # the mid block runs between the down and the up blocks
    order = [b.layer.split(".")[0] for b in manifest.boundaries]
    assert order.index("mid_block") < order.index("up_blocks")
    # a folder from before the rule was recorded was exported under P2P's literal numbers
    doc = manifest.to_json()
    del doc["attention_limits"]
    assert Manifest.from_json(doc).attention_limits == "p2p-literal"
    with pytest.raises(ConfigError, match="unknown attention_limits"):
        ExportOptions(attention_limits="literal")
    loaded = Manifest.load(
        folder, model_hash=tiny_pipeline.components.config_hash(), precision="fp32"
    )
    assert loaded == manifest
    for name in ("text_encoder", "vae_decoder", "vae_encoder"):
        assert (folder / manifest.graphs[name].file).is_file()
    assert all((folder / g.file).is_file() for g in manifest.unet[0].specs)
    assert (folder / "tokenizer").is_dir() and (folder / "scheduler_config.json").is_file()


def test_manifest_mismatch_is_a_clear_error(tiny_export, tmp_path):
    folder, _ = tiny_export
    with pytest.raises(ManifestError, match="another model"):
        Manifest.load(folder, model_hash="0" * 16)
    with pytest.raises(ManifestError, match="another precision"):
        Manifest.load(folder, precision="fp16")
    with pytest.raises(ManifestError, match="no manifest"):
        Manifest.load(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text((folder / "manifest.json").read_text())
    with pytest.raises(ManifestError, match="missing"):
        Manifest.load(broken)


def test_bad_input_fails_cleanly(tiny_components, tiny_export, tmp_path):
    folder, _ = tiny_export
    with pytest.raises(ExportError, match="output folder exists"):
        export_model(tiny_components, folder, progress=False)
    with pytest.raises(ExportError, match="unsupported ONNX opset"):
        export_model(tiny_components, tmp_path / "a", ExportOptions(opset=11), progress=False)
    with pytest.raises(ConfigError, match="multiple of 64"):
        export_model(tiny_components, tmp_path / "b", height=96, progress=False)
    no_unet = tmp_path / "model"
    tiny_components.save(no_unet)
    import shutil

    shutil.rmtree(no_unet / "unet")
    with pytest.raises(ModelError, match="missing its unet"):
        export_model(str(no_unet), tmp_path / "c", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_interrupted_export_leaves_nothing(tiny_components, tmp_path, monkeypatch):
    import adapedit.export.api as api

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "export_unet", boom)
    with pytest.raises(KeyboardInterrupt):
        export_model(tiny_components, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []
