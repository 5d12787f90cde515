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
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from ..errors import AnalysisError
from ..model import ImplicitModel
from ..runtime.plan import Component, execution_order

DIRECT_LIMIT = 30000  # cyclic components up to this many states: sparse LU (a 12.8k-state LeNet loop: 0.1 s;
# the fill-in of large random loops grows fast, GMRES is used beyond)
ITERATIVE_TOLERANCE = 1e-12  # relative residual of GMRES on larger cyclic components


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
    matrix: sp.csr_array,
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
        matrix: (n, n) CSR array.
        rhs: (n,) or (n, k) dense right-hand side(s).
        transpose: solve the adjoint system.
        row_scale: (n,) factors of M = diag(row_scale) matrix; None for M = matrix.
        components: ``execution_order(model)`` when the caller already has it.

    Raises:
        AnalysisError: I - M_cc is singular on some cyclic component.
    """
    rhs = np.asarray(rhs, dtype=np.float64)
    vector = rhs.ndim == 1
    W = rhs.reshape(model.n, 1 if vector else rhs.shape[1]).copy()  # (not -1: n = 0 has no states)
    scale = np.ones(model.n) if row_scale is None else np.asarray(row_scale, dtype=np.float64)
    components = execution_order(model) if components is None else components
    X = np.zeros_like(W)
    for component in components[::-1] if transpose else components:
        rows = component_states(model, component)
        A_rows = _row_block(matrix, rows)
        factor = scale[rows][:, None]
        if transpose:
            value = W[rows]
            if component.cyclic:
                value = _solve_cyclic(model, component, A_rows, rows, scale[rows], value, transpose=True)
            X[rows] = value
            _push(A_rows, factor * value, W)
        else:
            value = W[rows] + factor * (A_rows @ X)  # X[rows] is still zero: only other components count
            if component.cyclic:
                value = _solve_cyclic(model, component, A_rows, rows, scale[rows], value, transpose=False)
            X[rows] = value
    return X[:, 0] if vector else X


def _row_block(matrix: sp.csr_array, rows: slice | np.ndarray) -> sp.csr_array:
    """matrix[rows]; for a slice, a view on the data and indices (no copy of the non-zeros)."""
    if not isinstance(rows, slice):
        return matrix[rows]
    first, last = matrix.indptr[rows.start], matrix.indptr[rows.stop]
    indptr = matrix.indptr[rows.start : rows.stop + 1] - first
    return sp.csr_array(
        (matrix.data[first:last], matrix.indices[first:last], indptr),
        shape=(rows.stop - rows.start, matrix.shape[1]),
        copy=False,
    )


def _push(A_rows: sp.csr_array, values: np.ndarray, W: np.ndarray) -> None:
    """W += A_rows^T values, touching only the columns that A_rows reads."""
    if A_rows.nnz == 0:
        return
    low, high = int(A_rows.indices.min()), int(A_rows.indices.max()) + 1
    narrow = sp.csr_array((A_rows.data, A_rows.indices - low, A_rows.indptr), shape=(A_rows.shape[0], high - low))
    W[low:high] += narrow.T @ values


def _solve_cyclic(
    model: ImplicitModel,
    component: Component,
    A_rows: sp.csr_array,
    rows: slice | np.ndarray,
    scale: np.ndarray,
    value: np.ndarray,
    transpose: bool,
) -> np.ndarray:
    """(I - M_cc)^{-1} value, or (I - M_cc)^{-T} value: sparse LU when small, GMRES when large."""
    M_cc = scale_rows(sp.csr_array(A_rows[:, rows]), scale)
    size = M_cc.shape[0]
    system = sp.csc_array(sp.eye_array(size, format="csc") - M_cc)
    names = ", ".join(component_names(model, component))
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


def _gmres(system: sp.csc_array, value: np.ndarray) -> np.ndarray | None:
    """GMRES column by column to ``ITERATIVE_TOLERANCE``; None if some column does not converge."""
    solution = np.empty_like(value)
    for column in range(value.shape[1]):
        x, info = spla.gmres(system, value[:, column], rtol=ITERATIVE_TOLERANCE, atol=0.0, restart=50, maxiter=200)
        if info != 0:
            return None
        solution[:, column] = x
    return solution
