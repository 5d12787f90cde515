"""Fixed-point iteration x = g(x) on a batch of states (columns of an (m, batch) array).

Every sample (column) is iterated, tested and stopped on its own. With f_k = g(x_k) - x_k:

    residual   r_k = ||f_k||_inf / ||g(x_k)||_inf                      (relative)
    rate       L_k = max of the last ``RATE_WINDOW`` secant ratios
                     ||g(x_j) - g(x_{j-1})||_inf / ||x_j - x_{j-1}||_inf  (a local Lipschitz estimate)
    error      e_k = r_k / (1 - L_k)                                   (relative error of x_k)

For a map that contracts with factor L, ||x_k - x*|| <= ||f_k|| / (1 - L): the test e_k <= tol
bounds the error of the states, not just the last step (with L = 0.99 a residual of 1e-6 is an
error of up to 1e-4). A sample stops when e_k <= tol (at least two evaluations, unless f_k = 0),
returning g(x_k); the samples still running are the only ones ``g`` is asked to evaluate, so a
converged sample stops costing work.

Picard: x_{k+1} = g(x_k). Its error shrinks by about L per step.

Anderson (type II, memory m; Walker & Ni 2011) with f and the differences dF = [f_{i+1} - f_i],
dG = [g(x_{i+1}) - g(x_i)] of the last m steps: per sample gamma = argmin ||f_k - dF gamma||_2
(regularised normal equations, kept up to date one row and column per step) and
x_{k+1} = g(x_k) - dG gamma. It is turned on for a sample once its rate exceeds
``ACCELERATE_FROM`` (a fast contraction gains little from it). Safeguard: when a sample's
residual grows past twice its best, its history is dropped and its next step is a Picard step
(a restart).

A residual that stops improving near the dtype's rounding (``STALL_ITERATIONS`` steps without a
new best, below ``FLOOR_EPS`` machine epsilons) ends the iteration with a ConvergenceError that
says so, instead of spinning to max_iter.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import ConvergenceError, ToleranceError

# g(x, columns): the map at x (m, k) for the samples ``columns`` (indices into the batch).
BatchMap = Callable[[np.ndarray, np.ndarray], np.ndarray]
FixedPointMap = Callable[[np.ndarray], np.ndarray]

RATE_WINDOW = 3
ACCELERATE_FROM = 0.1
STALL_ITERATIONS = 20
FLOOR_EPS = 1000
# Steps smaller than this many epsilons (relative) are mostly rounding: no rate is read off them.
SECANT_FLOOR = 16
# A residual of at most this many epsilons counts as converged (below the least tolerance).
EXACT_FLOOR = 2
# The smallest tolerance a dtype can be asked for, in machine epsilons.
LEAST_TOLERANCE_EPS = 4


@dataclass(frozen=True)
class FixedPoint:
    """The result of ``iterate``.

    Attributes:
        x: g(x_k) of each sample at its last step, (m, batch).
        history: the largest residual over the running samples after each step.
        error: the largest estimated relative error e_k over the samples when they stopped.
    """

    x: np.ndarray
    history: list[float]
    error: float


def check_tolerance(tol: float, dtype: np.dtype) -> None:
    """Raise ToleranceError for a tolerance the dtype cannot reach (or one that is not positive)."""
    eps = float(np.finfo(dtype).eps)
    if not np.isfinite(tol) or tol <= 0:
        raise ToleranceError(f"the solver tolerance must be a positive number, got tol={tol!r}")
    if tol < LEAST_TOLERANCE_EPS * eps:
        raise ToleranceError(
            f"tol={tol:.3g} is below what {np.dtype(dtype).name} can reach (machine epsilon {eps:.3g}; the "
            f"least tolerance is {LEAST_TOLERANCE_EPS * eps:.3g}): loosen tol, or solve in float64 "
            "(model.astype(np.float64) and float64 inputs)"
        )


def iterate(
    g: BatchMap,
    x0: np.ndarray,
    tol: float,
    max_iter: int,
    memory: int = 5,
    what: str = "model",
    regularization: float | None = None,
) -> FixedPoint:
    """Iterate g from x0 (m, batch), each sample until its estimated error is below tol.

    ``memory`` = 0 is plain Picard. ``regularization`` is relative to the trace of the
    least-squares normal matrix (default: 100 machine epsilons of x0's dtype). Raises
    ConvergenceError, carrying the history, when max_iter iterations do not reach tol, when the
    residual stalls at the rounding floor, or when the iterates stop being finite.
    """
    eps = float(np.finfo(x0.dtype).eps)
    if regularization is None:
        regularization = 100 * eps
    tiny = float(np.finfo(x0.dtype).tiny)
    out = np.empty_like(x0)
    columns = np.arange(x0.shape[1])
    x = x0
    history: list[float] = []
    worst_error = 0.0
    state = _SampleState(x0.shape[1], memory)
    error = np.full(1, np.inf)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for _ in range(max_iter):
            gx = g(x, columns)
            step, size, dx, dg = column_maxima(x, gx, state.previous)
            scale = np.maximum(size, tiny)
            residual = step / scale
            history.append(float(residual.max(initial=0.0)))
            if not np.isfinite(residual).all():
                raise ConvergenceError(_diverged_message(what, len(history)), history)
            rate = state.rate(x, gx, dx, dg, scale, SECANT_FLOOR * eps)
            error = np.where(rate < 1, residual / (1 - np.minimum(rate, 1)), np.inf)
            error[residual <= EXACT_FLOOR * eps] = 0.0  # at the rounding floor: as exact as it gets
            done = error <= tol
            if done.any():
                out[:, columns[done]] = gx[:, done]
                worst_error = max(worst_error, float(error[done].max()))
                keep = np.flatnonzero(~done)
                if keep.size == 0:
                    return FixedPoint(out, history, worst_error)
                columns, x, gx, residual, rate = columns[keep], x[:, keep], gx[:, keep], residual[keep], rate[keep]
                state.keep(keep)
            stuck = state.stalled(residual, eps)
            if stuck.any():
                raise ConvergenceError(
                    _floor_message(what, len(history), residual[stuck], rate[stuck], tol, x0.dtype), history
                )
            x = state.step(x, gx, gx - x, residual, rate, regularization) if memory else gx
    raise ConvergenceError(_stalled_message(what, max_iter, history[-1], float(error.max()), tol), history)


class _SampleState:
    """Per-sample bookkeeping of ``iterate``: rates, best residuals, the Anderson history."""

    def __init__(self, batch: int, memory: int):
        self.memory = memory
        self.rates: deque[np.ndarray] = deque(maxlen=RATE_WINDOW)
        self.previous: tuple[np.ndarray, np.ndarray] | None = None  # (x, g(x)) of the last step
        self.best = np.full(batch, np.inf)
        self.since_best = np.zeros(batch, dtype=np.int64)
        self.accelerating = np.zeros(batch, dtype=bool)
        self.dF: deque[np.ndarray] = deque(maxlen=memory)  # f_{i+1} - f_i, newest last
        self.dG: deque[np.ndarray] = deque(maxlen=memory)  # g_{i+1} - g_i
        self.gram = np.zeros((batch, memory, memory))  # <dF_i, dF_j> per sample
        self.last_f: np.ndarray | None = None  # f and g(x) of the last step
        self.previous_g: np.ndarray | None = None

    def rate(self, x, gx, dx, dg, scale: np.ndarray, floor: float) -> np.ndarray:
        """The rate estimate L_k per sample (inf until a secant ratio is known) from the steps'
        sizes dx = ||x_k - x_{k-1}||, dg = ||g(x_k) - g(x_{k-1})||. Steps at the rounding
        floor (relative size below ``floor``) repeat the last ratio."""
        if self.previous is not None:
            measurable = dx > floor * scale
            ratio = dg / np.where(measurable, dx, 1.0)
            last = self.rates[-1] if self.rates else np.full(x.shape[1], np.inf)
            self.rates.append(np.where(measurable, ratio, last))
        self.previous = (x, gx)
        if not self.rates:
            return np.full(x.shape[1], np.inf)
        return np.max(np.stack(self.rates), axis=0)

    def keep(self, keep: np.ndarray) -> None:
        """Drop the samples that stopped (keep: positions of those still running)."""
        self.rates = deque((r[keep] for r in self.rates), maxlen=RATE_WINDOW)
        if self.previous is not None:
            self.previous = (self.previous[0][:, keep], self.previous[1][:, keep])
        self.best, self.since_best, self.accelerating = self.best[keep], self.since_best[keep], self.accelerating[keep]
        self.dF = deque((d[:, keep] for d in self.dF), maxlen=self.memory)
        self.dG = deque((d[:, keep] for d in self.dG), maxlen=self.memory)
        self.gram = self.gram[keep]
        if self.last_f is not None:
            self.last_f, self.previous_g = self.last_f[:, keep], self.previous_g[:, keep]

    def stalled(self, residual: np.ndarray, eps: float) -> np.ndarray:
        """The samples whose residual has not improved for ``STALL_ITERATIONS`` steps at the
        rounding floor."""
        improved = residual < self.best
        self.best = np.where(improved, residual, self.best)
        self.since_best = np.where(improved, 0, self.since_best + 1)
        return (self.since_best >= STALL_ITERATIONS) & (self.best <= FLOOR_EPS * eps)

    def step(
        self, x: np.ndarray, gx: np.ndarray, f: np.ndarray, residual: np.ndarray, rate: np.ndarray, regularization
    ) -> np.ndarray:
        """The next iterate: Anderson's for the samples it is on for, Picard's for the others."""
        self.accelerating |= np.isfinite(rate) & (rate > ACCELERATE_FROM)
        if self.last_f is not None:
            self._push(f - self.last_f, gx - self.previous_g)
        self.last_f, self.previous_g = f, gx
        restart = residual > 2 * self.best
        if restart.any():  # the mixed step made things worse: forget these samples' history
            for d in (*self.dF, *self.dG):
                d[:, restart] = 0
            self.gram[restart] = 0
        use = self.accelerating & ~restart
        if not self.dF or not use.any():
            return gx
        k = len(self.dF)
        gram = self.gram[:, self.memory - k :, self.memory - k :].copy()
        rhs = _dots(self.dF, f)
        trace = np.einsum("bii->b", gram)
        gram += (regularization * np.where(trace > 0, trace, 1.0))[:, None, None] * np.eye(k)
        try:
            gamma = np.linalg.solve(gram, rhs[..., None])[..., 0]  # (batch, k)
        except np.linalg.LinAlgError:
            return gx  # a degenerate history: take the Picard step
        gamma[~use] = 0
        gamma = gamma.astype(gx.dtype)
        step = gx.copy()
        for j, difference in enumerate(self.dG):
            step -= gamma[:, j] * difference
        return step

    def _push(self, dF: np.ndarray, dG: np.ndarray) -> None:
        """Append a difference pair, shifting the Gram matrix (newest in the last row/column)."""
        self.dF.append(dF)
        self.dG.append(dG)
        m = self.memory
        self.gram[:, :-1, :-1] = self.gram[:, 1:, 1:]
        k = len(self.dF)
        dots = _dots(self.dF, dF)  # the newest last
        self.gram[:, m - k :, m - 1] = dots
        self.gram[:, m - 1, m - k :] = dots


def column_maxima(x: np.ndarray, gx: np.ndarray, previous: tuple[np.ndarray, np.ndarray] | None):
    """Per column: max |g(x) - x|, max |g(x)|, max |x - x_prev|, max |g(x) - g_prev| (the last
    two zero without a previous step; NaN where a value is). (A numba pass computing the four
    at once was slower here: its NaN-keeping maxima do not vectorize.)"""
    px, pg = (x, gx) if previous is None else previous
    biggest = lambda a: np.max(np.abs(a), axis=0, initial=0.0).astype(np.float64)
    return biggest(gx - x), biggest(gx), biggest(x - px), biggest(gx - pg)


def _dots(vectors, v: np.ndarray) -> np.ndarray:
    """(batch, len(vectors)): per sample (column), the dot product of each of vectors with v
    (no stacked copy of the history)."""
    return np.stack([np.einsum("mb,mb->b", w, v) for w in vectors], axis=1)


def picard(
    g: FixedPointMap, x0: np.ndarray, tol: float, max_iter: int, what: str = "model"
) -> tuple[np.ndarray, list[float]]:
    """Iterate x <- g(x) from x0; return (fixed point, residual history)."""
    return anderson(g, x0, tol, max_iter, memory=0, what=what)


def anderson(
    g: FixedPointMap,
    x0: np.ndarray,
    tol: float,
    max_iter: int,
    memory: int = 5,
    regularization: float | None = None,
    what: str = "model",
) -> tuple[np.ndarray, list[float]]:
    """``iterate`` for a map of the whole batch, g(x); returns (fixed point, residual history)."""
    batch = x0.shape[1]

    def on_columns(x: np.ndarray, columns: np.ndarray) -> np.ndarray:
        if columns.size == batch:
            return g(x)
        full = np.zeros_like(x0)
        full[:, columns] = x
        return g(full)[:, columns]

    result = iterate(on_columns, x0, tol, max_iter, memory=memory, what=what, regularization=regularization)
    return result.x, result.history


def _diverged_message(what: str, iterations: int) -> str:
    return (
        f"fixed-point iteration on {what} diverged after {iterations} iterations (the iterates "
        "overflowed to inf/NaN): the equilibrium equation is not well-posed for this input. Check "
        "that the activations are non-expansive and ||A||_inf < 1 (or the Perron-Frobenius "
        "eigenvalue of |A| < 1) on the cyclic part"
    )


def _stalled_message(what: str, max_iter: int, residual: float, error: float, tol: float) -> str:
    return (
        f"fixed-point iteration on {what} did not converge in {max_iter} iterations: residual "
        f"{residual:.3g}, estimated error {error:.3g} > tol {tol:.3g}. The model may not be well-posed "
        "(check ||A||_inf < 1 or the Perron-Frobenius eigenvalue of |A| < 1 on the cyclic part); "
        "otherwise raise max_iter or loosen tol. The residual history is in the error's residual_history"
    )


def _floor_message(what, iterations, residual, rate, tol, dtype) -> str:
    eps = float(np.finfo(dtype).eps)
    worst = int(np.argmax(residual))
    L = float(rate[worst])
    reach = eps / (1 - L) if L < 1 else np.inf
    return (
        f"fixed-point iteration on {what} stalled after {iterations} iterations at residual "
        f"{float(residual[worst]):.3g}, the rounding floor of {np.dtype(dtype).name} (epsilon {eps:.3g}): with the "
        f"estimated contraction rate {L:.4g} the error cannot go below about {reach:.3g}, above tol {tol:.3g}. "
        "Loosen tol, or solve in float64 (model.astype(np.float64) and float64 inputs)"
    )
