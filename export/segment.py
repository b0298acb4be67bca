"""Graph work on the exported UNet with onnx-graphsurgeon: folding constants, cutting the graph
into segments at given tensors, and pruning it to some of its outputs.

Constants (``Constant`` nodes are lowered to constant tensors first) are copied into every
segment that uses them, so only variable tensors cross a cut: in a static export, where every
shape is a constant, no integer tensor crosses a cut at all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import onnx

from adapedit.errors import ExportError

#: Constant subgraphs whose result is larger than this are left to run time (an ``Expand`` of a
#: constant into a [B·H, P, K] tensor would otherwise be stored in the file).
FOLD_LIMIT_BYTES = 1 << 20


def load_graph(model: onnx.ModelProto):
    """The model as an onnx-graphsurgeon graph with ``Constant`` nodes lowered to constant
    tensors and constant subgraphs (up to :data:`FOLD_LIMIT_BYTES`) folded, topologically
    sorted.

    Raises:
        ExportError: the graph has control flow (If/Loop/Scan), which cannot be cut safely.
    """
    import onnx_graphsurgeon as gs

    logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
    graph = gs.import_onnx(model)
    if any(n.op in ("If", "Loop", "Scan") for n in graph.nodes):
        raise ExportError(
            "cannot cut a graph with control-flow subgraphs",
            where=graph.name,
            expected="a flat graph",
            got="If/Loop/Scan nodes",
        )
    graph.fold_constants(size_threshold=FOLD_LIMIT_BYTES).cleanup().toposort()
    return graph


def fold(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with constants lowered and folded as :func:`load_graph` does, uncut."""
    graph = load_graph(model)
    return _export(graph, graph.name)


def _export(graph, name: str) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    graph.name = name
    return gs.export_onnx(graph)


def prune(graph, outputs: Sequence[str]) -> onnx.ModelProto:
    """The graph with only ``outputs`` as outputs and every node they do not need removed (the
    graph itself is left as it is)."""
    g = graph.copy()
    tensors = g.tensors()
    g.outputs = [tensors[name] for name in outputs]
    g.cleanup(remove_unused_graph_inputs=True)
    return _export(g, graph.name)


def split(graph, cuts: Sequence[str]) -> Iterator[onnx.ModelProto]:
    """Cut ``graph`` after the nodes producing each tensor of ``cuts`` (in graph order); yields
    the segments in order.

    Segment ``k`` ends with the producer of ``cuts[k]`` and outputs it; every variable tensor
    produced in a segment and consumed later (or a graph output) becomes an output of its
    segment and an input of each later segment that uses it, by name. Graph inputs go to every
    segment that uses them; constants are copied into every segment that uses them.

    Raises:
        ExportError: a cut tensor is not produced by a node, or the cuts are out of graph order.
    """
    import onnx_graphsurgeon as gs

    nodes = list(graph.nodes)
    producer = {t.name: k for k, n in enumerate(nodes) for t in n.outputs}
    ends = []
    for name in cuts:
        if name not in producer:
            raise ExportError(
                "cut tensor is not produced by any node",
                where=graph.name,
                expected="an attention-probability tensor",
                got=name,
            )
        ends.append(producer[name])
    if ends != sorted(ends) or len(set(ends)) != len(ends):
        raise ExportError(
            "cuts are not in graph order",
            where=graph.name,
            expected="strictly increasing node positions",
            got=ends,
        )
    bounds = list(zip([-1, *ends], [*ends, len(nodes) - 1], strict=True))
    seg_of = {k: s for s, (lo, hi) in enumerate(bounds) for k in range(lo + 1, hi + 1)}
    graph_inputs = [t.name for t in graph.inputs]
    graph_outputs = {t.name for t in graph.outputs}
    last_use: dict[str, int] = {}  # the last segment that reads each variable tensor
    for k, n in enumerate(nodes):
        for t in n.inputs:
            if isinstance(t, gs.Variable) and t.name:
                last_use[t.name] = max(last_use.get(t.name, -1), seg_of[k])
    for s, (lo, hi) in enumerate(bounds):
        seg_nodes = nodes[lo + 1 : hi + 1]
        produced = [t for n in seg_nodes for t in n.outputs if t.name]
        produced_names = {t.name for t in produced}
        consumed = {}
        for n in seg_nodes:
            for t in n.inputs:
                if isinstance(t, gs.Variable) and t.name and t.name not in produced_names:
                    consumed.setdefault(t.name, t)
        # graph inputs in graph order, then live tensors in order of first use
        inputs = [consumed[n] for n in graph_inputs if n in consumed] + [
            t for n, t in consumed.items() if n not in graph_inputs
        ]
        outputs = [t for t in produced if t.name in graph_outputs or last_use.get(t.name, -1) > s]
        seg = gs.Graph(
            nodes=seg_nodes,
            inputs=inputs,
            outputs=outputs,
            opset=graph.opset,
            import_domains=graph.import_domains,
            ir_version=graph.ir_version,
        )
        yield _export(seg, f"segment_{s:02d}")
