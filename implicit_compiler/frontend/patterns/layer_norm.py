"""LayerNorm as exporters write it below opset 17 (x a variable; any operand order):

====================== ============================================================ ===================
pattern                decomposition matched                                        becomes
====================== ============================================================ ===================
LayerNorm (opset < 17) d = x - ReduceMean(x); d / Sqrt(ReduceMean(d^2) + eps)         LayerNormalization
                       [* scale] [+ bias], both means over the same trailing axes
                       (d^2 as Pow(d, 2) or d * d)
====================== ============================================================ ===================
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph_index import _Graph
from .matching import _exactly, _other, _private_node


def _match_layer_norm(graph: _Graph, root: onnx.NodeProto):
    """d / Sqrt(ReduceMean(d^2) + eps) [* scale] [+ bias], d = x - ReduceMean(x), matched from
    its last node (the Add of the bias, else the Mul of the scale, else the Div)."""
    bias = scale = None
    top = root
    if root.op_type == "Add":
        bias_name = next((n for n in root.input if graph.const(n) is not None), None)
        if bias_name is None:
            return None
        bias, below = graph.const(bias_name), _other(root, bias_name)
        if len(graph.readers.get(below, ())) != 1:
            return None
        top = graph.producer.get(below)
    if top is not None and top.op_type == "Mul" and top.domain in ("", "ai.onnx"):
        scale_name = next((n for n in top.input if graph.const(n) is not None), None)
        if scale_name is None:
            return None
        scale, below = graph.const(scale_name), _other(top, scale_name)
        if len(graph.readers.get(below, ())) != 1:
            return None
        top = graph.producer.get(below)
    if top is None or top.op_type != "Div" or top.domain not in ("", "ai.onnx"):
        return None
    core = _layer_norm_core(graph, top)
    if core is None:
        return None
    nodes, x, axes, epsilon = core
    nodes |= _chain_between(graph, root, top)
    if not graph.same_shape(x, root.output[0]):
        return None
    normalized = graph.shapes[x][len(graph.shapes[x]) - len(axes) :]
    constants = {}
    for value, default, name in ((scale, 1.0, "scale"), (bias, 0.0, "bias")):
        value = np.full(normalized, default) if value is None else value
        try:
            if value.ndim > len(normalized):
                return None
            value = np.broadcast_to(value, normalized).astype(np.float64)
        except ValueError:
            return None
        constants[graph.fresh(f"{root.name or root.output[0]}/folded_{name}")] = np.ascontiguousarray(value)
    epsilon_tensor = numpy_helper.from_array(np.array(epsilon, dtype=np.float64), "epsilon")
    node = _private_node("LayerNormalization", root, [x, *constants], axes=axes, epsilon=epsilon_tensor)
    return nodes, node, constants


def _chain_between(graph: _Graph, root: onnx.NodeProto, div: onnx.NodeProto) -> set[int]:
    """The Add / Mul nodes from the root down to (and without) the Div."""
    nodes, node = set(), root
    while node is not div:
        nodes.add(graph.index[id(node)])
        variable = next(n for n in node.input if graph.const(n) is None)
        node = graph.producer[variable]
    return nodes


def _layer_norm_core(graph: _Graph, div: onnx.NodeProto):
    """(nodes, x, axes, epsilon) of d / Sqrt(ReduceMean(d^2) + eps), d = x - ReduceMean(x)."""
    d, root = div.input[0], graph.produced(div.input[1], "Sqrt")
    sub = graph.produced(d, "Sub")
    if root is None or sub is None or len(graph.readers.get(div.input[1], ())) != 1:
        return None
    add = graph.produced(root.input[0], "Add")
    if add is None or len(graph.readers.get(root.input[0], ())) != 1:
        return None
    eps_name = next((n for n in add.input if graph.const(n) is not None), None)
    if eps_name is None or graph.const(eps_name).size != 1 or not float(graph.const(eps_name).ravel()[0]) > 0:
        return None
    variance = graph.produced(_other(add, eps_name), "ReduceMean")
    if variance is None or len(graph.readers.get(variance.output[0], ())) != 1:
        return None
    square = graph.produced(variance.input[0], "Pow") or graph.produced(variance.input[0], "Mul")
    if square is None or len(graph.readers.get(square.output[0], ())) != 1:
        return None
    if square.op_type == "Pow" and not (square.input[0] == d and _exactly(graph.const(square.input[1]), 2.0)):
        return None
    if square.op_type == "Mul" and list(square.input) != [d, d]:
        return None
    x, mean = sub.input
    mean_node = graph.produced(mean, "ReduceMean")
    if mean_node is None or mean_node.input[0] != x or len(graph.readers.get(mean, ())) != 1:
        return None
    rank = len(graph.shapes.get(x, ())) if x in graph.shapes else None
    axes = _trailing_axes(graph, mean_node, rank)
    if axes is None or axes != _trailing_axes(graph, variance, rank):
        return None
    nodes = {graph.index[id(n)] for n in (div, root, add, variance, square, sub, mean_node)}
    return nodes, x, axes, float(graph.const(eps_name).ravel()[0])


def _trailing_axes(graph: _Graph, node: onnx.NodeProto, rank: int | None) -> list[int] | None:
    """The axes a keepdims ReduceMean reduces, as [-k, ..., -1], when they are the k trailing
    axes of a rank-``rank`` input; else None."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if rank is None or attributes.get("keepdims", 1) != 1:
        return None
    axes = attributes.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = graph.const(node.input[1])
        axes = None if value is None else [int(a) for a in value.ravel()]
    if not axes:
        return None
    positive = sorted({a + rank if a < 0 else a for a in axes})
    if len(positive) != len(axes) or positive != list(range(rank - len(positive), rank)):
        return None
    return [a - rank for a in positive]
