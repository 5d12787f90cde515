"""Matrix products with a constant operand: Gemm and MatMul.

With the input flattened row-major, a product with a constant is a sparse linear map:

    Y = X W      (X variable, M x K; W constant, K x N):  vec(Y) = (I_M kron W^T) vec(X)
    Y = W X      (W constant, M x K; X variable, K x N):  vec(Y) = (W kron I_N) vec(X)

Gemm: Y = alpha * A' B' + beta * C with A' = A^T if transA (likewise B'), C broadcast to Y;
the transposes of a variable operand are row selections. MatMul follows numpy.matmul: 1-D
operands are promoted and the added axis removed, leading (stacked) axes broadcast and each
stacked product is one diagonal block of the map. A product of two variable operands is not
affine: it goes to ``bilinear`` (products through square blocks, summed).

Structured (``from_onnx(structure="auto")``, issue 20): X W with one row (M = 1, no stacking)
and at least ``MIN_STRUCTURED_NONZEROS`` weights is kept as ``structure.Dense`` terms, one per
run of X reading contiguous columns of [u; x] (W^T's columns times the run's factors); an X
that is not such a selection is first kept as an identity block.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ...errors import GraphError
from ...runtime.structured import MIN_STRUCTURED_NONZEROS
from ...structure import Dense, Term
from ..context import LoweringContext, NodeView, Value
from ..expression import source_runs
from ..registry import lowers
from .bilinear import variable_matmul
from .common import Affine, optional_input, shape_of


def _product_map(left: np.ndarray | None, right: np.ndarray | None, stack: int, m: int, k: int, n: int) -> sp.csr_array:
    """The map from the variable operand to Y for ``stack`` stacked products (M x K)(K x N).

    ``right`` (stack, K, N) given: the variable is the left (stack, M, K) operand;
    ``left`` (stack, M, K) given: the variable is the right (stack, K, N) operand.
    """
    blocks = []
    for index in range(stack):
        if right is not None:
            blocks.append(sp.kron(sp.identity(m, format="csr"), sp.csr_array(right[index].T), format="csr"))
        else:
            blocks.append(sp.kron(sp.csr_array(left[index]), sp.identity(n, format="csr"), format="csr"))
    return sp.csr_array(sp.block_diag(blocks, format="csr")) if stack > 1 else sp.csr_array(blocks[0])


def matmul(ctx: LoweringContext, node: NodeView, a: Value, b: Value) -> Affine:
    """numpy.matmul(a, b) where at least one operand is an expression."""
    if isinstance(a, Affine) and isinstance(b, Affine):
        return variable_matmul(ctx, node, a, b, node.proto.output[0])
    a_shape, b_shape = shape_of(a), shape_of(b)
    if not a_shape or not b_shape:
        raise GraphError(f"{node.where}: MatMul operands must have rank >= 1, got {a_shape} and {b_shape}")
    a_full = a_shape if len(a_shape) > 1 else (1, *a_shape)
    b_full = b_shape if len(b_shape) > 1 else (*b_shape, 1)
    m, k = a_full[-2:]
    k2, n = b_full[-2:]
    if k != k2:
        raise GraphError(f"{node.where}: cannot multiply shapes {a_shape} and {b_shape} (inner {k} != {k2})")
    try:
        stacked = np.broadcast_shapes(a_full[:-2], b_full[:-2])
    except ValueError:
        raise GraphError(f"{node.where}: stacked axes of {a_shape} and {b_shape} do not broadcast") from None
    stack = int(np.prod(stacked, dtype=np.int64))
    out_shape = (*stacked, m, n)
    final_shape = (*stacked, *((m,) if len(a_shape) > 1 else ()), *((n,) if len(b_shape) > 1 else ()))
    if isinstance(a, Affine) and ctx.structured and stack == 1 and m == 1 and k * n >= MIN_STRUCTURED_NONZEROS:
        weights = np.asarray(b, dtype=np.float64).reshape(k, n)
        return _dense_terms(ctx, node, a.reshape((k,)), weights).reshape(final_shape)
    if isinstance(a, Affine):
        a = ctx.without_terms(a)
        variable = a.reshape(a_full).broadcast_to((*stacked, m, k))
        weights = np.broadcast_to(np.asarray(b, dtype=np.float64).reshape(b_full), (*stacked, k, n))
        matrix = _product_map(None, weights.reshape(stack, k, n), stack, m, k, n)
    else:
        b = ctx.without_terms(b)
        variable = b.reshape(b_full).broadcast_to((*stacked, k, n))
        weights = np.broadcast_to(np.asarray(a, dtype=np.float64).reshape(a_full), (*stacked, m, k))
        matrix = _product_map(weights.reshape(stack, m, k), None, stack, m, k, n)
    ctx.ensure_fits(matrix.nnz, "a matrix product")
    result = ctx.apply_map(variable, matrix, out_shape)
    return result.reshape(final_shape)


def _dense_terms(ctx: LoweringContext, node: NodeView, x: Affine, weights: np.ndarray) -> Affine:
    """x W for x of k values and W (k, n) in float64, as ``Dense`` terms (module docstring)."""
    ctx.ensure_fits(weights.size, "the product's weights")
    runs = source_runs(x, x.size, ctx.p)
    if runs is None:  # not runs of states or inputs: keep the operand as an identity block
        x = ctx.materialize(x)
        runs = source_runs(x, x.size, ctx.p)
    n = weights.shape[1]
    terms = tuple(
        Term(
            slice(0, n),
            Dense(slice(run.start, run.start + run.stop - run.first), weights[run.first : run.stop].T * run.scales),
        )
        for run in runs
    )
    offset = x.offset @ weights if x.offset.any() else np.zeros(n)
    return Affine((n,), sp.csr_array((n, ctx.width)), offset, terms)


@lowers("MatMul")
def lower_matmul(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """numpy.matmul: a block-diagonal kron map with a constant operand, else square blocks."""
    return [matmul(ctx, node, inputs[0], inputs[1])]


@lowers("Gemm", attributes=("alpha", "beta", "transA", "transB", "broadcast"))
def lower_gemm(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """alpha * A' B' + beta * C: a kron map (or square blocks for two variables), plus beta C."""
    a, b = inputs[0], inputs[1]
    c = optional_input(inputs, 2)
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    if node.attr("transA", 0):
        a = _transpose(a, node)
    if node.attr("transB", 0):
        b = _transpose(b, node)
    if isinstance(a, Affine) and isinstance(b, Affine):
        product = matmul(ctx, node, a, b)
        product = product if alpha == 1.0 else product.scale(np.full(product.shape, alpha))
    elif isinstance(a, Affine):
        product = matmul(ctx, node, a, np.asarray(b, dtype=np.float64) * alpha)
    else:
        product = matmul(ctx, node, np.asarray(a, dtype=np.float64) * alpha, b)
    if c is None or beta == 0.0:
        return [product]
    if isinstance(c, Affine):
        return [product + c.scale(np.full(c.shape, beta)).broadcast_to(product.shape)]
    return [product.shift(beta * np.asarray(c, dtype=np.float64))]


def _transpose(value: Value, node: NodeView) -> Value:
    if len(shape_of(value)) != 2:
        raise GraphError(f"{node.where}: Gemm operands must be 2-D, got {shape_of(value)}")
    if isinstance(value, Affine):
        rows, cols = value.shape
        return value.take(np.arange(rows * cols).reshape(rows, cols).T)
    return np.asarray(value).T
