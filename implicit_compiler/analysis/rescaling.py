"""Rescaling the state by a positive diagonal similarity: ||A||_inf under 1, same predictions.

If phi is positively homogeneous (phi(d z) = d phi(z) for d > 0: identity, relu, leaky_relu),
the change of variables x = D x' with D = diag(v), v > 0, gives an equivalent model

    x' = phi(D^{-1} A D x' + D^{-1} B u + D^{-1} b_x),   y = C D x' + D_uy u + b_y,

i.e. A' = D^{-1} A D, B' = D^{-1} B, b_x' = D^{-1} b_x, C' = C D, with D_uy and b_y unchanged,
and the same prediction y for every u. Since |A'| = D^{-1} |A| D has the same spectrum as |A|,
lambda_pf(|A'|) = lambda_pf(|A|) <= ||A'||_inf for every D: a rescaling can bring ||A'||_inf
under 1 exactly when lambda_pf(|A|) < 1.

Choice of D. |A| may be reducible, so its Perron vector can have zeros and cannot be used as
is. Instead pick rho in (lambda_pf(|A|), 1), by default (lambda_pf + 1) / 2, and solve

    (I - |A| / rho) v = 1,   i.e.   v = sum_k (|A| / rho)^k 1 >= 1

(the series converges because lambda_pf(|A| / rho) < 1). Then v > 0 and |A| v = rho (v - 1),
so the row sums of D^{-1} |A| D are rho (1 - 1 / v_i) < rho < 1. The system is block triangular
in execution order (forward substitution, a sparse LU on cyclic components only).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp

from .. import arguments
from ..errors import AnalysisError, NotWellPosedError
from ..model import ImplicitModel
from ._block_solve import solve_identity_minus
from .spectral import perron_frobenius_eigenvalue


def rescaling_diagonal(model: ImplicitModel, rho: float | None = None) -> np.ndarray:
    """The diagonal v of D used by ``rescale``: (I - |A| / rho) v = 1, v >= 1.

    Args:
        model: the implicit model (activations are not checked here).
        rho: the target bound on ||D^{-1} A D||_inf, in (lambda_pf(|A|), 1); default
            (lambda_pf(|A|) + 1) / 2. A rho closer to 1 gives a milder D (smaller v).

    Raises:
        NotWellPosedError: lambda_pf(|A|) >= 1, no diagonal similarity can help.
        AnalysisError: rho outside (lambda_pf(|A|), 1), or v overflows.
    """
    absolute = abs(model.A.astype(np.float64, copy=False))
    radius = perron_frobenius_eigenvalue(absolute)
    if radius >= 1:
        raise NotWellPosedError(
            f"lambda_pf(|A|) = {radius:.6g} >= 1: no positive diagonal similarity brings ||D^-1 A D||_inf "
            "under 1 (it is never below lambda_pf(|A|)); shrink the loop gain of the cyclic part first"
        )
    if rho is None:
        rho = 0.5 * (radius + 1.0)
    elif not radius < _checked_rho(rho) < 1:
        raise AnalysisError(f"expected rho in (lambda_pf(|A|), 1) = ({radius:.6g}, 1), got {rho!r}")
    v = solve_identity_minus(model, absolute, np.ones(model.n), row_scale=np.full(model.n, 1.0 / rho))
    if not np.isfinite(v).all():
        raise AnalysisError(
            f"the rescaling overflows (v = sum_k (|A|/rho)^k 1 with rho = {rho:.6g}): choose rho closer to 1"
        )
    return v


def rescale(model: ImplicitModel, rho: float | None = None) -> ImplicitModel:
    """An equivalent model with ||A'||_inf < 1, by a positive diagonal similarity of the state.

    The state becomes x' = D^{-1} x with D = diag(v) from ``rescaling_diagonal`` (see the module
    docstring for why row sums then fall to rho (1 - 1/v_i) < 1). Predictions are unchanged;
    blocks, inputs, outputs and dtype are kept.

    Args:
        model: a model whose activations are all positively homogeneous.
        rho: the target bound on ||A'||_inf, in (lambda_pf(|A|), 1); default (lambda_pf + 1) / 2.

    Raises:
        AnalysisError: an activation is not positively homogeneous (tanh, sigmoid, square), or the
            rescaling overflows.
        NotWellPosedError: lambda_pf(|A|) >= 1.
    """
    if rho is not None:
        _checked_rho(rho)
    offending = [b for b in model.blocks if not b.activation.positively_homogeneous]
    if offending:
        listed = ", ".join(f"{b.name!r} ({b.activation})" for b in offending[:5])
        if len(offending) > 5:
            listed += f" and {len(offending) - 5} more"
        raise AnalysisError(
            f"rescale needs positively homogeneous activations (identity, relu, leaky_relu), got block(s) "
            f"{listed}: phi(d z) != d phi(z) there, so rescaling the state would change the predictions"
        )
    v = rescaling_diagonal(model, rho)
    inverse = 1.0 / v
    A = _scaled(model.A, rows=inverse, columns=v)
    B = _scaled(model.B, rows=inverse)
    C = _scaled(model.C, columns=v)
    bias_x = model.bias_x * inverse
    norm = float(abs(A).sum(axis=1).max()) if model.n else 0.0
    if not (norm < 1 and math.isfinite(norm)):
        raise AnalysisError(
            f"rescaling left ||A'||_inf = {norm:.6g}, expected < 1 (numerical trouble: v spans too wide)"
        )
    dtype = model.dtype
    return ImplicitModel(
        A.astype(dtype),
        B.astype(dtype),
        C.astype(dtype),
        model.D,
        bias_x.astype(dtype),
        model.bias_y,
        model.blocks,
        model.inputs,
        model.outputs,
    )


def _scaled(matrix: sp.csr_array, rows: np.ndarray | None = None, columns: np.ndarray | None = None) -> sp.csr_array:
    """diag(rows) matrix diag(columns) in float64, same sparsity pattern (entries scaled in place)."""
    data = matrix.data.astype(np.float64)
    if rows is not None:
        data *= np.repeat(rows, np.diff(matrix.indptr))
    if columns is not None:
        data *= columns[matrix.indices]
    return sp.csr_array((data, matrix.indices.copy(), matrix.indptr.copy()), shape=matrix.shape)


def _checked_rho(rho: Any) -> float:
    """rho as a float; a string such as "0.9" is refused by name rather than compared."""
    return arguments.real(rho, "rho", "a number in (lambda_pf(|A|), 1), or None", finite=False)
