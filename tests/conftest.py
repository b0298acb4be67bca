"""Shared fixtures: the CLIP tokenizer and the tiny random SD model, built once per session.
(Fixtures are added here, never replaced: several test modules rely on them.)"""

from __future__ import annotations

import importlib.util

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "trt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT"))


@pytest.fixture(scope="session")
def tokenizer():
    """The vendored CLIP BPE tokenizer, loaded once per test session (no model needed)."""
    from adapedit.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_components():
    from adapedit.models import build_random

    return build_random("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_components):
    from adapedit.pipeline import ReferencePipeline

    return ReferencePipeline(tiny_components)
