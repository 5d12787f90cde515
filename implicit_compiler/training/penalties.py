"""Penalties for training implicit models: feature selection and robustness.

Feature selection (column l_inf penalty, the implicit-learning papers' choice). Input j reaches
the states only through column j of B, so

    R(B) = sum_j ||B e_j||_inf = sum_j max_i |B_ij|

drives whole columns to zero, i.e. drops inputs. It is not differentiable, so it is trained by a
proximal step after each optimizer update (``prox_column_linf_``), column by column. By Moreau's
decomposition (the dual norm of ||.||_inf is ||.||_1),

    prox_{t ||.||_inf}(v) = v - P_{||w||_1 <= t}(v),

with P the Euclidean projection onto the l1 ball of radius t (Michelot's threshold,
``projection.project_rows_l1``). A column with ||v||_1 <= t is inside the ball, so P returns it
unchanged and the column becomes EXACTLY zero; otherwise the result is v clipped to
[-theta, theta], theta > 0 the ball's soft threshold. ``t`` is the learning rate times the
penalty weight, so with plain gradient steps this is the proximal gradient method, whose fixed
points zero column j exactly when the loss gradient's column has ||G e_j||_1 <= lambda.

The column group lasso sum_j ||B e_j||_2 (``column_group_lasso``, ``prox_column_group_lasso_``:
the group soft threshold B e_j <- max(0, 1 - t / ||B e_j||_2) B e_j) is kept beside it.

Robustness (the papers' penalty, ``robustness_penalty``). With induced inf norms (largest row l1
norm) and ||A||_inf < 1,

    P(A, B, C, D) = (||B||_inf^2 + ||C||_inf^2) / (2 (1 - ||A||_inf)) + ||D||_inf.

For 1-Lipschitz activations (relu, tanh, ...) ||x - x'|| <= ||B|| ||u - u'|| / (1 - ||A||), so
||y - y'||_inf <= (||D|| + ||C|| ||B|| / (1 - ||A||)) ||u - u'||_inf, and ||B|| ||C|| <=
(||B||^2 + ||C||^2) / 2 makes P an upper bound on the model's l_inf -> l_inf Lipschitz constant
that is a sum of squares in B and C (differentiable where each max is attained once).

Certified sensitivity bounds (not penalties of the papers, but usable as such). With L_i the
Lipschitz constant of state i's activation, Lambda = diag(L) and lambda_pf(Lambda |A|) < 1, every
pair of inputs satisfies |y(u) - y(u')| <= S |u - u'| componentwise with

    S = |C| (I - Lambda |A|)^{-1} Lambda |B| + |D|

(see ``implicit_compiler.analysis.bounds``), so ||y(u) - y(u')||_inf <= ||S||_inf ||u - u'||_inf:
``sensitivity_bound`` returns ||S||_inf, differentiable in the weights, for models small enough for
a dense n x n solve. For any size, ``norm_sensitivity_bound`` uses norms only: if
l ||A||_inf < 1 with l = max_i L_i, then

    ||y(u) - y(u')||_inf <= (||D||_inf + ||C||_inf l ||B||_inf / (1 - l ||A||_inf)) ||u - u'||_inf,

a looser bound (>= ||S||_inf) that costs a few sums. Both are upper bounds on the model's
l_inf -> l_inf Lipschitz constant, so adding either to the loss penalizes sensitivity soundly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from .. import arguments
from ..errors import ArgumentValueError, NotWellPosedError, ShapeError
from .projection import project_rows_l1, row_l1_norms
from .torch_bridge import ImplicitModule

DENSE_SOLVE_LIMIT = 4096  # states: a dense n x n float64 solve of this size takes 128 MiB


def column_norms(B: Any) -> Any:
    """||B[:, j]||_2 for every column j of an ``ImplicitModule``'s B (a tensor, differentiable),
    a dense 2-D tensor or array, a torch sparse CSR tensor, or a scipy sparse matrix."""
    if isinstance(B, ImplicitModule):
        return _safe_sqrt(_column_sums_of_squares(B.B_values, B.B_pattern.indices, B.p))
    if torch.is_tensor(B):
        if B.layout == torch.sparse_csr:
            return _safe_sqrt(_column_sums_of_squares(B.values(), B.col_indices(), B.shape[1]))
        _expect_matrix(B.shape)
        return _safe_sqrt((B * B).sum(0))
    if sp.issparse(B):
        _expect_matrix(B.shape)
        return np.sqrt(np.asarray(sp.csr_array(B).power(2).sum(axis=0)).ravel())
    B = np.asarray(B)
    _expect_matrix(B.shape)
    return np.sqrt((B * B).sum(axis=0))


def column_group_lasso(B: Any) -> Any:
    """sum_j ||B[:, j]||_2: a scalar tensor (differentiable) for torch inputs and modules, a float
    for numpy and scipy ones. Accepts what ``column_norms`` accepts."""
    norms = column_norms(B)
    return norms.sum() if torch.is_tensor(norms) else float(norms.sum())


@torch.no_grad()
def prox_column_group_lasso_(module: ImplicitModule, step: float) -> torch.Tensor:
    """The group soft threshold on B's columns, in place; returns the kept columns (bool, (p,)).

    B[:, j] <- max(0, 1 - step / ||B[:, j]||_2) B[:, j]: columns with norm <= step become exactly
    zero. ``step`` is the learning rate times the penalty weight.
    """
    _expect_module(module)
    step = _check_step(step)
    norms = column_norms(module)
    kept = norms > step
    scale = torch.where(kept, 1 - step / torch.where(kept, norms, torch.ones_like(norms)), torch.zeros_like(norms))
    module.B_values.mul_(scale[module.B_pattern.indices])
    return kept


def column_linf_norms(B: Any) -> Any:
    """||B e_j||_inf = max_i |B_ij| for every column j; accepts what ``column_norms`` accepts
    (a tensor for torch inputs and modules, differentiable; a numpy array otherwise)."""
    if isinstance(B, ImplicitModule):
        return _column_max_abs(B.B_values, B.B_pattern.indices, B.p)
    if torch.is_tensor(B):
        if B.layout == torch.sparse_csr:
            return _column_max_abs(B.values(), B.col_indices(), B.shape[1])
        _expect_matrix(B.shape)
        return B.abs().amax(0) if B.shape[0] else B.new_zeros(B.shape[1])
    if sp.issparse(B):
        _expect_matrix(B.shape)
        return np.asarray(abs(sp.csc_array(B)).max(axis=0).toarray()).ravel()
    B = np.asarray(B)
    _expect_matrix(B.shape)
    return np.abs(B).max(axis=0, initial=0.0)


def column_linf_penalty(B: Any) -> Any:
    """sum_j ||B e_j||_inf, the feature-selection penalty: a scalar tensor (differentiable) for
    torch inputs and modules, a float for numpy and scipy ones."""
    norms = column_linf_norms(B)
    return norms.sum() if torch.is_tensor(norms) else float(norms.sum())


def prox_column_linf(B: Any, step: float) -> Any:
    """prox_{step sum_j ||. e_j||_inf}(B) of a dense matrix (numpy array or tensor), a new one.

    Column by column v - P_{||w||_1 <= step}(v) (Moreau): columns with ||v||_1 <= step become
    exactly zero, the others are clipped to [-theta, theta] with theta their l1-ball threshold.
    """
    step = _check_step(step)
    _expect_matrix(tuple(B.shape))
    columns = B.T
    return (columns - project_rows_l1(columns, step)).T


@torch.no_grad()
def prox_column_linf_(module: ImplicitModule, step: float) -> torch.Tensor:
    """``prox_column_linf`` on B's stored entries, in place; returns the kept columns (bool, (p,)).

    Entries outside B's pattern are zero and stay zero (they neither raise ||v||_inf nor enter
    the l1 projection), so the prox over the stored entries is the prox over the pattern's
    matrices. ``step`` is the learning rate times the penalty weight.
    """
    _expect_module(module)
    step = _check_step(step)
    pattern = module.B_pattern
    order = pattern.transpose_order  # the positions in B_values of B's entries, column after column
    by_column = module.B_values[order]
    inside = project_rows_l1(by_column, step, indptr=pattern.transpose_indptr)
    module.B_values[order] = by_column - inside
    return row_l1_norms(by_column, pattern.transpose_indptr) > step


def robustness_penalty(A: Any, B: Any = None, C: Any = None, D: Any = None) -> Any:
    """(||B||_inf^2 + ||C||_inf^2) / (2 (1 - ||A||_inf)) + ||D||_inf, induced inf norms.

    Call it with an ``ImplicitModule`` (its stored values; a scalar tensor, differentiable) or
    with four dense matrices A, B, C, D (tensors: a differentiable scalar tensor; arrays: a float).
    For 1-Lipschitz activations it bounds the l_inf -> l_inf Lipschitz constant of u -> y (see
    the module docstring).

    Raises:
        NotWellPosedError: ||A||_inf >= 1 (project A first: ``module.project_(kappa)``, kappa < 1).
    """
    if isinstance(A, ImplicitModule):
        norms = [_inf_norm(A, name) for name in "ABCD"]
    else:
        if B is None or C is None or D is None:
            raise ArgumentValueError(
                "robustness_penalty: pass an ImplicitModule, or the four matrices A, B, C, D; got "
                f"{type(A).__name__} with B={type(B).__name__}, C={type(C).__name__}, D={type(D).__name__}"
            )
        norms = [_dense_inf_norm(matrix) for matrix in (A, B, C, D)]
    norm_a, norm_b, norm_c, norm_d = norms
    gain = float(norm_a.detach()) if torch.is_tensor(norm_a) else float(norm_a)
    if not gain < 1:
        raise NotWellPosedError(
            f"robustness_penalty needs ||A||_inf < 1, got {gain:.6g}; project A first "
            "(module.project_(kappa) with kappa < 1)"
        )
    return (norm_b**2 + norm_c**2) / (2 * (1 - norm_a)) + norm_d


def sensitivity_matrix(module: ImplicitModule) -> torch.Tensor:
    """S = |C| (I - Lambda |A|)^{-1} Lambda |B| + |D|, (q, p), differentiable (dense solve).

    Raises:
        NotWellPosedError: an activation is not Lipschitz (square) or lambda_pf(Lambda |A|) >= 1.
        ShapeError: more than ``DENSE_SOLVE_LIMIT`` states; use ``norm_sensitivity_bound``.
    """
    if module.n > DENSE_SOLVE_LIMIT:
        raise ShapeError(
            f"sensitivity_matrix solves a dense {module.n} x {module.n} system; models up to "
            f"{DENSE_SOLVE_LIMIT} states are supported. Use norm_sensitivity_bound for large models"
        )
    lipschitz = _finite_lipschitz(module)
    loop_gain = lipschitz[:, None] * module.dense("A").abs()
    _check_loop_gain(loop_gain)
    identity = torch.eye(module.n, dtype=module.dtype, device=loop_gain.device)
    states = torch.linalg.solve(identity - loop_gain, lipschitz[:, None] * module.dense("B").abs())
    return module.dense("C").abs() @ states + module.dense("D").abs()


def sensitivity_bound(module: ImplicitModule) -> torch.Tensor:
    """||S||_inf (largest row sum of S): ||y(u) - y(u')||_inf <= it * ||u - u'||_inf. A scalar
    tensor, differentiable in the weights; see ``sensitivity_matrix`` for when it applies."""
    return sensitivity_matrix(module).sum(1).max()


def norm_sensitivity_bound(module: ImplicitModule) -> torch.Tensor:
    """||D||_inf + ||C||_inf l ||B||_inf / (1 - l ||A||_inf), l the largest Lipschitz constant.

    A scalar tensor, differentiable, for models of any size; >= ``sensitivity_bound``.

    Raises:
        NotWellPosedError: an activation is not Lipschitz, or l ||A||_inf >= 1 (project first).
    """
    lipschitz = float(_finite_lipschitz(module).max()) if module.n else 0.0
    norm = {name: _inf_norm(module, name) for name in "ABCD"}
    gain = lipschitz * norm["A"]
    if not float(gain.detach()) < 1:
        raise NotWellPosedError(
            f"norm_sensitivity_bound needs l ||A||_inf < 1, got {float(gain.detach()):.4g} (l = {lipschitz:g}); "
            f"project A first: module.project_(kappa) with kappa < {1 / lipschitz if lipschitz else 1:g}"
        )
    return norm["D"] + norm["C"] * lipschitz * norm["B"] / (1 - gain)


# ------------------------------------------------------------------------------------ helpers
def _column_sums_of_squares(values: torch.Tensor, columns: torch.Tensor, n_columns: int) -> torch.Tensor:
    return values.new_zeros(n_columns).index_add(0, columns, values * values)


def _column_max_abs(values: torch.Tensor, columns: torch.Tensor, n_columns: int) -> torch.Tensor:
    """max |value| per column (0 for a column without entries), differentiable."""
    return values.new_zeros(n_columns).scatter_reduce(0, columns, values.abs(), reduce="amax", include_self=True)


def _dense_inf_norm(matrix: Any) -> Any:
    """The largest row l1 norm of a dense 2-D tensor or array (0 without rows)."""
    _expect_matrix(tuple(matrix.shape))
    if torch.is_tensor(matrix):
        sums = matrix.abs().sum(1)
        return sums.max() if sums.numel() else sums.new_zeros(())
    return float(np.abs(np.asarray(matrix, dtype=np.float64)).sum(axis=1).max(initial=0.0))


def _expect_module(module: Any) -> None:
    if not isinstance(module, ImplicitModule):
        raise ShapeError(f"expected an ImplicitModule, got {type(module).__name__}")


def _check_step(step: Any) -> float:
    expected = "a finite number >= 0 (learning rate x penalty weight)"
    value = arguments.real(step, "step", expected)
    if not value >= 0:
        raise ArgumentValueError(f"step: expected {expected}, got {step!r}")
    return value


def _safe_sqrt(squares: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 (a subgradient) at 0 instead of NaN."""
    positive = squares > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, squares, torch.ones_like(squares))), 0.0)


def _expect_matrix(shape: tuple) -> None:
    if len(shape) != 2:
        raise ShapeError(f"expected a 2-D matrix B (states x inputs), got shape {tuple(shape)}")


def _finite_lipschitz(module: ImplicitModule) -> torch.Tensor:
    lipschitz = module.lipschitz_per_state()
    if not bool(torch.isfinite(lipschitz).all()):
        names = sorted({str(a) for _, _, a in module.segments if math.isinf(a.lipschitz)})
        raise NotWellPosedError(
            f"a sensitivity bound needs Lipschitz activations; this model has {', '.join(map(repr, names))}"
        )
    return lipschitz


def _check_loop_gain(loop_gain: torch.Tensor) -> None:
    """lambda_pf(Lambda |A|) < 1: cheap when ||Lambda |A|||_inf < 1, else computed."""
    if loop_gain.numel() == 0 or float(loop_gain.detach().sum(1).max()) < 1:
        return
    from ..analysis.spectral import perron_frobenius_eigenvalue

    radius = perron_frobenius_eigenvalue(sp.csr_array(loop_gain.detach().cpu().numpy()))
    if not radius < 1:
        raise NotWellPosedError(
            f"the sensitivity bound needs lambda_pf(Lambda |A|) < 1, got {radius:.4g}; project A first "
            "with module.project_(kappa), kappa < 1"
        )


def _inf_norm(module: ImplicitModule, name: str) -> torch.Tensor:
    pattern = getattr(module, f"{name}_pattern")
    values = getattr(module, f"{name}_values")
    if pattern.nnz == 0:
        return values.new_zeros(())
    return values.new_zeros(pattern.shape[0]).index_add(0, pattern.row_ids, values.abs()).max()
