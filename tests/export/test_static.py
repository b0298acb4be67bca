"""Static exports (every shape a constant; the UNet per batch): nothing but float tensors across
cuts, the segments chain to the whole graph and to PyTorch for every batch, the weights are
stored once, and requests for other shapes are refused."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from adapedit.engines.folder import build_engines
from adapedit.engines.ort import OrtRunner
from adapedit.errors import ConfigError, EngineError
from adapedit.export.api import ExportOptions, export_model
from adapedit.runtime.session import EditSession
from adapedit.spec import UNET_INPUTS, Manifest

INTEGER = ("int64", "int32", "int16", "int8", "uint8", "bool")


def test_no_static_segment_has_an_integer_cut_tensor(tiny_static_export):
    _, m = tiny_static_export
    assert m.static and m.batches == (2, 4)
    for u in m.unet:
        for seg in u.segments:
            for t in (*seg.inputs, *seg.outputs):
                assert t.dtype not in INTEGER, (seg.file, t.name, t.dtype)
                assert all(isinstance(d, int) for d in t.shape), (seg.file, t.name, t.shape)
    # the UNet's own inputs are float too: a static segmented UNet takes no integer at all
    assert {t.name for t in m.unet[0].segments[0].inputs} >= set(UNET_INPUTS)


def test_static_graphs_have_no_shape_arithmetic(tiny_static_export):
    folder, m = tiny_static_export
    for u in m.unet:
        for spec in u.specs:
            ops = {
                n.op_type
                for n in onnx.load(str(folder / spec.file), load_external_data=False).graph.node
            }
            assert not ops & {"Shape", "ConstantOfShape", "Constant", "Range"}, (spec.file, ops)
    for name in ("text_encoder", "vae_decoder", "vae_encoder"):
        assert m.graphs[name].inputs[0].shape[0] == 1  # batch 1, called once per sample


def test_no_static_unet_graph_computes_anything_twice(tiny_static_export, tiny_fp16_fused_export):
    """No two nodes of a UNet graph do the same work (one op on the same inputs with the same
    attributes). The fused graph's edit hook asks for DPS's ``S`` of the LocalBlend-resolution
    layers twice — inside the shared ``edit_probs`` and again for the picture of ``S``
    (``dps.weight``) — and the export keeps one computation of it."""
    (static, m), (fused, _) = tiny_static_export, tiny_fp16_fused_export
    checked = [(static, spec.file) for u in m.unet for spec in u.specs]
    checked += [(fused, u.fused.file) for u in Manifest.load(fused).unet]
    assert [f for _, f in checked if f.endswith("_fused.onnx")] == [
        "unet/b2_fused.onnx",
        "unet/b4_fused.onnx",
    ]
    for folder, file in checked:
        graph = onnx.load(str(folder / file), load_external_data=False).graph
        if file.endswith("b4_fused.onnx"):
            assert "dps.weight" in {o.name for o in graph.output}
        work = Counter(
            (n.op_type, tuple(n.input), tuple(a.SerializeToString() for a in n.attribute))
            for n in graph.node
        )
        twice = [(op, inputs[:2]) for (op, inputs, _), k in work.items() if k > 1]
        assert not twice, (file, twice[:5])


def _feeds(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, 16, 16, generator=g),
        "timestep": torch.tensor([601.0]),
        "encoder_hidden_states": torch.randn(batch, 77, 32, generator=g),
    }


@pytest.mark.parametrize("batch", [2, 4])
def test_static_segments_chain_to_the_whole_graph_and_pytorch(
    tiny_pipeline, tiny_static_export, batch
):
    folder, m = tiny_static_export
    u = m.unet_graphs(batch)
    feeds = _feeds(batch)
    env = dict(feeds)
    for seg in u.segments:
        with OrtRunner(folder / seg.file, seg) as r:
            env.update(
                {
                    k: v.clone()
                    for k, v in r.infer({t.name: env[t.name] for t in seg.inputs}).items()
                }
            )
    with OrtRunner(folder / u.whole.file, u.whole) as r:
        whole = r.infer(feeds)["noise_pred"]
    with torch.no_grad():
        ref = tiny_pipeline.components.unet(
            feeds["sample"], feeds["timestep"], encoder_hidden_states=feeds["encoder_hidden_states"]
        ).sample
    assert (env["noise_pred"] - whole).abs().max() <= 1e-4
    assert (env["noise_pred"] - ref).abs().max() <= 1e-4


def test_the_weights_are_stored_once_for_every_batch_and_form(tiny_components, tiny_static_export):
    folder, m = tiny_static_export
    index = json.loads((folder / m.weights).read_text())
    stored = sum(t["length"] for t in index["tensors"].values())
    params = sum(p.numel() * p.element_size() for p in tiny_components.unet.parameters())
    assert stored <= 1.02 * params  # one copy, for both batches and both forms
    assert {t["file"] for t in index["tensors"].values()} == {"weights-b2.bin"}
    assert sorted(p.name for p in (folder / "unet").glob("weights*")) == [
        "weights-b2.bin",
        "weights.json",
    ]
    # every UNet graph of the export is indexed, and ONNX Runtime reads it as it is
    assert set(index["graphs"]) == {g.file for u in m.unet for g in u.specs}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ort.InferenceSession(str(folder / m.unet[1].segments[0].file), so)


def test_sessions_share_one_copy_of_the_weights(tiny_static_session):
    """Every UNet session of the folder (the segments of both batches) reads the
    pool's buffers in place: one copy loaded, and zeroing it changes what every form computes
    (``tests/engines/test_weights.py`` measures the memory the sessions hold)."""
    s = EditSession(tiny_static_session.folder)  # a pool of its own: this test zeroes it
    unets = {f"segmented {b}": s.segmented(b) for b in (2, 4)}
    g = torch.Generator().manual_seed(0)

    def outputs() -> dict[str, torch.Tensor]:
        out = {}
        for name, unet in unets.items():
            b = int(name.split()[1])
            x = torch.randn(b, 4, 16, 16, generator=g)
            ctx = torch.randn(b, 77, 32, generator=g)
            out[name] = unet(x, torch.tensor([501.0]), ctx).clone()
        return out

    g.manual_seed(0)
    before = outputs()
    index = s.weights
    assert index.loaded_bytes == sum(t["length"] for t in index.tensors.values())
    for key in index.tensors:
        index.buffer(key).zero_()
    g.manual_seed(0)
    after = outputs()
    assert all(not torch.equal(before[k], after[k]) for k in unets), "a session kept a copy"
    s.close()


def test_static_export_refuses_what_it_cannot_be(tiny_components, tmp_path):
    with pytest.raises(ConfigError, match="multiple of 64") as e:
        export_model(tiny_components, tmp_path / "a", ExportOptions(shapes="static"), height=96)
    assert e.value.field == "height"
    with pytest.raises(ConfigError, match="static batches"):
        ExportOptions(shapes="static", batches=(0,))
    with pytest.raises(ConfigError, match="unknown shapes"):
        ExportOptions(shapes="fixed")
    assert list(tmp_path.iterdir()) == []


def test_a_static_export_takes_no_dynamic_build_profile(tiny_static_export, tmp_path):
    from adapedit.engines.base import Profile

    folder, _ = tiny_static_export
    wide = Profile(batch=(1, 4, 4), height=(128, 128, 256), width=(128, 128, 256))
    with pytest.raises(EngineError, match="static export is built for its own shapes"):
        build_engines(folder, tmp_path / "e", profile=wide, progress=False)
    assert not (tmp_path / "e").exists()


def test_the_build_holds_only_what_a_session_loads(tiny_static_export, tmp_path):
    folder, m = tiny_static_export
    build_engines(folder, tmp_path / "e", progress=False)
    files = {p.relative_to(tmp_path / "e").as_posix() for p in (tmp_path / "e").rglob("*.onnx")}
    assert not any("whole" in f for f in files)  # benchmarks run the whole UNet, sessions do not
    assert {"text_encoder.onnx", "vae_decoder.onnx"} <= files
    assert {s.file for u in m.unet for s in u.segments} <= files


def test_a_static_session_refuses_other_shapes_before_any_engine_call(
    tiny_static_session, forbid_model_work
):
    from adapedit.config import EditConfig, SamplerConfig

    s = tiny_static_session
    with pytest.raises(EngineError, match="outside the built profile") as e:
        s.edit("a dog", "a cat", EditConfig(), SamplerConfig(steps=2, height=256, width=256))
    assert "128" in str(e.value) and "256" in str(e.value) and e.value.field == "height"
    with pytest.raises(EngineError, match="not built for this batch size") as e:
        s.prepare(EditConfig(), (16, 16), (1,))
    assert "batch 2 or 4" in str(e.value) and "batch 1" in str(e.value)
    assert forbid_model_work == []  # every runner, those made later too


def test_static_runtime_output_matches_the_dynamic_one(tiny_session, tiny_static_session):
    from adapedit.config import EditConfig, SamplerConfig

    cfg, sampler = EditConfig(alpha_m=0.0), SamplerConfig(steps=3, seed=1)
    a = tiny_session.edit("a dog on grass", "a cat on grass", cfg, sampler, record_latents=True)
    b = tiny_static_session.edit(
        "a dog on grass", "a cat on grass", cfg, sampler, record_latents=True
    )
    assert np.abs(a.latents[-1].numpy() - b.latents[-1].numpy()).max() <= 1e-4


@pytest.mark.slow
def test_a_parallel_export_writes_what_a_sequential_one_does(tiny_fp16_fused_export, tmp_path):
    """The GPU script exports with ``--jobs``: the UNet variants traced in processes of their
    own (started first, the text encoder and the VAE exported meanwhile) give the very files of
    one process doing it all in order."""
    parallel, options = tiny_fp16_fused_export
    sequential = tmp_path / "seq"
    export_model("tiny", sequential, options, jobs=1, progress=False)

    def listed(folder: Path) -> list[str]:
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    files = listed(parallel)
    assert files == listed(sequential)
    assert {"unet/b2_fused.onnx", "unet/b4_fused.onnx", "text_encoder.onnx"} <= set(files)
    for f in files:
        assert (parallel / f).read_bytes() == (sequential / f).read_bytes(), f


@pytest.mark.slow
def test_a_parallel_export_that_fails_stops_its_workers_at_once(tmp_path, monkeypatch):
    """An error beside the variants' processes (here the text encoder's export) reaches the
    caller at once, their traces stopped, rather than after them; nothing is left behind."""
    import multiprocessing
    import time

    import adapedit.export.api as api

    def broken(*args, **kwargs):
        raise RuntimeError("the text encoder broke")

    monkeypatch.setattr(api, "export_text_encoder", broken)  # in this process only
    options = ExportOptions(shapes="static", forms=("fused",))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="the text encoder broke"):
        export_model("tiny", tmp_path / "x", options, jobs=2, progress=False)
    assert time.monotonic() - t0 < 10  # each variant's process takes 20 s or more to trace
    assert multiprocessing.active_children() == [] and list(tmp_path.iterdir()) == []


def test_equal_bytes_under_two_shapes_are_two_stored_tensors(tmp_path):
    """Random-initialised norms are all ones: a [C] LayerNorm scale and a folded [C, 1, 1]
    GroupNorm scale share their bytes but not their shape, and each graph must get its own."""
    from onnx import TensorProto, helper, numpy_helper

    from adapedit.export.weights import WeightStore

    ones = np.ones(320, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [320, 1, 320])],
        [numpy_helper.from_array(ones, "a"), numpy_helper.from_array(ones.reshape(320, 1, 1), "b")],
    )
    store = WeightStore(tmp_path, "t")
    store.save(helper.make_model(graph), tmp_path / "g.onnx", "g.onnx")
    index = store.close()
    assert sorted(t["shape"] for t in index["tensors"].values()) == [[320], [320, 1, 1]]
