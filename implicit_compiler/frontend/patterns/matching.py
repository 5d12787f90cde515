"""Helpers every matcher shares: exact constants, flattened products, the new private node."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..registry import PATTERN_DOMAIN
from .graph_index import _Graph


def _is(value: np.ndarray | None, exact: float) -> bool:
    """A one-element constant equal to ``exact`` (in float64: a fold must compute what the graph
    computes, to the last bit of its constants; a float32-rounded sqrt(2/pi) is not folded)."""
    return value is not None and value.size == 1 and float(value.ravel()[0]) == exact


def _near(value: np.ndarray | None, exact: float) -> bool:
    """A one-element constant that rounds to the same float32 as ``exact`` (GELU's sqrt 2, which
    the fold keeps as the graph has it: ``_match_gelu``)."""
    return value is not None and value.size == 1 and np.float32(value.ravel()[0]) == np.float32(exact)


def _factors(graph: _Graph, name: str, used: set[int], top: bool = False) -> list[str]:
    """The operands of a product of Muls (and of Pow(x, 3): x three times), flattened through
    the Muls whose output nothing else reads; the nodes gone through are added to ``used``."""
    node = graph.produced(name, "Mul")
    power = graph.produced(name, "Pow")
    if not top and len(graph.readers.get(name, ())) != 1:
        return [name]
    if node is not None and len(node.input) == 2:
        used.add(graph.index[id(node)])
        return _factors(graph, node.input[0], used) + _factors(graph, node.input[1], used)
    if power is not None and _exactly(graph.const(power.input[1]), 3.0):
        used.add(graph.index[id(power)])
        return [power.input[0]] * 3
    return [name]


def _product(graph: _Graph, names: list[str]) -> tuple[float | None, list[str]]:
    """(the product of the constant factors: 1.0 when there is none, None when one is not a
    scalar; the variable factors)."""
    constants = [graph.const(name) for name in names if graph.const(name) is not None]
    variables = [name for name in names if graph.const(name) is None]
    if any(value.size != 1 for value in constants):
        return None, variables
    return float(np.prod([value.ravel()[0] for value in constants])), variables


def _one_plus(graph: _Graph, name: str, op_type: str, used: set[int]) -> onnx.NodeProto | None:
    """The ``op_type`` node t in name = Add(1, t) (either order), or None."""
    add = graph.produced(name, "Add")
    if add is None:
        return None
    for one, other in (add.input, reversed(add.input)):
        inner = graph.produced(other, op_type)
        if _is(graph.const(one), 1.0) and inner is not None:
            used.update((graph.index[id(add)], graph.index[id(inner)]))
            return inner
    return None


def _two_variables(graph: _Graph, root: onnx.NodeProto, scale: float):
    """For a Mul root: (the nodes used, [(x, t), (t, x)]) when its flattened product is two
    variables times constants of product ``scale`` (1: none, or ones), else None."""
    if root.op_type != "Mul" or root.domain not in ("", "ai.onnx"):
        return None
    used: set[int] = set()
    product, variables = _product(graph, _factors(graph, root.output[0], used, top=True))
    if len(variables) != 2 or product is None or product != scale:
        return None
    return used, [(variables[0], variables[1]), (variables[1], variables[0])]


def _private_node(op_type: str, root: onnx.NodeProto, inputs: list[str], **attributes):
    name = root.name or root.output[0]
    return helper.make_node(
        op_type, inputs, list(root.output), name=f"{name}/folded_{op_type}", domain=PATTERN_DOMAIN, **attributes
    )


def _other(node: onnx.NodeProto, name: str) -> str:
    """The other operand of a two-operand node."""
    return node.input[1] if node.input[0] == name else node.input[0]


def _exactly(value: np.ndarray | None, number: float) -> bool:
    return value is not None and value.size == 1 and float(value.ravel()[0]) == number
