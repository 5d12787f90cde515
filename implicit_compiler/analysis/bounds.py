"""Sensitivity: a componentwise bound |y(u) - y(u')| <= S |u - u'| valid for all inputs.

Let Lambda = diag(L_i), L_i the Lipschitz constant of state i's activation. Subtracting the
equilibrium equations for u and u' gives, componentwise,

    |x - x'| <= Lambda (|A| |x - x'| + |B| |u - u'|),   |y - y'| <= |C| |x - x'| + |D| |u - u'|.

If lambda_pf(Lambda |A|) < 1, then (I - Lambda |A|)^{-1} = sum_k (Lambda |A|)^k >= 0 exists,
so |x - x'| <= (I - Lambda |A|)^{-1} Lambda |B| |u - u'| and

    S = |C| (I - Lambda |A|)^{-1} Lambda |B| + |D|

(for non-expansive activations, Lambda = I: the paper's S = |C| (I - |A|)^{-1} |B| + |D|). S is
computed with one adjoint solve for q right-hand sides, (I - Lambda |A|)^T Z = |C|^T, then
S^T = |B|^T Lambda Z + |D|^T: block back-substitution in reverse execution order, a sparse LU
only on cyclic components, never a dense n x n inverse. An acyclic model always has
lambda_pf(Lambda |A|) = 0, and the spectrum of the block triangular Lambda |A| is the union of
its cyclic components' spectra, so only those are examined.

Output bounds over a box |u - u0| <= sigma follow: y(u0) - S sigma <= y(u) <= y(u0) + S sigma,
widened by a bound on the rounding of the predictions in the model's dtype (``rounding_margin``)
and rounded outward, so that no prediction of a sample in the box falls outside them.

Both read ``model.structure``: a structured model (convolutions kept as kernels) is never
materialized, its |A|, |B|, |C|, |D| products are the kernels' (``_block_solve``), the row
counts of the rounding bound come from the geometry (``row_nnz``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from .. import arguments
from ..errors import AnalysisError, ArgumentValueError
from ..model import ImplicitModel
from ..runtime.batching import flatten_inputs
from ..runtime.plan import Component, execution_order
from ..runtime.solve import DEFAULT_TOLERANCE
from ._block_solve import (
    absolute,
    component_matrix,
    component_names,
    component_states,
    lipschitz_per_state,
    solve_identity_minus,
)
from .crown import crown_bounds
from .interval import Structure, interval_bounds
from .relaxation import local_lipschitz
from .spectral import perron_frobenius_eigenvalue

ROUNDING_SAFETY = 2.0  # on the first-order rounding bound of ``rounding_margin``
ACTIVATION_ULPS = 8  # ulps of |phi(z)| allowed to tanh, sigmoid and leaky relu evaluations


@dataclass(frozen=True, eq=False)
class SensitivityReport:
    """The sensitivity matrix and whether its bound is valid.

    Attributes:
        matrix: S, (q, p) float64, read-only; all inf when not valid.
        valid: True when lambda_pf(Lambda |A|) < 1, so |y(u) - y(u')| <= S |u - u'| for all u, u'.
        reason: why (or why not), with the numbers.
        perron_frobenius: lambda_pf(Lambda |A|) (inf when an activation is not Lipschitz).
    """

    matrix: np.ndarray
    valid: bool
    reason: str
    perron_frobenius: float


@dataclass(frozen=True, eq=False)
class OutputBounds:
    """Componentwise bounds lower <= y(u) <= upper over the box |u - u0| <= sigma.

    Attributes:
        center: y(u0) in the model's dtype, (batch, q) or (q,) for one sample.
        lower: the method's lower bound minus the margin, rounded down, float64, same shape.
        upper: the method's upper bound plus the margin, rounded up, float64, same shape.
        margin: the bound on rounding and solver error included in lower and upper (the
            rounding of the predictions in the model's dtype, ``rounding_margin``), float64.
        method: "crown", "ibp" or "sensitivity".
        condition: why the bounds hold here (the method and the condition it needs, with the
            numbers: acyclic, or lambda_pf(Lambda |A_cc|) < 1 on each loop).
    """

    center: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    margin: np.ndarray
    method: str = "sensitivity"
    condition: str = ""


def sensitivity(model: ImplicitModel) -> SensitivityReport:
    """The sensitivity matrix S = |C| (I - Lambda |A|)^{-1} Lambda |B| + |D| and its validity.

    Args:
        model: the implicit model (computed in float64 whatever its dtype).

    Returns:
        A ``SensitivityReport``; when not valid (an activation that is not Lipschitz, or
        lambda_pf(Lambda |A|) >= 1) its matrix is all inf and ``reason`` says why.
    """
    rows, reason, radius = weighted_sensitivity(model, np.eye(model.q), execution_order(model))
    if rows is None:
        return _report(np.full((model.q, model.p), np.inf), False, reason, radius)
    return _report(rows, True, reason, radius)


def weighted_sensitivity(
    model: ImplicitModel, weights: np.ndarray, components: tuple[Component, ...]
) -> tuple[np.ndarray | None, str, float]:
    """(W^T S, reason, lambda_pf(Lambda |A|)) for nonnegative weights W (q, r): r adjoint solves.

    The first entry is None when S is not valid. ``sparse_attack`` needs only |c|^T S, one solve.
    """
    unbounded = [f"{b.name!r} ({b.activation})" for b in model.blocks if math.isinf(b.activation.lipschitz)]
    if unbounded:
        reason = (
            f"not valid: block(s) {', '.join(unbounded)} are not Lipschitz, so no finite S bounds the output "
            "change for all inputs (a square grows quadratically, exp exponentially, log and 1/z without bound "
            "near 0); bound the inputs and linearize instead"
        )
        return None, reason, math.inf
    structure = model.structure
    absolute_A = absolute(structure.A)
    lipschitz = lipschitz_per_state(model)
    radius, worst = 0.0, ()
    for component in components:
        if component.cyclic:
            rows = component_states(model, component)
            value = perron_frobenius_eigenvalue(component_matrix(absolute_A, rows, lipschitz[rows]))
            if value >= radius:
                radius, worst = value, component_names(model, component)
    if radius >= 1:
        reason = (
            f"not valid: lambda_pf(Lambda |A|) = {radius:.6g} >= 1 on the cyclic component [{', '.join(worst)}], "
            "so the Neumann series of (I - Lambda |A|)^{-1} diverges; shrink the loop gain"
        )
        return None, reason, radius
    rhs = absolute(structure.C).rmatvec(weights)  # |C|^T W, (n, r)
    Z = solve_identity_minus(model, absolute_A, rhs, transpose=True, row_scale=lipschitz, components=components)
    B, D = absolute(structure.B), absolute(structure.D)
    rows = B.rmatvec(lipschitz[:, None] * Z).T + D.rmatvec(weights).T
    if worst:
        reason = (
            f"valid: lambda_pf(Lambda |A|) = {radius:.6g} < 1 (largest on [{', '.join(worst)}]), "
            "so |y(u) - y(u')| <= S |u - u'| componentwise for all inputs"
        )
    else:
        reason = (
            "valid: the model is acyclic (lambda_pf(Lambda |A|) = 0), so |y(u) - y(u')| <= S |u - u'| for all inputs"
        )
    return rows, reason, radius


METHODS = ("crown", "ibp", "sensitivity")


def output_bounds(
    model: ImplicitModel,
    u0: Any,
    sigma: Any,
    sensitivity_report: SensitivityReport | None = None,
    method: str | None = None,
) -> OutputBounds:
    """Componentwise bounds on y over the box |u - u0| <= sigma, rounded outward; the margin
    bounds the rounding of predictions in the model's dtype, so that ``model.predict`` of any
    sample in the box (default tolerance) lies within the bounds.

    Methods (``analysis.crown``, ``analysis.interval``):
        "crown": linear relaxations back-substituted through the blocks (intermediate bounds
            by the same pass), loops through the relaxed fixed-point equation; the tightest.
        "ibp": interval bounds, block by block; loops by their interval fixed point.
        "sensitivity": y(u0) -/+ S sigma, S = ``sensitivity(model)``: one matrix for every box,
            valid where the model is Lipschitz, the loosest.
    crown and ibp hold for any activation whose pre-activations stay in its domain over the box
    (square, exp, ... included) and, on each cyclic component, when lambda_pf(Lambda |A_cc|) < 1.

    Args:
        model: the implicit model.
        u0: the center, one sample or a batch (anything ``model.solve`` takes).
        sigma: the box radius: a scalar, one value per input (p,), or shaped like one sample.
        sensitivity_report: a precomputed ``sensitivity(model)``, to bound many boxes at the
            cost of one (method "sensitivity").
        method: "crown", "ibp" or "sensitivity"; None: "sensitivity" when a sensitivity_report
            is given, "crown" otherwise.

    Raises:
        AnalysisError: the method's condition does not hold (named, with the numbers), or sigma
            is negative or misshaped.
        ArgumentValueError: an unknown method.
    """
    arguments.real_values(sigma, "sigma")
    if method is None:
        method = "sensitivity" if sensitivity_report is not None else "crown"
    method = arguments.choice(method, METHODS, "method")
    if sensitivity_report is not None and method != "sensitivity":
        raise ArgumentValueError(
            f"sensitivity_report is only used by method='sensitivity', got method={method!r}; drop one of them"
        )
    radius = per_input(model, sigma, "sigma")
    if (radius < 0).any():
        raise AnalysisError(f"sigma: expected nonnegative radii, got minimum {radius.min():.6g}")
    solution = model.solve(u0)
    center = np.asarray(solution.y, dtype=np.float64)
    inputs = flatten_inputs(model.inputs, u0)[0].astype(np.float64)
    if method == "sensitivity":
        report = sensitivity(model) if sensitivity_report is None else sensitivity_report
        check_report_shape(model, report)
        if not report.valid:
            raise AnalysisError(f"no output bounds: the sensitivity is {report.reason}")
        state = np.atleast_2d(np.asarray(solution.x, dtype=np.float64))  # (batch, n), n = 0 included
        margin = rounding_margin(model, state, np.abs(inputs), radius, solution.error).reshape(center.shape)
        reach = report.matrix @ radius + margin
        low, high, condition = center - reach, center + reach, f"sensitivity: {report.reason}"
    else:
        low, high, margin, condition = relaxed_bounds(model, inputs, radius, method, solution.error)
    return rounded_outward(solution.y, low, high, margin, method, condition)


def rounded_outward(center: np.ndarray, low, high, margin, method: str, condition: str) -> OutputBounds:
    """``OutputBounds`` with low and high (margin included) rounded outward, shaped like center."""
    low, high, margin = (np.reshape(value, np.shape(center)) for value in (low, high, margin))
    return OutputBounds(center, np.nextafter(low, -np.inf), np.nextafter(high, np.inf), margin, method, condition)


def relaxed_bounds(
    model: ImplicitModel,
    inputs: np.ndarray,
    radius: np.ndarray,
    method: str,
    solver_error: float,
    objective: np.ndarray | None = None,
):
    """(lower - margin, upper + margin, margin, condition) of R y by CROWN or IBP, (batch, r)
    each; R = ``objective`` (r, q), the identity by default."""
    structure = Structure.of(model)
    with np.errstate(all="ignore"):  # an overflow becomes inf or NaN: NaN is refused below
        if method == "crown":
            lower, upper, bounds = crown_bounds(structure, inputs, radius, objective)
        else:
            bounds = interval_bounds(structure, inputs, radius)
            lower, upper = _output_intervals(structure, bounds, inputs, radius, objective)
    if np.isnan(lower).any() or np.isnan(upper).any() or np.isnan(bounds.low).any() or np.isnan(bounds.high).any():
        raise AnalysisError(
            "no output bounds: the bounds overflow float64 over this box (an activation's range is infinite there, "
            "e.g. exp of a large pre-activation); use a smaller box"
        )
    reach = np.maximum(np.abs(bounds.low), np.abs(bounds.high))
    lipschitz = np.zeros(model.n)
    for block in model.blocks:
        lipschitz[block.slice] = local_lipschitz(
            block.activation, bounds.pre_low[:, block.slice], bounds.pre_high[:, block.slice]
        ).max(axis=0, initial=0.0)
        if np.isinf(lipschitz[block.slice]).any():
            raise AnalysisError(
                f"no output bounds: block {block.name!r} ({block.activation}) jumps at "
                f"{block.activation.alpha if block.activation.name == 'thresholded_relu' else 0:g} "
                "inside its pre-activation range over the box, so rounding a prediction near it can move it by "
                "the jump; use a smaller box or a continuous activation"
            )
    margin = rounding_margin(model, None, np.abs(inputs), radius, solver_error, reach=reach, lipschitz=lipschitz)
    if objective is not None:
        margin = margin @ np.abs(objective).T
    loops = structure.loops
    what = "linear relaxations back-substituted through the blocks" if method == "crown" else "interval bounds"
    condition = f"{method}: {what}; " + (
        f"{len(loops)} cyclic component(s), each with lambda_pf(Lambda |A_cc|) < 1 (checked), bounded through "
        "its fixed point"
        if loops
        else "the model is acyclic"
    )
    return lower - margin, upper + margin, margin, condition


def _output_intervals(structure, bounds, inputs: np.ndarray, radius: np.ndarray, objective=None):
    """R y = R C x + R D u + R b_y over the state intervals and the box, (batch, r) each."""
    model = structure.model
    x_mid, x_rad = 0.5 * (bounds.low + bounds.high), 0.5 * (bounds.high - bounds.low)
    R = sp.csr_array(sp.eye_array(model.q) if objective is None else objective)
    C, D, bias = sp.csr_array(R @ model.C), sp.csr_array(R @ model.D), R @ model.bias_y
    middle = (C @ x_mid.T).T + (D @ inputs.T).T + bias
    reach = (abs(C) @ x_rad.T).T + abs(D) @ radius
    size = (abs(C) @ np.abs(x_mid).T).T + (abs(D) @ np.abs(inputs).T).T + np.abs(bias) + reach
    pad = _gamma(np.diff(C.indptr) + np.diff(D.indptr) + 2, float(np.finfo(np.float64).eps) / 2) * size
    return middle - reach - pad, middle + reach + pad


def rounding_margin(
    model: ImplicitModel,
    state: np.ndarray | None,
    inputs: np.ndarray,
    radius: np.ndarray,
    solver_error: float,
    reach: np.ndarray | None = None,
    lipschitz: np.ndarray | None = None,
) -> np.ndarray:
    """A bound, per sample and output, on how far rounding in the model's dtype can move two
    predictions (the center's and a sample's in the box) from the exact outputs: (batch, q).

    With unit roundoff e of the dtype, a row of k terms computed in any order (sum of products
    in floating point) is off by at most g_k (sum of |terms|), g_k = k e / (1 - k e) (Higham,
    Accuracy and Stability of Numerical Algorithms, 3.1). Each state row z = A x + B u + b has
    k = nnz of its row + 2 (the bias, and the rounding of u to the dtype); tanh and sigmoid add
    a few ulps of |phi(z)|; states solved by iteration add the solver's error (relative to the
    largest state of their component: the default tolerance, or the center's when larger).
    With X >= |x| and U >= |u| anywhere in the box (X = |x(u0)| + (I - Lambda |A|)^{-1}
    Lambda |B| sigma, U = |u0| + sigma), the state errors e_x obey e_x <= Lambda (|A| e_x + r)
    + t, r = g (|A| X + |B| U + |b|), t the activation and solver terms, so

        e_x <= (I - Lambda |A|)^{-1} (Lambda r + t),
        e_y <= |C| e_x + g (|C| X + |D| U + |c|).

    The margin is twice e_y (both predictions round) times ``ROUNDING_SAFETY`` (the terms of
    second order in e, and the float64 arithmetic of this bound). It is about k e times the
    sensitivity-weighted sizes of the states: negligible beside S sigma unless sigma is within
    some ulps of u (LeNet-5, sigma 0.01: 6e-4 of the width in float32, 1e-14 in float64). For
    cyclic models it holds for predictions at the default tolerance.

    CROWN and IBP pass ``reach`` (their bounds on |x| over the box, (batch, n)) and
    ``lipschitz`` (each state's largest |phi'| over its pre-activation bounds, (n,)) instead of
    the global ones; their own float64 arithmetic (sums of products over the same rows, with
    slopes within those constants) has errors of the same form in float64, covered by the safety
    factor.
    """
    roundoff = float(np.finfo(model.dtype).eps) / 2
    components = execution_order(model)
    structure = model.structure
    A, B, C, D = (absolute(m) for m in (structure.A, structure.B, structure.C, structure.D))
    if reach is None:
        lipschitz = lipschitz_per_state(model)
        spread = solve_identity_minus(
            model, A, lipschitz * B.matvec(radius[:, None])[:, 0], row_scale=lipschitz, components=components
        )
        reach = np.abs(state) + spread
    reach_inputs = inputs + radius
    gamma_x = _gamma(structure.A.row_nnz() + structure.B.row_nnz() + 2, roundoff)
    gamma_y = _gamma(structure.C.row_nnz() + structure.D.row_nnz() + 2, roundoff)
    magnitudes = A.matvec(reach.T) + B.matvec(reach_inputs.T) + np.abs(model.bias_x.astype(np.float64))[:, None]
    rhs = lipschitz[:, None] * gamma_x[:, None] * magnitudes
    rhs += _evaluation_error(model, components, reach.T, roundoff, solver_error)
    errors = solve_identity_minus(model, A, rhs, row_scale=lipschitz, components=components)
    direct = C.matvec(reach.T) + D.matvec(reach_inputs.T) + np.abs(model.bias_y.astype(np.float64))[:, None]
    return (2 * ROUNDING_SAFETY * (C.matvec(errors) + gamma_y[:, None] * direct)).T


def _gamma(terms: np.ndarray, roundoff: float) -> np.ndarray:
    """g_k = k e / (1 - k e): the relative error bound of a k-term sum of products."""
    products = terms.astype(np.float64) * roundoff
    return products / np.maximum(1 - products, 0.5)


def _evaluation_error(
    model: ImplicitModel, components, reach: np.ndarray, roundoff: float, solver_error: float
) -> np.ndarray:
    """Per state and sample (n, batch), the error of evaluating its activation (a few ulps of
    |phi| for every activation but relu and identity; the clipped ones a few ulps of their
    clipping range) plus, for states iterated
    to a tolerance, the solver's error: relative in the max norm, so the tolerance (the default,
    or the center's estimated error when larger) times the component's largest |x|."""
    relative, absolute = np.zeros(model.n), np.zeros(model.n)
    for block in model.blocks:
        if block.activation.name not in ("identity", "relu"):
            relative[block.slice] = ACTIVATION_ULPS * roundoff
        if block.activation.name in ("hard_sigmoid", "hard_swish"):
            # max(0, min(1, a z + b)) rounds a z + b: an error of ulps of |a z| + |b| <= 1 + 2 |b|
            # where it is not clipped (and z <= 3 for hard_swish), not of |phi|
            beta = abs(block.activation.beta if block.activation.name == "hard_sigmoid" else 0.5)
            absolute[block.slice] = ACTIVATION_ULPS * roundoff * (1 + 2 * beta) * 3
    error = relative[:, None] * reach + absolute[:, None]
    tolerance = max(DEFAULT_TOLERANCE[model.dtype], float(solver_error))
    for component in components:
        if component.cyclic:
            rows = component_states(model, component)
            error[rows] += tolerance * reach[rows].max(axis=0, initial=0.0)
    return error


def check_report_shape(model: ImplicitModel, report: SensitivityReport) -> None:
    """A precomputed sensitivity report must belong to a model with the same p and q."""
    if report.matrix.shape != (model.q, model.p):
        raise AnalysisError(
            f"sensitivity_report: expected a (q, p) = {(model.q, model.p)} matrix, got {report.matrix.shape}; "
            "pass sensitivity(model) of this model"
        )


def per_input(model: ImplicitModel, value: Any, name: str) -> np.ndarray:
    """A scalar, a (p,) vector or one sample's worth of values as a finite (p,) float64 vector."""
    array = np.asarray(value, dtype=np.float64)
    sample_shapes = [(model.p,)] + ([model.inputs[0].shape] if len(model.inputs) == 1 else [])
    if array.ndim == 0:
        array = np.full(model.p, float(array))
    elif array.shape in sample_shapes:
        array = array.reshape(model.p)
    else:
        expected = " or ".join(str(s) for s in sample_shapes)
        raise AnalysisError(f"{name}: expected a scalar or an array of shape {expected}, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise AnalysisError(f"{name}: expected finite values")
    return array


def _report(matrix: np.ndarray, valid: bool, reason: str, radius: float) -> SensitivityReport:
    matrix = np.asarray(matrix, dtype=np.float64)
    matrix.setflags(write=False)
    return SensitivityReport(matrix, valid, reason, float(radius))
