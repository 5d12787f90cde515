"""x * G(x), G a chain of unary ops (x a variable; any operand order):

====================== ============================================================ ===================
pattern                decomposition matched                                        becomes
====================== ============================================================ ===================
SiLU / Swish           x * Sigmoid(x)                                                 silu block
Mish                   x * Tanh(Softplus(x))                                          Mish
HardSwish              x * HardSigmoid(x; alpha = 1/6, beta = 1/2)                    HardSwish
====================== ============================================================ ===================
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from .graph_index import _Graph
from .matching import _is, _private_node, _two_variables


def _unary_gate(private: str, chain: tuple[str, ...], check: Callable | None = None):
    """A matcher of x * G(x), G the chain of unary ops ``chain`` (outermost first)."""

    def match(graph: _Graph, root: onnx.NodeProto):
        found = _two_variables(graph, root, 1.0)
        if found is None:
            return None
        used, orders = found
        for x, t in orders:
            nodes, name = set(used), t
            for op_type in chain:
                node = graph.produced(name, op_type)
                if node is None or len(graph.readers.get(name, ())) != 1:
                    break
                if check is not None and not check(node):
                    break
                nodes.add(graph.index[id(node)])
                name = node.input[0]
            else:
                if name == x and graph.same_shape(x, root.output[0]):
                    return nodes, _private_node(private, root, [x]), {}
        return None

    return match


def _hard_sigmoid_of_hard_swish(node: onnx.NodeProto) -> bool:
    if node.op_type != "HardSigmoid":
        return True
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return _is(np.array(attributes.get("alpha", 0.2)), 1 / 6) and _is(np.array(attributes.get("beta", 0.5)), 0.5)
