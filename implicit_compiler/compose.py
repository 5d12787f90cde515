"""Composing implicit models: pure functions that return new models (operands are not changed).

For models m_i: x_i = phi_i(A_i x_i + B_i u_i + b_i), y_i = C_i x_i + D_i u_i + c_i, the state of
a composition stacks the operands' states (block names prefixed "m1/", "m2/"), so:

    cascade   u_2 = y_1:  A = [[A_1, 0], [B_2 C_1, A_2]], B = [B_1; B_2 D_1],
              b = [b_1; B_2 c_1 + b_2], C = [D_2 C_1, C_2], D = D_2 D_1, c = D_2 c_1 + c_2.
              When B_2 C_1 would hold many more non-zeros than B_2 and C_1, y_1 is kept as an
              identity "link" block instead: x_l = C_1 x_1 + D_1 u + c_1, read through B_2, D_2.
    parallel  same u, y = [y_1; y_2]:  A = diag(A_1, A_2), B = [B_1; B_2], C = diag(C_1, C_2).
    add       same u, y = y_1 + y_2:   A, B as parallel, C = [C_1, C_2], D = D_1 + D_2.
    multiply  same u, y = y_1 * y_2, exactly: two square blocks s± = (y_1 / s ± y_2 s)^2 (their
              pre-activations are affine in x_1, x_2, u) and y = (s+ - s-) / 4, with s per
              output a power of two that balances the typical sizes of y_1 / s and y_2 s
              (``output_sizes``).
    feedback  u = v + K y (K constant, p x q). With N = (I - D K)^{-1} (q x q):
              y = N (C x + D v + c),  u = v + K y, hence
              A' = A + B K N C,  B' = B (I + K N D),  b' = b + B K N c,
              C' = N C,  D' = N D,  c' = N c.
              With D = 0, N = I: A' = A + B K C. I - D K singular means the loop has no
              (unique) algebraic solution: NotWellPosedError. The loop makes A cyclic; the
              runtime iterates only on the cyclic component.

Structured operands (``model.structure``: convolutions and dense products kept as kernels) are
never materialized: stacking places their terms at the operand's offsets (``_stacked``, what
``sp.bmat`` does to the CSR), and a cascade whose second B or first C keeps terms takes the
link branch (no product B_2 C_1). Products with C and D (q rows) read them as CSR; feedback's
B K is formed a run of B's rows at a time, and a term of A or B that B K N C (N D) writes into
moves to the remainder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from . import arguments
from .activations import LOG_POSITIVE_FLOOR, Activation
from .errors import ArgumentTypeError, NotWellPosedError, ShapeError
from .model import ImplicitModel, StateBlock, TensorSpec
from .structure import StructuredMatrix, Term

# Fold B_2 C_1 into A when it holds at most this many times the non-zeros of B_2 and C_1.
LINK_GROWTH_LIMIT = 2.0
DENSE_SOLVE_LIMIT = 2048  # q up to which (I - D K) is factored densely
PRODUCT_CHUNK_ENTRIES = 1 << 22  # feedback: B K formed this many entries of B at a time
CYCLIC_SIZE_SWEEPS = 3  # sweeps of a cyclic component when estimating typical state sizes


def _prefixed_blocks(model: ImplicitModel, prefix: str, offset: int) -> list[StateBlock]:
    return [
        StateBlock(f"{prefix}/{b.name}", b.start + offset, b.stop + offset, b.activation, b.shape, b.source_node)
        for b in model.blocks
    ]


def _prefixed_specs(specs: Sequence[TensorSpec], prefix: str) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(f"{prefix}/{spec.name}", spec.shape) for spec in specs)


def _common(first: ImplicitModel, second: ImplicitModel) -> tuple[ImplicitModel, ImplicitModel]:
    """Both operands in their common dtype (float64 unless both are float32)."""
    dtype = np.result_type(first.dtype, second.dtype)
    return first.astype(dtype), second.astype(dtype)


def _models(first: Any, second: Any) -> None:
    """Both operands are ImplicitModels (a string or an array would fail deep inside otherwise)."""
    arguments.model(first, "first")
    arguments.model(second, "second")


def _same_input(first: ImplicitModel, second: ImplicitModel, operation: str) -> None:
    """Both operands are models taking the same input."""
    _models(first, second)
    if first.p != second.p:
        raise ShapeError(
            f"cannot {operation}: both models must take the same input, but the first takes p = {first.p} "
            f"values and the second p = {second.p}"
        )


def _same_output(first: ImplicitModel, second: ImplicitModel, operation: str) -> None:
    if first.q != second.q:
        raise ShapeError(
            f"cannot {operation}: the outputs must have the same size, but the first gives q = {first.q} "
            f"values and the second q = {second.q}"
        )


def _stacked(grid: list[list[Any]]) -> StructuredMatrix:
    """``sp.bmat(grid)`` for CSR arrays, ``StructuredMatrix`` objects and None (zero) in a grid:
    the remainders stacked by ``sp.bmat``, each term moved by its piece's offsets (its rows by
    the row offset, its source by the column offset). Every grid row and column needs a piece
    that gives its size."""
    heights = [next(piece.shape[0] for piece in row if piece is not None) for row in grid]
    widths = [next(row[j].shape[1] for row in grid if row[j] is not None) for j in range(len(grid[0]))]
    row_offsets, column_offsets = np.cumsum([0, *heights]), np.cumsum([0, *widths])
    terms, remainders = [], []
    for i, row in enumerate(grid):
        remainders.append([])
        for j, piece in enumerate(row):
            if piece is None:
                remainders[-1].append(None)
                continue
            piece = piece if isinstance(piece, StructuredMatrix) else StructuredMatrix.plain(sp.csr_array(piece))
            remainders[-1].append(piece.remainder)
            down, right = int(row_offsets[i]), int(column_offsets[j])
            for term in piece.terms:
                rows, source = _moved(term.rows, down), _moved(term.op.source, right)
                terms.append(Term(rows, replace(term.op, source=source)))
    remainder = sp.csr_array(sp.bmat(remainders, format="csr"))
    return StructuredMatrix((int(row_offsets[-1]), int(column_offsets[-1])), tuple(terms), remainder)


def _moved(span: slice, offset: int) -> slice:
    return slice(span.start + offset, span.stop + offset)


def _has_terms(*matrices: StructuredMatrix) -> bool:
    return any(matrix.terms for matrix in matrices)


def _side_by_side(
    first: ImplicitModel, second: ImplicitModel, prefixes: tuple[str, str]
) -> tuple[StructuredMatrix, StructuredMatrix, np.ndarray, list[StateBlock]]:
    """A = diag(A_1, A_2), B = [B_1; B_2], b = [b_1; b_2] and the prefixed blocks (same input)."""
    one, two = first.structure, second.structure
    A = _stacked([[one.A, None], [None, two.A]])
    B = _stacked([[one.B], [two.B]])
    blocks = _prefixed_blocks(first, prefixes[0], 0) + _prefixed_blocks(second, prefixes[1], first.n)
    return A, B, np.concatenate([first.bias_x, second.bias_x]), blocks


def cascade(first: ImplicitModel, second: ImplicitModel, prefixes: tuple[str, str] = ("m1", "m2")) -> ImplicitModel:
    """The second model applied to the first's output: y = m2(m1(u))."""
    _models(first, second)
    if first.q != second.p:
        raise ShapeError(
            f"cannot cascade: the first model gives q = {first.q} outputs but the second takes p = {second.p} inputs"
        )
    first, second = _common(first, second)
    one, two = first.structure, second.structure
    blocks = _prefixed_blocks(first, prefixes[0], 0)
    B2C1 = None if _has_terms(two.B, one.C) else sp.csr_array(second.B @ first.C)
    if B2C1 is not None and B2C1.nnz <= LINK_GROWTH_LIMIT * (second.B.nnz + first.C.nnz) + first.n:
        A = _stacked([[one.A, None], [B2C1, two.A]])
        B = _stacked([[one.B], [second.B @ first.D]])
        bias_x = np.concatenate([first.bias_x, second.B @ first.bias_y + second.bias_x])
        C = _stacked([[second.D @ first.C, two.C]])
        D = sp.csr_array(second.D @ first.D)
        bias_y = second.D @ first.bias_y + second.bias_y
        blocks += _prefixed_blocks(second, prefixes[1], first.n)
    else:  # keep y_1 as an identity block: no product of B_2 and C_1
        q = first.q
        zero = lambda rows, cols: sp.csr_array((rows, cols), dtype=first.dtype)  # noqa: E731
        A = _stacked(
            [
                [one.A, zero(first.n, q), zero(first.n, second.n)],
                [one.C, zero(q, q), zero(q, second.n)],
                [zero(second.n, first.n), two.B, two.A],
            ]
        )
        B = _stacked([[one.B], [one.D], [zero(second.n, first.p)]])
        bias_x = np.concatenate([first.bias_x, first.bias_y, second.bias_x])
        C = _stacked([[zero(second.q, first.n), two.D, two.C]])
        D = zero(second.q, first.p)
        bias_y = second.bias_y  # c_1 is inside the link block
        blocks.append(StateBlock(f"{prefixes[0]}/output", first.n, first.n + q, "identity", (q,)))
        blocks += _prefixed_blocks(second, prefixes[1], first.n + q)
    return ImplicitModel(A, B, C, D, bias_x, bias_y, tuple(blocks), first.inputs, second.outputs)


def parallel(first: ImplicitModel, second: ImplicitModel, prefixes: tuple[str, str] = ("m1", "m2")) -> ImplicitModel:
    """Both models on the same input, outputs stacked: y = [m1(u); m2(u)] (names prefixed)."""
    _same_input(first, second, "put in parallel")
    first, second = _common(first, second)
    A, B, bias_x, blocks = _side_by_side(first, second, prefixes)
    one, two = first.structure, second.structure
    C = _stacked([[one.C, None], [None, two.C]])
    D = _stacked([[one.D], [two.D]])
    outputs = _prefixed_specs(first.outputs, prefixes[0]) + _prefixed_specs(second.outputs, prefixes[1])
    bias_y = np.concatenate([first.bias_y, second.bias_y])
    return ImplicitModel(A, B, C, D, bias_x, bias_y, tuple(blocks), first.inputs, outputs)


def add(first: ImplicitModel, second: ImplicitModel, prefixes: tuple[str, str] = ("m1", "m2")) -> ImplicitModel:
    """Both models on the same input, outputs summed: y = m1(u) + m2(u)."""
    _same_input(first, second, "add")
    _same_output(first, second, "add")
    first, second = _common(first, second)
    A, B, bias_x, blocks = _side_by_side(first, second, prefixes)
    C = _stacked([[first.structure.C, second.structure.C]])
    D = sp.csr_array(first.D + second.D)
    bias_y = first.bias_y + second.bias_y
    return ImplicitModel(A, B, C, D, bias_x, bias_y, tuple(blocks), first.inputs, first.outputs)


def balancing_scales(sizes_a: np.ndarray, sizes_b: np.ndarray) -> np.ndarray:
    """Per element the power of two s nearest sqrt(|a| / |b|), so that a / s and b s have sizes
    within a factor sqrt(2) of each other (s = 1 where either size is zero).

    For the square identity a b = ((a/s + b s)^2 - (a/s - b s)^2) / 4 (``multiply`` and the Mul
    lowering): both squares round at about max(a/s, b s)^2 while their difference is 4ab, so
    unbalanced operands (x W1 with weights ~100 times x W2 with weights ~0.01) lose about
    log10(|a| / |b|) digits. Powers of two make the scaling itself exact.
    """
    sizes_a, sizes_b = np.asarray(sizes_a, dtype=np.float64), np.asarray(sizes_b, dtype=np.float64)
    sized = (sizes_a > 0) & (sizes_b > 0) & np.isfinite(sizes_a) & np.isfinite(sizes_b)
    with np.errstate(divide="ignore", invalid="ignore"):
        exponent = np.round(0.5 * (np.log2(sizes_a) - np.log2(sizes_b)))
    return np.exp2(np.where(sized, exponent, 0.0))


def typical_size(phi: Activation, size: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """The size of phi(z) for |z| ~ size: tanh and sigmoid saturate at 1, square squares, exp
    exponentiates (capped short of overflow), ...; rectifier-like activations keep the size
    (times their slope for z < 0 when larger than 1). Only a scale for balancing products.

    ``offset``: z's constant term. exp(z) then has the size exp(offset), the middle in log scale
    of exp(offset -/+ spread): a softmax written out as exp(z - max z) / sum is at most 1 however
    large z is (exp(size) would give its 1e4 logits e^700 and lose every digit of the division).
    """
    name = phi.name
    if name == "exp" and offset is not None:
        return np.exp(np.clip(offset, -700.0, 700.0)) * np.ones_like(size)
    if name in ("tanh", "erf", "softsign"):
        return np.minimum(size, 1.0)
    if name in ("sigmoid", "hard_sigmoid", "heaviside"):
        return np.ones_like(size)
    with np.errstate(divide="ignore", over="ignore"):
        unbounded = {
            "square": lambda: size**2,
            "exp": lambda: np.exp(np.minimum(size, 700.0)),
            "log": lambda: np.abs(np.log(size)),
            "log_positive": lambda: np.abs(np.log(np.maximum(size, LOG_POSITIVE_FLOOR))),
            "reciprocal": lambda: 1.0 / size,
            "sqrt": lambda: np.sqrt(size),
            "rsqrt": lambda: 1.0 / np.sqrt(size),
            "power": lambda: size ** (phi.alpha or 0.0),
        }
        if name in unbounded:
            return unbounded[name]()
    if name in ("leaky_relu", "elu", "selu"):
        return size * max(1.0, abs(phi.alpha)) * (abs(phi.beta) if name == "selu" else 1.0)
    return size


def output_sizes(model: ImplicitModel) -> np.ndarray:
    """A typical size of each output: the 2-norm of its row [C, D, c] with each state weighted
    by its own typical size (``typical_size`` of the 2-norm of its row [A, B, b]; inputs count
    1), in execution order, a cyclic component swept ``CYCLIC_SIZE_SWEEPS`` times."""
    from .analysis._block_solve import row_block
    from .runtime.plan import execution_order

    def squared(matrix: StructuredMatrix) -> StructuredMatrix:
        """The matrix of the squared entries, float64 (kernels squared)."""
        terms = tuple(Term(t.rows, replace(t.op, weight=t.op.weight.astype(np.float64) ** 2)) for t in matrix.terms)
        remainder = sp.csr_array(matrix.remainder, dtype=np.float64)
        remainder = sp.csr_array((remainder.data**2, remainder.indices, remainder.indptr), shape=matrix.shape)
        return StructuredMatrix(matrix.shape, terms, remainder)

    def row_sums(matrix: StructuredMatrix, values: np.ndarray) -> np.ndarray:
        return matrix.matvec(values[:, None])[:, 0]

    structure = model.structure
    A2 = squared(structure.A)
    fixed = row_sums(squared(structure.B), np.ones(model.p)) + model.bias_x.astype(np.float64) ** 2
    states = np.ones(model.n)
    for component in execution_order(model):
        for _ in range(CYCLIC_SIZE_SWEEPS if component.cyclic else 1):
            for block in (model.blocks[i] for i in component.blocks):
                rows = block.slice
                low, A2_rows = row_block(A2, rows)
                row_sizes = np.sqrt(row_sums(A2_rows, states[low : low + A2_rows.shape[1]] ** 2) + fixed[rows])
                states[rows] = typical_size(block.activation, row_sizes, model.bias_x[rows].astype(np.float64))
    squares = row_sums(squared(structure.C), states**2) + row_sums(squared(structure.D), np.ones(model.p))
    return np.sqrt(squares + model.bias_y.astype(np.float64) ** 2)


def multiply(first: ImplicitModel, second: ImplicitModel, prefixes: tuple[str, str] = ("m1", "m2")) -> ImplicitModel:
    """Both models on the same input, outputs multiplied elementwise, exactly: y = m1(u) * m2(u)."""
    _same_input(first, second, "multiply")
    _same_output(first, second, "multiply")
    first, second = _common(first, second)
    A, B, bias_x, blocks = _side_by_side(first, second, prefixes)
    n, q = first.n + second.n, first.q
    scales = balancing_scales(output_sizes(first), output_sizes(second)).astype(first.dtype)
    # y_1 / s and y_2 s of one typical size (exact: powers of two)
    C1, D1, c1 = sp.diags_array(1.0 / scales) @ first.C, sp.diags_array(1.0 / scales) @ first.D, first.bias_y / scales
    C2, D2, c2 = sp.diags_array(scales) @ second.C, sp.diags_array(scales) @ second.D, second.bias_y * scales
    squares_read = sp.vstack(
        [sp.hstack([C1, C2]), sp.hstack([C1, -C2])], format="csr"
    )  # pre-activations of s+ and s-: C_1 x_1 / s ± C_2 x_2 s (+ (D_1 / s ± D_2 s) u + c_1 / s ± c_2 s)
    A = _stacked([[A, None], [squares_read, sp.csr_array((2 * q, 2 * q), dtype=first.dtype)]])
    B = _stacked([[B], [D1 + D2], [D1 - D2]])
    bias_x = np.concatenate([bias_x, c1 + c2, c1 - c2])
    blocks += [
        StateBlock("product/sum_squared", n, n + q, "square", (q,)),
        StateBlock("product/difference_squared", n + q, n + 2 * q, "square", (q,)),
    ]
    quarter = 0.25 * sp.identity(q, format="csr", dtype=first.dtype)
    C = sp.hstack([sp.csr_array((q, n), dtype=first.dtype), quarter, -quarter], format="csr")
    D = sp.csr_array((q, first.p), dtype=first.dtype)
    return ImplicitModel(A, B, C, D, bias_x, None, tuple(blocks), first.inputs, first.outputs)


def feedback(model: ImplicitModel, K: Any) -> ImplicitModel:
    """The closed loop u = v + K y: a model from the new input v (same shape as u) to y.

    Args:
        model: the open-loop model.
        K: the loop gain, p x q (array-like or sparse); a scalar k means k I (needs p = q).

    Raises:
        ShapeError: K is not p x q.
        NotWellPosedError: I - D K is singular (the algebraic loop through D has no unique solution).
    """
    arguments.model(model, "model")
    p, q = model.p, model.q
    K = _loop_gain(K, p, q)
    if K.shape != (p, q):
        raise ShapeError(f"the loop gain K must be p x q = {p} x {q} (u = v + K y), got {K.shape}")
    if not np.isfinite(K.data).all():
        raise ShapeError("the loop gain K holds NaN or inf values")
    if model.D.nnz == 0 or K.nnz == 0:
        NC, ND, Nc = model.C, model.D, model.bias_y
    else:
        NC, ND, Nc = _loop_solve(sp.csr_array(model.D @ K), model.C, model.D, model.bias_y)
    structure = model.structure
    BK = _product(structure.B, K)
    A = _plus(structure.A, sp.csr_array(BK @ NC))
    B = _plus(structure.B, sp.csr_array(BK @ ND))
    bias_x = model.bias_x + BK @ Nc
    closed = ImplicitModel(
        A, B, sp.csr_array(NC), sp.csr_array(ND), bias_x, Nc, model.blocks, model.inputs, model.outputs
    )
    return closed if closed.dtype == model.dtype else closed.astype(model.dtype)  # (the loop solved in float64)


def _product(matrix: StructuredMatrix, K: sp.csr_array) -> sp.csr_array:
    """matrix @ K as CSR, the matrix's CSR formed a run of rows at a time (each row's sums as in
    the CSR product of the whole)."""
    parts = [sp.csr_array(rows @ K) for _, rows in matrix.row_chunks(PRODUCT_CHUNK_ENTRIES)]
    return parts[0] if len(parts) == 1 else sp.csr_array(sp.vstack(parts, format="csr"))


def _plus(matrix: StructuredMatrix, added: sp.csr_array) -> StructuredMatrix:
    """matrix + added: the terms that ``added`` writes into join the remainder (as CSR), the
    others stay; the remainder plus ``added`` is summed as CSR, as for a plain matrix."""
    coo = added.tocoo()
    kept, moved = [], []
    for term in matrix.terms:
        rows, source = term.rows, term.op.source
        hit = (coo.row >= rows.start) & (coo.row < rows.stop) & (coo.col >= source.start) & (coo.col < source.stop)
        (moved if hit.any() else kept).append(term)
    remainder = matrix.remainder
    if moved:
        empty = sp.csr_array(matrix.shape, dtype=matrix.dtype)
        remainder = remainder + StructuredMatrix(matrix.shape, tuple(moved), empty).to_csr()
    return StructuredMatrix(matrix.shape, tuple(kept), sp.csr_array(remainder + added))


def _loop_gain(K: Any, p: int, q: int) -> sp.csr_array:
    """K as a p x q float64 CSR array: a real number k as k I (p = q), an array-like or sparse
    matrix of real numbers as given. Strings, None and complex gains are refused by name."""
    if np.ndim(K) == 0 and not sp.issparse(K):
        k = arguments.real(K, "K", "a real number, or a p x q matrix of them")
        if p != q:
            raise ShapeError(f"a scalar loop gain needs p = q, but the model has p = {p} inputs and q = {q} outputs")
        return k * sp.identity(p, format="csr")
    dtype = K.dtype if sp.issparse(K) else np.asarray(K).dtype
    if dtype.kind not in "biuf":
        raise ArgumentTypeError(f"K: expected a p x q = {p} x {q} matrix of real numbers, got dtype {dtype}")
    return sp.csr_array(K, dtype=np.float64) if sp.issparse(K) else sp.csr_array(np.asarray(K, dtype=np.float64))


def _loop_solve(DK: sp.csr_array, C: sp.csr_array, D: sp.csr_array, bias: np.ndarray):
    """N C, N D, N c with N = (I - D K)^{-1}; NotWellPosedError when I - D K is singular."""
    q = DK.shape[0]
    loop = sp.identity(q, format="csc") - DK.tocsc()
    singular = NotWellPosedError(
        "the feedback loop is ill-posed: I - D K is singular, so y = C x + D (v + K y) + c has no unique "
        "solution for y. Change K (or the model's direct feedthrough D) so that I - D K is invertible"
    )
    if q <= DENSE_SOLVE_LIMIT:
        dense = loop.toarray()
        if np.linalg.cond(dense) > 1 / (1e3 * np.finfo(np.float64).eps):
            raise singular
        solve = lambda rhs: np.linalg.solve(dense, rhs)  # noqa: E731
    else:
        try:
            factor = spla.splu(loop)
        except RuntimeError:
            raise singular from None
        solve = factor.solve
    NC = sp.csr_array(solve(C.toarray()))
    ND = sp.csr_array(solve(D.toarray()))
    return NC, ND, solve(bias)
