"""Graph surgery on ONNX models: cutting a graph into segments at given tensors, and pruning a
graph to some of its outputs. Plain ``onnx`` protobuf work, no runtime needed."""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx import helper

from adapedit.errors import ExportError


def _value_infos(graph: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    infos = {v.name: v for v in graph.value_info}
    infos.update({v.name: v for v in graph.input})
    infos.update({v.name: v for v in graph.output})
    return infos


def _model_like(model: onnx.ModelProto, graph: onnx.GraphProto) -> onnx.ModelProto:
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="adapedit")
    out.ir_version = model.ir_version
    out.functions.extend(model.functions)
    return out


def _subgraph(
    model: onnx.ModelProto,
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[str],
    outputs: Sequence[str],
    name: str,
) -> onnx.ModelProto:
    g = model.graph
    infos = _value_infos(g)
    used = {i for n in nodes for i in n.input}
    missing = [t for t in [*inputs, *outputs] if t not in infos]
    if missing:
        raise ExportError(
            "no type information for tensors at a cut",
            where=name,
            expected="shape-inferred value_info for every live tensor",
            got=missing[:5],
        )
    graph = helper.make_graph(
        list(nodes),
        name,
        inputs=[infos[t] for t in inputs],
        outputs=[infos[t] for t in outputs],
        initializer=[init for init in g.initializer if init.name in used],
        value_info=[infos[o] for n in nodes for o in n.output if o in infos and o not in outputs],
    )
    return _model_like(model, graph)


def prune(model: onnx.ModelProto, keep_outputs: Sequence[str]) -> onnx.ModelProto:
    """The model with only ``keep_outputs`` as outputs and every node they do not need removed."""
    g = model.graph
    needed = set(keep_outputs)
    kept: list[onnx.NodeProto] = []
    for node in reversed(g.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    inputs = [i.name for i in g.input if i.name in needed]
    return _subgraph(model, kept, inputs, list(keep_outputs), g.name)


def split(model: onnx.ModelProto, cuts: Sequence[str]) -> list[onnx.ModelProto]:
    """Cut ``model`` after the nodes producing each tensor of ``cuts`` (in graph order).

    Segment ``k`` ends with the producer of ``cuts[k]`` and outputs it; every tensor produced in
    a segment and consumed later (or a graph output) becomes an output of its segment and an input
    of each later segment that uses it, by name. Graph inputs go to every segment that uses them.
    Initializers are copied into the segments that use them.

    Raises:
        ExportError: a cut tensor is not produced by a node, the cuts are out of graph order, or
            a node carries a subgraph (control flow cannot be cut safely).
    """
    g = model.graph
    nodes = list(g.node)
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in nodes
        for a in n.attribute
    ):
        raise ExportError(
            "cannot cut a graph with control-flow subgraphs",
            where=g.name,
            expected="a flat graph",
            got="If/Loop/Scan nodes",
        )
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    ends = []
    for name in cuts:
        if name not in producer:
            raise ExportError(
                "cut tensor is not produced by any node",
                where=g.name,
                expected="an attention-probability tensor",
                got=name,
            )
        ends.append(producer[name])
    if ends != sorted(ends) or len(set(ends)) != len(ends):
        raise ExportError(
            "cuts are not in graph order",
            where=g.name,
            expected="strictly increasing node positions",
            got=ends,
        )
    bounds = list(zip([-1, *ends], [*ends, len(nodes) - 1], strict=True))
    seg_of = {}
    for k, (lo, hi) in enumerate(bounds):
        for i in range(lo + 1, hi + 1):
            seg_of[i] = k
    initializers = {init.name for init in g.initializer}
    graph_inputs = [i.name for i in g.input]
    graph_outputs = {o.name for o in g.output}
    # the last segment that reads each tensor
    last_use: dict[str, int] = {}
    for k, n in enumerate(nodes):
        for t in n.input:
            if t:
                last_use[t] = max(last_use.get(t, -1), seg_of[k])
    segments = []
    for k, (lo, hi) in enumerate(bounds):
        seg_nodes = nodes[lo + 1 : hi + 1]
        produced = [o for n in seg_nodes for o in n.output if o]
        produced_set = set(produced)
        consumed = list(dict.fromkeys(t for n in seg_nodes for t in n.input if t))
        inputs = [t for t in consumed if t not in produced_set and t not in initializers]
        # graph inputs in graph order, then live tensors in order of first use
        inputs = [t for t in graph_inputs if t in inputs] + [
            t for t in inputs if t not in graph_inputs
        ]
        outputs = [t for t in produced if t in graph_outputs or last_use.get(t, -1) > k]
        segments.append(_subgraph(model, seg_nodes, inputs, outputs, f"segment_{k:02d}"))
    return segments
