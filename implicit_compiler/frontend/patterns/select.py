"""Folding ONNX's own function bodies of Elu, Selu and ThresholdedRelu back into one activation.

onnx's reference expansions (the ``*_expanded_ver18`` node tests, and models inlined with
``onnx.inliner``) write these activations with Less and Where on the input, constants cast like
x (CastLike):

=================== ==================================================== ==========================
pattern             decomposition matched (x a variable)                 becomes
=================== ==================================================== ==========================
Elu                 Where(Less(x, 0), alpha * (Exp(x) - 1), x)           elu(alpha)
Selu                Where(Less(x, 0), gamma * (alpha * Exp(x) - alpha),  selu(alpha, gamma)
                    gamma * x)
ThresholdedRelu     Where(Less(alpha, x), x, 0)                          thresholded_relu(alpha)
=================== ==================================================== ==========================

(each Mul in either operand order). Lowered as written, Where on a variable condition costs a
heaviside block and two square blocks (``ops/select.py``); folded, one componentwise block.

Exact: every constant is one value (a scalar, with or without its CastLike), 0 and 1 must be
exactly 0 and 1, Selu's two alphas and two gammas each the same value, and the activation takes
the graph's own alpha and gamma in float64 (``_is`` in ``patterns``: no rounding). Then the
activation computes what the graph computes at every x: x < 0 takes the exponential branch in
both, x >= 0 (and -0.0) the other; NaN gives NaN (elu, selu) or 0 (thresholded_relu, where
Less(alpha, NaN) is false) in both. The rounding differs only as alpha expm1(x) differs from
alpha (exp(x) - 1) (the activation's is the more accurate). The folded nodes are private ops
(``patterns.PATTERN_DOMAIN``) with alpha and gamma as float64 constant inputs, so that their
value is not rounded to a float32 attribute; ``FUNCTIONS`` gives each its ONNX definition.
The matchers follow ``patterns``' protocol: ``match(graph, root)`` gives (matched node indices,
the new node, new constants) or None; ``patterns.fold_patterns`` checks that the matched values
are read by nothing else.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...activations import Activation
from ..context import LoweringContext, NodeView
from ..ops.common import as_affine
from ..registry import PATTERN_DOMAIN, PATTERN_LOWERINGS, Lowering

# (pattern, what it becomes) for the op table (patterns.FOLDED)
FOLDED = (
    ("Elu: Where(Less(x, 0), alpha (Exp(x) - 1), x)", "one elu(alpha) block"),
    ("Selu: Where(Less(x, 0), gamma (alpha Exp(x) - alpha), gamma x)", "one selu(alpha, gamma) block"),
    ("ThresholdedRelu: Where(Less(alpha, x), x, 0)", "one thresholded_relu(alpha) block"),
)


def _scalar(graph, name: str, nodes: set[int]) -> float | None:
    """The value of a one-element constant ``name``, seen through a CastLike (added to ``nodes``)."""
    value = graph.const(name)
    cast = graph.produced(name, "CastLike")
    if value is None and cast is not None:
        value = graph.const(cast.input[0])
        if value is not None:
            nodes.add(graph.index[id(cast)])
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.ravel()[0])


def _node(graph, name: str, op_type: str, nodes: set[int]) -> onnx.NodeProto | None:
    """The ``op_type`` node producing ``name`` (added to ``nodes``), or None."""
    node = graph.produced(name, op_type)
    if node is not None:
        nodes.add(graph.index[id(node)])
    return node


def _scaled(graph, name: str, nodes: set[int]) -> tuple[float, str] | None:
    """(c, v) for name = Mul(c, v) or Mul(v, c), c a one-element constant."""
    mul = _node(graph, name, "Mul", nodes)
    if mul is None:
        return None
    for constant, variable in (mul.input, mul.input[::-1]):
        value = _scalar(graph, constant, nodes)
        if value is not None and graph.const(variable) is None:
            return value, variable
    return None


def _below_zero(graph, root: onnx.NodeProto, nodes: set[int]) -> str | None:
    """x for the condition Less(x, 0) of the Where ``root``."""
    less = _node(graph, root.input[0], "Less", nodes)
    if less is None or _scalar(graph, less.input[1], nodes) != 0.0 or graph.const(less.input[0]) is not None:
        return None
    return less.input[0]


def _exp_of(graph, name: str, x: str, nodes: set[int]) -> bool:
    exp = _node(graph, name, "Exp", nodes)
    return exp is not None and exp.input[0] == x


def _folded(graph, root: onnx.NodeProto, op_type: str, x: str, nodes: set[int], **values: float):
    """The match: the private node reading x and the constants (fresh float64 initializers)."""
    if not graph.same_shape(x, root.output[0]):
        return None
    base = root.name or root.output[0]
    constants = {graph.fresh(f"{base}/folded_{key}"): np.array(value) for key, value in values.items()}
    node = helper.make_node(
        op_type, [x, *constants], list(root.output), name=f"{base}/folded_{op_type}", domain=PATTERN_DOMAIN
    )
    return nodes, node, constants


def match_elu(graph, root: onnx.NodeProto):
    """Where(Less(x, 0), alpha * (Exp(x) - 1), x)."""
    if root.op_type != "Where" or root.domain not in ("", "ai.onnx"):
        return None
    nodes = {graph.index[id(root)]}
    x = _below_zero(graph, root, nodes)
    if x is None or root.input[2] != x:
        return None
    scaled = _scaled(graph, root.input[1], nodes)
    if scaled is None:
        return None
    alpha, difference = scaled
    sub = _node(graph, difference, "Sub", nodes)
    if sub is None or _scalar(graph, sub.input[1], nodes) != 1.0 or not _exp_of(graph, sub.input[0], x, nodes):
        return None
    return _folded(graph, root, "Elu", x, nodes, alpha=alpha)


def match_selu(graph, root: onnx.NodeProto):
    """Where(Less(x, 0), gamma * (alpha * Exp(x) - alpha), gamma * x)."""
    if root.op_type != "Where" or root.domain not in ("", "ai.onnx"):
        return None
    nodes = {graph.index[id(root)]}
    x = _below_zero(graph, root, nodes)
    positive, negative = (_scaled(graph, name, nodes) for name in root.input[2:0:-1])
    if x is None or positive is None or negative is None or positive[1] != x:
        return None
    gamma, (gamma_again, difference) = positive[0], negative
    sub = _node(graph, difference, "Sub", nodes)
    if sub is None or gamma_again != gamma:
        return None
    scaled = _scaled(graph, sub.input[0], nodes)
    if scaled is None or _scalar(graph, sub.input[1], nodes) != scaled[0]:
        return None
    alpha, exp = scaled
    if not _exp_of(graph, exp, x, nodes):
        return None
    return _folded(graph, root, "Selu", x, nodes, alpha=alpha, gamma=gamma)


def match_thresholded_relu(graph, root: onnx.NodeProto):
    """Where(Less(alpha, x), x, 0)."""
    if root.op_type != "Where" or root.domain not in ("", "ai.onnx"):
        return None
    nodes = {graph.index[id(root)]}
    less = _node(graph, root.input[0], "Less", nodes)
    if less is None or _scalar(graph, root.input[2], nodes) != 0.0:
        return None
    alpha, x = _scalar(graph, less.input[0], nodes), less.input[1]
    if alpha is None or root.input[1] != x or graph.const(x) is not None:
        return None
    return _folded(graph, root, "ThresholdedRelu", x, nodes, alpha=alpha)


MATCHERS = (match_elu, match_selu, match_thresholded_relu)


# ------------------------------------------------------------------------------ functions
def _function(op_type: str, parameters: list[str], body: list[onnx.NodeProto], opset: int) -> onnx.FunctionProto:
    constants = [
        helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value), name))
        for name, value in (("zero", 0.0), ("one", 1.0))
    ]
    return helper.make_function(
        PATTERN_DOMAIN, op_type, ["X", *parameters], ["Y"], constants + body, [helper.make_opsetid("", opset)], []
    )


def elu_function(opset: int) -> onnx.FunctionProto:
    """Elu(X, Alpha) = Where(X < 0, Alpha (Exp(X) - 1), X), in float64."""
    body = [
        helper.make_node("Less", ["X", "zero"], ["negative"]),
        helper.make_node("Exp", ["X"], ["e"]),
        helper.make_node("Sub", ["e", "one"], ["d"]),
        helper.make_node("Mul", ["Alpha", "d"], ["n"]),
        helper.make_node("Where", ["negative", "n", "X"], ["Y"]),
    ]
    return _function("Elu", ["Alpha"], body, opset)


def selu_function(opset: int) -> onnx.FunctionProto:
    """Selu(X, Alpha, Gamma) = Where(X < 0, Gamma (Alpha Exp(X) - Alpha), Gamma X), in float64."""
    body = [
        helper.make_node("Less", ["X", "zero"], ["negative"]),
        helper.make_node("Exp", ["X"], ["e"]),
        helper.make_node("Mul", ["Alpha", "e"], ["ae"]),
        helper.make_node("Sub", ["ae", "Alpha"], ["d"]),
        helper.make_node("Mul", ["Gamma", "d"], ["n"]),
        helper.make_node("Mul", ["Gamma", "X"], ["p"]),
        helper.make_node("Where", ["negative", "n", "p"], ["Y"]),
    ]
    return _function("Selu", ["Alpha", "Gamma"], body, opset)


def thresholded_relu_function(opset: int) -> onnx.FunctionProto:
    """ThresholdedRelu(X, Alpha) = Where(Alpha < X, X, 0), in float64."""
    body = [
        helper.make_node("Less", ["Alpha", "X"], ["above"]),
        helper.make_node("Where", ["above", "X", "zero"], ["Y"]),
    ]
    return _function("ThresholdedRelu", ["Alpha"], body, opset)


FUNCTIONS = {"Elu": elu_function, "Selu": selu_function, "ThresholdedRelu": thresholded_relu_function}


# ------------------------------------------------------------------------------ lowering
def _lowering(op_type: str, name: str) -> Lowering:
    """One ``name`` block with the folded constants (inputs 1, 2) as its alpha (and beta)."""

    def lower(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
        parameters = [float(np.asarray(value).ravel()[0]) for value in inputs[1:]]
        return [ctx.create_block(as_affine(inputs[0], ctx.width), Activation(name, *parameters))]

    lower.__name__ = f"lower_folded_{name}"
    lower.__doc__ = f"{op_type} folded from its function body: one {name} block."
    return Lowering(op_type, 1, lower, frozenset(), __name__)


for _op_type, _name in (("Elu", "elu"), ("Selu", "selu"), ("ThresholdedRelu", "thresholded_relu")):
    PATTERN_LOWERINGS[_op_type] = _lowering(_op_type, _name)
