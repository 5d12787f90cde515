"""Deep equilibrium linear models: nonlinearity on the weights only, and why gradient descent converges linearly.

The setting of Kawaguchi, "On the Theory of Implicit Deep Learning: Global Convergence with
Implicit Layers" (ICLR 2021): a deep equilibrium model whose layer is linear in the state and
nonlinear in its weight,

    z = gamma sigma(A) z + phi(x),      f(x) = B z* = B (I - gamma sigma(A))^{-1} phi(x),

with a fixed feature map phi: R^d -> R^m (m the width), A in R^{m x m}, B in R^{m_y x m},
gamma in (0, 1) and sigma(A) the column softmax, sigma(A)_ij = exp(A_ij) / sum_k exp(A_kj). Every
column of sigma(A) sums to 1, so ||gamma sigma(A)||_1 = gamma < 1: the equilibrium exists and is
unique for every A (no projection needed), and M(A) = (I - gamma sigma(A))^{-1} = sum_k (gamma
sigma(A))^k is the infinitely deep weight-tied network.

The loss, over n samples with Phi = [phi(x_1) ... phi(x_n)] (m x n) and Y (m_y x n), is the
square loss L(A, B) = ||B M(A) Phi - Y||_F^2 / (2 n); it is non-convex in (A, B). The paper shows
gradient descent reaches the global optimum at a linear rate, with any width, m < m_y included
(its abstract: "allowing the width to be smaller than the output dimension and the number of
data points"). The target value is that of the shallow linear model on the same features,

    L* = min_W ||W Phi - Y||_F^2 / (2 n)     (least squares; ``optimal_loss``),

since B M(A) ranges over every W as B does (M(A) is invertible), so inf L = L*. The argument
(here for the square loss; we derive the constants ourselves) is a Polyak-Lojasiewicz inequality
through B alone: with R = B M Phi - Y, dL/dB = R Phi^T M^T / n and, W = B M, W* a least-squares
solution, R Phi^T = (W - W*) Phi Phi^T and L - L* = ||(W - W*) Phi||^2 / (2 n), so

    ||grad L||^2 >= ||dL/dB||^2 >= 2 mu(A) (L - L*),   mu(A) = lambda_min(Phi Phi^T / n) / ||I - gamma sigma(A)||_2^2

(lambda_min > 0 when Phi has full row rank m <= n: width at most the number of samples; the
output dimension m_y plays no part). A gradient step of size alpha on an L_s-smooth stretch then
gives L_{t+1} - L* <= (1 - 2 alpha mu (1 - alpha L_s / 2)) (L_t - L*): a straight line on a log
scale, whose slope ``pl_rate`` bounds. (The paper's Theorem 1 covers more losses and states its
own constants, which we could not check: only its abstract was reachable when this was written,
and the column softmax is sigma as we recall the paper's. This module reproduces the setting, not
its proof.)

Gradients, by implicit differentiation (what ``ImplicitModule`` does for x = phi(A x + B u + b)),
with S = sigma(A), Z = M Phi the equilibria and the adjoint V solving (I - gamma S)^T V = B^T R:

    dL/dB = R Z^T / n,    dL/dS = gamma V Z^T / n,    dL/dA = S * (dL/dS - 1 1^T (S * dL/dS))

(the last is the softmax's Jacobian, column by column; * is the entrywise product).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import arguments
from ..errors import ArgumentValueError, ShapeError


@dataclass(frozen=True)
class DEQLossAndGradients:
    """L(A, B) and its gradients (``loss_and_gradients``)."""

    loss: float
    grad_A: np.ndarray
    grad_B: np.ndarray


@dataclass(frozen=True)
class DEQTrainingHistory:
    """Gradient descent on a deep equilibrium linear model (``gradient_descent``).

    Attributes:
        loss: L(A_t, B_t) for t = 0 .. steps (before each step, and after the last).
        optimal_loss: L*, the least-squares loss of the linear model on the same features.
        pl_constant: mu(A_t) along the run (module docstring), one per loss entry.
        A, B: the final weights.
    """

    loss: tuple[float, ...]
    optimal_loss: float
    pl_constant: tuple[float, ...]
    A: np.ndarray
    B: np.ndarray

    @property
    def gap(self) -> np.ndarray:
        """L(A_t, B_t) - L*, per step."""
        return np.asarray(self.loss) - self.optimal_loss


def column_softmax(A: np.ndarray) -> np.ndarray:
    """sigma(A)_ij = exp(A_ij) / sum_k exp(A_kj): every column a probability vector."""
    shifted = np.exp(A - A.max(axis=0, keepdims=True))
    return shifted / shifted.sum(axis=0, keepdims=True)


def equilibrium(A: np.ndarray, Phi: np.ndarray, gamma: float) -> np.ndarray:
    """Z = (I - gamma sigma(A))^{-1} Phi: the equilibrium z of every column of Phi (m x n)."""
    A, Phi = _matrices(A, Phi)
    gamma = _gamma(gamma)
    return np.linalg.solve(np.eye(len(A)) - gamma * column_softmax(A), Phi)


def loss_and_gradients(
    A: np.ndarray, B: np.ndarray, Phi: np.ndarray, Y: np.ndarray, gamma: float
) -> DEQLossAndGradients:
    """L(A, B) = ||B (I - gamma sigma(A))^{-1} Phi - Y||_F^2 / (2 n) and its gradients (module docstring).

    Args:
        A: (m, m); B: (m_y, m); Phi: the features (m, n), one column per sample; Y: (m_y, n).
        gamma: in (0, 1).
    """
    A, Phi = _matrices(A, Phi)
    gamma = _gamma(gamma)
    B, Y = np.asarray(B, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    m, n = Phi.shape
    if B.ndim != 2 or B.shape[1] != m or Y.shape != (B.shape[0], n):
        raise ShapeError(f"expected B (m_y, {m}) and Y (m_y, {n}), got B {B.shape} and Y {Y.shape}")
    S = column_softmax(A)
    system = np.eye(m) - gamma * S
    Z = np.linalg.solve(system, Phi)
    R = B @ Z - Y
    V = np.linalg.solve(system.T, B.T @ R)
    grad_S = gamma * V @ Z.T / n
    grad_A = S * (grad_S - (S * grad_S).sum(axis=0, keepdims=True))
    return DEQLossAndGradients(float(np.sum(R * R)) / (2 * n), grad_A, R @ Z.T / n)


def optimal_loss(Phi: np.ndarray, Y: np.ndarray) -> float:
    """L* = min_W ||W Phi - Y||_F^2 / (2 n), by least squares."""
    Phi, Y = np.asarray(Phi, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    W_transposed, *_ = np.linalg.lstsq(Phi.T, Y.T, rcond=None)
    residual = W_transposed.T @ Phi - Y
    return float(np.sum(residual * residual)) / (2 * Phi.shape[1])


def pl_constant(A: np.ndarray, Phi: np.ndarray, gamma: float) -> float:
    """mu(A) = lambda_min(Phi Phi^T / n) / ||I - gamma sigma(A)||_2^2 (module docstring)."""
    A, Phi = _matrices(A, Phi)
    gamma = _gamma(gamma)
    smallest = float(np.linalg.eigvalsh(Phi @ Phi.T / Phi.shape[1])[0])
    return smallest / float(np.linalg.norm(np.eye(len(A)) - gamma * column_softmax(A), 2)) ** 2


def b_smoothness(A: np.ndarray, Phi: np.ndarray, gamma: float) -> float:
    """The Lipschitz constant of dL/dB at A: lambda_max(M Phi Phi^T M^T / n), M = (I - gamma sigma(A))^{-1}.

    1 / b_smoothness(A0) is the step size the experiments use (the A block has no such closed form).
    """
    Z = equilibrium(A, Phi, gamma)
    return float(np.linalg.eigvalsh(Z @ Z.T / Phi.shape[1])[-1])


def pl_rate(step_size: float, mu: float) -> float:
    """1 - 2 alpha mu: the per-step factor of L - L* that the PL inequality gives for small steps."""
    return 1.0 - 2.0 * step_size * mu


def gradient_descent(
    A0: np.ndarray,
    B0: np.ndarray,
    Phi: np.ndarray,
    Y: np.ndarray,
    gamma: float,
    step_size: float,
    steps: int,
) -> DEQTrainingHistory:
    """Plain full-batch gradient descent on A and B together: (A, B) <- (A, B) - alpha grad L."""
    step_size = arguments.real(step_size, "step_size", "a positive step size")
    if step_size <= 0:
        raise ArgumentValueError(f"step_size: expected a positive step size, got {step_size!r}")
    steps = arguments.integer(steps, "steps", 1)
    A, B = np.array(A0, dtype=np.float64), np.array(B0, dtype=np.float64)
    losses, constants = [], []
    for _ in range(steps):
        result = loss_and_gradients(A, B, Phi, Y, gamma)
        losses.append(result.loss)
        constants.append(pl_constant(A, Phi, gamma))
        A -= step_size * result.grad_A
        B -= step_size * result.grad_B
    losses.append(loss_and_gradients(A, B, Phi, Y, gamma).loss)
    constants.append(pl_constant(A, Phi, gamma))
    return DEQTrainingHistory(tuple(losses), optimal_loss(Phi, Y), tuple(constants), A, B)


def fitted_rate(gap: np.ndarray, floor: float = 1e-11) -> tuple[float, float, int]:
    """The per-step factor r of gap_t ~ c r^t, fitted by least squares on log(gap) while gap > floor * gap_0.

    Returns (r, the fit's R^2 on log(gap): 1 for a straight line, steps used).
    """
    gap = np.asarray(gap, dtype=np.float64)
    below = np.flatnonzero(~(gap > floor * gap[0]))
    usable = int(below[0]) if below.size else len(gap)
    if usable < 3:
        raise ArgumentValueError(f"gap: expected at least 3 values above floor * gap[0], got {usable}")
    steps, logs = np.arange(usable), np.log(gap[:usable])
    slope, intercept = np.polyfit(steps, logs, 1)
    residual = logs - (slope * steps + intercept)
    r_squared = 1.0 - float(np.sum(residual**2)) / float(np.sum((logs - logs.mean()) ** 2))
    return float(np.exp(slope)), r_squared, usable


def _matrices(A: np.ndarray, Phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    A, Phi = np.asarray(A, dtype=np.float64), np.asarray(Phi, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or Phi.ndim != 2 or Phi.shape[0] != A.shape[0]:
        raise ShapeError(f"expected A (m, m) and Phi (m, n), got A {A.shape} and Phi {Phi.shape}")
    return A, Phi


def _gamma(gamma: float) -> float:
    gamma = arguments.real(gamma, "gamma", "a number in (0, 1)")
    if not 0 < gamma < 1:
        raise ArgumentValueError(f"gamma: expected a number in (0, 1) (then ||gamma sigma(A)||_1 < 1), got {gamma!r}")
    return gamma
