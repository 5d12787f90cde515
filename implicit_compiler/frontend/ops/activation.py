"""Activations: each creates a state block (or two) with a componentwise phi.

    Relu(z)          = relu(z)                                   one block, phi = relu
    LeakyRelu(z)     = leaky_relu_alpha(z)                       one block
    Sigmoid, Tanh    = sigmoid(z), tanh(z)                       one block
    PRelu(z; s)      = leaky_relu_s(z) when the slope s is one scalar;
                       relu(z) - s * relu(-z) otherwise          (two relu blocks, exact)
    Clip(z; lo, hi)  = lo + relu(z - lo) - relu(z - hi)          (lo, hi finite)
                     = lo + relu(z - lo)                         (no upper bound)
                     = hi - relu(hi - z)                         (no lower bound)

The slope of PRelu and the bounds of Clip must be constants. Before opset 7 a 1-D PRelu slope
of C values is per channel (axis 1).
"""

from __future__ import annotations

import numpy as np

from ...errors import GraphError
from ..context import LoweringContext, NodeView, Value
from ..registry import lowers
from .common import as_affine, optional_input, require_constant


def _activate(ctx: LoweringContext, value: Value, activation: str) -> list:
    return [ctx.create_block(as_affine(value, ctx.width), activation)]


@lowers("Relu")
def lower_relu(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """relu(z): one block."""
    return _activate(ctx, inputs[0], "relu")


@lowers("Sigmoid")
def lower_sigmoid(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """sigmoid(z): one block."""
    return _activate(ctx, inputs[0], "sigmoid")


@lowers("Tanh")
def lower_tanh(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """tanh(z): one block."""
    return _activate(ctx, inputs[0], "tanh")


@lowers("LeakyRelu", attributes=("alpha",))
def lower_leaky_relu(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """leaky_relu(z) with the node's alpha (default 0.01): one block."""
    alpha = float(node.attr("alpha", 0.01))
    return _activate(ctx, inputs[0], f"leaky_relu({alpha!r})")


@lowers("PRelu")
def lower_prelu(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """leaky_relu(z) for one scalar slope, else relu(z) - s * relu(-z): one or two blocks."""
    z = as_affine(inputs[0], ctx.width)
    slope = np.asarray(require_constant(inputs[1], node, "the slope (input 1)"), dtype=np.float64)
    slope = _legacy_channel_slope(node, slope, z.shape)
    try:
        shape = np.broadcast_shapes(z.shape, slope.shape)
    except ValueError:
        raise GraphError(f"{node.where}: slope shape {slope.shape} does not broadcast to input {z.shape}") from None
    z = z.broadcast_to(shape)
    flat = slope.ravel()
    if flat.size > 0 and np.all(flat == flat[0]):
        return [ctx.create_block(z, f"leaky_relu({float(flat[0])!r})")]
    positive = ctx.create_block(z, "relu", name=f"{node.proto.output[0]}/positive")
    negative = ctx.create_block(-z, "relu", name=f"{node.proto.output[0]}/negative")
    return [positive - negative.scale(slope)]


def _legacy_channel_slope(node: NodeView, slope: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Before opset 7 (no broadcasting), a 1-D slope of C values is one slope per channel, axis 1
    of (N, C, ...) (Caffe2's PRelu; pytorch exported PReLU(num_parameters=C) so): reshaped to
    (C, 1, ...) to broadcast."""
    if node.opset < 7 and slope.ndim == 1 and slope.size > 1 and len(shape) >= 2 and shape[1] == slope.size:
        return slope.reshape((slope.size,) + (1,) * (len(shape) - 2))
    return slope


@lowers("Clip", attributes=("min", "max"))
def lower_clip(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """lo + relu(z - lo) - relu(z - hi): one relu block per finite bound."""
    z = as_affine(inputs[0], ctx.width)
    if node.opset < 11:
        low, high = node.attr("min", -np.inf), node.attr("max", np.inf)
    else:
        low_value, high_value = optional_input(inputs, 1), optional_input(inputs, 2)
        low = -np.inf if low_value is None else float(require_constant(low_value, node, "min (input 1)"))
        high = np.inf if high_value is None else float(require_constant(high_value, node, "max (input 2)"))
    low, high = float(low), float(high)
    output = node.proto.output[0]
    if np.isfinite(low) and np.isfinite(high):
        if low > high:  # ONNX: every output equals max
            return [as_affine(np.full(z.shape, high), ctx.width)]
        above_low = ctx.create_block(z.shift(-low), "relu", name=f"{output}/above_min")
        above_high = ctx.create_block(z.shift(-high), "relu", name=f"{output}/above_max")
        return [(above_low - above_high).shift(low)]
    if np.isfinite(low):
        return [ctx.create_block(z.shift(-low), "relu").shift(low)]
    if np.isfinite(high):
        return [(-ctx.create_block((-z).shift(high), "relu")).shift(high)]
    return [z]
