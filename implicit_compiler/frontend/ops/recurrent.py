"""Recurrent ops (RNN, GRU, LSTM) unrolled over their fixed sequence length, exactly.

With X_t the input at step t (layout 0: X is (seq, batch, input); layout 1: (batch, seq,
input)), W, R, B the constant weights of one direction (gate blocks stacked in ONNX order) and
H_{t-1}, C_{t-1} the previous states, each step of each direction and batch entry is lowered
into state blocks, in the order the ONNX spec computes them:

    RNN   H_t = f(X_t W^T + H_{t-1} R^T + Wb + Rb)
    GRU   z_t, r_t = f(X_t W_zr^T + H_{t-1} R_zr^T + Wb_zr + Rb_zr)                 (one block)
          h_t = g(X_t W_h^T + (r_t * H_{t-1}) R_h^T + Rb_h + Wb_h)        linear_before_reset=0
          h_t = g(X_t W_h^T + r_t * (H_{t-1} R_h^T + Rb_h) + Wb_h)        linear_before_reset=1
          H_t = (1 - z_t) * h_t + z_t * H_{t-1} = h_t + z_t * (H_{t-1} - h_t)
    LSTM  i_t, f_t = f(X_t W_if^T + H_{t-1} R_if^T + P_if * C_{t-1} + Wb_if + Rb_if) (one block)
          c_t = g(X_t W_c^T + H_{t-1} R_c^T + Wb_c + Rb_c)
          C_t = f_t * C_{t-1} + i_t * c_t         (input_forget=1: f_t = 1 - i_t)
          o_t = f(X_t W_o^T + H_{t-1} R_o^T + P_o * C_t + Wb_o + Rb_o)
          H_t = o_t * h(C_t)

Gate products are not componentwise; each is lowered exactly with the identity
a * b = ((a + b)^2 - (a - b)^2) / 4, i.e. two ``square`` blocks (products computed at the same
time, like f * C_{t-1} and i * c, share one pair of blocks). In exact arithmetic this is the
product; in floating point its rounding error is about eps (|a| + |b|)^2, which for gates in
(0, 1) and bounded states is at the level of the other roundings.

Activations (``activations``, with ``activation_alpha``/``activation_beta`` consumed in order
by the functions that take them, as onnxruntime does): Relu, Tanh, Sigmoid, LeakyRelu(alpha)
are one block; Affine(alpha, beta) is no block; ScaledTanh(alpha, beta) = alpha tanh(beta z)
is a tanh block; HardSigmoid(alpha, beta) = relu(w) - relu(w - 1) with w = alpha z + beta is
one relu block. ``clip`` bounds every activation input first: clip(z) = relu(z + c) -
relu(z - c) - c, one relu block. Elu, Softsign, Softplus and ThresholdedRelu are refused (not
exactly expressible with the componentwise activations).

``sequence_lens`` (constant) shortens each batch entry's sequence: steps past its length give
zeros in Y, the reverse direction starts at its last valid step, and Y_h (Y_c) is the state
after its last processed step. Outputs follow the layout: Y (seq, dirs, batch, hidden) or
(batch, seq, dirs, hidden); Y_h, Y_c (dirs, batch, hidden) or (batch, dirs, hidden).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ...errors import GraphError
from ..context import LoweringContext, NodeView, Value
from ..registry import lowers
from .common import Affine, as_affine, optional_input, require_constant
from .elementwise import product

COMMON_ATTRIBUTES = (
    "activation_alpha",
    "activation_beta",
    "activations",
    "clip",
    "direction",
    "hidden_size",
    "layout",
    "output_sequence",
)
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
DEFAULT_ACTIVATIONS = {"RNN": ("Tanh",), "GRU": ("Sigmoid", "Tanh"), "LSTM": ("Sigmoid", "Tanh", "Tanh")}
# Defaults of activation_alpha / activation_beta for the functions that take them (onnxruntime).
ACTIVATION_PARAMETERS = {
    "LeakyRelu": (0.01, None),
    "Affine": (1.0, 0.0),
    "ScaledTanh": (1.0, 1.0),
    "HardSigmoid": (0.2, 0.5),
}
REFUSED_ACTIVATIONS = ("Elu", "Softsign", "Softplus", "ThresholdedRelu")


@dataclass(frozen=True)
class ActivationFunction:
    """One of the recurrent activations f, g, h with its parameters and the clip bound."""

    name: str
    alpha: float | None
    beta: float | None
    clip: float | None

    def apply(self, ctx: LoweringContext, z: Affine, name: str) -> Affine:
        """f(clip(z)) as an expression, creating the blocks it needs."""
        if self.clip is not None:
            c = self.clip
            bounded = ctx.create_block(
                Affine.concatenate([z.shift(c), z.shift(-c)], ctx.width),
                "relu",
                name=f"{name}/clip",
                sample_shape=(2 * z.size,),
            )
            z = (_rows(bounded, 0, z.size) - _rows(bounded, z.size, 2 * z.size)).shift(-c)
        shape = (z.size,)
        if self.name in ("Relu", "Tanh", "Sigmoid"):
            return ctx.create_block(z, self.name.lower(), name=name, sample_shape=shape)
        if self.name == "LeakyRelu":
            return ctx.create_block(z, f"leaky_relu({self.alpha!r})", name=name, sample_shape=shape)
        if self.name == "Affine":
            return z.scale(np.full(z.shape, self.alpha)).shift(self.beta)
        if self.name == "ScaledTanh":
            inner = ctx.create_block(z.scale(np.full(z.shape, self.beta)), "tanh", name=name, sample_shape=shape)
            return inner.scale(np.full(z.shape, self.alpha))
        # HardSigmoid: clip(alpha z + beta, 0, 1) = relu(w) - relu(w - 1)
        w = z.scale(np.full(z.shape, self.alpha)).shift(self.beta)
        both = ctx.create_block(
            Affine.concatenate([w, w.shift(-1.0)], ctx.width), "relu", name=name, sample_shape=(2 * z.size,)
        )
        return _rows(both, 0, z.size) - _rows(both, z.size, 2 * z.size)


def _rows(expression: Affine, start: int, stop: int) -> Affine:
    return expression.take(np.arange(start, stop))


def _activation_functions(node: NodeView, kind: str, directions: int) -> list[list[ActivationFunction]]:
    """The activation functions of each direction, from the node's attributes."""
    count = len(DEFAULT_ACTIVATIONS[kind])
    names = list(node.attr("activations") or DEFAULT_ACTIVATIONS[kind] * directions)
    if len(names) == count and directions == 2:
        names = names * 2
    if len(names) != count * directions:
        raise GraphError(
            f"{node.where}: expected {count * directions} activations ({count} per direction), got {names}"
        )
    alphas = list(node.attr("activation_alpha") or [])
    betas = list(node.attr("activation_beta") or [])
    clip = node.attr("clip")
    functions = []
    for name in names:
        canonical = {n.lower(): n for n in ("Relu", "Tanh", "Sigmoid", *ACTIVATION_PARAMETERS, *REFUSED_ACTIVATIONS)}
        name = canonical.get(name.lower(), name)
        if name in REFUSED_ACTIVATIONS or name not in ("Relu", "Tanh", "Sigmoid", *ACTIVATION_PARAMETERS):
            raise node.unsupported(
                "activations",
                names,
                f"{name} cannot be lowered exactly with componentwise relu/tanh/sigmoid/leaky_relu blocks; "
                "supported: Relu, Tanh, Sigmoid, LeakyRelu, Affine, ScaledTanh, HardSigmoid",
            )
        alpha, beta = ACTIVATION_PARAMETERS.get(name, (None, None))
        if alpha is not None and alphas:
            alpha = float(alphas.pop(0))
        if beta is not None and betas:
            beta = float(betas.pop(0))
        functions.append(ActivationFunction(name, alpha, beta, None if clip is None else float(clip)))
    return [functions[d * count : (d + 1) * count] for d in range(directions)]


@dataclass(frozen=True)
class _Weights:
    """The constants of one direction, float64: W (G*H, I), R (G*H, H), Wb, Rb (G*H,), P (3H,)."""

    W: np.ndarray
    R: np.ndarray
    Wb: np.ndarray
    Rb: np.ndarray
    P: np.ndarray | None


def _map(ctx: LoweringContext, value: Affine, matrix: np.ndarray) -> Affine:
    """value @ matrix^T for a 1-D expression."""
    return ctx.apply_map(value, sp.csr_array(matrix), (matrix.shape[0],))


def _scaled(value: Affine, factors: np.ndarray) -> Affine:
    return value.scale(factors)


def _rnn_step(ctx, x_t, h, c, weights: _Weights, functions, name: str, node: NodeView):
    pre = _map(ctx, x_t, weights.W) + _map(ctx, h, weights.R)
    pre = pre.shift(weights.Wb + weights.Rb)
    return functions[0].apply(ctx, pre, f"{name}/h"), None


def _gru_step(ctx, x_t, h, c, weights: _Weights, functions, name: str, node: NodeView):
    f, g = functions
    size = h.size
    x_part = _map(ctx, x_t, weights.W).shift(weights.Wb)
    linear_before_reset = node.attr("linear_before_reset", 0)
    if linear_before_reset:
        h_part = _map(ctx, h, weights.R).shift(weights.Rb)
        gates = f.apply(ctx, _rows(x_part, 0, 2 * size) + _rows(h_part, 0, 2 * size), f"{name}/zr")
        z, r = _rows(gates, 0, size), _rows(gates, size, 2 * size)
        candidate_pre = _rows(x_part, 2 * size, 3 * size) + product(
            ctx, r, _rows(h_part, 2 * size, 3 * size), f"{name}/r*Rh"
        )
    else:
        gates_pre = _rows(x_part, 0, 2 * size) + _map(ctx, h, weights.R[: 2 * size]).shift(weights.Rb[: 2 * size])
        gates = f.apply(ctx, gates_pre, f"{name}/zr")
        z, r = _rows(gates, 0, size), _rows(gates, size, 2 * size)
        reset_h = product(ctx, r, h, f"{name}/r*h")
        candidate_pre = _rows(x_part, 2 * size, 3 * size) + _map(ctx, reset_h, weights.R[2 * size :]).shift(
            weights.Rb[2 * size :]
        )
    candidate = g.apply(ctx, candidate_pre, f"{name}/h~")
    return candidate + product(ctx, z, h - candidate, f"{name}/z*(h-h~)"), None


def _lstm_step(ctx, x_t, h, c, weights: _Weights, functions, name: str, node: NodeView):
    f, g, h_function = functions
    size = h.size
    pre = (_map(ctx, x_t, weights.W) + _map(ctx, h, weights.R)).shift(weights.Wb + weights.Rb)
    input_pre, output_pre = _rows(pre, 0, size), _rows(pre, size, 2 * size)
    forget_pre, cell_pre = _rows(pre, 2 * size, 3 * size), _rows(pre, 3 * size, 4 * size)
    if weights.P is not None:
        input_pre = input_pre + _scaled(c, weights.P[:size])
        forget_pre = forget_pre + _scaled(c, weights.P[2 * size :])
    candidate = g.apply(ctx, cell_pre, f"{name}/c~")
    if node.attr("input_forget", 0):
        input_gate = f.apply(ctx, input_pre, f"{name}/i")
        cell = c + product(ctx, input_gate, candidate - c, f"{name}/i*(c~-C)")
    else:
        gates = f.apply(ctx, Affine.concatenate([forget_pre, input_pre], ctx.width), f"{name}/fi")
        both = product(ctx, gates, Affine.concatenate([c, candidate], ctx.width), f"{name}/f*C+i*c~")
        cell = _rows(both, 0, size) + _rows(both, size, 2 * size)
    if weights.P is not None:
        output_pre = output_pre + _scaled(cell, weights.P[size : 2 * size])
    output_gate = f.apply(ctx, output_pre, f"{name}/o")
    hidden = product(ctx, output_gate, h_function.apply(ctx, cell, f"{name}/h(C)"), f"{name}/o*h(C)")
    return hidden, cell


STEPS = {"RNN": _rnn_step, "GRU": _gru_step, "LSTM": _lstm_step}


def _lower_recurrent(ctx: LoweringContext, node: NodeView, inputs: list, kind: str) -> list:
    gates = GATES[kind]
    layout = node.attr("layout", 0)
    if layout not in (0, 1):
        raise node.unsupported("layout", layout, "layout must be 0 or 1")
    x = as_affine(inputs[0], ctx.width)
    if x.ndim != 3:
        raise GraphError(f"{node.where}: X must be 3-D, got shape {x.shape}")
    ids = np.arange(x.size).reshape(x.shape)
    if layout == 1:
        ids = ids.transpose(1, 0, 2)  # -> (seq, batch, input)
    seq, batch, input_size = ids.shape
    W = np.asarray(require_constant(inputs[1], node, "W (input 1)"), dtype=np.float64)
    R = np.asarray(require_constant(inputs[2], node, "R (input 2)"), dtype=np.float64)
    directions = {"forward": 1, "reverse": 1, "bidirectional": 2}.get(node.attr("direction", "forward"))
    if directions is None:
        raise node.unsupported("direction", node.attr("direction"), "use forward, reverse or bidirectional")
    hidden = node.attr("hidden_size") or (W.shape[1] // gates if W.ndim == 3 else 0)
    expected = {"W": (directions, gates * hidden, input_size), "R": (directions, gates * hidden, hidden)}
    for name, array in (("W", W), ("R", R)):
        if array.shape != expected[name]:
            raise GraphError(f"{node.where}: {name} has shape {array.shape}, expected {expected[name]}")
    B = _optional_constant(inputs, 3, node, "B (input 3)", (directions, 2 * gates * hidden))
    lengths = _sequence_lengths(inputs, node, seq, batch)
    initial_h = _initial_state(ctx, inputs, 5, node, layout, directions, batch, hidden)
    initial_c = _initial_state(ctx, inputs, 6, node, layout, directions, batch, hidden) if kind == "LSTM" else None
    P = _optional_constant(inputs, 7, node, "P (input 7)", (directions, 3 * hidden)) if kind == "LSTM" else None
    functions = _activation_functions(node, kind, directions)

    output = next((name for name in node.proto.output if name), node.name)
    zeros = as_affine(np.zeros(hidden), ctx.width)
    Y = {}
    last_h, last_c = {}, {}
    for d in range(directions):
        reverse = node.attr("direction", "forward") == "reverse" or d == 1
        weights = _Weights(W[d], R[d], B[d, : gates * hidden], B[d, gates * hidden :], None if P is None else P[d])
        for b in range(batch):
            h, c = initial_h[d][b], (initial_c[d][b] if initial_c is not None else None)
            steps = range(lengths[b] - 1, -1, -1) if reverse else range(lengths[b])
            for t in steps:
                name = f"{output}/{'reverse' if reverse else 'forward'}" + (f"/b{b}" if batch > 1 else "") + f"/t{t}"
                x_t = x.take(ids[t, b])
                h, c = STEPS[kind](ctx, x_t, h, c, weights, functions[d], name, node)
                Y[t, d, b] = h
            last_h[d, b], last_c[d, b] = h, c
    order_y = (
        [(t, d, b) for t in range(seq) for d in range(directions) for b in range(batch)]
        if layout == 0
        else [(t, d, b) for b in range(batch) for t in range(seq) for d in range(directions)]
    )
    y = Affine.concatenate([Y.get(key, zeros) for key in order_y], ctx.width)
    y_shape = (seq, directions, batch, hidden) if layout == 0 else (batch, seq, directions, hidden)
    order_last = (
        [(d, b) for d in range(directions) for b in range(batch)]
        if layout == 0
        else [(d, b) for b in range(batch) for d in range(directions)]
    )
    last_shape = (directions, batch, hidden) if layout == 0 else (batch, directions, hidden)
    outputs = [y.reshape(y_shape), Affine.concatenate([last_h[k] for k in order_last], ctx.width).reshape(last_shape)]
    if kind == "LSTM":
        outputs.append(Affine.concatenate([last_c[k] for k in order_last], ctx.width).reshape(last_shape))
    return outputs


def _optional_constant(inputs: list, index: int, node: NodeView, what: str, shape: tuple) -> np.ndarray | None:
    value = optional_input(inputs, index)
    if value is None:
        return None if what.startswith("P") else np.zeros(shape)
    array = np.asarray(require_constant(value, node, what), dtype=np.float64)
    if array.shape != shape:
        raise GraphError(f"{node.where}: {what} has shape {array.shape}, expected {shape}")
    return array


def _sequence_lengths(inputs: list, node: NodeView, seq: int, batch: int) -> list[int]:
    value = optional_input(inputs, 4)
    if value is None:
        return [seq] * batch
    if isinstance(value, Affine):
        raise GraphError(f"{node.where}: sequence_lens depends on the model input; it must be a constant")
    lengths = [int(v) for v in np.asarray(value).ravel()]
    if len(lengths) != batch or any(not 1 <= v <= seq for v in lengths):
        raise GraphError(
            f"{node.where}: sequence_lens {lengths} must give one length in 1..{seq} per batch entry ({batch})"
        )
    return lengths


def _initial_state(
    ctx: LoweringContext,
    inputs: list,
    index: int,
    node: NodeView,
    layout: int,
    directions: int,
    batch: int,
    hidden: int,
) -> list[list[Affine]]:
    """initial_h / initial_c as [direction][batch] expressions (zeros when omitted)."""
    value: Value | None = optional_input(inputs, index)
    shape = (directions, batch, hidden) if layout == 0 else (batch, directions, hidden)
    if value is None:
        value = np.zeros(shape)
    state = as_affine(value, ctx.width)
    if state.shape != shape:
        raise GraphError(f"{node.where}: initial state (input {index}) has shape {state.shape}, expected {shape}")
    ids = np.arange(state.size).reshape(shape)
    if layout == 1:
        ids = ids.transpose(1, 0, 2)
    return [[state.take(ids[d, b]) for b in range(batch)] for d in range(directions)]


def check_recurrent_attributes(node: NodeView) -> None:
    """The attribute values refused whatever the shapes (run on every node before lowering any)."""
    if node.attr("layout", 0) not in (0, 1):
        raise node.unsupported("layout", node.attr("layout"), "layout must be 0 or 1")
    if node.attr("direction", "forward") not in ("forward", "reverse", "bidirectional"):
        raise node.unsupported("direction", node.attr("direction"), "use forward, reverse or bidirectional")


@lowers("RNN", attributes=COMMON_ATTRIBUTES, check=check_recurrent_attributes)
def lower_rnn(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """Unrolled: H_t = f(X_t W^T + H_{t-1} R^T + b), one block per step."""
    return _lower_recurrent(ctx, node, inputs, "RNN")


@lowers("GRU", attributes=(*COMMON_ATTRIBUTES, "linear_before_reset"), check=check_recurrent_attributes)
def lower_gru(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """Unrolled: gate blocks, products as square blocks, both linear_before_reset modes."""
    return _lower_recurrent(ctx, node, inputs, "GRU")


@lowers("LSTM", attributes=(*COMMON_ATTRIBUTES, "input_forget"), check=check_recurrent_attributes)
def lower_lstm(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """Unrolled: gate blocks, peepholes, products as square blocks; Y, Y_h and Y_c."""
    return _lower_recurrent(ctx, node, inputs, "LSTM")
