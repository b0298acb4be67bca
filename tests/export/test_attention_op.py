"""``attention_op``: the attention layers no edit reads, written as standard ONNX operators
(the default) or as ONNX Runtime's ``com.microsoft.MultiHeadAttention``: the same numbers, one
fused operator per layer (native TensorRT's refusal of such a folder: tests/engines/test_trt.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from adapedit.errors import ConfigError
from adapedit.export.api import ExportOptions
from adapedit.spec import Manifest


def _ops(path) -> Counter:
    graph = onnx.load(str(path), load_external_data=False).graph
    return Counter((n.domain, n.op_type) for n in graph.node)


def test_each_uncontrolled_layer_is_one_multi_head_attention(tiny_ort_attention_export):
    folder, m = tiny_ort_attention_export
    assert m.attention_op == "ort"
    uncontrolled = set(m.attention) - set(m.controlled)
    assert uncontrolled  # the full-resolution self-attention layers of the tiny UNet
    whole = _ops(folder / m.unet_graphs(4).whole.file)
    assert whole["com.microsoft", "MultiHeadAttention"] == len(uncontrolled)
    assert whole["", "Softmax"] == len(m.controlled)  # the controlled layers' explicit softmax
    segments = sum((_ops(folder / s.file) for s in m.unet_graphs(4).segments), Counter())
    assert segments["com.microsoft", "MultiHeadAttention"] == len(uncontrolled)


def test_multi_head_attention_computes_what_the_standard_operators_do(
    tiny_ort_attention_export, tiny_static_export
):
    """The whole UNet of both exports on ONNX Runtime (CPU) with the same inputs: the noise
    prediction agrees to fp32 rounding."""
    import onnxruntime as ort

    m = tiny_static_export[1]
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((4, m.latent_channels, 16, 16)).astype(np.float32),
        "timestep": np.array([500.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((4, 77, m.text_hidden)).astype(np.float32),
    }
    out = []
    for folder, m in (tiny_ort_attention_export, tiny_static_export):
        path = folder / m.unet_graphs(4).whole.file
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        out.append(session.run(None, feeds)[0])
    assert np.abs(out[0]).max() > 0.1
    assert np.abs(out[0] - out[1]).max() <= 1e-4


def test_the_choice_is_checked_and_an_older_folder_wrote_standard_operators(tiny_export):
    with pytest.raises(ConfigError, match="unknown attention_op"):
        ExportOptions(attention_op="flash")
    doc = tiny_export[1].to_json()
    del doc["attention_op"]
    assert Manifest.from_json(doc).attention_op == "onnx"
