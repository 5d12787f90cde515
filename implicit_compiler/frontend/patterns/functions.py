"""Each private op's definition, a model-local ONNX function: the rewritten graph stays a valid
model (shape inference goes through it; onnxruntime and onnx.reference run it)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import GraphError
from ..registry import PATTERN_DOMAIN
from .gelu import GELU_CUBIC, SQRT_HALF_PI
from .select import FUNCTIONS as SELECT_FUNCTIONS

INTS = onnx.AttributeProto.INTS


def _function(op_type: str, opset: int) -> onnx.FunctionProto:
    """The model-local function defining a private op, in float64 (the prepared model's type),
    in ops of the model's own opset."""
    if op_type in SELECT_FUNCTIONS:
        return SELECT_FUNCTIONS[op_type](opset)

    def constant(name: str, value: float) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value), name))

    inputs, attributes = ["X"], []
    if op_type == "Silu":
        body = [helper.make_node("Sigmoid", ["X"], ["s"]), helper.make_node("Mul", ["X", "s"], ["Y"])]
    elif op_type == "Mish":
        body = [
            helper.make_node("Softplus", ["X"], ["p"]),
            helper.make_node("Tanh", ["p"], ["t"]),
            helper.make_node("Mul", ["X", "t"], ["Y"]),
        ]
    elif op_type == "HardSwish":
        body = [
            helper.make_node("HardSigmoid", ["X"], ["h"], alpha=1 / 6, beta=0.5),
            helper.make_node("Mul", ["X", "h"], ["Y"]),
        ]
    elif op_type == "Gelu":  # x (1 + erf(x / c)) / 2, c the graph's (float32-rounded) sqrt 2
        inputs = ["X", "C"]
        body = [
            constant("one", 1.0),
            constant("half", 0.5),
            helper.make_node("Div", ["X", "C"], ["z"]),
            helper.make_node("Erf", ["z"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["a"]),
            helper.make_node("Mul", ["X", "half"], ["h"]),
            helper.make_node("Mul", ["h", "a"], ["Y"]),
        ]
    elif op_type == "GeluTanh":  # x (1 + tanh(c (x + 0.044715 x^3))) / 2
        body = [
            constant("c", SQRT_HALF_PI),
            constant("k", GELU_CUBIC),
            constant("one", 1.0),
            constant("half", 0.5),
            helper.make_node("Mul", ["X", "X"], ["x2"]),
            helper.make_node("Mul", ["x2", "X"], ["x3"]),
            helper.make_node("Mul", ["x3", "k"], ["kx3"]),
            helper.make_node("Add", ["X", "kx3"], ["inner"]),
            helper.make_node("Mul", ["inner", "c"], ["z"]),
            helper.make_node("Tanh", ["z"], ["t"]),
            helper.make_node("Add", ["t", "one"], ["a"]),
            helper.make_node("Mul", ["X", "half"], ["h"]),
            helper.make_node("Mul", ["h", "a"], ["Y"]),
        ]
    elif op_type == "LayerNormalization":  # (x - mean) / sqrt(var + eps) * scale + bias
        inputs, attributes = ["X", "Scale", "B"], ["axes", "epsilon"]
        eps = _referring(helper.make_node("Constant", [], ["eps"]), "value", "epsilon", onnx.AttributeProto.TENSOR)
        body = [eps, *_reduce_mean("X", "mean", opset), helper.make_node("Sub", ["X", "mean"], ["d"])]
        body += [helper.make_node("Mul", ["d", "d"], ["d2"]), *_reduce_mean("d2", "var", opset)]
        body += [
            helper.make_node("Add", ["var", "eps"], ["ve"]),
            helper.make_node("Sqrt", ["ve"], ["sd"]),
            helper.make_node("Div", ["d", "sd"], ["n"]),
            helper.make_node("Mul", ["n", "Scale"], ["ns"]),
            helper.make_node("Add", ["ns", "B"], ["Y"]),
        ]
    else:
        raise GraphError(f"no function for the private op {op_type!r}")
    return helper.make_function(
        PATTERN_DOMAIN, op_type, inputs, ["Y"], body, [helper.make_opsetid("", opset)], attributes
    )


def _reduce_mean(source: str, target: str, opset: int) -> list[onnx.NodeProto]:
    """ReduceMean over the node's ``axes`` attribute, keepdims: an attribute below opset 18, an input from."""
    if opset < 18:
        return [_referring(helper.make_node("ReduceMean", [source], [target]), "axes", "axes", INTS)]
    axes = _referring(helper.make_node("Constant", [], [f"{target}_axes"]), "value_ints", "axes", INTS)
    return [axes, helper.make_node("ReduceMean", [source, f"{target}_axes"], [target])]


def _referring(node: onnx.NodeProto, name: str, function_attribute: str, kind: int) -> onnx.NodeProto:
    """``node`` with its attribute ``name`` taken from the function's ``function_attribute``."""
    node.attribute.append(onnx.AttributeProto(name=name, ref_attr_name=function_attribute, type=kind))
    return node
