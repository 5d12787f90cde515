"""Penalties for training implicit models: feature selection and robustness.

Feature selection (column group lasso). Input j reaches the model only through column j of B and
D's column j; the group lasso on B's columns

    R(B) = sum_j ||B[:, j]||_2

drives whole columns to zero, i.e. drops inputs. It is not differentiable where a column is zero,
so train with a proximal step after each optimizer update (``prox_column_group_lasso_``): the
group soft threshold

    B[:, j] <- max(0, 1 - step / ||B[:, j]||_2) B[:, j],   step = learning rate x penalty weight,

sets columns with norm <= step exactly to zero.

Robustness (a certified sensitivity bound). With L_i the Lipschitz constant of state i's
activation, Lambda = diag(L) and lambda_pf(Lambda |A|) < 1, every pair of inputs satisfies
|y(u) - y(u')| <= S |u - u'| componentwise with

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

from ..errors import NotWellPosedError, ShapeError
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
    if not isinstance(module, ImplicitModule):
        raise ShapeError(f"expected an ImplicitModule, got {type(module).__name__}")
    step = float(step)
    if not step >= 0:
        raise ValueError(f"step: expected a number >= 0 (learning rate x penalty weight), got {step}")
    norms = column_norms(module)
    kept = norms > step
    scale = torch.where(kept, 1 - step / torch.where(kept, norms, torch.ones_like(norms)), torch.zeros_like(norms))
    module.B_values.mul_(scale[module.B_pattern.indices])
    return kept


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
