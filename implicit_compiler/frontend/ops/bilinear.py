"""Contractions of tensors: MatMul and Gemm of two variable operands, and Einsum.

Every contraction of two tensors (a MatMul, a Gemm, an Einsum of two operands) is a sum of
products of one entry of each over the points t of the index space of all its letters:

    out[o(t)] = sum over t of a[a(t)] * b[b(t)]

e.g. for MatMul (..., i, k) @ (..., k, j) the points are (..., i, k, j), o(t) = (..., i, j),
a(t) = (..., i, k), b(t) = (..., k, j) (a stacked axis of size 1 reads index 0: broadcasting).

- Both operands variable: the products of all the points are made at once, exactly, by the
  square identity of ``elementwise.product`` (a b = ((a/s + b s)^2 - (a/s - b s)^2) / 4 with an
  exact power-of-two balancing s per point): two ``square`` blocks of one state per point. The
  sum over the contracted letters is linear: it is no block of its own but the rows of the
  result, folded into whatever reads it. States: 2 * points, e.g. 2 S^2 D per attention head
  for Q K^T (S tokens, head width D) and as many for P V.
- One operand constant c: a linear map, T[o(t), v(t)] += c[c(t)] (the kron map of
  ``linear.py`` in general form).
- One operand (Einsum 'ij->ji', 'ii->i', 'ij->'): a selection summed, T[o(t), a(t)] = 1.

An operand's rows are gathered once per point that reads it; where folding its rows into every
point would multiply the non-zeros (Q = x W_q read by all S keys), it is kept as an identity
block first (``LoweringContext.apply_map``). A letter that only one operand has, and the output
has not, is summed on that operand first (a linear map), so that it does not multiply the
points. Einsum of more operands contracts them left to right, two at a time.

The batch axis is a stacked axis like any other here (one sample is lowered): a product over a
feature axis keeps samples apart; ``batch_axis`` refuses a contraction over the batch axis.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Sequence

import numpy as np
import scipy.sparse as sp

from ...errors import GraphError
from ..context import LoweringContext, NodeView, Value
from ..registry import lowers
from .common import Affine, shape_of
from .elementwise import product

Labels = tuple[Hashable, ...]
# Non-zeros per point of a product of two variables, at least: two square rows of two each.
NONZEROS_PER_PRODUCT = 4


# ---------------------------------------------------------------------------- the index space
def _label_sizes(node: NodeView, operands: Sequence[tuple[tuple[int, ...], Labels]]) -> dict[Hashable, int]:
    """The size of every letter: equal wherever it appears, or 1 there (broadcasting)."""
    sizes: dict[Hashable, int] = {}
    for shape, labels in operands:
        if len(shape) != len(labels):
            raise GraphError(f"{node.where}: an operand of shape {shape} has {len(labels)} subscripts")
        for size, label in zip(shape, labels):
            sizes[label] = max(sizes.get(label, 1), int(size))
    for shape, labels in operands:
        for size, label in zip(shape, labels):
            if size not in (1, sizes[label]):
                raise GraphError(
                    f"{node.where}: the sizes of subscript {_name(label)} differ between operands "
                    f"({size} and {sizes[label]}) and neither is 1; operand shapes "
                    f"{[shape for shape, _ in operands]}"
                )
    return sizes


def _name(label: Hashable) -> str:
    return repr(label) if isinstance(label, str) else f"{label} (of the ellipsis)"


def _flat_ids(shape: tuple[int, ...], labels: Labels, space: Labels, sizes: dict[Hashable, int]) -> np.ndarray:
    """Per point of the index space (C order over ``space``), the flat index of the tensor entry
    (of ``shape`` with ``labels``) it reads; an axis of size 1 reads index 0."""
    space_shape = tuple(sizes[label] for label in space)
    ids = np.zeros((1,) * len(space), dtype=np.int64)
    stride = 1
    for size, label in zip(reversed(shape), reversed(labels)):
        if size != 1:
            position = space.index(label)
            view = [1] * len(space)
            view[position] = size
            ids = ids + np.arange(size, dtype=np.int64).reshape(view) * stride
        stride *= size
    return np.broadcast_to(ids, space_shape).ravel()


def _unique(labels: Sequence[Hashable]) -> Labels:
    return tuple(dict.fromkeys(labels))


# ---------------------------------------------------------------------------- contractions
def contract(
    ctx: LoweringContext,
    node: NodeView,
    a: Value,
    a_labels: Labels,
    b: Value,
    b_labels: Labels,
    out_labels: Labels,
    name: str,
) -> Value:
    """The contraction out[out_labels] = sum a[a_labels] * b[b_labels] over the other letters."""
    sizes = _label_sizes(node, [(shape_of(a), a_labels), (shape_of(b), b_labels)])
    keep_a = _unique(label for label in a_labels if label in b_labels or label in out_labels)
    keep_b = _unique(label for label in b_labels if label in a_labels or label in out_labels)
    a = reduce_operand(ctx, node, a, a_labels, keep_a)
    b = reduce_operand(ctx, node, b, b_labels, keep_b)
    space = _unique((*out_labels, *keep_a, *keep_b))
    points = math.prod(sizes[label] for label in space)
    out_shape = tuple(sizes[label] for label in out_labels)
    if isinstance(a, Affine) and isinstance(b, Affine):
        ctx.ensure_fits(NONZEROS_PER_PRODUCT * points, f"the {points:,} products of {node.op_type}")
    else:
        ctx.ensure_fits(points, f"the linear map of {node.op_type}")
    a_ids = _flat_ids(shape_of(a), keep_a, space, sizes)
    b_ids = _flat_ids(shape_of(b), keep_b, space, sizes)
    out_ids = _flat_ids(out_shape, out_labels, space, sizes)
    if not isinstance(a, Affine) and not isinstance(b, Affine):
        values = np.asarray(a, dtype=np.float64).ravel()[a_ids] * np.asarray(b, dtype=np.float64).ravel()[b_ids]
        return np.bincount(out_ids, weights=values, minlength=math.prod(out_shape)).reshape(out_shape)
    if not isinstance(b, Affine):
        return _linear(ctx, a, a_ids, out_ids, out_shape, np.asarray(b, dtype=np.float64).ravel()[b_ids])
    if not isinstance(a, Affine):
        return _linear(ctx, b, b_ids, out_ids, out_shape, np.asarray(a, dtype=np.float64).ravel()[a_ids])
    left = ctx.apply_map(a.reshape((a.size,)), _selection(a_ids, a.size), (points,))
    right = ctx.apply_map(b.reshape((b.size,)), _selection(b_ids, b.size), (points,))
    products = product(ctx, left, right, name)
    return products.map(_selection(out_ids, math.prod(out_shape)).T.tocsr(), out_shape)


def reduce_operand(ctx: LoweringContext, node: NodeView, value: Value, labels: Labels, keep: Labels) -> Value:
    """value[labels] summed over the letters not in ``keep`` (diagonals taken for repeated
    letters), with its axes in the order of ``keep``: a selection summed (a linear map)."""
    if tuple(labels) == tuple(keep):
        return value
    shape = shape_of(value)
    sizes = _label_sizes(node, [(shape, labels)])
    space = _unique((*keep, *labels))
    out_shape = tuple(sizes[label] for label in keep)
    ids = _flat_ids(shape, labels, space, sizes)
    out_ids = _flat_ids(out_shape, keep, space, sizes)
    if not isinstance(value, Affine):
        weights = np.asarray(value, dtype=np.float64).ravel()[ids]
        return np.bincount(out_ids, weights=weights, minlength=math.prod(out_shape)).reshape(out_shape)
    return _linear(ctx, value, ids, out_ids, out_shape, np.ones(ids.size))


def _linear(
    ctx: LoweringContext, value: Affine, ids: np.ndarray, out_ids: np.ndarray, out_shape: tuple[int, ...], weights
) -> Affine:
    """The linear map T[out_ids, ids] += weights applied to an expression (duplicates summed)."""
    matrix = sp.csr_array((weights, (out_ids, ids)), shape=(math.prod(out_shape), value.size))
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    return ctx.apply_map(value.reshape((value.size,)), matrix, out_shape)


def _selection(ids: np.ndarray, size: int) -> sp.csr_array:
    """The (len(ids), size) matrix picking entry ids[t] for row t."""
    return sp.csr_array((np.ones(ids.size), ids, np.arange(ids.size + 1)), shape=(ids.size, size))


# ---------------------------------------------------------------------------- MatMul and Gemm
def matmul_labels(a_rank: int, b_rank: int) -> tuple[Labels, Labels, Labels]:
    """numpy.matmul as a contraction: (..., i, k) @ (..., k, j) -> (..., i, j), the stacked axes
    aligned from the right; a 1-D left operand is (k), a 1-D right operand (k), and the output
    drops their i or j."""
    stacked = max(a_rank, b_rank) - 2
    a_labels = (*range(stacked)[stacked - (a_rank - 2) :], "i", "k") if a_rank > 1 else ("k",)
    b_labels = (*range(stacked)[stacked - (b_rank - 2) :], "k", "j") if b_rank > 1 else ("k",)
    out_labels = (*range(max(stacked, 0)), *(("i",) if a_rank > 1 else ()), *(("j",) if b_rank > 1 else ()))
    return a_labels, b_labels, out_labels


def variable_matmul(ctx: LoweringContext, node: NodeView, a: Affine, b: Affine, name: str) -> Value:
    """numpy.matmul(a, b) of two expressions: the products of all (..., i, k, j) through square
    blocks, summed over k."""
    a_shape, b_shape = a.shape, b.shape
    if not a_shape or not b_shape:
        raise GraphError(f"{node.where}: MatMul operands must have rank >= 1, got {a_shape} and {b_shape}")
    inner_a = a_shape[-1]
    inner_b = b_shape[0] if len(b_shape) == 1 else b_shape[-2]
    if inner_a != inner_b:
        raise GraphError(f"{node.where}: cannot multiply shapes {a_shape} and {b_shape} (inner {inner_a} != {inner_b})")
    a_labels, b_labels, out_labels = matmul_labels(len(a_shape), len(b_shape))
    return contract(ctx, node, a, a_labels, b, b_labels, out_labels, name)


# ---------------------------------------------------------------------------- Einsum
def parse_equation(node: NodeView, shapes: Sequence[tuple[int, ...]] | None = None) -> tuple[list[Labels], Labels]:
    """The subscripts of an Einsum equation: per operand its labels, and the output's.

    Letters stay as themselves; the axes an ellipsis stands for become the integers 0.. (aligned
    from the right, so that they broadcast like numpy's). Without "->" the output is the letters
    that appear once, sorted by ASCII, after the ellipsis axes. With ``shapes`` None only the
    syntax is checked (before lowering)."""
    equation = node.attr("equation")
    if not isinstance(equation, str):
        raise GraphError(f"{node.where}: Einsum needs an 'equation' string attribute")
    equation = equation.replace(" ", "")
    if not re.fullmatch(r"([A-Za-z]|\.\.\.)*(,([A-Za-z]|\.\.\.)*)*(->([A-Za-z]|\.\.\.)*)?", equation):
        raise GraphError(
            f"{node.where}: cannot parse the Einsum equation {node.attr('equation')!r}; write subscripts of "
            "letters and at most one '...' per term, separated by ',', optionally followed by '->' and the output"
        )
    left, arrow, right = equation.partition("->")
    terms = left.split(",")
    if any(term.count("...") > 1 for term in [*terms, right]):
        raise GraphError(f"{node.where}: the Einsum equation {equation!r} has more than one '...' in a term")
    if shapes is not None and len(shapes) != len(terms):
        raise GraphError(
            f"{node.where}: the Einsum equation {equation!r} has {len(terms)} terms for {len(shapes)} inputs"
        )
    if shapes is None:
        return [tuple(term) for term in terms], tuple(right)
    ellipsis_rank = 0
    operands = []
    for term, shape in zip(terms, shapes):
        letters = term.replace("...", "")
        if ("..." not in term and len(letters) != len(shape)) or len(letters) > len(shape):
            raise GraphError(
                f"{node.where}: Einsum term {term!r} does not fit an operand of shape {shape}: give one letter per "
                "axis, or '...' for the axes not named"
            )
        rank = len(shape) - len(letters)
        ellipsis_rank = max(ellipsis_rank, rank)
        operands.append((term, rank))
    labels = [_term_labels(term, rank, ellipsis_rank) for term, rank in operands]
    if arrow:
        out_labels = _term_labels(right, ellipsis_rank, ellipsis_rank)
        missing = [label for label in out_labels if not any(label in term for term in labels)]
        if missing or len(set(out_labels)) != len(out_labels):
            raise GraphError(
                f"{node.where}: the output of the Einsum equation {equation!r} must name each letter of the "
                "inputs at most once"
            )
    else:
        letters = [label for term in labels for label in term if isinstance(label, str)]
        once = sorted(letter for letter in set(letters) if letters.count(letter) == 1)
        out_labels = (*range(ellipsis_rank), *once)
    return labels, tuple(out_labels)


def _term_labels(term: str, rank: int, ellipsis_rank: int) -> Labels:
    """A term's labels: its letters, the ellipsis as the last ``rank`` of 0..ellipsis_rank-1."""
    before, dots, after = term.partition("...")
    if not dots:
        return tuple(term)
    return (*before, *range(ellipsis_rank - rank, ellipsis_rank), *after)


def check_einsum(node: NodeView) -> None:
    """The equation parses (run on every node before lowering any)."""
    parse_equation(node)


@lowers("Einsum", attributes=("equation",), since=(12, 28), check=check_einsum)
def lower_einsum(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """Einsum: linear maps, and products of two variable operands through square blocks."""
    labels, out_labels = parse_equation(node, [shape_of(value) for value in inputs])
    value, value_labels = inputs[0], labels[0]
    for index in range(1, len(inputs)):
        later = {label for term in labels[index + 1 :] for label in term}
        keep = out_labels if index == len(inputs) - 1 else None
        if keep is None:
            needed = later | set(out_labels)
            keep = _unique(label for label in (*value_labels, *labels[index]) if label in needed)
        name = f"{node.proto.output[0]}/product{index}" if len(inputs) > 2 else node.proto.output[0]
        value = contract(ctx, node, value, value_labels, inputs[index], labels[index], keep, name)
        value_labels = keep
    return [reduce_operand(ctx, node, value, value_labels, out_labels)]
