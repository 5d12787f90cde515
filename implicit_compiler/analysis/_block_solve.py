"""Linear solves with I - M, M shaped like A, walked block by block in execution order.

Every analysis here needs (I - M) X = R or its adjoint (I - M)^T X = R for a matrix M with
the sparsity of A (or less): M = |A|/rho for the rescaling, Lambda |A| for the sensitivity,
Gamma A for the Jacobian. Ordering the state by the strongly connected components of the block
graph (``runtime.plan.execution_order``) makes I - M block lower triangular:

    X_c = (I - M_cc)^{-1} (R_c + M[c, earlier] X_earlier),

with M_cc = 0 for an acyclic component, so X_c is one sparse product (forward substitution),
and for a cyclic one a solve restricted to the component's states: a sparse LU of I - M_cc up
to ``DIRECT_LIMIT`` states, GMRES above it (the LU of a large random loop fills in; GMRES on
I - M_cc converges fast when lambda_pf(|M_cc|) < 1, which every caller here ensures), with the
LU as fallback if GMRES stalls.

The adjoint (I - M)^T X = R runs in reverse order and pushes instead of pulling:

    X_c = (I - M_cc)^{-T} W_c,   then W[columns read by c] += M[c, :]^T X_c,   W = R at first,

so it needs the rows of M only, never M^T (transposing a compiled ResNet20's 37M non-zeros
costs more than the solve). M is passed as diag(s) A' with the row factors s applied to
vectors, so Lambda |A| and Gamma A are never materialized. A compiled feedforward network is
all acyclic components: both solves cost about nnz(A) times the number of right-hand sides,
and no n x n matrix is ever formed densely.

M may be a CSR array or a ``structure.StructuredMatrix`` (convolution and dense terms plus a
CSR remainder: ``absolute(model.structure.A)``). A component's rows are then the terms inside them
(a convolution pulls with ``apply`` and pushes with the transposed convolution) beside the
remainder's rows, never materialized; a cyclic component's M_cc is built as CSR when it holds
at most ``COMPONENT_CSR_ENTRIES`` entries (the sparse LU and the eigenvalues of a plain model),
and is an operator on the structure above (GMRES; ``perron_frobenius_eigenvalue`` by iteration).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from ..errors import AnalysisError
from ..model import ImplicitModel
from ..runtime.plan import Component, execution_order
from ..structure import StructuredMatrix, Term

DIRECT_LIMIT = 30000  # cyclic components up to this many states: sparse LU (a 12.8k-state LeNet loop: 0.1 s;
# the fill-in of large random loops grows fast, GMRES is used beyond)
ITERATIVE_TOLERANCE = 1e-12  # relative residual of GMRES on larger cyclic components
COMPONENT_CSR_ENTRIES = 1 << 25  # a structured cyclic component's rows of M up to this many entries
# (0.4 GB as float64 CSR) are built as CSR; larger ones stay operators on the structure


def component_states(model: ImplicitModel, component: Component) -> slice | np.ndarray:
    """The state indices of a component: a slice when its blocks are contiguous."""
    blocks = [model.blocks[i] for i in component.blocks]
    if all(a.stop == b.start for a, b in zip(blocks, blocks[1:])):
        return slice(blocks[0].start, blocks[-1].stop)
    return np.concatenate([np.arange(b.start, b.stop) for b in blocks])


def component_names(model: ImplicitModel, component: Component) -> tuple[str, ...]:
    """The names of a component's blocks, in state order."""
    return tuple(model.blocks[i].name for i in component.blocks)


def lipschitz_per_state(model: ImplicitModel) -> np.ndarray:
    """The Lipschitz constant of each state's activation, (n,) float64 (inf for square)."""
    constants = np.empty(model.n, dtype=np.float64)
    for block in model.blocks:
        constants[block.slice] = block.activation.lipschitz
    return constants


def scale_rows(matrix: sp.csr_array, factors: np.ndarray) -> sp.csr_array:
    """diag(factors) @ matrix without forming the diagonal matrix (a new CSR array)."""
    scaled = matrix.copy()
    scaled.data *= np.repeat(factors, np.diff(matrix.indptr))
    return scaled


def solve_identity_minus(
    model: ImplicitModel,
    matrix: sp.csr_array | StructuredMatrix,
    rhs: np.ndarray,
    transpose: bool = False,
    row_scale: np.ndarray | None = None,
    components: tuple[Component, ...] | None = None,
) -> np.ndarray:
    """X with (I - M) X = rhs, or (I - M)^T X = rhs when ``transpose``; M = diag(row_scale) matrix.

    The forward solve pulls: X_c = (I - M_cc)^{-1} (R_c + M[c, :] X) in execution order. The
    adjoint pushes, in reverse order: X_c = (I - M_cc)^{-T} W_c, then W += M[c, :]^T X_c over
    the columns that c reads; neither transposes nor copies the matrix, and ``row_scale`` is
    applied to vectors, never to the matrix (except on cyclic components, to factor I - M_cc).

    Args:
        model: gives the block structure; ``matrix`` must have no non-zero outside A's pattern.
        matrix: (n, n) CSR array or ``StructuredMatrix`` (never materialized).
        rhs: (n,) or (n, k) dense right-hand side(s).
        transpose: solve the adjoint system.
        row_scale: (n,) factors of M = diag(row_scale) matrix; None for M = matrix.
        components: ``execution_order(model)`` when the caller already has it.

    Raises:
        AnalysisError: I - M_cc is singular on some cyclic component.
    """
    matrix = as_structured(matrix)
    rhs = np.asarray(rhs, dtype=np.float64)
    vector = rhs.ndim == 1
    W = rhs.reshape(model.n, 1 if vector else rhs.shape[1]).copy()  # (not -1: n = 0 has no states)
    scale = np.ones(model.n) if row_scale is None else np.asarray(row_scale, dtype=np.float64)
    components = execution_order(model) if components is None else components
    X = np.zeros_like(W)
    for component in components[::-1] if transpose else components:
        rows = component_states(model, component)
        low, M_rows = row_block(matrix, rows)
        columns = slice(low, low + M_rows.shape[1])
        factor = scale[rows][:, None]
        if transpose:
            value = W[rows]
            if component.cyclic:
                value = _solve_cyclic(model, component, M_rows, rows, low, scale[rows], value, transpose=True)
            X[rows] = value
            if M_rows.shape[1]:
                W[columns] += M_rows.rmatvec(factor * value)
        else:
            # X[rows] is still zero: only other components count
            value = W[rows] + factor * M_rows.matvec(X[columns])
            if component.cyclic:
                value = _solve_cyclic(model, component, M_rows, rows, low, scale[rows], value, transpose=False)
            X[rows] = value
    return X[:, 0] if vector else X


def as_structured(matrix: sp.csr_array | StructuredMatrix) -> StructuredMatrix:
    """A CSR array as a structured matrix without terms; a structured one as it is."""
    return matrix if isinstance(matrix, StructuredMatrix) else StructuredMatrix.plain(sp.csr_array(matrix))


def row_block(matrix: StructuredMatrix, rows: slice | np.ndarray) -> tuple[int, StructuredMatrix]:
    """(low, M[rows, low:high]), low:high the columns those rows read and their own (the
    diagonal block): the remainder's rows (a view for a slice) and the terms inside them,
    shifted. A term only partly inside the rows (no lowering makes one: terms write whole
    blocks) is built as CSR for those rows."""
    runs = [rows] if isinstance(rows, slice) else _runs(rows)
    pieces, terms, offset = [], [], 0
    for run in runs:
        inside = [term for term in matrix.terms if term.rows.start < run.stop and run.start < term.rows.stop]
        if any(term.rows.start < run.start or term.rows.stop > run.stop for term in inside):
            pieces.append(matrix.to_csr(run))
        else:
            pieces.append(_row_block(matrix.remainder, run))
            terms += [Term(_shifted(term.rows, offset - run.start), term.op) for term in inside]
        offset += run.stop - run.start
    remainder = pieces[0] if len(pieces) == 1 else sp.csr_array(sp.vstack(pieces, format="csr"))
    spans = [(term.op.source.start, term.op.source.stop) for term in terms] + [(runs[0].start, runs[-1].stop)]
    if remainder.nnz:
        spans.append((int(remainder.indices.min()), int(remainder.indices.max()) + 1))
    low, high = min(a for a, _ in spans), max(b for _, b in spans)
    narrow = sp.csr_array(
        (remainder.data, remainder.indices - low, remainder.indptr), shape=(remainder.shape[0], high - low)
    )
    terms = [Term(term.rows, replace(term.op, source=_shifted(term.op.source, -low))) for term in terms]
    return low, StructuredMatrix(narrow.shape, tuple(terms), narrow)


def component_matrix(
    matrix: sp.csr_array | StructuredMatrix,
    rows: slice | np.ndarray,
    scale: np.ndarray | None = None,
    magnitude: bool = False,
) -> sp.csr_array | spla.LinearOperator:
    """diag(scale) M_cc (|M_cc| in float64 with ``magnitude``), M restricted to a component's
    states ``rows`` (in rows and columns): as CSR when M is plain or those rows hold at most
    ``COMPONENT_CSR_ENTRIES`` entries, else as a float64 operator on the structure (``matvec``
    and ``rmatvec`` of its terms)."""
    low, M_rows = row_block(as_structured(matrix), rows)
    return _restricted(low, absolute(M_rows) if magnitude else M_rows, rows, scale)


def absolute(matrix: StructuredMatrix) -> StructuredMatrix:
    """|M| in float64 (one copy of the remainder)."""
    terms = tuple(
        Term(term.rows, replace(term.op, weight=np.abs(term.op.weight.astype(np.float64)))) for term in matrix.terms
    )
    return StructuredMatrix(matrix.shape, terms, abs(matrix.remainder.astype(np.float64, copy=False)))


def _restricted(
    low: int, M_rows: StructuredMatrix, rows: slice | np.ndarray, scale: np.ndarray | None
) -> sp.csr_array | spla.LinearOperator:
    """``component_matrix`` from ``row_block``'s (low, M[rows, low:high])."""
    columns = _shifted(rows, -low) if isinstance(rows, slice) else rows - low
    if not M_rows.terms or int(M_rows.row_nnz().sum()) <= COMPONENT_CSR_ENTRIES:
        M_cc = sp.csr_array(M_rows.to_csr()[:, columns])
        return M_cc if scale is None else scale_rows(M_cc, scale)
    M_rows = M_rows.astype(np.float64)
    factor = np.ones(M_rows.shape[0]) if scale is None else np.asarray(scale, dtype=np.float64)

    def multiply(vectors: np.ndarray) -> np.ndarray:
        vectors = vectors.reshape(M_rows.shape[0], -1)
        embedded = np.zeros((M_rows.shape[1], vectors.shape[1]))
        embedded[columns] = vectors
        return factor[:, None] * M_rows.matvec(embedded)

    def multiply_transposed(vectors: np.ndarray) -> np.ndarray:
        vectors = vectors.reshape(M_rows.shape[0], -1)
        return M_rows.rmatvec(factor[:, None] * vectors)[columns]

    size = M_rows.shape[0]
    return spla.LinearOperator(
        (size, size), matvec=multiply, rmatvec=multiply_transposed, matmat=multiply, dtype=np.float64
    )


def _runs(rows: np.ndarray) -> list[slice]:
    """An increasing index array as its runs of consecutive indices."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts, stops = np.r_[0, breaks], np.r_[breaks, len(rows)]
    return [slice(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops)]


def _shifted(span: slice, offset: int) -> slice:
    return slice(span.start + offset, span.stop + offset)


def _row_block(matrix: sp.csr_array, rows: slice) -> sp.csr_array:
    """matrix[rows], a view on the data and indices (no copy of the non-zeros)."""
    first, last = matrix.indptr[rows.start], matrix.indptr[rows.stop]
    indptr = matrix.indptr[rows.start : rows.stop + 1] - first
    return sp.csr_array(
        (matrix.data[first:last], matrix.indices[first:last], indptr),
        shape=(rows.stop - rows.start, matrix.shape[1]),
        copy=False,
    )


def _solve_cyclic(
    model: ImplicitModel,
    component: Component,
    M_rows: StructuredMatrix,
    rows: slice | np.ndarray,
    low: int,
    scale: np.ndarray,
    value: np.ndarray,
    transpose: bool,
) -> np.ndarray:
    """(I - M_cc)^{-1} value, or (I - M_cc)^{-T} value: sparse LU when small, GMRES when large
    (only GMRES when M_cc is an operator on the structure)."""
    M_cc = _restricted(low, M_rows, rows, scale)
    size = M_cc.shape[0]
    names = ", ".join(component_names(model, component))
    if isinstance(M_cc, spla.LinearOperator):
        system = spla.aslinearoperator(sp.eye_array(size)) - M_cc
        solution = _gmres(system.T if transpose else system, value)
        if solution is None:
            raise AnalysisError(
                f"GMRES did not reach {ITERATIVE_TOLERANCE:g} on I - M for the cyclic component [{names}] "
                f"({size} states, too large for a sparse LU: more than {COMPONENT_CSR_ENTRIES} entries); the "
                "linearized loop is close to gain 1 there"
            )
        return solution
    system = sp.csc_array(sp.eye_array(size, format="csc") - M_cc)
    if size > DIRECT_LIMIT:
        solution = _gmres(system.T if transpose else system, value)
        if solution is not None:
            return solution
    try:
        return spla.splu(system).solve(value, trans="T" if transpose else "N")
    except RuntimeError as error:  # SuperLU: "Factor is exactly singular"
        raise AnalysisError(
            f"I - M is singular on the cyclic component [{names}] ({size} states): {error}; "
            "the linearized loop has gain exactly 1 there"
        ) from None


def _gmres(system: sp.csc_array | spla.LinearOperator, value: np.ndarray) -> np.ndarray | None:
    """GMRES column by column to ``ITERATIVE_TOLERANCE``; None if some column does not converge."""
    solution = np.empty_like(value)
    for column in range(value.shape[1]):
        x, info = spla.gmres(system, value[:, column], rtol=ITERATIVE_TOLERANCE, atol=0.0, restart=50, maxiter=200)
        if info != 0:
            return None
        solution[:, column] = x
    return solution
