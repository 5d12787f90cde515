"""LRN, local response normalization across channels (AlexNet, GoogLeNet), lowered exactly.

For X of shape (N, C, D1, ..., Dk), ONNX defines (opsets 1 and 13, the same function)

    square_sum[n, c, d] = sum of X[n, i, d]^2 for i from max(0, c - floor((size - 1) / 2))
                                                  to min(C - 1, c + ceil((size - 1) / 2))
    Y = X / (bias + alpha / size * square_sum) ** beta

which is, with the bricks the other lowerings use:

    s = x^2                                one ``square`` block
    d = bias + alpha / size * W s          affine: W sums each channel window (a sparse 0/1 map)
    r = d ** -beta                         one ``power(-beta)`` block (rsqrt for beta = 1/2,
                                           reciprocal for 1, nothing for 0: ``elementwise._power``)
    y = x * r                              the product of two variables, through the exact square
                                           identity with its balancing (``elementwise.product``)

so four blocks of the input's size, all componentwise. alpha, beta and bias are the node's
(float32) attributes as onnxruntime and onnx.reference read them (defaults 1e-4, 0.75, 1, as
float32).
Where d <= 0 (a negative bias) d ** -beta is what IEEE pow gives (NaN or inf), as in ONNX.
"""

from __future__ import annotations

import numpy as np
import onnx
import scipy.sparse as sp

from ...errors import GraphError
from ..context import LoweringContext, NodeView
from ..registry import lowers
from .common import Affine, as_affine
from .elementwise import _power, product


def _attribute(node: NodeView, name: str) -> float:
    """The float attribute, or its schema's default (the float32 value, 1e-4 as 9.99999974e-05,
    that onnxruntime and onnx.reference use)."""
    value = node.attr(name)
    if value is None:
        schema = onnx.defs.get_schema(node.op_type, max_inclusive_version=node.opset, domain="")
        value = onnx.helper.get_attribute_value(schema.attributes[name].default_value)
    return float(value)


def check_size(node: NodeView) -> None:
    """``size``, the channel window, is required and a positive integer."""
    size = node.attr("size")
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise node.unsupported("size", size, "LRN needs its window size, a positive integer (e.g. size=5)")


def window_sum(x: Affine, size: int) -> Affine:
    """W x: each entry the sum of x over its channel window (axis 1), as ONNX's LRN defines it."""
    ids = np.arange(x.size).reshape(x.shape)
    channels, before, after = x.shape[1], (size - 1) // 2, size // 2  # floor and ceil of (size - 1) / 2
    rows, columns = [], []
    for shift in range(-before, after + 1):
        for channel in range(max(0, -shift), min(channels, channels - shift)):
            rows.append(ids[:, channel].ravel())
            columns.append(ids[:, channel + shift].ravel())
    rows, columns = np.concatenate(rows), np.concatenate(columns)
    matrix = sp.csr_array((np.ones(rows.size), (rows, columns)), shape=(x.size, x.size))
    return x.map(matrix, x.shape)


@lowers("LRN", attributes=("alpha", "beta", "bias", "size"), check=check_size)
def lower_lrn(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """x * (bias + alpha / size * window sum of x^2) ** -beta: square, power and product blocks."""
    x = as_affine(inputs[0], ctx.width)
    if x.ndim < 2:
        raise GraphError(f"{node.where}: expected an input of rank >= 2 (N, C, ...), got shape {x.shape}")
    size = int(node.attr("size"))
    alpha, beta, bias = (_attribute(node, name) for name in ("alpha", "beta", "bias"))
    output = node.proto.output[0]
    squares = ctx.create_block(x, "square", name=f"{output}/square")
    denominator = window_sum(squares, size).scale(np.full(x.shape, alpha / size)).shift(np.full(x.shape, bias))
    factor = _power(ctx, denominator, -beta, f"{output}/power")
    return [product(ctx, x, factor, output)]
