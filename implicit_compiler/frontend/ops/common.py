"""Helpers shared by the op lowerings: operands, axes, broadcasting."""

from __future__ import annotations

import numpy as np

from ...errors import GraphError
from ..context import LoweringContext, NodeView, Value, as_affine, require_constant
from ..expression import Affine

__all__ = ["Affine", "as_affine", "broadcast_affine", "normalize_axis", "require_constant", "shape_of"]


def shape_of(value: Value) -> tuple[int, ...]:
    """The (batch-1) shape of a constant or an expression."""
    return value.shape if isinstance(value, Affine) else tuple(np.shape(value))


def normalize_axis(axis: int, rank: int, node: NodeView) -> int:
    """A non-negative axis, or GraphError when it is out of range."""
    if not -rank <= axis < rank:
        raise GraphError(f"{node.where}: axis {axis} is out of range for a tensor of rank {rank}")
    return axis % rank


def broadcast_affine(ctx: LoweringContext, value: Value, shape: tuple[int, ...]) -> Affine:
    """An operand as an expression broadcast to ``shape`` (numpy rules)."""
    return as_affine(value, ctx.width).broadcast_to(shape)


def optional_input(inputs: list[Value | None], index: int) -> Value | None:
    """inputs[index], or None when the node omits it."""
    return inputs[index] if index < len(inputs) else None


def constant_ints(value: Value | None, node: NodeView, what: str) -> list[int]:
    """A constant 1-D integer operand (axes, shapes, pads) as a list of ints."""
    array = require_constant(value, node, what)
    return [int(v) for v in np.asarray(array).ravel()]
