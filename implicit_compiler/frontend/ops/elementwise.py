"""Elementwise arithmetic with numpy broadcasting: Add, Sub, Mul, Div, Sum, Neg, Max, Min.

    a + b, a - b          expressions add row by row after broadcasting (residual Add);
                          a constant operand only shifts the offset
    a * c, a / c          c constant: diag(c) scaling of the rows (a / c as a * (1 / c))
    a * b                 both variable: a*b = ((a/s + b s)^2 - (a/s - b s)^2) / 4, two
                          ``square`` blocks, exact (used by gates and by composition); s
                          per element, a power of two, balances the sizes of a/s and b s
    a / b                 b variable: a * reciprocal(b), a reciprocal block then the product
                          above (c / b: a scaling of reciprocal(b))
    a ** p                p constant: a (p = 1), ones (p = 0), square (2), sqrt (0.5),
                          reciprocal (-1), rsqrt (-0.5), else a power(p) block; one block
                          per distinct value of p
    c ** b                c constant > 0, b variable: exp(ln(c) b), one exp block
    max(a, b)             b + relu(a - b); min(a, b) = a - relu(a - b): one relu block
    Sum(a_1, ..., a_k)    a_1 + ... + a_k

A power with a variable base and a variable exponent is refused.
"""

from __future__ import annotations

from functools import reduce

import numpy as np

from ...compose import balancing_scales
from ...errors import GraphError, UnsupportedOpError
from ..context import LoweringContext, NodeView, Value
from ..registry import lowers
from .common import Affine, as_affine, shape_of

BROADCAST_ATTRIBUTES = ("broadcast", "axis", "consumed_inputs")


def _broadcast_shape(node: NodeView, *values: Value) -> tuple[int, ...]:
    _check_legacy_broadcast(node, values)
    try:
        return tuple(np.broadcast_shapes(*(shape_of(v) for v in values)))
    except ValueError:
        shapes = [shape_of(v) for v in values]
        raise GraphError(f"{node.where}: operand shapes {shapes} do not broadcast") from None


def _check_legacy_broadcast(node: NodeView, values: tuple) -> None:
    """Opset < 7 broadcast with an explicit axis is not numpy broadcasting: refuse it."""
    if node.attr("broadcast", 0) and node.attr("axis") is not None:
        shapes = [shape_of(v) for v in values]
        if len(shapes) == 2 and shapes[1] and len(shapes[1]) < len(shapes[0]):
            trailing = shapes[0][len(shapes[0]) - len(shapes[1]) :]
            if trailing != shapes[1]:
                raise node.unsupported(
                    "axis", node.attr("axis"), "upgrade the model to opset >= 7 (numpy broadcasting)"
                )


def add(ctx: LoweringContext, node: NodeView, a: Value, b: Value, sign: float = 1.0) -> Affine:
    """a + sign * b for expressions and/or constants."""
    shape = _broadcast_shape(node, a, b)
    a, b = (_broadcastable(ctx, value, shape) for value in (a, b))
    if not isinstance(b, Affine):
        return a.broadcast_to(shape).shift(sign * np.asarray(b, dtype=np.float64))
    b_expr = b.broadcast_to(shape)
    b_expr = b_expr if sign == 1.0 else -b_expr
    if not isinstance(a, Affine):
        return b_expr.shift(np.asarray(a, dtype=np.float64))
    if a.terms_conflict(b_expr):  # conv(x) + x, or two geometries of one source: b kept as states
        b_expr = ctx.materialize(b_expr)
    return a.broadcast_to(shape) + b_expr


def _broadcastable(ctx: LoweringContext, value: Value, shape: tuple[int, ...]) -> Value:
    """An operand with structured terms that must be broadcast: kept as an identity block first."""
    if isinstance(value, Affine) and value.has_terms and value.shape != shape:
        return ctx.materialize(value)
    return value


def multiply(ctx: LoweringContext, node: NodeView, a: Value, b: Value) -> Affine:
    """a * b: a scaling when one side is constant, else the exact square identity."""
    shape = _broadcast_shape(node, a, b)
    if not isinstance(b, Affine):
        return _scaled(ctx, a, shape, b)
    if not isinstance(a, Affine):
        return _scaled(ctx, b, shape, a)
    a, b = ctx.without_terms(a), ctx.without_terms(b)
    return product(ctx, a.broadcast_to(shape), b.broadcast_to(shape), node.proto.output[0])


def _scaled(ctx: LoweringContext, value: Affine, shape: tuple[int, ...], factors) -> Affine:
    """value * factors (constant), the value's structured terms kept when the factors fold into
    their kernels (constant per output channel), else the value kept as an identity block."""
    factors = np.asarray(factors, dtype=np.float64)
    if value.has_terms and (value.shape != shape or not value.scale_keeps_terms(np.broadcast_to(factors, shape))):
        value = ctx.materialize(value)
    return value.broadcast_to(shape).scale(factors)


def product(ctx: LoweringContext, a: Affine, b: Affine, name: str) -> Affine:
    """a * b = ((a' + b')^2 - (a' - b')^2) / 4 with a' = a / s, b' = b s, for two expressions of
    one shape: two square blocks (a scaling when either expression is in fact constant).

    The identity loses |a'|/|b'| + |b'|/|a'| relative precision to the cancellation of the two
    squares, so the operands are balanced first by ``balancing_scales`` (a' b' = a b exactly),
    from their typical sizes: the norms of their rows with each variable weighted by its own
    typical size (``LoweringContext.row_sizes``; a relu of x W with large W is large).
    """
    if b.coefficients.nnz == 0:
        return a.scale(b.offset.reshape(a.shape))
    if a.coefficients.nnz == 0:
        return b.scale(a.offset.reshape(b.shape))
    scales = balancing_scales(ctx.row_sizes(a), ctx.row_sizes(b)).reshape(a.shape)
    a, b = a.scale(1.0 / scales), b.scale(scales)
    plus = ctx.create_block(a + b, "square", name=f"{name}/sum_squared")
    minus = ctx.create_block(a - b, "square", name=f"{name}/difference_squared")
    return (plus - minus).scale(np.full(a.shape, 0.25))


def maximum(ctx: LoweringContext, a: Affine, b: Affine, name: str) -> Affine:
    """max(a, b) = b + relu(a - b), elementwise, for expressions of one shape."""
    return b + ctx.create_block(a - b, "relu", name=name)


@lowers("Add", attributes=BROADCAST_ATTRIBUTES)
def lower_add(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """a + b (residual connections, biases)."""
    a, b = inputs
    return [add(ctx, node, a, b) if isinstance(a, Affine) else add(ctx, node, b, a)]


@lowers("Sub", attributes=BROADCAST_ATTRIBUTES)
def lower_sub(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """a - b."""
    a, b = inputs
    if isinstance(a, Affine):
        return [add(ctx, node, a, b, sign=-1.0)]
    return [add(ctx, node, -b, a)]


@lowers("Mul", attributes=BROADCAST_ATTRIBUTES)
def lower_mul(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """a * c (scaling), or a * b exactly through two square blocks."""
    return [multiply(ctx, node, inputs[0], inputs[1])]


@lowers("Div", attributes=BROADCAST_ATTRIBUTES)
def lower_div(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """a / c as a * (1 / c); a / b as a * reciprocal(b) (a reciprocal block and a product)."""
    a, b = inputs
    if isinstance(b, Affine):
        shape = _broadcast_shape(node, a, b)
        reciprocal = ctx.create_block(
            _broadcastable(ctx, b, shape).broadcast_to(shape), "reciprocal", name=f"{node.proto.output[0]}/reciprocal"
        )
        return [multiply(ctx, node, a, reciprocal)]
    divisor = np.asarray(b, dtype=np.float64)
    if (divisor == 0).any():
        raise GraphError(f"{node.where}: division by a constant that holds zeros")
    return [multiply(ctx, node, a, 1.0 / divisor)]


@lowers("Pow", attributes=BROADCAST_ATTRIBUTES)
def lower_pow(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """a ** p for constant exponents p (a power block per distinct p; square for 2, sqrt for 0.5),
    or c ** b = exp(ln(c) b) for a constant base c > 0."""
    base, exponent = inputs
    shape = _broadcast_shape(node, base, exponent)
    output = node.proto.output[0]
    if isinstance(base, Affine) and not isinstance(exponent, Affine):
        exponents = np.broadcast_to(np.asarray(exponent, dtype=np.float64), shape)
        if not np.isfinite(exponents).all():
            raise UnsupportedOpError(f"{node.where}: the exponent holds NaN or inf; expected finite exponents")
        base = base.broadcast_to(shape)
        values = np.unique(exponents)
        if values.size == 1:
            return [_power(ctx, base, float(values[0]), output)]
        # one block per distinct exponent over the elements that have it, then back in place
        flat, flat_exponents = base.reshape((base.size,)), exponents.ravel()
        groups = [np.flatnonzero(flat_exponents == value) for value in values]
        parts = [
            _power(ctx, flat.take(ids), float(v), f"{output}/power{k}")
            for k, (v, ids) in enumerate(zip(values, groups))
        ]
        position = np.empty(base.size, dtype=np.int64)
        position[np.concatenate(groups)] = np.arange(base.size)
        return [Affine.concatenate(parts, ctx.width).take(position.reshape(shape))]
    if not isinstance(base, Affine):
        constant = np.broadcast_to(np.asarray(base, dtype=np.float64), shape)
        if not (constant > 0).all() or not np.isfinite(constant).all():
            raise UnsupportedOpError(
                f"{node.where}: a variable exponent needs a constant base > 0 (c ** b = exp(ln(c) b)); "
                f"this base holds {float(constant.min()):g}"
            )
        return [ctx.create_block(exponent.broadcast_to(shape).scale(np.log(constant)), "exp", name=output)]
    raise UnsupportedOpError(
        f"{node.where}: both the base and the exponent depend on the model input; only a constant "
        "exponent, or a constant base > 0, is supported"
    )


def _power(ctx: LoweringContext, base: Affine, power: float, name: str) -> Affine:
    """base ** power for one exponent: base itself (1), ones (0; ONNX: also 0 ** 0 = 1), a
    square (2), sqrt (0.5), reciprocal (-1) or rsqrt (-0.5) block, else a power block."""
    if power == 1:
        return base
    if power == 0:
        return as_affine(np.ones(base.shape), ctx.width)
    spec = {2.0: "square", 0.5: "sqrt", -1.0: "reciprocal", -0.5: "rsqrt"}.get(power, f"power({power!r})")
    return ctx.create_block(base, spec, name=name)


@lowers("Neg", attributes=("consumed_inputs",))
def lower_neg(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """-a."""
    return [-inputs[0]]


@lowers("Sum", attributes=("consumed_inputs",))
def lower_sum(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """a_1 + ... + a_k with broadcasting."""
    shape = _broadcast_shape(node, *inputs)
    terms = [as_affine(_broadcastable(ctx, value, shape), ctx.width).broadcast_to(shape) for value in inputs]
    return [reduce(lambda left, right: left + right, terms)]


@lowers("Max", attributes=("consumed_inputs",))
def lower_max(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """max(a, b) = b + relu(a - b), folded left over the operands."""
    return [_extremum(ctx, node, inputs, sign=1.0)]


@lowers("Min", attributes=("consumed_inputs",))
def lower_min(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """min(a, b) = -max(-a, -b)."""
    return [_extremum(ctx, node, inputs, sign=-1.0)]


def _extremum(ctx: LoweringContext, node: NodeView, inputs: list, sign: float) -> Affine:
    shape = _broadcast_shape(node, *inputs)
    terms = [as_affine(value, ctx.width).broadcast_to(shape) for value in inputs]
    if sign < 0:
        terms = [-term for term in terms]
    result = terms[0]
    for index, term in enumerate(terms[1:], start=1):
        result = maximum(ctx, term, result, name=f"{node.proto.output[0]}/max{index}")
    return result if sign > 0 else -result
