"""GELU's two forms, as exporters decompose them (x a variable; any operand order):

====================== ============================================================ ===================
pattern                decomposition matched                                        becomes
====================== ============================================================ ===================
GELU (erf)             x * (1 + Erf(x / sqrt 2)) * 0.5  (or Erf(x * (1 / sqrt 2)))    Gelu
GELU (tanh)            x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 x^3))) * 0.5          Gelu, tanh
                       (x^3 as x * (x * x) or Pow(x, 3))
====================== ============================================================ ===================
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from .graph_index import _Graph
from .matching import _factors, _near, _one_plus, _other, _private_node, _product, _two_variables

SQRT_HALF_PI = math.sqrt(2 / math.pi)
GELU_CUBIC = 0.044715


def _half_x_one_plus(graph: _Graph, root: onnx.NodeProto, op_type: str):
    """For a root 0.5 * x * (1 + op_type(...)) (GELU's two forms): each reading (x, the nodes
    matched so far, the op_type node), x being either of the root's two variables."""
    found = _two_variables(graph, root, 0.5)
    if found is None:
        return
    used, orders = found
    for x, t in orders:
        nodes = set(used)
        gate = _one_plus(graph, t, op_type, nodes)
        if gate is not None:
            yield x, nodes, gate


def _match_gelu(graph: _Graph, root: onnx.NodeProto):
    """x * (1 + Erf(x / sqrt 2)) * 0.5, or with Erf(x * (1 / sqrt 2))."""
    for x, nodes, erf in _half_x_one_plus(graph, root, "Erf"):
        div, mul = graph.produced(erf.input[0], "Div"), graph.produced(erf.input[0], "Mul")
        if div is not None and div.input[0] == x and _near(graph.const(div.input[1]), math.sqrt(2)):
            nodes.add(graph.index[id(div)])
            divisor = float(graph.const(div.input[1]).ravel()[0])
        elif mul is not None and x in mul.input and _near(graph.const(_other(mul, x)), math.sqrt(0.5)):
            nodes.add(graph.index[id(mul)])
            divisor = 1.0 / float(graph.const(_other(mul, x)).ravel()[0])
        else:
            continue
        if graph.same_shape(x, root.output[0]):
            name = graph.fresh(f"{root.name or root.output[0]}/gelu_divisor")
            return nodes, _private_node("Gelu", root, [x, name]), {name: np.array(divisor)}
    return None


def _match_gelu_tanh(graph: _Graph, root: onnx.NodeProto):
    """x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3))) * 0.5."""
    for x, nodes, tanh in _half_x_one_plus(graph, root, "Tanh"):
        if len(graph.readers.get(tanh.input[0], ())) != 1:
            continue
        outer, inner = _product(graph, _factors(graph, tanh.input[0], nodes, top=True))
        if outer is None or outer != SQRT_HALF_PI or len(inner) != 1:
            continue
        add = graph.produced(inner[0], "Add")
        if add is None or x not in add.input or len(graph.readers.get(inner[0], ())) != 1:
            continue
        nodes.add(graph.index[id(add)])
        cubic = _other(add, x)
        if len(graph.readers.get(cubic, ())) != 1:
            continue
        factor, powers = _product(graph, _factors(graph, cubic, nodes, top=True))
        if factor is None or factor != GELU_CUBIC or powers != [x, x, x]:
            continue
        if graph.same_shape(x, root.output[0]):
            return nodes, _private_node("GeluTanh", root, [x]), {}
    return None
