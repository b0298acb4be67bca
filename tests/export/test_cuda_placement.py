"""Every node of the static graphs a GPU runs stays on ONNX Runtime's CUDA provider.

ONNX Runtime places a node on the CPU when the CUDA provider has no kernel for its op at the
graph's opset and input types, and when the node computes an input that CUDA kernels read in
host memory (a shape, axes, sizes); and it loads no file of a newer ONNX IR version than
its own. Either of the first two costs two copies per call, and a graph with any node
off the CUDA provider cannot be captured as a CUDA graph, which is what the fused runtime's
speed rests on. No GPU is needed to check this: the graphs' ops and types are read here and set
against the CUDA kernels of ONNX Runtime 1.31 (:data:`CUDA_KERNELS`), in fp32 (the CPU
fixtures) and in fp16 (what the GPU runs).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import shape_inference

from adapedit.spec import Manifest

#: Op type (``domain.op`` outside ONNX's own domain) → (opsets of its domain, element types of
#: its data input) that ONNX Runtime 1.31's CUDA provider has a kernel for, read from its
#: registered-kernel table (docs/OperatorKernels.md at commit 001d12d; ``MultiHeadAttention``
#: from ``contrib_ops/cuda/bert/multihead_attention.cc``, T float or float16) for the types
#: these graphs can hold. Only the ops the exports use are listed: an op new to a graph is
#: checked against that table before it joins.
CUDA_KERNELS: dict[str, tuple[range, frozenset[str]]] = {
    op: (opsets, frozenset(types.split()))
    for op, opsets, types in (
        ("Add", range(14, 99), "float16 float32 int64"),
        ("Cast", range(13, 99), "bool float16 float32 int64"),
        ("Clip", range(13, 99), "float16 float32 int64"),
        ("Concat", range(13, 99), "bool float16 float32 int64"),
        ("Conv", range(11, 99), "float16 float32"),
        ("Cos", range(7, 99), "float16 float32"),
        ("Div", range(14, 99), "float16 float32 int64"),
        ("Erf", range(13, 99), "float16 float32"),
        ("Expand", range(13, 99), "bool float16 float32 int64"),
        ("Gather", range(13, 99), "bool float16 float32 int64"),
        ("Gemm", range(13, 99), "float16 float32"),
        ("InstanceNormalization", range(6, 99), "float16 float32"),
        ("IsNaN", range(13, 99), "float16 float32"),
        ("LayerNormalization", range(17, 99), "float16 float32"),
        ("MatMul", range(13, 99), "float16 float32"),
        ("com.microsoft.MultiHeadAttention", range(1, 2), "float16 float32"),
        ("Mul", range(14, 99), "float16 float32 int64"),
        ("ReduceL2", range(18, 99), "float16 float32"),
        ("ReduceMean", range(18, 99), "float16 float32"),
        ("Reshape", range(14, 99), "bool float16 float32 int64"),
        ("Resize", range(11, 99), "float16 float32"),
        ("Sigmoid", range(13, 99), "float16 float32"),
        ("Sin", range(7, 99), "float16 float32"),
        ("Slice", range(13, 99), "bool float16 float32 int64"),
        ("Softmax", range(13, 99), "float16 float32"),
        ("Split", range(18, 99), "bool float16 float32 int64"),
        ("Sub", range(14, 99), "float16 float32 int64"),
        ("Transpose", range(13, 99), "bool float16 float32 int64"),
        ("Unsqueeze", range(13, 99), "bool float16 float32 int64"),
        ("Where", range(16, 99), "float16 float32 int64"),  # its X and Y; the condition is bool
    )
}

#: The inputs (by position) that ONNX Runtime's CUDA kernels take in host memory: a node that
#: computes one is placed on the CPU, whatever its op.
HOST_INPUTS: dict[str, tuple[int, ...]] = {
    "Clip": (1, 2),
    "Reshape": (1,),
    "Expand": (1,),
    "Slice": (1, 2, 3, 4),
    "Unsqueeze": (1,),
    "Squeeze": (1,),
    "Split": (1,),
    "Resize": (1, 2, 3),
    "Tile": (1,),
    "Pad": (1, 2, 3),
    "TopK": (1,),
    "ConstantOfShape": (0,),
    "Range": (0, 1, 2),
    **{f"Reduce{r}": (1,) for r in ("L2", "Mean", "Max", "Min", "Sum", "Prod")},
}


#: The newest ONNX IR version ONNX Runtime 1.31 loads (onnx 1.23 writes 14 unless told).
MAX_IR_VERSION = 13


def off_cuda(path: Path) -> list[str]:
    """The nodes of the ONNX graph at ``path`` that ONNX Runtime would place off the CUDA
    provider, each with why (empty: every node runs there); first, a file it would not load."""
    model = onnx.load(str(path), load_external_data=False)
    found = []
    if model.ir_version > MAX_IR_VERSION:
        found.append(
            f"IR version {model.ir_version}: ONNX Runtime 1.31 loads up to {MAX_IR_VERSION}"
        )
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    graph = shape_inference.infer_shapes(model).graph
    dtypes = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.output)}
    dtypes |= {v.name: v.type.tensor_type.elem_type for v in graph.input}
    dtypes |= {t.name: t.data_type for t in graph.initializer}
    fixed = {t.name for t in graph.initializer}
    produced = {o for n in graph.node if n.op_type != "Constant" for o in n.output}
    for n in graph.node:
        if n.op_type == "Constant":  # a value, not a kernel: ONNX Runtime makes it an initializer
            continue
        data = n.input[1] if n.op_type == "Where" else n.input[0]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(dtypes[data]).name
        domain = n.domain or "ai.onnx"
        op = n.op_type if domain == "ai.onnx" else f"{domain}.{n.op_type}"
        opset = opsets[domain]
        versions, types = CUDA_KERNELS.get(op, (range(0), frozenset()))
        if opset not in versions or dtype not in types:
            found.append(f"{n.name}: {op} (opset {opset}) on {dtype}: no CUDA kernel")
        for i in HOST_INPUTS.get(n.op_type, ()):
            if i < len(n.input) and n.input[i] in produced and n.input[i] not in fixed:
                found.append(f"{n.name}: {n.op_type} input {i} is computed on the CPU")
    return found


def _graphs(folder: Path) -> list[Path]:
    m = Manifest.load(folder, check_files=False)
    return [folder / spec.file for spec in m.all_graphs()]


def test_the_checker_finds_a_node_off_the_cuda_provider(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [6])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),  # no kernel listed
        helper.make_node("ReduceProd", ["s"], ["n"], keepdims=1, name="count"),
        helper.make_node("Reshape", ["x", "n"], ["y"], name="flatten"),  # a computed shape
    ]
    graph = helper.make_graph(nodes, "g", [x], [y])
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "g.onnx"
    )
    found = off_cuda(tmp_path / "g.onnx")
    assert "IR version 14: ONNX Runtime 1.31 loads up to 13" in found  # onnx 1.23's default
    assert any(f.startswith("shape: Shape") for f in found), found
    assert "flatten: Reshape input 1 is computed on the CPU" in found


def test_fp32_static_graphs_stay_on_the_cuda_provider(tiny_static_export, tiny_fused_engines):
    graphs = _graphs(tiny_static_export[0]) + _graphs(tiny_fused_engines)
    assert {p.name for p in graphs} >= {"b4_fused.onnx", "b4_whole.onnx", "b4_segment_00.onnx"}
    for path in graphs:
        assert off_cuda(path) == [], path


@pytest.mark.slow
def test_fp16_fused_export_stays_on_the_cuda_provider(tiny_fp16_fused_export):
    graphs = _graphs(tiny_fp16_fused_export[0])
    assert {p.name for p in graphs} >= {"b2_fused.onnx", "b4_fused.onnx", "text_encoder.onnx"}
    for path in graphs:
        assert off_cuda(path) == [], path
