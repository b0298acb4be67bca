"""TensorRT plumbing that runs without TensorRT (plan cache, keys, profile shapes, lazy import)
and the real build, marked ``trt``."""

from __future__ import annotations

import importlib.util
import logging

import pytest

from adapedit.engines.base import Profile
from adapedit.engines.cache import PlanCache, PlanKey, file_digest
from adapedit.engines.trt import TrtRunner, profile_shapes
from adapedit.errors import EngineError

KEY = PlanKey("a" * 64, "10.9.0", "NVIDIA H100 sm90", '{"sample": [[1,4,16,16]]}')


def test_cache_builds_once_then_loads(tmp_path):
    cache = PlanCache(tmp_path)
    calls = []

    def build():
        calls.append(1)
        return b"PLAN-BYTES"

    path, built = cache.get_or_build(KEY, build)
    assert built and path.read_bytes() == b"PLAN-BYTES"
    path2, built2 = cache.get_or_build(KEY, build)
    assert not built2 and path2 == path and len(calls) == 1
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".plan"]  # no temp files


def test_corrupt_or_stale_plan_is_rebuilt_with_a_message(tmp_path, caplog):
    cache = PlanCache(tmp_path)
    path, _ = cache.get_or_build(KEY, lambda: b"GOOD")
    path.write_bytes(b"GOOX")  # corrupted on disk
    with caplog.at_level(logging.WARNING, logger="adapedit.engines"):
        _, built = cache.get_or_build(KEY, lambda: b"GOOD")
    assert built and "corrupt" in caplog.text and path.read_bytes() == b"GOOD"
    meta = path.with_suffix(".json")
    meta.write_text(meta.read_text().replace("10.9.0", "10.8.0"))  # built by another TRT
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adapedit.engines"):
        _, built = cache.get_or_build(KEY, lambda: b"GOOD")
    assert built and "stale" in caplog.text
    meta.unlink()
    assert cache.load(KEY) is None


def test_plan_keys_differ_by_every_part():
    variants = [
        KEY,
        PlanKey("b" * 64, *list(KEY.__dict__.values())[1:]),
        PlanKey(KEY.onnx_sha256, "10.10.0", KEY.gpu, KEY.profile),
        PlanKey(KEY.onnx_sha256, KEY.backend_version, "NVIDIA A100 sm80", KEY.profile),
        PlanKey(KEY.onnx_sha256, KEY.backend_version, KEY.gpu, "{}"),
    ]
    assert len({k.digest for k in variants}) == len(variants)


def test_file_digest_covers_external_data(tmp_path):
    f = tmp_path / "m.onnx"
    f.write_bytes(b"graph")
    d1 = file_digest(f)
    (tmp_path / "m.onnx.data").write_bytes(b"weights")
    assert file_digest(f) != d1


def test_profile_shapes_of_every_segment(tiny_export):
    _, m = tiny_export
    p = Profile(batch=(1, 2, 4), height=(128, 128, 256), width=(128, 192, 256))
    unet_multiple = m.size_multiple // m.vae_scale_factor
    first = profile_shapes(m.unet[0].segments[0], p, m.vae_scale_factor, unet_multiple)
    assert first["sample"] == ((1, 4, 16, 16), (2, 4, 16, 24), (4, 4, 32, 32))
    b = m.boundaries[0]  # down_blocks.0 attn1: probs [B*H, P, P]
    nxt = profile_shapes(m.unet[0].segments[1], p, m.vae_scale_factor, unet_multiple)
    assert nxt[b.probs] == ((2, 256, 256), (4, 384, 384), (8, 1024, 1024))
    for seg in m.unet[0].segments:  # every input of every segment evaluates
        shapes = profile_shapes(seg, p, m.vae_scale_factor, unet_multiple)
        assert set(shapes) == {t.name for t in seg.inputs}


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed"
)
def test_without_tensorrt_the_runner_says_so(tiny_export):
    _, m = tiny_export
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        TrtRunner("x.plan", m.graphs["vae_decoder"]).activate()


@pytest.mark.trt
@pytest.mark.gpu
def test_tensorrt_engines_match_onnxruntime(tiny_export, tmp_path):
    import torch

    from adapedit.engines.folder import build_engines
    from adapedit.engines.ort import OrtRunner
    from adapedit.engines.trt import TrtRunner

    folder, m = tiny_export
    build_engines(folder, tmp_path / "trt", backend="trt", progress=False)
    spec = m.graphs["vae_decoder"]
    z = torch.randn(1, 4, 16, 16)
    with (
        OrtRunner(folder / spec.file, spec) as ort_r,
        TrtRunner(tmp_path / "trt" / "plans" / "vae_decoder.plan", spec) as trt_r,
    ):
        a = ort_r.infer({"latent": z})["image"]
        b = trt_r.infer({"latent": z.cuda()})["image"].cpu()
    assert (a - b).abs().max() < 1e-2
