"""Each activation of ``implicit_compiler.activations`` as ONNX ops, exactly as defined there.

ONNX's own op is used where it computes phi (so that ``from_onnx`` reads it back as one
block); its float attributes are float32, so a parameter goes in an attribute only when the
model computes in float32 (the runtime rounds parameters to the dtype too) or the parameter is
a float32 number; otherwise the formula is written with constants in the model's dtype. Ops of
later opsets (Gelu 20, Mish 18, HardSwish 14) are written as their formulas before them.

================= ==================================================================
activation        ONNX
================= ==================================================================
identity          (none)
relu              Relu
leaky_relu(a)     LeakyRelu(a), or Relu(z) - a Relu(-z) (exact: one term is 0)
tanh, sigmoid     Tanh, Sigmoid
exp, log, sqrt    Exp, Log, Sqrt; reciprocal: Reciprocal; erf: Erf
rsqrt             Reciprocal(Sqrt(z))
square            z * z
power(p)          Pow(z, p)
gelu              Gelu (opset 20), or z * (1 + Erf(z / sqrt 2)) * 0.5
gelu_tanh         Gelu(approximate='tanh') (opset 20), or z * (1 + Tanh(c (z + 0.044715 z^3))) * 0.5
elu(a)            Elu(a), or Where(z < 0, a (Exp(z) - 1), z)
selu(a, g)        Selu(a, g), or Where(z < 0, g (a Exp(z) - a), g z)
celu(a)           Celu(a), or Relu(z) + Min(0, a (Exp(Min(z, 0) / a) - 1))
softplus          Softplus; softsign: Softsign
hard_sigmoid(a,b) HardSigmoid(a, b), or Clip(a z + b, 0, 1)
hard_swish        HardSwish (opset 14), or z * Clip(z / 6 + 1/2, 0, 1)
silu              z * Sigmoid(z)
mish              Mish (opset 18), or z * Tanh(Softplus(z))
thresholded_relu  ThresholdedRelu(a), or Where(a < z, z, 0)
heaviside(h)      Cast(z > 0) + h Cast(z == 0) (NaN -> 0, as phi)
log_positive      Where(z > 0, Max(Log(z), L), Where(IsNaN(z), z, L)), L = log(2**-1022)
================= ==================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..activations import GELU_TANH_CUBIC, GELU_TANH_SCALE, LOG_POSITIVE_FLOOR, Activation
from .onnx_graph import GraphWriter

LOG_POSITIVE_LEAST = math.log(LOG_POSITIVE_FLOOR)


def apply_activation(g: GraphWriter, z: str, phi: Activation, hint: str) -> str:
    """phi(z) for an (N, m) tensor z."""
    return ACTIVATIONS[phi.name](g, z, phi, hint)


def _in_attribute(g: GraphWriter, *parameters: float) -> bool:
    """Whether float32 attributes hold the parameters as the model computes with them."""
    return g.dtype == np.float32 or all(float(np.float32(p)) == p for p in parameters)


def _unary(op: str) -> Callable[[GraphWriter, str, Activation, str], str]:
    def write(g: GraphWriter, z: str, phi: Activation, hint: str) -> str:
        return g.node(op, [z], hint)

    return write


def _identity(g, z, phi, hint):
    return z


def _leaky_relu(g, z, phi, hint):
    if _in_attribute(g, phi.alpha):
        return g.node("LeakyRelu", [z], hint, alpha=phi.alpha)
    negative = g.node("Relu", [g.node("Neg", [z], hint)], hint)
    return g.node("Sub", [g.node("Relu", [z], hint), g.node("Mul", [negative, g.scalar(phi.alpha)], hint)], hint)


def _rsqrt(g, z, phi, hint):
    return g.node("Reciprocal", [g.node("Sqrt", [z], hint)], hint)


def _square(g, z, phi, hint):
    return g.node("Mul", [z, z], hint)


def _power(g, z, phi, hint):
    return g.node("Pow", [z, g.scalar(phi.alpha)], hint)


def _half_z_one_plus(g, z, gate, hint):
    """z * (1 + gate) * 0.5 (GELU's two forms, as ``from_onnx`` folds them back)."""
    return g.node("Mul", [g.node("Mul", [z, g.node("Add", [g.scalar(1.0), gate], hint)], hint), g.scalar(0.5)], hint)


def _gelu(g, z, phi, hint):
    if g.opset >= 20:
        return g.node("Gelu", [z], hint)
    erf = g.node("Erf", [g.node("Div", [z, g.scalar(math.sqrt(2))], hint)], hint)
    return _half_z_one_plus(g, z, erf, hint)


def _gelu_tanh(g, z, phi, hint):
    if g.opset >= 20:
        return g.node("Gelu", [z], hint, approximate="tanh")
    cube = g.node("Mul", [z, g.node("Mul", [z, z], hint)], hint)
    inner = g.node("Add", [z, g.node("Mul", [g.scalar(GELU_TANH_CUBIC), cube], hint)], hint)
    gate = g.node("Tanh", [g.node("Mul", [g.scalar(GELU_TANH_SCALE), inner], hint)], hint)
    return _half_z_one_plus(g, z, gate, hint)


def _exp_minus_one(g, z, hint):
    return g.node("Sub", [g.node("Exp", [z], hint), g.scalar(1.0)], hint)


def _negative(g, z, hint):
    return g.node("Less", [z, g.scalar(0.0)], hint)


def _elu(g, z, phi, hint):
    if _in_attribute(g, phi.alpha):
        return g.node("Elu", [z], hint, alpha=phi.alpha)
    below = g.node("Mul", [g.scalar(phi.alpha), _exp_minus_one(g, z, hint)], hint)
    return g.node("Where", [_negative(g, z, hint), below, z], hint)


def _selu(g, z, phi, hint):
    if _in_attribute(g, phi.alpha, phi.beta):
        return g.node("Selu", [z], hint, alpha=phi.alpha, gamma=phi.beta)
    scaled_exp = g.node("Mul", [g.scalar(phi.alpha), g.node("Exp", [z], hint)], hint)
    below = g.node("Mul", [g.scalar(phi.beta), g.node("Sub", [scaled_exp, g.scalar(phi.alpha)], hint)], hint)
    above = g.node("Mul", [g.scalar(phi.beta), z], hint)
    return g.node("Where", [_negative(g, z, hint), below, above], hint)


def _celu(g, z, phi, hint):
    if _in_attribute(g, phi.alpha):
        return g.node("Celu", [z], hint, alpha=phi.alpha)
    shrunk = g.node("Div", [g.node("Min", [z, g.scalar(0.0)], hint), g.scalar(phi.alpha)], hint)
    below = g.node("Mul", [g.scalar(phi.alpha), _exp_minus_one(g, shrunk, hint)], hint)
    return g.node("Add", [g.node("Relu", [z], hint), g.node("Min", [below, g.scalar(0.0)], hint)], hint)


def _hard_sigmoid(g, z, phi, hint):
    if _in_attribute(g, phi.alpha, phi.beta):
        return g.node("HardSigmoid", [z], hint, alpha=phi.alpha, beta=phi.beta)
    affine = g.node("Add", [g.node("Mul", [z, g.scalar(phi.alpha)], hint), g.scalar(phi.beta)], hint)
    return g.node("Clip", [affine, g.scalar(0.0), g.scalar(1.0)], hint)


def _hard_swish(g, z, phi, hint):
    if g.opset >= 14:
        return g.node("HardSwish", [z], hint)
    affine = g.node("Add", [g.node("Mul", [z, g.scalar(1 / 6)], hint), g.scalar(0.5)], hint)
    return g.node("Mul", [z, g.node("Clip", [affine, g.scalar(0.0), g.scalar(1.0)], hint)], hint)


def _silu(g, z, phi, hint):
    return g.node("Mul", [z, g.node("Sigmoid", [z], hint)], hint)


def _mish(g, z, phi, hint):
    if g.opset >= 18:
        return g.node("Mish", [z], hint)
    return g.node("Mul", [z, g.node("Tanh", [g.node("Softplus", [z], hint)], hint)], hint)


def _thresholded_relu(g, z, phi, hint):
    if _in_attribute(g, phi.alpha):
        return g.node("ThresholdedRelu", [z], hint, alpha=phi.alpha)
    above = g.node("Less", [g.scalar(phi.alpha), z], hint)
    return g.node("Where", [above, z, g.scalar(0.0)], hint)


def _heaviside(g, z, phi, hint):
    step = g.node("Cast", [g.node("Greater", [z, g.scalar(0.0)], hint)], hint, to=g.elem_type)
    if phi.alpha == 0:
        return step
    at_zero = g.node("Cast", [g.node("Equal", [z, g.scalar(0.0)], hint)], hint, to=g.elem_type)
    if phi.alpha != 1:
        at_zero = g.node("Mul", [at_zero, g.scalar(phi.alpha)], hint)
    return g.node("Add", [step, at_zero], hint)


def _log_positive(g, z, phi, hint):
    least = g.scalar(LOG_POSITIVE_LEAST)
    positive = g.node("Greater", [z, g.scalar(0.0)], hint)
    logarithm = g.node("Max", [g.node("Log", [z], hint), least], hint)
    otherwise = g.node("Where", [g.node("IsNaN", [z], hint), z, least], hint)
    return g.node("Where", [positive, logarithm, otherwise], hint)


ACTIVATIONS: dict[str, Callable[[GraphWriter, str, Activation, str], str]] = {
    "identity": _identity,
    "relu": _unary("Relu"),
    "leaky_relu": _leaky_relu,
    "tanh": _unary("Tanh"),
    "sigmoid": _unary("Sigmoid"),
    "square": _square,
    "exp": _unary("Exp"),
    "log": _unary("Log"),
    "reciprocal": _unary("Reciprocal"),
    "sqrt": _unary("Sqrt"),
    "rsqrt": _rsqrt,
    "erf": _unary("Erf"),
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "elu": _elu,
    "selu": _selu,
    "celu": _celu,
    "softplus": _unary("Softplus"),
    "softsign": _unary("Softsign"),
    "hard_sigmoid": _hard_sigmoid,
    "hard_swish": _hard_swish,
    "silu": _silu,
    "mish": _mish,
    "power": _power,
    "thresholded_relu": _thresholded_relu,
    "log_positive": _log_positive,
    "heaviside": _heaviside,
}
