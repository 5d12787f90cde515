"""The Perron-Frobenius eigenvalue lambda_pf(M) of a nonnegative matrix M.

For M >= 0 the spectral radius is itself an eigenvalue, lambda_pf(M), with a nonnegative
eigenvector (Perron-Frobenius). It is what the well-posedness and sensitivity conditions test:
lambda_pf(|A|) < 1. The computation is made robust in four steps:

- Reducibility. Ordering the states by the strongly connected components of M's graph makes M
  block triangular, so lambda_pf(M) = max over components of lambda_pf(M_cc). A one-state
  component contributes |m_ii| (0 without a self-loop): a nilpotent M (a feedforward network)
  gives exactly 0, where a dense eigensolver would return rounding noise of size eps^(1/n).
- Irreducible blocks: dense LAPACK eigenvalues up to ``DENSE_LIMIT`` states, ARPACK
  (``scipy.sparse.linalg.eigs``, k=1, largest magnitude) above it.
- Certification: for any v > 0, min_i (Mv)_i / v_i <= lambda_pf <= max_i (Mv)_i / v_i
  (Collatz-Wielandt), and for an eigenvector x of an eigenvalue of largest modulus, |x| is the
  Perron vector, so ARPACK's answer is accepted only when the bracket of |x| is tight around it.
- Otherwise: power iteration on M + s I (the shift makes the dominant eigenvalue strictly
  dominant even for periodic M) until the bracket closes to ``tol``; then dense eigenvalues for
  blocks up to ``DENSE_FALLBACK_LIMIT`` states, or the bracket's upper end above that.

A ``scipy.sparse.linalg.LinearOperator`` (|A_cc| of a structured model, its convolutions kept
as kernels) has no graph to split: it is taken as one block (ARPACK, then the power iteration;
a reducible one may leave the bracket open and give its upper end, never an underestimate).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
import scipy.sparse.linalg as spla

from ..errors import AnalysisError

DENSE_LIMIT = 512  # irreducible blocks up to this size: dense eigenvalues directly
DENSE_FALLBACK_LIMIT = 4096  # up to this size: dense eigenvalues when the iterations fail
CERTIFY = 1e-6  # accept ARPACK's value when the Collatz-Wielandt bracket is this tight (relative)
ARPACK_RESTARTS = 300  # ARPACK gives up after this many restarts (its default, 10 n, can take seconds)


def perron_frobenius_eigenvalue(matrix: Any, tol: float = 1e-10, max_iter: int = 5000) -> float:
    """The Perron-Frobenius eigenvalue (spectral radius) of a nonnegative square matrix.

    Args:
        matrix: a nonnegative (n, n) sparse matrix or array-like, pass ``abs(A)`` for |A|; or a
            ``LinearOperator`` of one (its nonnegativity is the caller's).
        tol: relative accuracy for the iterative solvers (blocks above ``DENSE_LIMIT`` states).
        max_iter: iteration cap of the power-iteration fallback.

    Returns:
        lambda_pf as a float; 0.0 for an empty or nilpotent matrix. If neither ARPACK (checked by
        the Collatz-Wielandt bracket of its eigenvector) nor the power iteration reaches ``tol`` on
        a block, dense eigenvalues are used up to ``DENSE_FALLBACK_LIMIT`` states, and above it
        that block's Collatz-Wielandt upper bound, so the result never underestimates
        (conditions lambda < 1 stay sufficient).

    Raises:
        AnalysisError: the matrix is not square, not finite, or has a negative entry.
    """
    if isinstance(matrix, spla.LinearOperator):
        return _operator_radius(matrix, tol, max_iter)
    M = _as_nonnegative_csr(matrix)
    n = M.shape[0]
    if n == 0 or M.nnz == 0:
        return 0.0
    count, labels = csgraph.connected_components(M, directed=True, connection="strong")
    sizes = np.bincount(labels, minlength=count)
    diagonal = M.diagonal()
    singles = sizes[labels] == 1
    radius = float(diagonal[singles].max()) if singles.any() else 0.0
    if singles.all():
        return radius
    # Permute so that each component is a contiguous range, then take its diagonal block.
    order = np.argsort(labels, kind="stable")
    permuted = M[order][:, order]
    starts = np.concatenate([[0], np.cumsum(sizes)])  # component l holds rows starts[l]:starts[l + 1]
    for start, stop in zip(starts[:-1], starts[1:]):
        if stop - start > 1:
            radius = max(radius, _irreducible_radius(permuted[start:stop, start:stop], tol, max_iter))
    return radius


def _operator_radius(M: spla.LinearOperator, tol: float, max_iter: int) -> float:
    """lambda_pf of a nonnegative operator, as one block."""
    if M.shape[0] != M.shape[1]:
        raise AnalysisError(f"expected a square matrix, got shape {M.shape}")
    if M.shape[0] == 0:
        return 0.0
    if M.shape[0] == 1:
        return float(abs((M @ np.ones(1))[0]))
    return _irreducible_radius(M, tol, max_iter)


def _as_nonnegative_csr(matrix: Any) -> sp.csr_array:
    if sp.issparse(matrix):
        M = sp.csr_array(matrix, dtype=np.float64)
    else:
        dense = np.asarray(matrix, dtype=np.float64)
        if dense.ndim != 2:
            raise AnalysisError(f"expected a square matrix, got shape {dense.shape}")
        M = sp.csr_array(dense)
    if M.shape[0] != M.shape[1]:
        raise AnalysisError(f"expected a square matrix, got shape {M.shape}")
    M.sum_duplicates()
    if not np.isfinite(M.data).all():
        raise AnalysisError("expected a finite matrix, got NaN or inf entries")
    if (M.data < 0).any():
        raise AnalysisError(
            f"expected a nonnegative matrix, got {int((M.data < 0).sum())} negative entries; pass abs(A) for |A|"
        )
    M.eliminate_zeros()
    return M


def _irreducible_radius(M: sp.csr_array, tol: float, max_iter: int) -> float:
    """lambda_pf of an irreducible nonnegative matrix with at least 2 states."""
    n = M.shape[0]
    if n <= DENSE_LIMIT:
        return _dense_radius(M)
    start = np.ones(n)
    try:
        values, vectors = spla.eigs(M, k=1, which="LM", tol=tol, v0=start, maxiter=ARPACK_RESTARTS)
    except spla.ArpackNoConvergence:
        pass
    else:
        # Certify: for an eigenpair (mu, x) of largest modulus, |x| is the Perron vector, so the
        # Collatz-Wielandt bracket of |x| is tight around |mu|. Anything else is a wrong answer.
        radius, vector = float(np.abs(values[0])), np.abs(vectors[:, 0])
        if vector.min() > 0:
            lower, upper = _collatz_wielandt(M, vector)
            if lower <= radius * (1 + 1e-12) and radius <= upper * (1 + 1e-12) and upper - lower <= CERTIFY * upper:
                return radius
            start = vector
    radius, converged = _power_iteration(M, start, tol, max_iter)
    if converged:
        return radius
    if n <= DENSE_FALLBACK_LIMIT:
        return _dense_radius(M)
    return radius  # the Collatz-Wielandt upper bound: never an underestimate


def _dense_radius(M: sp.csr_array | spla.LinearOperator) -> float:
    dense = M.toarray() if sp.issparse(M) else M @ np.eye(M.shape[0])
    return float(np.abs(np.linalg.eigvals(dense)).max())


def _collatz_wielandt(M: sp.csr_array, v: np.ndarray) -> tuple[float, float]:
    """min_i (Mv)_i / v_i <= lambda_pf(M) <= max_i (Mv)_i / v_i, for v > 0."""
    ratios = (M @ v) / v
    return float(ratios.min()), float(ratios.max())


def _power_iteration(M: sp.csr_array, v: np.ndarray, tol: float, max_iter: int) -> tuple[float, bool]:
    """Shifted power iteration from v > 0: (estimate, converged); the upper bound if not converged."""
    v = v / v.max()
    shift = _collatz_wielandt(M, v)[1]  # an upper bound of lambda_pf: shifts by about lambda_pf
    best_upper = shift
    for _ in range(max_iter):
        w = M @ v
        ratios = w / v
        lower, upper = float(ratios.min()), float(ratios.max())
        best_upper = min(best_upper, upper)  # every bracket is valid: keep the tightest upper end
        if upper - lower <= tol * upper:
            return 0.5 * (lower + upper), True
        v = w + shift * v
        v /= v.max()
    return best_upper, False
