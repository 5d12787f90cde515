"""Training by block-coordinate descent on the Fenchel relaxation of the implicit constraint.

The model is x = relu(A x + B u + b_x), y = C x + D u + b_y (leaky relu too: see the end). Samples
are columns here: U (p x m), the hidden states X (n x m), targets Y (q x m), m samples.

Fenchel divergence. For f(x) = x^2 / 2 + indicator(x >= 0), the conjugate is
f*(z) = relu(z)^2 / 2 and grad f*(z) = relu(z). Fenchel-Young gives, componentwise,

    F(x, z) = f(x) + f*(z) - x z = x^2 / 2 + relu(z)^2 / 2 - x z >= 0     (x >= 0),

with equality exactly when x = grad f*(z) = relu(z). So x = relu(A x + B u + b_x) holds if and only
if x >= 0 and F(x, A x + B u + b_x) = 0 (El Ghaoui, Gu, Travacca, Askari, Tsai, "Implicit Deep
Learning", SIAM J. Math. Data Sci. 2021, section "Fenchel divergence formulation"). Per hidden unit
i the divergence averaged over samples is F_i = (1/m) sum_j F(X_ij, Z_ij), Z = A X + B U + b_x 1^T.

Relaxed problem. With theta = (A, B, b_x, C, D, b_y) and dual variables lambda >= 0 (one per unit):

    J(theta, X; lambda) = L(Y, C X + D U + b_y 1^T) + sum_i lambda_i F_i(X, Z)
                          + (alpha / 2) (||A||_F^2 + ||B||_F^2 + ||C||_F^2 + ||D||_F^2),
    over X >= 0 and ||A||_inf <= kappa,

where L is (1 / 2m) ||Yhat - Y||_F^2 (regressor, "squared"), the mean binary cross-entropy of
sigmoid logits ("binary") or the mean softmax cross-entropy ("multiclass"). J is convex in each of
the blocks (C, D, b_y) and (A, B, b_x) for fixed X (F is convex in z, L in Yhat), which is what the
paper calls bi-convex; in X it is smooth but convex only when Lambda - Lambda A - A^T Lambda >= 0.

Blocks and their Lipschitz constants (step 1 / L_block; c = the loss curvature: 1 squared, 1/4
binary since sigmoid' <= 1/4, 1/2 multiclass since ||diag(p) - p p^T||_2 <= 1/2):

- output block (C, D, b_y): the gradient is G W_o^T (+ alpha C, alpha D) with G = dL/dYhat and
  W_o = [X; U; 1] (without U when D is not trained). Its Hessian is at most (c / m) W_o W_o^T (x) I,
  so L_out = c sigma_max(W_o)^2 / m + alpha (exact for the squared loss, alpha = 0).
- hidden block (A, B, b_x): with W = [X; U; 1] and H = Lambda (relu(Z) - X) / m, the gradient is
  H W^T (+ alpha A, alpha B). Row i's Hessian is (lambda_i / m) W S_i W^T with S_i = diag(Z_ij > 0),
  so L_hid = max_i lambda_i sigma_max(W)^2 / m + alpha (exact when every Z > 0, lambda constant).
  After the step A is projected onto ||A||_inf <= kappa (``projection.project_rows_l1``, exact).
- states X >= 0: the gradient is C^T G + (Lambda (X - Z) + A^T Lambda (relu(Z) - X)) / m. Per
  sample its Hessian (where defined) is (M + C^T H_L C + A^T Lambda S A) / m with
  M = Lambda - Lambda A - A^T Lambda, 0 <= H_L <= c I and 0 <= S <= I, so it lies between M / m and
  K / m, K = M + c C^T C + A^T Lambda A, and L_X = max(lambda_max(K), -lambda_min(M), 0) / m (exact
  for the squared loss when every Z > 0). The step is projected onto X >= 0.

Each step is a projected gradient step of step 1 / L on an L-smooth block over a convex set, so
by the descent lemma no step increases J: J is non-increasing along a BCD sweep (states, output,
hidden, the order of the reference code).

Dual ascent: lambda_i <- lambda_i + dual_learning_rate * F_i, only for the units with
F_i > tol_fenchel. ``type_of_training``:

- "two_loops": each round runs sweeps until J's relative decrease is at most ``inner_tol`` (or
  ``max_inner_iter`` sweeps), then one dual step;
- "one_loop": each round is one sweep and one dual step.

Training starts from the initial model's equilibrium states (F = 0 there). The final model is the
implicit model with the trained weights: its predictions solve the real equilibrium, not the
relaxed X; ``BCDHistory.equilibrium_gap`` records ||X - X*||_F / sqrt(m) between the relaxed
states and the equilibrium states X* of the same weights, each round.

Reference and deviations. The reference is the IDL authors' MATLAB code (classes
``ImplicitDeepLearning`` / ``UtilitiesIDL``: ``gradient_hidden_var``, ``gradient_parameters_reg``,
``gradient_parameters_hid``, ``step_size_*``, ``dual_variable_update``). Its gradients are the ones
above (its loss is (1/m) ||.||_F^2, ours has the 1/2, so its step sizes differ by that factor).
Where we deviate: (1) its step sizes use max(m, ||X||^2, ||U||^2, ||X U^T||), a cruder bound that
leaves out the bias column; ours are the blocks' Lipschitz constants derived above; its X step uses
||A^T A + Lambda - Lambda D + D^T Lambda|| + max(lambda) ||D||^2, whose sign of D^T Lambda does not
match its own gradient; ours bounds the Hessian by the Loewner interval above; (2) its dual step
adds a constant ``dual_step`` to every unit whose divergence exceeds the tolerance; ours adds
``dual_learning_rate * F_i`` there (as the issue states); (3) it also trains the output block by
exact least squares in some variants; we take gradient steps so that every block is treated alike
and classification losses work too.

Leaky relu. For phi(z) = z (z >= 0), a z (z < 0), 0 < a <= 1: phi = grad f* with
f*(z) = z phi(z) / 2 (z^2 / 2, or a z^2 / 2 below 0, convex), whose conjugate is f(x) = x^2 / 2 for
x >= 0 and x^2 / (2 a) for x < 0. So F(x, z) = f(x) + f*(z) - x z >= 0 with equality iff
x = phi(z), and X is free (no projection) on these units. The gradients keep their form with
relu -> phi and X -> f'(X) (x, or x / a below 0) in the X gradient; f'' is 1 or 1 / a and
phi' lies in [a, 1], so the X block's Hessian lies between M = Lambda - Lambda A - A^T Lambda +
A^T Lambda diag(a) A and K = Lambda diag(1 / a) - Lambda A - A^T Lambda + c C^T C + A^T Lambda A
(over m), and the hidden block's bound is unchanged. Units may mix relu (a = 0) and leaky relu
(``Weights.slopes``). Other activations are refused by the estimators (no divergence derived).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..errors import ArgumentValueError
from ..model import ImplicitModel
from .projection import project_rows_l1

LOSSES = ("squared", "binary", "multiclass")
LOSS_CURVATURE = {"squared": 1.0, "binary": 0.25, "multiclass": 0.5}
TRAINING_TYPES = ("two_loops", "one_loop")
EQUILIBRIUM_TOL = 1e-12  # Picard iterations stop when the estimated error is under this (relative)
EQUILIBRIUM_MAX_ITER = 20_000
# Problems with at most this many weights run on one BLAS thread: their products are too small to
# gain from threads (a 32 x 500 Gram matrix: 0.06 ms on one thread, 24 ms on two busy cores).
SINGLE_THREAD_WEIGHTS = 200_000


# ------------------------------------------------------------------------------- data types
@dataclass
class Weights:
    """The model's weights as dense float64 arrays (the iterate of the BCD; mutable on purpose)."""

    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    D: np.ndarray
    bias_x: np.ndarray
    bias_y: np.ndarray
    slopes: np.ndarray | None = None  # each unit's negative slope a_i: 0 relu, in (0, 1] leaky relu

    def __post_init__(self) -> None:
        if self.slopes is None:
            self.slopes = np.zeros(self.A.shape[0])

    def copy(self) -> Weights:
        names = ("A", "B", "C", "D", "bias_x", "bias_y", "slopes")
        return Weights(*(np.array(getattr(self, name)) for name in names))


@dataclass(frozen=True)
class Patterns:
    """Which entries of A, B, C, D may be non-zero (booleans); the others stay zero."""

    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    D: np.ndarray

    @classmethod
    def full(cls, weights: Weights) -> Patterns:
        return cls(*(np.ones(getattr(weights, name).shape, dtype=bool) for name in "ABCD"))


@dataclass(frozen=True)
class BCDSettings:
    """The BCD's parameters (see the module docstring)."""

    kappa: float = 0.95
    alpha: float = 0.0
    type_of_training: str = "two_loops"
    rounds: int = 20
    dual_learning_rate: float = 1.0
    tol_fenchel: float = 1e-4
    starting_lambda: float = 1.0
    max_inner_iter: int = 200
    inner_tol: float = 1e-4
    column_linf: float = 0.0  # lambda of lambda sum_j ||B e_j||_inf, by its prox in the hidden step
    train_feedthrough: bool = True
    verbose: int = 0


@dataclass(frozen=True)
class Lipschitz:
    """The Lipschitz constants of the blocks' gradients (steps are their inverses)."""

    states: float
    output: float
    hidden: float


@dataclass(frozen=True)
class BCDHistory:
    """One entry per round (after its sweeps, before its dual step unless said otherwise).

    Attributes:
        type_of_training: "two_loops" or "one_loop".
        objective: J(theta, X; lambda) with the round's lambda.
        loss: the data loss L of the relaxed states X (the objective's first term).
        fenchel: sum_i F_i(X, Z), the relaxed states' total divergence (per sample).
        dual_norm: ||lambda||_2 after the round's dual step.
        equilibrium_loss: the data loss of the real model (its equilibrium states) on the data.
        equilibrium_gap: ||X - X*||_F / sqrt(m), relaxed against equilibrium states.
        eval_loss: the real model's data loss on the eval set (empty without one).
        inner_iterations: sweeps run in the round.
        seconds: time since training started, at the end of the round.
    """

    type_of_training: str
    objective: tuple[float, ...] = ()
    loss: tuple[float, ...] = ()
    fenchel: tuple[float, ...] = ()
    dual_norm: tuple[float, ...] = ()
    equilibrium_loss: tuple[float, ...] = ()
    equilibrium_gap: tuple[float, ...] = ()
    eval_loss: tuple[float, ...] = ()
    inner_iterations: tuple[int, ...] = ()
    seconds: tuple[float, ...] = ()

    @property
    def rounds(self) -> int:
        return len(self.objective)


@dataclass(frozen=True)
class BCDResult:
    """What ``train_bcd`` returns: the trained weights, relaxed states, dual variables, history."""

    weights: Weights
    states: np.ndarray
    dual: np.ndarray
    history: BCDHistory


@dataclass(frozen=True)
class Data:
    """Inputs U (p x m) and targets Y (q x m: values, 0/1 labels, or one-hot rows) with their loss."""

    U: np.ndarray
    Y: np.ndarray
    loss: str

    @property
    def m(self) -> int:
        return self.U.shape[1]


# ------------------------------------------------------------------------------- the divergence
def activate(Z: np.ndarray, slopes: np.ndarray | None = None) -> np.ndarray:
    """phi(z) = z for z >= 0, a_i z below (relu: a_i = 0), row i with its unit's slope."""
    if slopes is None or not slopes.any():
        return np.maximum(Z, 0.0)
    return np.where(Z >= 0, Z, slopes[:, None] * Z)


def fenchel_divergence(X: np.ndarray, Z: np.ndarray, slopes: np.ndarray | None = None) -> np.ndarray:
    """F(x, z) = f(x) + f*(z) - x z componentwise, >= 0, and 0 exactly where x = phi(z).

    relu (slope 0): x^2 / 2 + relu(z)^2 / 2 - x z, for x >= 0. Leaky relu (slope a in (0, 1]):
    f(x) = x^2 / 2 (x >= 0) or x^2 / (2 a) (x < 0), f*(z) = z phi(z) / 2. Rows are units.
    """
    X, Z = np.asarray(X, dtype=np.float64), np.asarray(Z, dtype=np.float64)
    conjugate = 0.5 * Z * activate(Z, slopes)
    if slopes is None or not slopes.any():
        return 0.5 * X * X + conjugate - X * Z
    return 0.5 * X * _primal_derivative(X, slopes) + conjugate - X * Z


def _primal_derivative(X: np.ndarray, slopes: np.ndarray) -> np.ndarray:
    """f'(x) = x (x >= 0) or x / a (x < 0); relu rows (a = 0) hold x >= 0 and take x."""
    safe = np.where(slopes > 0, slopes, 1.0)[:, None]
    return np.where(X >= 0, X, X / safe)


def unit_divergences(X: np.ndarray, Z: np.ndarray, slopes: np.ndarray | None = None) -> np.ndarray:
    """F_i = (1/m) sum_j F(X_ij, Z_ij): one value per hidden unit (row)."""
    return fenchel_divergence(X, Z, slopes).mean(axis=1)


def preactivation(weights: Weights, X: np.ndarray, U: np.ndarray) -> np.ndarray:
    """Z = A X + B U + b_x 1^T."""
    return weights.A @ X + weights.B @ U + weights.bias_x[:, None]


def outputs(weights: Weights, X: np.ndarray, U: np.ndarray) -> np.ndarray:
    """Yhat = C X + D U + b_y 1^T."""
    return weights.C @ X + weights.D @ U + weights.bias_y[:, None]


# ------------------------------------------------------------------------------- losses
def data_loss(loss: str, predicted: np.ndarray, targets: np.ndarray) -> float:
    """L(Y, Yhat): (1/2m) ||Yhat - Y||_F^2, or the mean (binary / softmax) cross-entropy of logits."""
    m = predicted.shape[1]
    if loss == "squared":
        return 0.5 * float(np.sum((predicted - targets) ** 2)) / m
    if loss == "binary":  # softplus(y) - t y, computed without overflow
        return float(np.sum(np.logaddexp(0.0, predicted) - targets * predicted)) / m
    shifted = predicted - predicted.max(axis=0, keepdims=True)
    log_normalizer = np.log(np.exp(shifted).sum(axis=0))
    return float(np.mean(log_normalizer - (shifted * targets).sum(axis=0)))


def loss_gradient(loss: str, predicted: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """dL / dYhat (q x m), the 1/m included."""
    m = predicted.shape[1]
    if loss == "squared":
        return (predicted - targets) / m
    if loss == "binary":
        return (0.5 * (1.0 + np.tanh(0.5 * predicted)) - targets) / m
    shifted = np.exp(predicted - predicted.max(axis=0, keepdims=True))
    return (shifted / shifted.sum(axis=0, keepdims=True) - targets) / m


def objective(
    weights: Weights, X: np.ndarray, data: Data, dual: np.ndarray, alpha: float = 0.0, column_linf: float = 0.0
) -> float:
    """J(theta, X; lambda) of the module docstring."""
    value = data_loss(data.loss, outputs(weights, X, data.U), data.Y)
    value += float(dual @ unit_divergences(X, preactivation(weights, X, data.U), weights.slopes))
    if alpha:
        value += 0.5 * alpha * sum(float(np.sum(getattr(weights, name) ** 2)) for name in "ABCD")
    if column_linf:
        value += column_linf * float(np.abs(weights.B).max(axis=0, initial=0.0).sum())
    return value


# ------------------------------------------------------------------------------- Lipschitz constants
def lipschitz_constants(
    weights: Weights, X: np.ndarray, data: Data, dual: np.ndarray, alpha: float = 0.0, train_feedthrough: bool = True
) -> Lipschitz:
    """The blocks' Lipschitz constants at the current point (derivations in the module docstring)."""
    m, c = data.m, LOSS_CURVATURE[data.loss]
    gram = design_gram(X, data.U)  # W W^T, W = [X; U; 1]: sigma_max(W)^2 = lambda_max(W W^T)
    n, p = X.shape[0], data.U.shape[0]
    kept = np.r_[0 : n + p + 1] if train_feedthrough else np.r_[0:n, n + p]  # W_o's rows
    return Lipschitz(
        states=states_lipschitz(weights, data.loss, dual, data.m),
        output=c * float(np.linalg.eigvalsh(gram[np.ix_(kept, kept)])[-1]) / m + alpha,
        hidden=float(np.max(dual, initial=0.0)) * float(np.linalg.eigvalsh(gram)[-1]) / m + alpha,
    )


def states_lipschitz(weights: Weights, loss: str, dual: np.ndarray, m: int) -> float:
    """L_X = max(lambda_max(K), -lambda_min(M), 0) / m (the module docstring); it does not depend on X.

    With slopes a_i: f'' is 1 or 1 / a_i and phi' in [a_i, 1], so M = Lambda - Lambda A - A^T Lambda
    + A^T Lambda diag(a) A and K = Lambda diag(1 or 1/a) - Lambda A - A^T Lambda + c C^T C + A^T Lambda A
    (relu: a_i = 0, f'' = 1 on x >= 0).
    """
    slopes = weights.slopes
    coupling = np.diag(dual) @ weights.A
    symmetric = coupling + coupling.T
    curvature = np.where(slopes > 0, 1.0 / np.where(slopes > 0, slopes, 1.0), 1.0)
    M = np.diag(dual) - symmetric + weights.A.T @ (dual * slopes)[:, None] * weights.A
    K = np.diag(dual * curvature) - symmetric + LOSS_CURVATURE[loss] * weights.C.T @ weights.C
    K += weights.A.T @ (dual[:, None] * weights.A)
    return max(float(np.linalg.eigvalsh(K)[-1]), -float(np.linalg.eigvalsh(M)[0]), 0.0) / m


def design_gram(X: np.ndarray, U: np.ndarray) -> np.ndarray:
    """W W^T for W = [X; U; 1^T], assembled from its blocks (no stacked copy of W)."""
    XU = np.vstack([X, U]) if U.shape[0] else X
    inner = XU @ XU.T
    sums = XU.sum(axis=1)
    return np.block([[inner, sums[:, None]], [sums[None, :], np.array([[float(X.shape[1])]])]])


# ------------------------------------------------------------------------------- gradients
def states_gradient(weights: Weights, X: np.ndarray, data: Data, dual: np.ndarray) -> np.ndarray:
    """grad_X J = C^T G + (Lambda (f'(X) - Z) + A^T Lambda (phi(Z) - X)) / m  (relu: f'(X) = X)."""
    Z = preactivation(weights, X, data.U)
    G = loss_gradient(data.loss, outputs(weights, X, data.U), data.Y)
    weighted = dual[:, None]
    primal = _primal_derivative(X, weights.slopes)
    return (
        weights.C.T @ G
        + (weighted * (primal - Z) + weights.A.T @ (weighted * (activate(Z, weights.slopes) - X))) / data.m
    )


def output_gradients(
    weights: Weights, X: np.ndarray, data: Data, alpha: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grad_C, grad_D, grad_b_y) J = (G X^T + alpha C, G U^T + alpha D, G 1)."""
    G = loss_gradient(data.loss, outputs(weights, X, data.U), data.Y)
    return G @ X.T + alpha * weights.C, G @ data.U.T + alpha * weights.D, G.sum(axis=1)


def hidden_gradients(
    weights: Weights, X: np.ndarray, data: Data, dual: np.ndarray, alpha: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grad_A, grad_B, grad_b_x) J = (H X^T + alpha A, H U^T + alpha B, H 1), H = Lambda (phi(Z) - X) / m."""
    Z = preactivation(weights, X, data.U)
    H = dual[:, None] * (activate(Z, weights.slopes) - X) / data.m
    return H @ X.T + alpha * weights.A, H @ data.U.T + alpha * weights.B, H.sum(axis=1)


# ------------------------------------------------------------------------------- block steps
def states_step(weights: Weights, X: np.ndarray, data: Data, dual: np.ndarray, lipschitz: float) -> np.ndarray:
    """X <- X - grad_X J / L_X, projected onto X >= 0 on the relu rows (leaky relu rows are free)."""
    if lipschitz <= 0:
        return X
    stepped = X - states_gradient(weights, X, data, dual) / lipschitz
    relu_rows = weights.slopes == 0
    stepped[relu_rows] = np.maximum(stepped[relu_rows], 0.0)
    return stepped


def output_step(
    weights: Weights, X: np.ndarray, data: Data, patterns: Patterns, lipschitz: float, settings: BCDSettings
) -> Weights:
    """(C, D, b_y) <- (C, D, b_y) - grad / L_out, on their patterns (D only when it is trained)."""
    grad_C, grad_D, grad_bias = output_gradients(weights, X, data, settings.alpha)
    step = 1.0 / lipschitz
    D = weights.D - step * grad_D * patterns.D if settings.train_feedthrough else weights.D
    return replace(weights, C=weights.C - step * grad_C * patterns.C, D=D, bias_y=weights.bias_y - step * grad_bias)


def hidden_step(
    weights: Weights,
    X: np.ndarray,
    data: Data,
    dual: np.ndarray,
    patterns: Patterns,
    lipschitz: float,
    settings: BCDSettings,
) -> Weights:
    """(A, B, b_x) <- (A, B, b_x) - grad / L_hid, then A projected onto ||A||_inf <= kappa (on its
    pattern) and, with ``column_linf``, B by the prox of (column_linf / L_hid) sum_j ||B e_j||_inf
    (v - the projection onto the l1 ball, column by column: a proximal gradient step, so the
    descent lemma still holds and columns end exactly zero)."""
    if lipschitz <= 0:
        return weights
    grad_A, grad_B, grad_bias = hidden_gradients(weights, X, data, dual, settings.alpha)
    step = 1.0 / lipschitz
    B = weights.B - step * grad_B * patterns.B
    if settings.column_linf > 0:
        B = B - project_rows_l1(B.T, step * settings.column_linf).T
    return replace(
        weights,
        A=project_rows_l1(weights.A - step * grad_A, settings.kappa, mask=patterns.A),
        B=B,
        bias_x=weights.bias_x - step * grad_bias,
    )


def bcd_sweep(
    weights: Weights, X: np.ndarray, data: Data, dual: np.ndarray, patterns: Patterns, settings: BCDSettings
) -> tuple[Weights, np.ndarray]:
    """One pass over the blocks: states, output, hidden; each with its own 1 / L step.

    L_X depends on the weights only, L_out and L_hid on X (taken after the states step).
    """
    X = states_step(weights, X, data, dual, states_lipschitz(weights, data.loss, dual, data.m))
    constants = lipschitz_constants(weights, X, data, dual, settings.alpha, settings.train_feedthrough)
    weights = output_step(weights, X, data, patterns, constants.output, settings)
    weights = hidden_step(weights, X, data, dual, patterns, constants.hidden, settings)
    return weights, X


def dual_step(weights: Weights, X: np.ndarray, data: Data, dual: np.ndarray, settings: BCDSettings) -> np.ndarray:
    """lambda_i += dual_learning_rate * F_i where F_i > tol_fenchel."""
    divergences = unit_divergences(X, preactivation(weights, X, data.U), weights.slopes)
    return dual + settings.dual_learning_rate * np.where(divergences > settings.tol_fenchel, divergences, 0.0)


# ------------------------------------------------------------------------------- equilibrium
def equilibrium_states(weights: Weights, U: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """X* = phi(A X* + B U + b_x) by Picard iteration (a contraction: ||A||_inf < 1, phi 1-Lipschitz).

    Stops when the a-posteriori bound ||X_k - X*||_max <= rate / (1 - rate) ||X_k - X_k-1||_max
    falls under EQUILIBRIUM_TOL (relative to max(1, ||X_k||_max)), rate = ||A||_inf.
    """
    rate = float(np.abs(weights.A).sum(axis=1).max(initial=0.0))
    if rate >= 1:
        raise ArgumentValueError(f"equilibrium: ||A||_inf = {rate:.6g} >= 1, the Picard iteration may not converge")
    drive = weights.B @ U + weights.bias_x[:, None]
    X = activate(drive, weights.slopes) if start is None else start
    factor = rate / (1.0 - rate) if rate > 0 else 0.0
    for _ in range(EQUILIBRIUM_MAX_ITER):
        updated = activate(weights.A @ X + drive, weights.slopes)
        change = float(np.abs(updated - X).max(initial=0.0))
        X = updated
        if factor * change <= EQUILIBRIUM_TOL * max(1.0, float(np.abs(X).max(initial=0.0))):
            break
    return X


# ------------------------------------------------------------------------------- training
def check_settings(settings: BCDSettings) -> None:
    """Typed errors for parameters the BCD cannot take."""
    if settings.type_of_training not in TRAINING_TYPES:
        raise ArgumentValueError(f"type_of_training must be one of {TRAINING_TYPES}, got {settings.type_of_training!r}")
    for name in ("rounds", "max_inner_iter"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ArgumentValueError(f"{name} must be a positive integer, got {value!r}")
    for name in ("dual_learning_rate", "tol_fenchel", "starting_lambda", "inner_tol", "alpha"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
            raise ArgumentValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if value < 0:
            raise ArgumentValueError(f"{name} must be >= 0, got {value!r}")
    if not 0 < settings.kappa < 1:
        raise ArgumentValueError(f"kappa must be in (0, 1) for a well-posed model, got {settings.kappa!r}")


def train_bcd(
    weights: Weights,
    data: Data,
    settings: BCDSettings,
    patterns: Patterns | None = None,
    evaluation: Data | None = None,
) -> BCDResult:
    """Rounds of BCD sweeps and dual steps from ``weights`` (copied); see the module docstring.

    Small problems (``SINGLE_THREAD_WEIGHTS``) run on one BLAS thread.
    """
    from threadpoolctl import threadpool_limits

    stored = sum(getattr(weights, name).size for name in "ABCD")
    if stored > SINGLE_THREAD_WEIGHTS:
        return _train_bcd(weights, data, settings, patterns, evaluation)
    with threadpool_limits(limits=1):
        return _train_bcd(weights, data, settings, patterns, evaluation)


def _train_bcd(
    weights: Weights,
    data: Data,
    settings: BCDSettings,
    patterns: Patterns | None,
    evaluation: Data | None,
) -> BCDResult:
    check_settings(settings)
    if data.loss not in LOSSES:
        raise ArgumentValueError(f"loss must be one of {LOSSES}, got {data.loss!r}")
    patterns = Patterns.full(weights) if patterns is None else patterns
    weights = weights.copy()
    weights.A = project_rows_l1(weights.A, settings.kappa, mask=patterns.A)
    X = equilibrium_states(weights, data.U)
    dual = np.full(weights.A.shape[0], float(settings.starting_lambda))
    records: dict[str, list] = {name: [] for name in BCDHistory.__dataclass_fields__ if name != "type_of_training"}
    start = time.perf_counter()
    for round_index in range(1, settings.rounds + 1):
        weights, X, sweeps = _inner_loop(weights, X, data, dual, patterns, settings)
        value = objective(weights, X, data, dual, settings.alpha, settings.column_linf)
        Z = preactivation(weights, X, data.U)
        equilibrium = equilibrium_states(weights, data.U, start=X)
        records["objective"].append(value)
        records["loss"].append(data_loss(data.loss, outputs(weights, X, data.U), data.Y))
        records["fenchel"].append(float(unit_divergences(X, Z, weights.slopes).sum()))
        dual = dual_step(weights, X, data, dual, settings)
        records["dual_norm"].append(float(np.linalg.norm(dual)))
        records["equilibrium_loss"].append(data_loss(data.loss, outputs(weights, equilibrium, data.U), data.Y))
        records["equilibrium_gap"].append(float(np.linalg.norm(X - equilibrium)) / np.sqrt(data.m))
        if evaluation is not None:
            eval_states = equilibrium_states(weights, evaluation.U)
            records["eval_loss"].append(
                data_loss(evaluation.loss, outputs(weights, eval_states, evaluation.U), evaluation.Y)
            )
        records["inner_iterations"].append(sweeps)
        records["seconds"].append(time.perf_counter() - start)
        if settings.verbose:
            _print_round(round_index, settings.rounds, records)
    history = BCDHistory(settings.type_of_training, **{name: tuple(values) for name, values in records.items()})
    return BCDResult(weights=weights, states=X, dual=dual, history=history)


def _inner_loop(
    weights: Weights, X: np.ndarray, data: Data, dual: np.ndarray, patterns: Patterns, settings: BCDSettings
) -> tuple[Weights, np.ndarray, int]:
    """One sweep ("one_loop"), or sweeps until J stops decreasing by more than inner_tol (relative)."""
    if settings.type_of_training == "one_loop":
        weights, X = bcd_sweep(weights, X, data, dual, patterns, settings)
        return weights, X, 1
    previous = objective(weights, X, data, dual, settings.alpha, settings.column_linf)
    for sweep in range(1, settings.max_inner_iter + 1):
        weights, X = bcd_sweep(weights, X, data, dual, patterns, settings)
        current = objective(weights, X, data, dual, settings.alpha, settings.column_linf)
        if previous - current <= settings.inner_tol * max(abs(previous), np.finfo(np.float64).tiny):
            return weights, X, sweep
        previous = current
    return weights, X, settings.max_inner_iter


def _print_round(round_index: int, rounds: int, records: dict[str, list]) -> None:
    line = (
        f"round {round_index:>4}/{rounds}: objective {records['objective'][-1]:.6g}, "
        f"loss {records['loss'][-1]:.6g}, fenchel {records['fenchel'][-1]:.3g}, "
        f"dual norm {records['dual_norm'][-1]:.3g}, equilibrium loss {records['equilibrium_loss'][-1]:.6g}, "
        f"gap {records['equilibrium_gap'][-1]:.3g}"
    )
    if records["eval_loss"]:
        line += f", eval loss {records['eval_loss'][-1]:.6g}"
    print(f"{line} ({records['inner_iterations'][-1]} sweeps, {records['seconds'][-1]:.1f} s)", file=sys.stderr)


# ------------------------------------------------------------------------------- ImplicitModel glue
def train_model(
    model: ImplicitModel,
    inputs: np.ndarray,
    targets: np.ndarray,
    loss: str,
    settings: BCDSettings,
    evaluation: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[ImplicitModel, BCDResult]:
    """Train a relu / leaky relu ``model`` (``unit_slopes``) by BCD on rows ``inputs`` (m x p) and ``targets``.

    targets: (m, q) values ("squared"), (m, 1) 0/1 labels ("binary") or (m,) class codes
    ("multiclass", one-hot against the model's q outputs). The stored patterns of A, B, C, D are
    kept (entries outside them stay zero). Returns the trained model (same blocks and specs) and
    the BCD result.
    """
    weights = Weights(
        *(getattr(model, name).toarray().astype(np.float64) for name in "ABCD"),
        model.bias_x.astype(np.float64),
        model.bias_y.astype(np.float64),
        unit_slopes(model),
    )
    patterns = Patterns(*(_stored(getattr(model, name)) for name in "ABCD"))
    data = Data(np.asarray(inputs, dtype=np.float64).T, _target_columns(targets, loss, model.q), loss)
    eval_data = None
    if evaluation is not None:
        eval_inputs, eval_targets = evaluation
        eval_columns = _target_columns(eval_targets, loss, model.q)
        eval_data = Data(np.asarray(eval_inputs, dtype=np.float64).T, eval_columns, loss)
    result = train_bcd(weights, data, settings, patterns, eval_data)
    return with_weights(model, result.weights), result


def with_weights(model: ImplicitModel, weights: Weights) -> ImplicitModel:
    """``model`` with its stored entries (pattern kept) and biases read from dense ``weights``."""
    matrices = []
    for name in "ABCD":
        pattern = sp.csr_array(getattr(model, name))
        rows = np.repeat(np.arange(pattern.shape[0]), np.diff(pattern.indptr))
        data = getattr(weights, name)[rows, pattern.indices].astype(model.dtype)
        matrices.append(sp.csr_array((data, pattern.indices.copy(), pattern.indptr.copy()), shape=pattern.shape))
    bias_x, bias_y = weights.bias_x.astype(model.dtype), weights.bias_y.astype(model.dtype)
    return ImplicitModel(*matrices, bias_x, bias_y, model.blocks, model.inputs, model.outputs)


def unit_slopes(model: ImplicitModel) -> np.ndarray:
    """Each state's negative slope: 0 for relu blocks, alpha for leaky_relu(alpha) with 0 < alpha <= 1.

    Raises:
        ArgumentValueError: a block with another activation (or a leaky relu slope outside (0, 1]).
    """
    slopes = np.zeros(model.n)
    for block in model.blocks:
        name, alpha = block.activation.name, block.activation.alpha
        if name == "leaky_relu" and 0 < alpha <= 1:
            slopes[block.start : block.stop] = alpha
        elif name != "relu":
            raise ArgumentValueError(
                f"solver='bcd' trains relu and leaky_relu(alpha), 0 < alpha <= 1, states only (their Fenchel "
                f"divergence is derived in bcd.py), got activation {block.activation} in block {block.name!r}; "
                "use activation='relu' or 'leaky_relu(0.1)', or solver='adam' for other activations"
            )
    return slopes


def _stored(matrix: sp.csr_array) -> np.ndarray:
    """The stored entries of a CSR matrix (explicit zeros included) as a boolean array."""
    ones = sp.csr_array((np.ones(matrix.nnz, dtype=bool), matrix.indices, matrix.indptr), shape=matrix.shape)
    return ones.toarray()


def _target_columns(targets: np.ndarray, loss: str, q: int) -> np.ndarray:
    targets = np.asarray(targets)
    if loss == "multiclass":
        return np.eye(q)[targets.astype(np.int64).ravel()].T
    return targets.astype(np.float64).reshape(len(targets), -1).T


# ------------------------------------------------------------------------------- estimator glue
def check_estimator(estimator: Any) -> None:
    """Typed errors for an ImplicitRegressor / ImplicitClassifier that asks for solver="bcd"."""
    model = estimator.init_model
    if model is None:  # a one-state stand-in with the estimator's activation
        model = ImplicitModel.from_matrices(np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)),
                                            estimator.activation)  # fmt: skip
    unit_slopes(model)
    if estimator.group_lasso:
        raise ArgumentValueError(
            f"solver='bcd' does not apply the group lasso, got group_lasso={estimator.group_lasso!r}; "
            "use column_linf for feature selection with 'bcd' (its prox is exact), or solver='sgd'"
        )
    if estimator.robustness:
        raise ArgumentValueError(
            f"solver='bcd' does not add the robustness penalty, got robustness={estimator.robustness!r}; "
            "use robustness=0 with 'bcd', or solver='adam'"
        )
    check_settings(estimator_settings(estimator))


def estimator_settings(estimator: Any) -> BCDSettings:
    """The BCD settings of an estimator (max_epochs caps the inner sweeps, tol ends them)."""
    return BCDSettings(
        kappa=estimator.kappa,
        alpha=estimator.alpha,
        type_of_training=estimator.type_of_training,
        rounds=estimator.rounds,
        dual_learning_rate=estimator.dual_learning_rate,
        tol_fenchel=estimator.tol_fenchel,
        starting_lambda=estimator.starting_lambda,
        max_inner_iter=estimator.max_epochs,
        column_linf=estimator.column_linf,
        inner_tol=estimator.tol,
        train_feedthrough=estimator.feedthrough,
        verbose=estimator.verbose,
    )


def fit_estimator(
    estimator: Any,
    initial: ImplicitModel,
    X: np.ndarray,
    targets: np.ndarray,
    eval_set: tuple[np.ndarray, np.ndarray] | None,
) -> ImplicitModel:
    """Train ``initial`` (standardized units) by BCD for an estimator; returns the trained model.

    Sets ``history_``, ``dual_variables_``, ``relaxation_gap_`` (the last ||X - X*||_F / sqrt(m)),
    ``loss_curve_`` (the real model's training loss per round, BCD units: half the squared error
    summed over outputs, or the cross-entropy), ``validation_loss_curve_`` (eval loss per round),
    ``validation_scores_`` (empty), ``n_iter_`` (rounds) and ``best_loss_``.
    """
    from sklearn.base import is_regressor

    loss = "squared" if is_regressor(estimator) else ("binary" if targets.dtype.kind == "f" else "multiclass")
    standardize = lambda values: (values - estimator.input_mean_) / estimator.input_scale_  # noqa: E731
    evaluation = None if eval_set is None else (standardize(eval_set[0]), eval_set[1])
    model, result = train_model(
        initial.astype(np.float64), standardize(X), targets, loss, estimator_settings(estimator), evaluation
    )
    history = result.history
    estimator.history_ = history
    estimator.dual_variables_ = result.dual
    estimator.relaxation_gap_ = history.equilibrium_gap[-1]
    estimator.loss_curve_ = list(history.equilibrium_loss)
    estimator.validation_loss_curve_ = list(history.eval_loss)
    estimator.validation_scores_ = []
    estimator.n_iter_ = history.rounds
    estimator.best_loss_ = float(min(history.eval_loss or history.equilibrium_loss))
    return model
