"""What certified bounds need to know of each activation phi over an interval [l, h] of its
pre-activation z: the range of phi, and linear functions bounding phi from below and above.

- ``interval_image(phi, l, h)``: [min phi, max phi] over [l, h]. A continuous phi attains
  both at an endpoint or at a stationary point inside; each activation lists its stationary
  points and kinks (``_CRITICAL``: gelu's minimum at z ~ -0.7518, silu's at -1.2785, ...),
  and thresholded_relu's jump adds both one-sided values. Where [l, h] leaves phi's domain or
  reaches a pole (log, sqrt, rsqrt, reciprocal, negative powers at 0), no bound exists: a
  ``DomainError`` says so.
- ``linear_relaxation(phi, l, h)``: slopes and intercepts with
  a_lo z + b_lo <= phi(z) <= a_hi z + b_hi on [l, h] (CROWN, Zhang et al. 2018):
    relu and leaky_relu (convex for alpha <= 1): the chord above; below, the line through 0
      of slope 1 or alpha, whichever leaves the smaller area (1 when h > -l);
    convex phi (square, exp, softplus, ...): the chord above, the tangent at the midpoint
      below; concave phi (log, sqrt) the other way round;
    sigmoid and tanh (convex for z <= 0, concave for z >= 0): as convex or concave on one side
      of 0; across 0 the two lines of slope min(phi'(l), phi'(h)) through (l, phi(l)) and
      (h, phi(h)) (DeepPoly, Singh et al. 2019; phi' is unimodal, so phi' >= that slope on [l, h]);
    any other phi: the constant lines at min and max phi.
- ``parallel_relaxation(phi, l, h)``: one slope s with phi(z) - s z in [e_lo, e_hi] on
  [l, h], for the loops of cyclic components (the state is then x = s z + e, linear in z).
  s is the chord's slope; the range of phi(z) - s z is attained at the endpoints and where
  phi'(z) = s (relu's kink; closed forms for sigmoid and tanh); other phi take s = 0.

Everything is computed in float64 and widened by a few ulps (``WIDEN_ULPS``) of the values
involved, so that rounding in these formulas cannot make a bound cross phi.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy import optimize

from ..activations import LOG_POSITIVE_FLOOR, Activation

WIDEN_ULPS = 16  # float64 ulps of the values in a relaxation, added outward
_EPS = float(np.finfo(np.float64).eps)

MONOTONE = frozenset(
    {"identity", "relu", "tanh", "sigmoid", "exp", "log", "sqrt", "rsqrt", "erf", "softplus", "softsign", "celu",
     "hard_sigmoid", "log_positive"}
)  # fmt: skip
CONVEX = frozenset({"square", "exp", "softplus", "relu"})
CONCAVE = frozenset({"log", "sqrt", "log_positive"})  # log_positive: above its floor


class DomainError(ValueError):
    """[l, h] leaves phi's domain or reaches one of its poles: phi is unbounded (or NaN) there."""


@dataclass(frozen=True)
class Lines:
    """lower_slope z + lower_intercept <= phi(z) <= upper_slope z + upper_intercept on [l, h],
    each array shaped like l. ``upper_negative_slope`` (a max level's, ``max_tree``): where
    given, the upper line is upper_slope z^+ + upper_negative_slope z^- + upper_intercept, with
    z^+ / z^- the positive / negative terms of z's row."""

    lower_slope: np.ndarray
    lower_intercept: np.ndarray
    upper_slope: np.ndarray
    upper_intercept: np.ndarray
    upper_negative_slope: np.ndarray | None = None


def interval_image(phi: Activation, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) of phi over [low, high], elementwise, widened outward by a few ulps."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    _check_domain(phi, low, high)
    at_low, at_high = _evaluate(phi, low), _evaluate(phi, high)
    smallest, largest = np.minimum(at_low, at_high), np.maximum(at_low, at_high)
    for point, values in _critical(phi):
        inside = (low <= point) & (point <= high)
        for value in values:
            smallest = np.where(inside, np.minimum(smallest, value), smallest)
            largest = np.where(inside, np.maximum(largest, value), largest)
    pad = WIDEN_ULPS * _EPS  # each end by ulps of its own value (phi's evaluation there)
    tiny = np.finfo(np.float64).tiny
    smallest, largest = smallest - pad * np.abs(smallest) - tiny, largest + pad * np.abs(largest) + tiny
    if _nonnegative(phi):  # (so that sums of them, a variance, stay provably >= 0)
        smallest = np.maximum(smallest, 0.0)
    return smallest, largest


def linear_relaxation(phi: Activation, low: np.ndarray, high: np.ndarray) -> Lines:
    """Lines below and above phi on [low, high] (see the module docstring for each phi)."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    name = phi.name
    if name == "identity":
        one, zero = np.ones_like(low), np.zeros_like(low)
        return Lines(one, zero, one, zero)
    smallest, largest = interval_image(phi, low, high)
    width = high - low
    flat = width <= 0
    safe_width = np.where(flat, 1.0, width)
    at_low, at_high = _evaluate(phi, low), _evaluate(phi, high)
    chord = np.where(flat, 0.0, (at_high - at_low) / safe_width)
    chord_intercept = at_low - chord * low
    if name in ("relu", "leaky_relu"):
        alpha = 0.0 if name == "relu" else phi.alpha
        steep = np.where(high > -low, 1.0, alpha)
        if alpha <= 1:  # convex: max(z, alpha z)
            lines = (steep, np.zeros_like(low), chord, chord_intercept)
        else:  # concave: min(z, alpha z)
            gentle = np.where(high > -low, 1.0, alpha)
            lines = (chord, chord_intercept, gentle, np.zeros_like(low))
    elif name in CONVEX or name in CONCAVE or (name in ("sigmoid", "tanh")):
        middle = 0.5 * (low + high)
        tangent = phi.derivative(middle)
        tangent_intercept = _evaluate(phi, middle) - tangent * middle
        convex_lines = (tangent, tangent_intercept, chord, chord_intercept)
        concave_lines = (chord, chord_intercept, tangent, tangent_intercept)
        if name in CONVEX:
            lines = convex_lines
        elif name in CONCAVE:
            lines = concave_lines
            if name == "log_positive":  # concave above its floor only (constant below it: a kink)
                constant = (np.zeros_like(low), smallest, np.zeros_like(low), largest)
                lines = tuple(np.where(low > LOG_POSITIVE_FLOOR, a, b) for a, b in zip(lines, constant))
        else:
            slope = np.minimum(phi.derivative(low), phi.derivative(high))
            across = (slope, at_low - slope * low, slope, at_high - slope * high)
            lines = tuple(
                np.where(high <= 0, convex, np.where(low >= 0, concave, mixed))
                for convex, concave, mixed in zip(convex_lines, concave_lines, across)
            )
    else:
        zero = np.zeros_like(low)
        lines = (zero, smallest, zero, largest)
    lines = tuple(np.where(flat, fallback, line) for line, fallback in zip(lines, (0.0, smallest, 0.0, largest)))
    return _widen_lines(Lines(*lines), low, high, smallest, largest)


def parallel_relaxation(
    phi: Activation, low: np.ndarray, high: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s, e_lo, e_hi) with e_lo <= phi(z) - s z <= e_hi for z in [low, high]."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    smallest, largest = interval_image(phi, low, high)
    name = phi.name
    if name == "identity":
        zero = np.zeros_like(low)
        return np.ones_like(low), zero, zero
    if name not in ("relu", "leaky_relu", "sigmoid", "tanh"):
        return np.zeros_like(low), smallest, largest
    width = high - low
    flat = width <= 0
    at_low, at_high = _evaluate(phi, low), _evaluate(phi, high)
    slope = np.where(flat, 0.0, (at_high - at_low) / np.where(flat, 1.0, width))
    candidates = [at_low - slope * low, at_high - slope * high]
    for point in _touching_points(name, slope):
        inside = (low <= point) & (point <= high)
        value = _evaluate(phi, np.where(inside, point, low)) - slope * np.where(inside, point, low)
        candidates.append(np.where(inside, value, candidates[0]))
    e_lo, e_hi = np.minimum.reduce(candidates), np.maximum.reduce(candidates)
    e_lo = np.where(flat, smallest, e_lo)
    e_hi = np.where(flat, largest, e_hi)
    scale = np.maximum(np.abs(smallest), np.abs(largest)) + np.abs(slope) * np.maximum(np.abs(low), np.abs(high))
    e_lo, e_hi = _widen(e_lo, e_hi, scale)
    return slope, e_lo, e_hi


def local_lipschitz(phi: Activation, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """max |phi'| over [low, high]: phi's Lipschitz constant where it has one, otherwise the
    largest |phi'| at the endpoints (the activations without a global constant have a monotone
    |phi'| on each side of their pole or minimum: square, exp, log, sqrt, rsqrt, reciprocal,
    powers); inf for thresholded_relu's and heaviside's jumps inside [low, high]."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    if math.isfinite(phi.lipschitz):
        return np.full(low.shape, phi.lipschitz)
    if phi.name == "thresholded_relu":
        return np.where((low <= phi.alpha) & (phi.alpha < high), np.inf, 1.0)
    if phi.name == "heaviside":
        return np.where((low <= 0) & (high >= 0), np.inf, 0.0)
    _check_domain(phi, low, high)
    slope = np.maximum(np.abs(phi.derivative(low)), np.abs(phi.derivative(high)))
    if phi.name == "power" and 0 < phi.alpha < 1:  # sqrt-like: |phi'| largest at the low end, inf at 0
        slope = np.abs(phi.derivative(low))
    return slope * (1 + WIDEN_ULPS * _EPS)


# ----------------------------------------------------------------------------- helpers
def _evaluate(phi: Activation, z: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return phi(np.asarray(z, dtype=np.float64))


def _check_domain(phi: Activation, low: np.ndarray, high: np.ndarray) -> None:
    """Raise DomainError where [low, high] leaves phi's domain or touches a pole."""
    name, alpha = phi.name, phi.alpha
    if name in ("log", "rsqrt", "sqrt"):  # (log and rsqrt at 0 itself: -inf / inf, bounds but no numbers)
        bad, what = low < 0, "z >= 0"
    elif name == "reciprocal":
        bad, what = (low <= 0) & (high >= 0), "z != 0 (a pole at 0)"
    elif name == "power" and alpha != round(alpha):
        bad, what = (low < 0) | ((low <= 0) & (alpha < 0)), "z >= 0 (a non-integer power)"
    elif name == "power" and alpha < 0:
        bad, what = (low <= 0) & (high >= 0), "z != 0 (a pole at 0)"
    else:
        return
    if np.any(bad):
        index = int(np.flatnonzero(np.ravel(bad))[0])
        raise DomainError(
            f"{phi} needs {what}, but its pre-activation ranges over "
            f"[{np.ravel(low)[index]:.6g}, {np.ravel(high)[index]:.6g}] (entry {index})"
        )


def _nonnegative(phi: Activation) -> bool:
    """phi(z) >= 0 for every z where it is defined."""
    if phi.name == "power":
        return phi.alpha == round(phi.alpha) and phi.alpha % 2 == 0 or phi.alpha != round(phi.alpha)
    if phi.name == "heaviside":
        return phi.alpha >= 0
    return phi.name in ("relu", "square", "exp", "sigmoid", "softplus", "sqrt", "rsqrt", "hard_sigmoid")


def _critical(phi: Activation) -> list[tuple[float, tuple[float, ...]]]:
    """(point, values phi takes or approaches there) besides the endpoints: stationary points, kinks and jumps."""
    name, alpha = phi.name, phi.alpha
    if name in MONOTONE:
        return []
    if name in ("leaky_relu", "elu", "selu", "square"):
        return [(0.0, (0.0,))]
    if name == "power":
        return [(0.0, (0.0,))] if alpha > 0 and alpha == round(alpha) and alpha % 2 == 0 else []
    if name == "thresholded_relu":
        return [(alpha, (0.0, alpha))]
    if name == "heaviside":
        return [(0.0, (0.0, alpha, 1.0))]
    if name == "hard_swish":
        return [(-1.5, (-0.375,))]
    if name in ("gelu", "gelu_tanh", "silu", "mish"):
        point = _minimum_point(name)
        return [(point, (float(_evaluate(phi, np.array(point))),))]
    return []


@cache
def _minimum_point(name: str) -> float:
    """The stationary point of gelu, gelu_tanh, silu or mish (their one minimum, in [-3, 0])."""
    phi = Activation(name)
    return float(optimize.brentq(lambda z: float(phi.derivative(np.array(z))), -3.0, -0.1, xtol=1e-15))


def _touching_points(name: str, slope: np.ndarray) -> list[np.ndarray]:
    """The z where phi'(z) = slope (the other extremes of phi(z) - slope z)."""
    if name in ("relu", "leaky_relu"):
        return [np.zeros_like(slope)]
    with np.errstate(all="ignore"):
        if name == "sigmoid":  # s (1 - s) = slope
            root = np.sqrt(np.maximum(1 - 4 * slope, 0.0))
            return [np.log(p / (1 - p)) for p in ((1 - root) / 2, (1 + root) / 2)]
        root = np.sqrt(np.maximum(1 - slope, 0.0))  # tanh: 1 - t^2 = slope
        return [np.arctanh(np.clip(t, -1.0, 1.0)) for t in (-root, root)]


def _widen(low: np.ndarray, high: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pad = WIDEN_ULPS * _EPS * np.abs(scale) + np.finfo(np.float64).tiny
    return low - pad, high + pad


def _widen_lines(lines: Lines, low, high, smallest, largest) -> Lines:
    """Move each line outward by the rounding of its slope times z plus its intercept."""
    reach = np.maximum(np.abs(low), np.abs(high))
    scale_lo = np.abs(lines.lower_slope) * reach + np.abs(lines.lower_intercept) + np.abs(smallest)
    scale_hi = np.abs(lines.upper_slope) * reach + np.abs(lines.upper_intercept) + np.abs(largest)
    pad = WIDEN_ULPS * _EPS
    return Lines(
        lines.lower_slope,
        lines.lower_intercept - pad * scale_lo - np.finfo(np.float64).tiny,
        lines.upper_slope,
        lines.upper_intercept + pad * scale_hi + np.finfo(np.float64).tiny,
    )
