"""Lowering the private ops: each by the registry's lowering of the standard op it names
(``STANDARD``), given a node of that op; ``Silu`` (which ONNX has no op for), to one silu block."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import UnsupportedOpError
from ..context import LoweringContext, NodeView
from ..ops.common import as_affine
from ..registry import PATTERN_LOWERINGS, Lowering, find_lowering
from .catalog import STANDARD


def standard_node(node: onnx.NodeProto) -> onnx.NodeProto:
    """The default-domain node of the standard op a private node stands for (STANDARD)."""
    op_type, _ = STANDARD[node.op_type]
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "LayerNormalization":
        epsilon = float(numpy_helper.to_array(attributes["epsilon"]))
        extra = {"axis": int(attributes["axes"][0]), "epsilon": epsilon}
    elif node.op_type in ("Gelu", "GeluTanh"):
        extra = {"approximate": "tanh" if node.op_type == "GeluTanh" else "none"}
    else:
        extra = {}
    inputs = list(node.input)[:1] if node.op_type == "Gelu" else list(node.input)  # (Gelu's divisor: _delegate)
    return helper.make_node(op_type, inputs, list(node.output), name=node.name, **extra)


def _delegate(private: str) -> Lowering:
    """The private op's lowering: the registry's lowering of its standard op, on the standard node."""
    op_type, version = STANDARD[private]

    def view(node: NodeView) -> NodeView:
        return NodeView(standard_node(node.proto), version, node.index)

    def standard(node: NodeView) -> Lowering:
        try:
            return find_lowering(op_type, "", version, node.where)
        except UnsupportedOpError as error:
            raise UnsupportedOpError(
                f"{node.where}: folded from its exporter's decomposition into {op_type} (opset {version}), "
                f"which has no lowering here ({error})"
            ) from error

    def check(node: NodeView) -> None:
        lowering, standard_view = standard(node), view(node)
        unknown = set(standard_view.attributes) - (lowering.attributes or set(standard_view.attributes))
        if unknown:
            raise standard_view.unsupported(sorted(unknown)[0], None, f"{op_type} is lowered without it")
        if lowering.check is not None:
            lowering.check(standard_view)

    def lower(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
        if private != "Gelu":
            return standard(node).function(ctx, view(node), inputs)
        # x (1 + erf(x / c)) / 2 = a gelu(x / a) exactly, a = c / sqrt 2: the graph's own c (its
        # float32 sqrt 2 would leave the exact gelu 5e-8 away from what the graph computes)
        x = as_affine(inputs[0], ctx.width)
        a = float(np.asarray(inputs[1]).ravel()[0]) / math.sqrt(2)
        (y,) = standard(node).function(ctx, view(node), [x.scale(np.full(x.shape, 1 / a))])
        return [as_affine(y, ctx.width).scale(np.full(x.shape, a))]

    lower.__doc__ = f"{private}: the lowering of {op_type}-{version}."
    attributes = {"LayerNormalization": ("axes", "epsilon")}.get(private, ())
    return Lowering(private, 1, lower, frozenset(attributes), __name__, check)


def lower_silu(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """x * sigmoid(x) folded: one silu block."""
    return [ctx.create_block(as_affine(inputs[0], ctx.width), "silu")]


PATTERN_LOWERINGS["Silu"] = Lowering("Silu", 1, lower_silu, frozenset(), __name__)
for _private in STANDARD:
    PATTERN_LOWERINGS[_private] = _delegate(_private)
