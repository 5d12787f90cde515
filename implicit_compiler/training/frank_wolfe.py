"""Frank-Wolfe (conditional gradient) training of A over the ball {||A||_inf <= kappa}: sparse A.

The set. ||A||_inf is the largest row l1 norm, so K = {A : ||A||_inf <= kappa} is the product of
one l1 ball of radius kappa per row. Its vertices are the matrices with exactly one entry
+-kappa per row; with kappa < 1 every point of K is a well-posed model (non-expansive phi).
Over a sparsity pattern (a CSR matrix's stored entries, e.g. strictly lower triangular for an
acyclic model) K is intersected with the matrices on that pattern: each row's ball lives on its
stored entries.

The linear minimization oracle (LMO). For a gradient G = dL/dA,

    S = argmin_{S in K} <G, S>:   S_i: = -kappa sign(G_ij*) e_j*,   j* = argmax_j |G_ij|

row by row (a linear function on an l1 ball is smallest at the vertex opposite to the largest
gradient entry; ties go to the first such entry, a zero row of G gives S_i: = 0, also a
minimizer). No projection, no sort: one pass over G.

The step. A <- (1 - gamma) A + gamma S with the standard gamma_t = 2 / (t + 2), t = 0, 1, ...
(or, in ``frank_wolfe``, an exact line search: gamma minimizing L on the segment [A, S]). A stays
in K (a convex combination of points of K), so the model stays well-posed without a projection.
From A_0 = 0, A_t is a convex combination of at most t vertices, so row i of A_t has at most t
non-zeros: each step adds at most one non-zero per row (the sparse models of the implicit deep
learning course's slides). ``nonzeros`` counts them.

The duality gap. For a convex L,

    g(A) = <G, A - S> = <G, A> + kappa sum_i max_j |G_ij|  >=  L(A) - min_K L,

since L(A*) >= L(A) + <G, A* - A> >= L(A) + min_{S in K} <G, S - A>. It is computed for free
from the LMO, and is the natural stopping rule (g <= tol) and history entry. For a non-convex L
(an implicit model) g(A) = 0 exactly at the stationary points of L over K, so it still measures
how far A is from stationary.

Training an implicit model (``FrankWolfeSteps``, run by the estimators with ``solver="frank_wolfe"``).
The gradient dL/dA comes from the implicit differentiation of ``ImplicitModule`` (one adjoint
solve per step). A starts at 0 (a random start would be dense; from 0 the iterates are sparse), or
at ``init_model``'s A projected into K; a warm start begins the step count at one epoch's steps
(gamma_0 = 1 would replace the given A by a vertex). Each step, on a mini-batch (``batch_size``; a batch as
large as the training set gives the deterministic method, whose gap is then exact):

    A  <- (1 - gamma_t) A + gamma_t S(dL/dA),     gamma_t = 2 / (t + 2), t counting steps
    B, C, D, b_x, b_y <- one Adam step (``learning_rate``), then the column penalties' prox on B

B, C, D and the biases take plain (Adam) gradient steps rather than Frank-Wolfe steps over balls
of their own: well-posedness constrains A only, so they are unconstrained; a ball on each would be
one more radius to guess per matrix (too small a radius caps the fit, as kappa does not: any
kappa < 1 is well-posed), and the sparsity that matters for the equilibrium solve is A's. Column
sparsity of B is what ``column_linf`` (or ``group_lasso``) is for. So training is a block method: a Frank-Wolfe step
on the constrained block A, a gradient step on the rest, from the same backward pass.

Mini-batch gaps are estimates (the gradient is a mini-batch's); the history keeps each epoch's
mean. Training stops on the estimators' rule (no improvement of the watched loss by ``tol`` for
``n_iter_no_change`` epochs; the "adaptive" schedule divides Adam's step instead) or as soon as an
epoch's gap is at most ``tol``; the best epoch's weights are restored when a validation split is
watched (still in K: every iterate is).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from .. import arguments
from ..errors import ArgumentTypeError, ArgumentValueError, ShapeError


@dataclass(frozen=True)
class FrankWolfeHistory:
    """One entry per iteration (``frank_wolfe``) or per epoch (``FrankWolfeSteps``).

    Attributes:
        loss: the objective at the iterate the step started from (the epoch's mean training loss).
        duality_gap: <G, A - S>, an upper bound on loss - min over the ball when it is convex
            (the epoch's mean over its mini-batches).
        step_size: the gamma of the step (the epoch's last).
        nonzeros: non-zero entries of A after the step (after the epoch).
    """

    loss: tuple[float, ...]
    duality_gap: tuple[float, ...]
    step_size: tuple[float, ...]
    nonzeros: tuple[int, ...]


@dataclass(frozen=True)
class FrankWolfeResult:
    """The outcome of ``frank_wolfe``: the last iterate, its gap, and the history."""

    A: np.ndarray
    duality_gap: float
    converged: bool
    history: FrankWolfeHistory


# ------------------------------------------------------------------------------- the oracle
def linear_minimization_oracle(gradient: Any, kappa: float, indptr: Any = None) -> Any:
    """S = argmin over {||S||_inf <= kappa} of <gradient, S>: per row, -kappa sign(G_ij*) at j* = argmax |G_ij|.

    Args:
        gradient: a dense 2-D array or tensor, or, with ``indptr``, the 1-D values of a CSR matrix
            (the ball then lives on the stored entries).
        kappa: the radius, >= 0.
        indptr: CSR row pointers, or None for a dense gradient.

    Returns:
        S with the kind (numpy or torch), shape and dtype of ``gradient``: one non-zero per row
        (none where the row's gradient is zero or the row stores nothing).
    """
    kappa = _radius(kappa)
    values, indptr, restore = _as_rows(gradient, indptr, "gradient")
    vertex = np.zeros_like(values)
    rows = np.flatnonzero(np.diff(indptr) > 0)
    if rows.size:
        row_ids = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        order = np.lexsort((-np.abs(values), row_ids))  # per row, the largest |G| first (first index on ties)
        largest = order[indptr[rows]]
        vertex[largest] = -kappa * np.sign(values[largest])
    return restore(vertex)


def duality_gap(gradient: Any, A: Any, vertex: Any) -> float:
    """<G, A - S>: the Frank-Wolfe gap (an upper bound on L(A) - min L over the ball for a convex L)."""
    G, A, S = (_numpy(x, name) for x, name in ((gradient, "gradient"), (A, "A"), (vertex, "vertex")))
    if not G.shape == A.shape == S.shape:
        raise ShapeError(f"duality_gap: gradient, A and vertex must share a shape, got {G.shape}, {A.shape}, {S.shape}")
    return float(np.sum(G.astype(np.float64) * (A.astype(np.float64) - S)))


def standard_step_size(t: int) -> float:
    """gamma_t = 2 / (t + 2) for the t-th step (t = 0, 1, ...): gamma_0 = 1 jumps to a vertex."""
    return 2.0 / (arguments.integer(t, "t", 0) + 2)


def nonzeros(A: Any) -> int:
    """The number of non-zero entries (stored zeros of a pattern do not count)."""
    return int(np.count_nonzero(_numpy(A, "A")))


# ------------------------------------------------------------------------------- the method
def frank_wolfe(
    objective: Callable[[np.ndarray], float],
    gradient: Callable[[np.ndarray], np.ndarray],
    A0: Any,
    kappa: float,
    max_iter: int = 100,
    tol: float = 0.0,
    line_search: bool = False,
) -> FrankWolfeResult:
    """Minimize ``objective`` over {||A||_inf <= kappa} by Frank-Wolfe steps from A0 (dense 2-D).

    Args:
        objective: A -> L(A).
        gradient: A -> dL/dA, shaped like A.
        A0: the start; must lie in the ball (0 gives sparse iterates).
        kappa: the radius, >= 0.
        max_iter: the most steps.
        tol: stop once the duality gap is at most this.
        line_search: choose gamma in [0, 1] minimizing the objective on the segment [A, S]
            (scipy's bounded scalar search) instead of 2 / (t + 2).
    """
    kappa = _radius(kappa)
    max_iter = arguments.integer(max_iter, "max_iter", 1)
    tol = arguments.real(tol, "tol", "a finite number >= 0")
    if tol < 0:
        raise ArgumentValueError(f"tol: expected a finite number >= 0, got {tol!r}")
    if not isinstance(line_search, bool):
        raise ArgumentTypeError(f"line_search: expected True or False, got {line_search!r}")
    A = np.array(_numpy(A0, "A0"), dtype=np.float64)
    if A.ndim != 2:
        raise ShapeError(f"A0: expected a 2-D array, got shape {A.shape}")
    largest_row = float(np.abs(A).sum(axis=1).max()) if A.size else 0.0
    if largest_row > kappa * (1 + 1e-12):
        raise ArgumentValueError(
            f"A0: expected a start in the ball ||A||_inf <= kappa = {kappa}, got ||A0||_inf = {largest_row}; "
            "start from 0 or project it (project_inf_norm)"
        )
    losses, gaps, steps, counts = [], [], [], []
    gap, converged = np.inf, False
    for t in range(max_iter):
        G = np.asarray(gradient(A), dtype=np.float64)
        S = linear_minimization_oracle(G, kappa)
        gap = duality_gap(G, A, S)
        losses.append(float(objective(A)))
        gaps.append(gap)
        if gap <= tol:
            converged = True
            break
        gamma = _line_search(objective, A, S) if line_search else standard_step_size(t)
        A = (1 - gamma) * A + gamma * S
        steps.append(gamma)
        counts.append(nonzeros(A))
    history = FrankWolfeHistory(tuple(losses), tuple(gaps), tuple(steps), tuple(counts))
    return FrankWolfeResult(A, float(gap), converged, history)


def _line_search(objective: Callable[[np.ndarray], float], A: np.ndarray, S: np.ndarray) -> float:
    result = minimize_scalar(lambda gamma: objective((1 - gamma) * A + gamma * S), bounds=(0.0, 1.0), method="bounded")
    return float(result.x)


# ------------------------------------------------------------------------------- estimators
class FrankWolfeSteps:
    """The estimators' steps for ``solver="frank_wolfe"`` (module docstring), run by their epoch
    loop (``estimators._ImplicitEstimator._optimize``): per mini-batch a Frank-Wolfe step on A
    and an Adam step on the rest, then the column penalties' prox; per epoch the mean duality
    gap, gamma and A's non-zeros, into ``frank_wolfe_history_`` at the end. Training also stops
    once an epoch's gap is at most ``tol``."""

    def __init__(self, estimator: Any, torch: Any, module: Any, steps_per_epoch: int):
        self.estimator, self.torch, self.module = estimator, torch, module
        self.kappa, self.indptr = float(estimator.kappa), module.A_pattern.indptr.numpy()
        self.t = 0
        if estimator.init_model is None:
            with torch.no_grad():
                module.A_values.zero_()  # from 0 the iterates are sparse
        else:  # a warm start: gamma_0 = 1 would replace the given A by a vertex
            self.t = steps_per_epoch  # the first step moves A by 2 / (steps + 2)
        others = [parameter for name, parameter in module.named_parameters() if name != "A_values"]
        self.optimizer = torch.optim.Adam(others, lr=estimator.learning_rate) if others else None
        self.gaps, self.gammas, self.counts, self.epoch_gaps, self.gamma = [], [], [], [], 1.0

    def step(self, step_size: float) -> None:
        """After the backward pass: A <- (1 - gamma) A + gamma S, Adam on the rest, the prox."""
        self.gamma = standard_step_size(self.t)
        with self.torch.no_grad():
            self.epoch_gaps.append(_frank_wolfe_step_(self.module, self.kappa, self.indptr, self.gamma))
        if self.optimizer is not None:
            self.optimizer.step()
        with self.torch.no_grad():
            self.estimator._prox_(self.module, step_size)
        self.t += 1

    def set_learning_rate(self, step_size: float) -> None:
        for group in self.optimizer.param_groups if self.optimizer is not None else ():
            group["lr"] = step_size

    def end_epoch(self) -> bool:
        """Record the epoch; True when its gap is at most ``tol`` (converged)."""
        self.gaps.append(float(np.mean(self.epoch_gaps)))
        self.gammas.append(self.gamma)
        self.counts.append(nonzeros(self.module.A_values.detach().numpy()))
        self.epoch_gaps = []
        if self.estimator.verbose:
            print(f"  duality gap {self.gaps[-1]:.3g}, non-zeros of A {self.counts[-1]}", file=sys.stderr, flush=True)
        return self.gaps[-1] <= self.estimator.tol

    def finish(self) -> None:
        self.estimator.frank_wolfe_history_ = FrankWolfeHistory(
            tuple(self.estimator.loss_curve_), tuple(self.gaps), tuple(self.gammas), tuple(self.counts)
        )


def _frank_wolfe_step_(module: Any, kappa: float, indptr: np.ndarray, gamma: float) -> float:
    """A <- (1 - gamma) A + gamma S(dL/dA) in place, over A's pattern; returns the duality gap."""
    values = module.A_values
    if values.grad is None:  # A does not reach the loss (no states): nothing to do
        return 0.0
    gradient = values.grad.detach().numpy()
    current = values.detach().numpy()
    vertex = linear_minimization_oracle(gradient, kappa, indptr=indptr)
    gap = float(np.dot(gradient.astype(np.float64), current.astype(np.float64) - vertex))
    values.mul_(1 - gamma).add_(values.new_tensor(vertex), alpha=gamma)
    return gap


# ------------------------------------------------------------------------------- helpers
def _radius(kappa: Any) -> float:
    kappa = arguments.real(kappa, "kappa", "a finite radius >= 0")
    if kappa < 0:
        raise ArgumentValueError(f"kappa: expected a finite radius >= 0, got {kappa!r}")
    return kappa


def _numpy(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    arguments.real_values(value, name)
    return np.asarray(value)


def _as_rows(gradient: Any, indptr: Any, name: str) -> tuple[np.ndarray, np.ndarray, Callable]:
    """The values in row order, CSR row pointers, and a function giving the result gradient's kind back."""
    is_torch = hasattr(gradient, "detach")
    array = _numpy(gradient, name)
    if array.dtype.kind != "f":
        array = array.astype(np.float64)
    if indptr is None:
        if array.ndim != 2:
            raise ShapeError(f"{name}: expected a 2-D matrix (or CSR values with indptr), got shape {array.shape}")
        shape = array.shape
        values = np.ascontiguousarray(array).reshape(-1)
        pointers = np.arange(shape[0] + 1) * shape[1]
    else:
        pointers = np.asarray(_numpy(indptr, "indptr"), dtype=np.int64)
        if array.ndim != 1 or pointers.ndim != 1 or pointers.size < 1 or pointers[-1] != array.size:
            raise ShapeError(
                f"{name}: expected CSR values of length indptr[-1] with 1-D indptr, got shapes {array.shape} "
                f"and {pointers.shape}"
            )
        shape, values = array.shape, array

    def restore(result: np.ndarray) -> Any:
        result = result.reshape(shape)
        if is_torch:
            import torch

            return torch.as_tensor(result, dtype=gradient.dtype, device=gradient.device)
        return result

    return values, pointers, restore
