"""Fixed-point iteration x = g(x) on a batch of states (columns of an (m, batch) array).

Residual: r_k = ||g(x_k) - x_k||_inf / max(1, ||g(x_k)||_inf), the largest over the batch;
the iteration stops when r_k <= tol and returns g(x_k).

Picard: x_{k+1} = g(x_k). It converges when g is a contraction (e.g. phi non-expansive and
||A||_inf < 1) and its error shrinks like the contraction factor per step.

Anderson (type II, memory m; Walker & Ni 2011): with f_k = g(x_k) - x_k and the differences
dF = [f_{i+1} - f_i], dG = [g(x_{i+1}) - g(x_i)] of the last m steps, solve per sample the
least-squares problem gamma = argmin ||f_k - dF gamma||_2 (regularised normal equations) and
step to x_{k+1} = g(x_k) - dG gamma. When a step makes the residual grow past twice the best so
far, the history is dropped and the next step is a plain Picard step (a restart).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from ..errors import ConvergenceError

FixedPointMap = Callable[[np.ndarray], np.ndarray]


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
    """Anderson-accelerated iteration of g from x0; memory=0 is plain Picard.

    ``regularization`` is relative to the trace of the least-squares normal matrix (default:
    100 machine epsilons of x0's dtype). Returns (fixed point, residual history). Raises
    ConvergenceError, carrying the history, when max_iter iterations do not reach tol or the
    iterates stop being finite.
    """
    if regularization is None:
        regularization = 100 * float(np.finfo(x0.dtype).eps)
    history: list[float] = []
    dF: deque[np.ndarray] = deque(maxlen=memory)  # f_{i+1} - f_i, newest last
    dG: deque[np.ndarray] = deque(maxlen=memory)  # g_{i+1} - g_i
    previous: tuple[np.ndarray, np.ndarray] | None = None  # (g, f) of the last step
    best = np.inf
    x = x0
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(max_iter):
            gx = g(x)
            f = gx - x
            residual = float(np.max(np.abs(f), initial=0.0) / max(1.0, float(np.max(np.abs(gx), initial=0.0))))
            history.append(residual)
            if not np.isfinite(residual):
                raise ConvergenceError(_diverged_message(what, len(history)), history)
            if residual <= tol:
                return gx, history
            if memory == 0:
                x = gx
                continue
            if residual > 2 * best:  # Anderson made things worse: restart from a Picard step
                dF.clear()
                dG.clear()
                previous = None
            best = min(best, residual)
            if previous is not None:
                dG.append(gx - previous[0])
                dF.append(f - previous[1])
            previous = (gx, f)
            x = _anderson_step(gx, f, dG, dF, regularization) if dF else gx
    raise ConvergenceError(_stalled_message(what, max_iter, history[-1], tol), history)


def _anderson_step(
    gx: np.ndarray, f: np.ndarray, dG: deque[np.ndarray], dF: deque[np.ndarray], regularization: float
) -> np.ndarray:
    """g(x_k) - dG gamma with gamma = argmin ||f_k - dF gamma|| solved for every sample."""
    dF_stack = np.stack(dF)  # (m, n, batch)
    gram = np.einsum("inb,jnb->bij", dF_stack, dF_stack)
    rhs = np.einsum("inb,nb->bi", dF_stack, f)
    trace = np.einsum("bii->b", gram)
    scale = np.where(trace > 0, trace, 1.0).astype(gram.dtype)
    gram += (regularization * scale)[:, None, None] * np.eye(gram.shape[1], dtype=gram.dtype)
    try:
        gamma = np.linalg.solve(gram, rhs[..., None])[..., 0]  # (batch, m)
    except np.linalg.LinAlgError:
        return gx  # a degenerate history: take the Picard step
    step = gx.copy()
    for i, difference in enumerate(dG):
        step -= gamma[:, i] * difference
    return step


def _diverged_message(what: str, iterations: int) -> str:
    return (
        f"fixed-point iteration on {what} diverged after {iterations} iterations (the iterates "
        "overflowed to inf/NaN): the equilibrium equation is not well-posed for this input. Check "
        "that the activations are non-expansive and ||A||_inf < 1 (or the Perron-Frobenius "
        "eigenvalue of |A| < 1) on the cyclic part"
    )


def _stalled_message(what: str, max_iter: int, residual: float, tol: float) -> str:
    return (
        f"fixed-point iteration on {what} did not converge in {max_iter} iterations: residual "
        f"{residual:.3g} > tol {tol:.3g}. The model may not be well-posed (check ||A||_inf < 1 or "
        "the Perron-Frobenius eigenvalue of |A| < 1 on the cyclic part); otherwise raise max_iter "
        "or loosen tol. The residual history is in the error's residual_history"
    )
