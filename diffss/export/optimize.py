"""Exact ONNX graph rewrites that onnxruntime's own optimiser does not make.

``reduce_max_over_last_axis``: ``ReduceMax(MatMul(A, B), axis=-2)`` becomes
``ReduceMax(MatMul(B^T, A^T), axis=-1)``: the same numbers ((AB)^T = B^T A^T, so each max
runs over the same products), but onnxruntime reduces a contiguous last axis several times
faster than a strided one, and fuses the transposes into the MatMul. A prior written as the
max over support pixels of a [support, query] similarity has this form (at 473x473 that
ReduceMax was a fifth of PFENet's CPU time); diffss's PFENet and BAM now build the similarity
as [query, support] and need no rewrite, which stays for other models.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _ranks(proto: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    graph = inferred.graph
    ranks = {}
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            ranks[value.name] = len(tensor_type.shape.dim)
    for init in graph.initializer:
        ranks[init.name] = len(init.dims)
    return ranks


def _reduce_axes(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> list[int] | None:
    for attribute in node.attribute:
        if attribute.name == "axes":
            return list(attribute.ints)
    if len(node.input) > 1 and node.input[1]:  # opset 18: axes as an input, must be constant
        tensor = constants.get(node.input[1])
        return None if tensor is None else [int(a) for a in numpy_helper.to_array(tensor).ravel()]
    return None


def _keepdims(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "keepdims"), 1)


def _swap_last_two(rank: int) -> list[int]:
    return list(range(rank - 2)) + [rank - 1, rank - 2]


def reduce_max_over_last_axis(proto: onnx.ModelProto) -> int:
    """Rewrite in place every ``ReduceMax`` over axis -2 of a ``MatMul`` used only there;
    returns how many were rewritten."""
    graph = proto.graph
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    ranks = _ranks(proto)
    producers = {out: node for node in graph.node for out in node.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    graph_outputs = {o.name for o in graph.output}
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = node.attribute[0].t

    replaced: set[str] = set()  # outputs of the MatMuls now computed transposed
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        new_nodes.append(node)
        if node.op_type != "ReduceMax" or node.domain not in ("", "ai.onnx"):
            continue
        matmul = producers.get(node.input[0])
        if matmul is None or matmul.op_type != "MatMul" or uses.get(node.input[0]) != 1 or node.input[0] in graph_outputs:
            continue
        a, b = matmul.input
        rank, rank_a, rank_b = ranks.get(node.input[0]), ranks.get(a), ranks.get(b)
        axes = _reduce_axes(node, constants)
        if None in (rank, rank_a, rank_b, axes) or min(rank_a, rank_b) < 2 or len(axes) != 1:
            continue
        if axes[0] % rank != rank - 2:
            continue
        tag = f"{node.name or node.output[0]}_lastaxis"
        a_t, b_t, product = f"{tag}_aT", f"{tag}_bT", f"{tag}_product"
        new_nodes.pop()
        new_nodes += [
            helper.make_node("Transpose", [b], [b_t], name=f"{tag}_transpose_b", perm=_swap_last_two(rank_b)),
            helper.make_node("Transpose", [a], [a_t], name=f"{tag}_transpose_a", perm=_swap_last_two(rank_a)),
            helper.make_node("MatMul", [b_t, a_t], [product], name=f"{tag}_matmul"),
        ]
        keepdims = _keepdims(node)
        reduced = f"{tag}_reduced" if keepdims else node.output[0]
        if opset >= 18:
            axes_name = f"{tag}_axes"
            graph.initializer.append(numpy_helper.from_array(np.array([rank - 1], dtype=np.int64), axes_name))
            new_nodes.append(helper.make_node("ReduceMax", [product, axes_name], [reduced], name=f"{tag}_reducemax", keepdims=keepdims))
        else:
            new_nodes.append(helper.make_node("ReduceMax", [product], [reduced], name=f"{tag}_reducemax", axes=[rank - 1], keepdims=keepdims))
        if keepdims:  # [..., N, 1] back to the original [..., 1, N]
            new_nodes.append(helper.make_node("Transpose", [reduced], [node.output[0]], name=f"{tag}_restore", perm=_swap_last_two(rank)))
        replaced.add(matmul.output[0])
    if replaced:
        kept = [n for n in new_nodes if not (n.op_type == "MatMul" and n.output[0] in replaced)]
        del graph.node[:]
        graph.node.extend(kept)
    return len(replaced)
