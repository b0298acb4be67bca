"""Short calibration (``calibration_steps``) and the calibration cache: K = steps is today's edit
bit for bit, a shorter pass changes τ, bad K is refused before model work; the cache serves an
edit that changes only edit-side options with the images of a fresh edit, never exceeds its byte
bound, and never serves another model's entry."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from adapedit.config import EditConfig, SamplerConfig
from adapedit.errors import ConfigError
from adapedit.pipelines.calibration_cache import CalibrationCache, CalibrationKey
from adapedit.pipelines.controller import CalibrationStats
from adapedit.pipelines.pipeline import ReferencePipeline

SRC, TGT = "a dog standing on the grass", "a dog sitting on the grass"
SAMPLER = SamplerConfig(steps=4, seed=3)


def _taus(result) -> list[float]:
    return [w.tau for w in result.tau.words] + [result.tau.tau_self]


def _tiny(**kwargs) -> ReferencePipeline:
    """A pipeline on a tiny model of its own (a pipeline installs its processors in the UNet,
    so two pipelines never share components)."""
    from adapedit.pipelines.models import build_random

    return ReferencePipeline(build_random("tiny", seed=0), **kwargs)


@pytest.fixture(scope="module")
def uncached():
    """A reference pipeline without a cache: every edit calibrates."""
    return _tiny(calibration_cache=None)


def test_full_calibration_steps_is_todays_edit_bit_for_bit(uncached):
    today = uncached.edit(SRC, TGT, EditConfig(), SAMPLER, record_latents=True)
    full = uncached.edit(SRC, TGT, EditConfig(calibration_steps=4), SAMPLER, record_latents=True)
    assert _taus(full) == _taus(today)
    assert np.array_equal(full.edited_image, today.edited_image)
    assert all(torch.equal(a, b) for a, b in zip(full.latents, today.latents, strict=True))
    assert today.calibration == full.calibration == "computed"


def test_a_short_calibration_changes_tau_and_the_edit(uncached):
    # α_m = 0: the tiny random model's maps are all under 0.03, which would mask every word
    full = uncached.edit(SRC, TGT, EditConfig(alpha_m=0.0), SAMPLER, record_latents=True)
    short_config = EditConfig(alpha_m=0.0, calibration_steps=1)
    short = uncached.edit(SRC, TGT, short_config, SAMPLER, record_latents=True)
    assert _taus(short) != _taus(full)
    assert not np.array_equal(short.edited_image, full.edited_image)
    assert len(short.latents) == len(full.latents) == 4  # the edit pass keeps its steps
    assert short.plan.config.calibration_steps == 1
    assert short.to_json("tiny")["config"]["edit"]["calibration_steps"] == 1


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_calibration_steps_below_one_or_not_an_integer_is_refused(k):
    with pytest.raises(ConfigError, match="calibration_steps") as e:
        EditConfig(calibration_steps=k)
    assert e.value.field == "calibration_steps"


def test_calibration_steps_over_the_edits_steps_is_refused_before_model_work(
    tiny_pipeline, forbid_model_work
):
    with pytest.raises(ConfigError, match="exceeds") as e:
        tiny_pipeline.edit(SRC, TGT, EditConfig(calibration_steps=5), SAMPLER)
    assert e.value.field == "calibration_steps" and "steps (4)" in e.value.expected


def test_a_re_edit_of_the_same_target_uses_the_cache_and_equals_a_fresh_edit(uncached):
    pipe = _tiny()  # the default cache
    first = pipe.edit(SRC, TGT, EditConfig(), SAMPLER)
    assert first.calibration == "computed" and len(pipe.calibration_cache) == 1
    edit_side = [
        EditConfig(lambda_s=0.5, lambda_sv=2.0),
        EditConfig(lambda_tau=0.5, tau_rule="released"),
        EditConfig(alpha_m=0.1, dps_mask=False),
        EditConfig(local_blend=("dog",), local_blend_threshold=0.5),
        EditConfig(edit_type="reweight", reweight=(("grass", 2.0),)),
    ]
    for config in edit_side:
        source = SRC if config.edit_type != "reweight" else TGT
        again = pipe.edit(source, TGT, config, SAMPLER)
        fresh = uncached.edit(source, TGT, config, SAMPLER)
        assert again.calibration == "cached", config
        assert again.to_json("m")["calibration"] == "cached"
        assert _taus(again) == _taus(fresh), config
        assert np.array_equal(again.edited_image, fresh.edited_image), config
    # what the pass depends on: another seed, K, guidance or target calibrates again
    for config, sampler, target in [
        (EditConfig(), SamplerConfig(steps=4, seed=4), TGT),
        (EditConfig(calibration_steps=2), SAMPLER, TGT),
        (EditConfig(), SamplerConfig(steps=4, seed=3, guidance=5.0), TGT),
        (EditConfig(), SAMPLER, "a dog lying on the grass"),
        (EditConfig(calibration="last"), SAMPLER, TGT),
    ]:
        assert pipe.edit(SRC, target, config, sampler).calibration == "computed"
    off = pipe.edit(SRC, TGT, EditConfig(use_fwt=False, use_dps=False), SAMPLER)
    assert off.calibration == "off"


def _stats(n_bytes: int) -> CalibrationStats:
    t = torch.zeros(n_bytes // 4)
    return CalibrationStats(torch.zeros(0), t, {}, {"l": t})


def _key(i: int) -> CalibrationKey:
    return CalibrationKey("m", f"t{i}", "x", "ddim", 4, 7.5, "mean", 2)


def test_the_cache_never_exceeds_its_bound_and_drops_the_least_recently_used():
    cache = CalibrationCache(1000)
    for i in range(3):
        cache.put(_key(i), _stats(400))
    assert len(cache) == 2 and cache.nbytes == 800 <= cache.max_bytes
    assert cache.get(_key(0)) is None  # the oldest went
    assert cache.get(_key(1)) is not None  # now the most recent
    cache.put(_key(3), _stats(400))
    assert cache.get(_key(2)) is None and cache.get(_key(1)) is not None
    cache.put(_key(4), _stats(2000))  # larger than the bound: not kept, nothing dropped for it
    assert cache.get(_key(4)) is None and len(cache) == 2 and cache.nbytes == 800
    cache.put(_key(1), _stats(100))  # replacing an entry counts its new size
    assert cache.nbytes == 500


def test_the_bound_holds_under_concurrent_writers():
    cache = CalibrationCache(10_000)

    def fill(base: int) -> None:
        for i in range(200):
            cache.put(_key(base + i), _stats(400 + 4 * (i % 7)))
            assert cache.nbytes <= cache.max_bytes

    threads = [threading.Thread(target=fill, args=(1000 * j,)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = sum(s.nbytes for s in cache._entries.values())
    assert held == cache.nbytes <= cache.max_bytes and len(cache) > 0


@pytest.mark.parametrize("bound", [0, -5, 1.5, "1GB", True])
def test_a_cache_size_that_is_not_a_positive_byte_count_is_refused(tiny_components, bound):
    with pytest.raises(ConfigError, match="positive byte count") as e:
        ReferencePipeline(tiny_components, calibration_cache=bound)
    assert e.value.field == "calibration_cache_bytes"


def test_stats_bytes_count_the_shared_tensor_once():
    t = torch.zeros(10)
    stats = CalibrationStats(torch.zeros(5), t, {"a": torch.zeros(3)}, {"a": t})
    assert stats.nbytes == 4 * (5 + 3 + 10)
