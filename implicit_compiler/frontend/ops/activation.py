"""Activations: each creates a state block (or two) with a componentwise phi.

    Relu(z)          = relu(z)                                   one block, phi = relu
    LeakyRelu(z)     = leaky_relu_alpha(z)                       one block
    Sigmoid, Tanh    = sigmoid(z), tanh(z)                       one block
    PRelu(z; s)      = leaky_relu_s(z) when the slope s is one scalar;
                       relu(z) - s * relu(-z) otherwise          (two relu blocks, exact)
    Clip(z; lo, hi)  = lo + relu(z - lo) - relu(z - hi)          (lo, hi finite)
                     = lo + relu(z - lo)                         (no upper bound)
                     = hi - relu(hi - z)                         (no lower bound)
    Abs(z)           = relu(z) + relu(-z)                        two relu blocks
    Exp, Log, Sqrt, Reciprocal, Erf, Softplus, Softsign, HardSwish, Mish
                     = exp, log, sqrt, reciprocal, erf, ...      one block of that activation
    Gelu(z)          = gelu(z) (approximate 'none'), gelu_tanh(z) ('tanh')
    Swish(z; alpha)  = silu(alpha z) / alpha                     one silu block (z / 2 if alpha = 0)
    Elu, Selu, Celu, HardSigmoid, ThresholdedRelu
                     = elu(alpha), selu(alpha, gamma), celu(alpha), hard_sigmoid(alpha, beta),
                       thresholded_relu(alpha)                   one block, the node's parameters
                                                                 (the schema's defaults, float32
                                                                 values, where absent)

The slope of PRelu and the bounds of Clip must be constants. Before opset 7 a 1-D PRelu slope
of C values is per channel (axis 1).
"""

from __future__ import annotations

import numpy as np
import onnx

from ...activations import Activation
from ...errors import GraphError
from ..context import LoweringContext, NodeView, Value
from ..registry import lowers
from .common import as_affine, optional_input, require_constant


def _activate(ctx: LoweringContext, value: Value, activation: str | Activation) -> list:
    return [ctx.create_block(as_affine(value, ctx.width), activation)]


def _float_attribute(node: NodeView, name: str) -> float:
    """The node's float attribute, or its schema's default where absent: the float32 value
    (0.2 as 0.20000000298...) that onnxruntime and onnx.reference use."""
    value = node.attr(name)
    if value is None:
        schema = onnx.defs.get_schema(node.op_type, max_inclusive_version=node.opset, domain="")
        value = onnx.helper.get_attribute_value(schema.attributes[name].default_value)
    return float(value)


def _register_unary(op_type: str, activation: str) -> None:
    """One block of ``activation`` for an op without attributes (but opset 1's consumed_inputs)."""

    def lower(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
        return _activate(ctx, inputs[0], activation)

    lower.__name__ = f"lower_{activation}"
    lower.__doc__ = f"{activation}(z): one block."
    lowers(op_type, attributes=("consumed_inputs",))(lower)


for _op_type, _activation in {
    "Exp": "exp",
    "Log": "log",
    "Sqrt": "sqrt",
    "Reciprocal": "reciprocal",
    "Erf": "erf",
    "Softplus": "softplus",
    "Softsign": "softsign",
    "HardSwish": "hard_swish",
    "Mish": "mish",
}.items():
    _register_unary(_op_type, _activation)


@lowers("Abs", attributes=("consumed_inputs",))
def lower_abs(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """|z| = relu(z) + relu(-z): two relu blocks."""
    z = as_affine(inputs[0], ctx.width)
    output = node.proto.output[0]
    positive = ctx.create_block(z, "relu", name=f"{output}/positive")
    negative = ctx.create_block(-z, "relu", name=f"{output}/negative")
    return [positive + negative]


@lowers("Gelu", attributes=("approximate",))
def lower_gelu(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """gelu(z) = z Phi(z), or its tanh approximation (approximate='tanh'): one block."""
    approximate = node.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise node.unsupported("approximate", approximate, "expected 'none' or 'tanh'")
    return _activate(ctx, inputs[0], "gelu" if approximate == "none" else "gelu_tanh")


@lowers("Elu", attributes=("alpha", "consumed_inputs"))
def lower_elu(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """elu(z) with the node's alpha: one block."""
    return _activate(ctx, inputs[0], Activation("elu", _float_attribute(node, "alpha")))


@lowers("Selu", attributes=("alpha", "gamma", "consumed_inputs"))
def lower_selu(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """selu(z) with the node's alpha and gamma: one block."""
    parameters = _float_attribute(node, "alpha"), _float_attribute(node, "gamma")
    return _activate(ctx, inputs[0], Activation("selu", *parameters))


@lowers("Celu", attributes=("alpha",))
def lower_celu(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """celu(z) = max(z, 0) + min(0, alpha (exp(z / alpha) - 1)): one block."""
    alpha = _float_attribute(node, "alpha")
    if alpha == 0:
        raise node.unsupported("alpha", alpha, "Celu divides by alpha: expected a non-zero alpha")
    return _activate(ctx, inputs[0], Activation("celu", alpha))


@lowers("HardSigmoid", attributes=("alpha", "beta", "consumed_inputs"))
def lower_hard_sigmoid(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """max(0, min(1, alpha z + beta)): one block."""
    parameters = _float_attribute(node, "alpha"), _float_attribute(node, "beta")
    return _activate(ctx, inputs[0], Activation("hard_sigmoid", *parameters))


@lowers("Swish", attributes=("alpha",))
def lower_swish(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """z sigmoid(alpha z) = silu(alpha z) / alpha: one silu block (z / 2 for alpha = 0)."""
    z = as_affine(inputs[0], ctx.width)
    alpha = _float_attribute(node, "alpha")
    if alpha == 0:
        return [z.scale(np.full(z.shape, 0.5))]
    return [ctx.create_block(z.scale(np.full(z.shape, alpha)), "silu").scale(np.full(z.shape, 1 / alpha))]


@lowers("ThresholdedRelu", attributes=("alpha",))
def lower_thresholded_relu(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """z where z > alpha, else 0: one block."""
    return _activate(ctx, inputs[0], Activation("thresholded_relu", _float_attribute(node, "alpha")))


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
