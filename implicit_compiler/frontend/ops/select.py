"""Comparisons, logic and Where on values computed from the model input.

A boolean is held as a float expression that is 1 where it is true and 0 where it is false (a
Cast of it to a float type is then the expression unchanged, as ``shape.lower_cast`` does, and a
boolean graph output is predicted as 0.0 / 1.0), made by the ``heaviside(h)`` activation,
phi(z) = 1 for z > 0, h at z = 0, 0 for z < 0 or NaN:

    Less(a, b)            heaviside(0)(b - a)          a < b  iff  b - a > 0
    LessOrEqual(a, b)     heaviside(1)(b - a)          a <= b iff  b - a >= 0
    Greater(a, b)         Less(b, a);  GreaterOrEqual(a, b) = LessOrEqual(b, a)
    Equal(a, b)           And(LessOrEqual(a, b), LessOrEqual(b, a))
    Not(c)                1 - c                        (affine)
    And(c, d)             heaviside(0)(c + d - 3/2)    1 only where both are 1
    Or(c, d)              heaviside(0)(c + d - 1/2)    1 where either is 1
    Where(c, p, q)        q + c (p - q)                the product of two variables through the
                                                       exact square identity (elementwise.product)

Every comparison is one block of componentwise jumps (Lipschitz constant inf: the analyses that
need a bound say they do not apply). And and Or of two 0/1 values are exact as one more block
(cheaper than the products c d and c + d - c d, and free of their rounding). With constant
operands these ops are folded (``lower``), never lowered here.

What differs from ONNX, in IEEE arithmetic (stated, not refused: the graphs that reach it are
rare and the model computes it rather than silently something else):

- b - a is computed as one sum (the model's row ``A x + B u + b``). For finite a and b its sign
  is that of the comparison exactly (a difference of two different floats is never 0, there
  are subnormals); where a or b is itself a sum of several terms, the single sum rounds
  differently from ONNX's two, and values within that rounding of each other may compare
  otherwise. a = b = +inf (or -inf) gives b - a = NaN: LessOrEqual / GreaterOrEqual / Equal are
  then false where ONNX says true (strict comparisons agree: false). A comparison with NaN is
  false in both.
- Where(c, p, q) = q + c (p - q) needs finite p and q: where p or q is infinite (or p - q
  overflows) the product gives inf - inf = NaN where ONNX gives the selected branch (a NaN in
  either branch likewise). With both branches finite it is exact up to rounding: c = 0 gives q
  exactly; c = 1 gives p up to a few ulps of |p| + |q| (q + (p - q)), times how far |p - q| is
  from the size the product was balanced for at compile time (as every product here): well
  inside float64's 1e-9 and float32's tolerances unless |q| is far larger than |p|.
"""

from __future__ import annotations

import numpy as np

from ...errors import GraphError
from ..context import LoweringContext, NodeView, Value
from ..registry import lowers
from .common import Affine, as_affine, shape_of
from .elementwise import product

# comparison -> (swap the operands, value of phi at 0: 0 strict, 1 non-strict)
COMPARISONS = {
    "Less": (False, 0.0),
    "LessOrEqual": (False, 1.0),
    "Greater": (True, 0.0),
    "GreaterOrEqual": (True, 1.0),
}


def _broadcast(ctx: LoweringContext, node: NodeView, values: list[Value]) -> list[Affine]:
    """The operands as expressions of their common (numpy-broadcast) shape."""
    try:
        shape = tuple(np.broadcast_shapes(*(shape_of(v) for v in values)))
    except ValueError:
        raise GraphError(f"{node.where}: operand shapes {[shape_of(v) for v in values]} do not broadcast") from None
    return [as_affine(value, ctx.width).broadcast_to(shape) for value in values]


def holds(ctx: LoweringContext, node: NodeView, a: Value, b: Value, at_zero: float, name: str) -> Affine:
    """1 where b - a > 0 (and ``at_zero`` where b - a = 0), else 0: one heaviside block."""
    a, b = _broadcast(ctx, node, [a, b])
    return ctx.create_block(b - a, f"heaviside({at_zero!r})", name=name)


def _comparison(op_type: str):
    swap, at_zero = COMPARISONS[op_type]

    def lower_comparison(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
        a, b = inputs[::-1] if swap else inputs
        return [holds(ctx, node, a, b, at_zero, node.proto.output[0])]

    lower_comparison.__name__ = f"lower_{op_type.lower()}"
    relation = {"Less": "a < b", "LessOrEqual": "a <= b", "Greater": "a > b", "GreaterOrEqual": "a >= b"}[op_type]
    lower_comparison.__doc__ = f"{relation}: a heaviside block of the difference (1 where it holds, else 0)."
    return lower_comparison


for _op in COMPARISONS:
    lowers(_op)(_comparison(_op))


@lowers("Equal")
def lower_equal(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """a == b: And(a <= b, b <= a), three heaviside blocks."""
    a, b = inputs
    output = node.proto.output[0]
    below = holds(ctx, node, a, b, 1.0, f"{output}/less_or_equal")
    above = holds(ctx, node, b, a, 1.0, f"{output}/greater_or_equal")
    return [_both(ctx, below, above, output)]


@lowers("Not")
def lower_not(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """not c = 1 - c (c a 0/1 expression)."""
    condition = as_affine(inputs[0], ctx.width)
    return [(-condition).shift(np.ones(condition.shape))]


def _both(ctx: LoweringContext, c: Affine, d: Affine, name: str) -> Affine:
    return ctx.create_block((c + d).shift(np.full(c.shape, -1.5)), "heaviside(0.0)", name=name)


@lowers("And")
def lower_and(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """c and d = heaviside(c + d - 3/2) for 0/1 expressions: one block."""
    c, d = _broadcast(ctx, node, inputs)
    return [_both(ctx, c, d, node.proto.output[0])]


@lowers("Or")
def lower_or(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """c or d = heaviside(c + d - 1/2) for 0/1 expressions: one block."""
    c, d = _broadcast(ctx, node, inputs)
    return [ctx.create_block((c + d).shift(np.full(c.shape, -0.5)), "heaviside(0.0)", name=node.proto.output[0])]


def where(ctx: LoweringContext, node: NodeView, inputs: list) -> Affine:
    """Where(c, p, q) for a condition c computed from the input: q + c (p - q), the product
    through the square identity (a scaling when p - q is constant). Exact for finite p and q;
    an infinite branch gives NaN (see the module docstring)."""
    condition, chosen, other = _broadcast(ctx, node, inputs)
    return other + product(ctx, condition, chosen - other, node.proto.output[0])
