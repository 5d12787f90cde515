"""Fixed-point iteration x = g(x) on a batch of states (columns of an (m, batch) array).

Every sample (column) is iterated, tested and stopped on its own. With f_k = g(x_k) - x_k:

    residual   r_k = ||f_k||_inf / ||g(x_k)||_inf                      (relative)
    rate       L_k = max of the last ``RATE_WINDOW`` secant ratios
                     ||g(x_j) - g(x_{j-1})||_inf / ||x_j - x_{j-1}||_inf  (a local Lipschitz estimate)
    error      e_k = r_k / (1 - L_k)                                   (relative error of x_k)

For a map that contracts with factor L, ||x_k - x*|| <= ||f_k|| / (1 - L): the test e_k <= tol
bounds the error of the states, not just the last step (with L = 0.99 a residual of 1e-6 is an
error of up to 1e-4). A sample stops when e_k <= tol (at least two evaluations, unless f_k = 0),
returning g(x_k). Stopped samples are swept on (untested, unaccelerated) until the ones still
running are at most ``COMPACT_SHARE`` of the columns; then only those are passed to ``g``, so a
converged sample stops costing work without a copy of every array at every stop (the training
solves of a 100-state model: 0.82 against 0.90 ms a forward solve).

Picard: x_{k+1} = g(x_k). Its error shrinks by about L per step.

Anderson (type II, memory m; Walker & Ni 2011) with f and the differences dF = [f_{i+1} - f_i],
dG = [g(x_{i+1}) - g(x_i)] of the last m steps: per sample gamma = argmin ||f_k - dF gamma||_2
(regularised normal equations, kept up to date one row and column per step) and
x_{k+1} = g(x_k) - dG gamma. It is turned on for a sample once its rate exceeds the rate from
which it pays (``accelerate_from``: at least ``ACCELERATE_FROM``, more when the map is cheap
beside the acceleration's own passes over the states). Safeguard: when a sample's
residual grows past twice its best, its history is dropped and its next step is a Picard step
(a restart). The same happens when the mixed step would move x_k by more than ``TRUST`` times
||f_k|| / (1 - L_k), the bound on the distance to the fixed point of a map contracting with
L_k: an ill-conditioned least-squares problem (nearly collinear dF) can give huge coefficients,
and one such step from a converging iterate once overflowed a well-posed training solve.

Broyden (``Acceleration("broyden")``): the "good" Broyden method on F(x) = g(x) - x per sample,
its inverse Jacobian kept as ``memory`` rank-one terms from H_0 = -I (the first step is Picard's),
under the same restarts and trust test. It is an option, not the default: on a dense nonnegative
A (n = 500, ||A||_inf = 0.99, float32) it takes fewer steps than Anderson (11 against 14 at batch
1, 15 against 17 at batch 256) but longer (1.14 against 0.85 ms, 36 against 26 ms; the LeNet-5
loop at batch 256: 15.4 against 7.8 ms), its products with the history being numpy passes.

A residual that stops improving near the dtype's rounding (``STALL_ITERATIONS`` steps without a
new best, below ``FLOOR_EPS`` machine epsilons) ends the iteration with a ConvergenceError that
says so, instead of spinning to max_iter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import ConvergenceError, ShapeError, ToleranceError
from . import fixed_point_kernels as kernels

# g(x, columns): the map at x (m, k) for the samples ``columns`` (indices into the batch).
BatchMap = Callable[[np.ndarray, np.ndarray], np.ndarray]
FixedPointMap = Callable[[np.ndarray], np.ndarray]

RATE_WINDOW = 3
# Samples that stop stay in the arrays, swept on but no longer tested, until those still running
# are at most this share of them; then the arrays are compacted (each compaction copies x, g(x)
# and the history; on a trained classifier at batch 256 they cost 0.05 ms a stop).
COMPACT_SHARE = 0.5
ACCELERATIONS = ("anderson", "broyden")
ACCELERATE_FROM = 0.1
# The cost model of ``accelerate_from``, in nanoseconds on this project's 2-core machine: a step
# of the iteration costs STEP_NS (Python, the stopping test) plus the map's multiply-adds at
# MULTIPLY_ADD_NS[dtype] * (1 + SINGLE_VECTOR_BATCH / batch) each (BLAS; a matrix-vector product
# is bound by reading the weights); an Anderson or Broyden step costs ACCELERATION_NS plus its
# (2 memory + 8) passes over the iterated states at PASS_NS + PASS_SINGLE_NS / batch an element
# (the kernels vectorize across samples). Measured, memory 5: Anderson's step on 500 states took
# 16.7 us at batch 1 and 109 us at batch 64 (float64), on 200 states at batch 256 in float32
# 0.12 ms against 0.095 ms for the 200 x 200 product. Anderson is taken to shrink the error per
# step like ANDERSON_EFFICIENCY times the Chebyshev (GMRES) rate of a linear map contracting by L:
# on dense relu maps Picard / Anderson took 12 / 8 steps (secant rate 0.3), 19 / 9 (0.47), 37 / 11
# (0.65); on the trained 200-state digits classifier 13 / 10 (0.3), where Picard took 2.3 ms
# against 3.9 at batch 256.
STEP_NS = 10_000.0
MULTIPLY_ADD_NS = {np.dtype(np.float32): 0.01, np.dtype(np.float64): 0.02}
SINGLE_VECTOR_BATCH = 5.0
ACCELERATION_NS = 3_000.0
PASS_NS, PASS_SINGLE_NS = 0.15, 1.6
ANDERSON_EFFICIENCY = 0.75
STALL_ITERATIONS = 20
FLOOR_EPS = 1000
# Steps smaller than this many epsilons (relative) are mostly rounding: no rate is read off them.
SECANT_FLOOR = 16
# A residual of at most this many epsilons counts as converged (below the least tolerance).
EXACT_FLOOR = 2
# An Anderson step may move x_k by at most this many times ||f_k|| / (1 - L_k) (rates clipped to
# TRUST_RATE), else it is replaced by the Picard step and the sample's history dropped.
TRUST = 4
TRUST_RATE = 0.999
# The smallest tolerance a dtype can be asked for, in machine epsilons.
LEAST_TOLERANCE_EPS = 4


@dataclass(frozen=True)
class Acceleration:
    """How ``iterate`` accelerates: "anderson" (the default) or "broyden", with ``memory``
    difference pairs (Anderson) or rank-one updates (Broyden) kept; memory 0 is plain Picard."""

    method: str = "anderson"
    memory: int = 5

    def __post_init__(self) -> None:
        if self.method not in ACCELERATIONS:
            raise ShapeError(f"unknown acceleration {self.method!r}: expected one of {', '.join(ACCELERATIONS)}")
        if self.memory < 0:
            raise ShapeError(f"the acceleration's memory must be >= 0, got {self.memory}")


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


@functools.lru_cache(maxsize=256)
def accelerate_from(relative_cost: float) -> float:
    """The least secant rate L at which acceleration pays when its step costs ``relative_cost``
    evaluations of the map: the L where Anderson's error reduction per step, taken as
    ``ANDERSON_EFFICIENCY`` times Chebyshev's, log q(L) / log L with q(L) = (1 - sqrt(1 - L)) /
    (1 + sqrt(1 - L)), first beats Picard's by the factor 1 + relative_cost it costs (at least
    ``ACCELERATE_FROM``). The gain grows with L without bound, so a slow enough contraction is
    always accelerated."""

    def gain(L: float) -> float:
        root = np.sqrt(1.0 - L)
        return ANDERSON_EFFICIENCY * np.log((1.0 - root) / (1.0 + root)) / np.log(L)

    low, high = ACCELERATE_FROM, 1.0 - 1e-12
    if gain(low) >= 1.0 + relative_cost:
        return ACCELERATE_FROM
    for _ in range(50):
        middle = 0.5 * (low + high)
        low, high = (low, middle) if gain(middle) >= 1.0 + relative_cost else (middle, high)
    return high


def acceleration_cost(rows: int, batch: int, map_work: float | None, memory: int, dtype: np.dtype) -> float:
    """An acceleration step's cost in steps of the iteration, for a map of ``map_work``
    multiply-adds per sample on ``rows`` iterated states of ``batch`` samples (the cost model
    above; 0 when the map's work is unknown)."""
    if not map_work or memory == 0:
        return 0.0
    multiply_add = MULTIPLY_ADD_NS.get(np.dtype(dtype), 0.02) * (1.0 + SINGLE_VECTOR_BATCH / batch)
    step = STEP_NS + map_work * batch * multiply_add
    acceleration = ACCELERATION_NS + (2 * memory + 8) * rows * batch * (PASS_NS + PASS_SINGLE_NS / batch)
    return acceleration / step


def iterate(
    g: BatchMap,
    x0: np.ndarray,
    tol: float,
    max_iter: int,
    memory: int | Acceleration = 5,
    what: str = "model",
    regularization: float | None = None,
    watch: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    groups: np.ndarray | None = None,
    map_work: float | None = None,
) -> FixedPoint:
    """Iterate g from x0 (m, batch), each sample until its estimated error is below tol.

    ``watch(gx, columns)``: quantities computed from the iterate, (w, k), e.g. the outputs y = C x
    + ...; their estimated error, from their own steps and rate, is tested beside the states' (so
    the outputs are as accurate as tol asks, whatever the scaling of the states). ``groups``:
    row offsets [0, ..., m] of the blocks of x; residuals, steps and rates are then measured in
    the block-normalized norm (``fixed_point_kernels.block_maxima``: each block relative to its
    own scale, down to sqrt(eps) of the largest it had: states decaying to zero do not keep
    the iteration going), so that a block of small states (after ``rescale``) is solved as
    accurately as the others. ``memory``: Anderson's history length (0: plain Picard), or an
    ``Acceleration`` (Anderson or Broyden, and its memory). ``map_work``: multiply-adds of one
    evaluation of g per sample; acceleration then starts only at the rate from which it pays
    (``accelerate_from``; unknown: from ``ACCELERATE_FROM``). ``regularization`` is relative to
    the trace of the least-squares normal matrix (default: 100 machine epsilons of x0's dtype). Raises
    ConvergenceError, carrying the history, when max_iter iterations do not reach tol, when the
    residual stalls at the rounding floor, or when the iterates stop being finite.
    """
    eps = float(np.finfo(x0.dtype).eps)
    if regularization is None:
        regularization = 100 * eps
    acceleration = memory if isinstance(memory, Acceleration) else Acceleration("anderson", int(memory))
    cost = acceleration_cost(*x0.shape, map_work, acceleration.memory, x0.dtype)
    constants = np.array(
        [np.finfo(x0.dtype).tiny, SECANT_FLOOR * eps, EXACT_FLOOR * eps, tol, FLOOR_EPS * eps, STALL_ITERATIONS,
         accelerate_from(round(cost, 2)), np.sqrt(eps)],
    )  # fmt: skip
    whole = np.array([0, x0.shape[0]], dtype=np.int64)
    groups = whole if groups is None else np.asarray(groups, dtype=np.int64)
    out = np.empty_like(x0)
    columns = np.arange(x0.shape[1])
    x = x0
    history: list[float] = []
    worst_error = 0.0
    state = _SampleState(x0, acceleration.memory, acceleration.method)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for _ in range(max_iter):
            gx = g(x, columns)
            worst, finite, any_done, any_stuck = state.assess(x, gx, constants, watch, columns, groups)
            history.append(worst)
            if not finite:
                raise ConvergenceError(_diverged_message(what, len(history)), history)
            if any_done:
                k = columns.size
                done, finished = state.flags[0, :k], state.finished[:k]
                worst_error = max(worst_error, float(state.error[:k][done].max()))
                if k == out.shape[1] and gx.dtype == out.dtype and done.all():  # all at once: g(x) is the answer
                    return FixedPoint(gx, history, worst_error)
                kernels.store_columns(out, columns, done, gx)
                finished |= done
                keep = np.flatnonzero(~finished)
                if keep.size == 0:
                    return FixedPoint(out, history, worst_error)
                if keep.size <= COMPACT_SHARE * k:  # else the stopped samples are swept on, untested
                    columns, x, gx = columns[keep], kernels.take_columns(x, keep), kernels.take_columns(gx, keep)
                    state.keep(keep)
            if any_stuck:
                k = columns.size
                stuck = state.flags[1, :k]
                residual, rate = state.residual[:k][stuck], state.rate[:k][stuck]
                raise ConvergenceError(_floor_message(what, len(history), residual, rate, tol, x0.dtype), history)
            x = state.step(x, gx, regularization)
    error = float(state.error[: columns.size][~state.finished[: columns.size]].max(initial=0.0))
    raise ConvergenceError(_stalled_message(what, max_iter, history[-1], error, tol), history)


class _SampleState:
    """Per-sample bookkeeping of ``iterate`` (``fixed_point_kernels``): the column maxima, the
    rate window, best residuals and stopping flags, the Anderson history (a ring of slots).
    Per-sample vectors are allocated for the whole batch; the first k entries belong to the k
    samples still running."""

    def __init__(self, x0: np.ndarray, memory: int, method: str = "anderson"):
        rows, batch = x0.shape
        self.memory, self.method = memory, method
        self.previous: tuple[np.ndarray, np.ndarray] | None = None  # (x, g(x)) of the last step
        self.rates = np.full((RATE_WINDOW, batch), np.inf)  # secant ratios, a ring
        self.rate_slot, self.rate_filled = 0, 0
        self.best = np.full(batch, np.inf)
        self.since_best = np.zeros(batch, dtype=np.int64)
        self.accelerating = np.zeros(batch, dtype=bool)
        self.residual, self.rate, self.error = np.empty(batch), np.empty(batch), np.empty(batch)
        self.flags = np.zeros((3, batch), dtype=bool)  # done, stuck, restart
        self.finished = np.zeros(batch, dtype=bool)  # stopped, kept in the arrays until compacted
        self.maxima_out = np.empty((5, batch))
        self.watched = np.zeros(batch)  # the watched quantities' relative step (0: none watched)
        self.last_watched: np.ndarray | None = None
        self.watched_steps: list[np.ndarray] = []  # their last relative steps, oldest first
        self.seen: np.ndarray | None = None  # with groups: each block's largest |x| or |g(x)| so far
        # the history, made when a sample first turns acceleration on (a solve that never does
        # allocates none: 2 x 1 MB for 200 states x 256 samples, 18 us a zeroed array)
        self.dtype = x0.dtype
        self.ring_f: np.ndarray | None = None  # f_{i+1} - f_i per slot, (memory, rows, running)
        self.ring_g: np.ndarray | None = None  # g_{i+1} - g_i
        self.gram: np.ndarray | None = None  # <dF_i, dF_j> per sample, slot by slot
        self.filled, self.slot = 0, 0
        self.views: tuple | None = None  # the per-sample arrays' first k entries, for k running samples

    def assess(
        self, x: np.ndarray, gx: np.ndarray, constants: np.ndarray, watch, columns, groups
    ) -> tuple[float, bool, bool, bool]:
        """The stopping test of the running samples (``fixed_point_kernels.assess``)."""
        k = x.shape[1]
        px, pg = (x, gx) if self.previous is None else self.previous
        watched = self.watched[:k]
        if watch is not None:
            watched[:] = self._watched_error(watch(gx, columns), constants[0])
        if self.views is None or self.views[0] != k:  # (slicing 13 arrays every step cost 5 us)
            self.views = (k, self._seen(groups)[:, :k], self.maxima_out[:, :k], self.rates[:, :k])
            self.views += (self.best[:k], self.since_best[:k], self.accelerating[:k], self.finished[:k])
            self.views += (self.residual[:k], self.rate[:k], self.error[:k], self.flags[:, :k])
        _, seen, maxima, rates, best, since_best, accelerating, finished, residual, rate, error, flags = self.views
        worst, finite, any_done, any_stuck = kernels.assess(
            x, gx, px, pg, groups, seen, maxima, self.previous is not None, rates, self.rate_slot, self.rate_filled,
            best, since_best, accelerating, constants, watched, finished, residual, rate, error, flags,
        )  # fmt: skip
        if self.previous is not None:
            self.rate_slot = (self.rate_slot + 1) % RATE_WINDOW
            self.rate_filled = min(self.rate_filled + 1, RATE_WINDOW)
        if not finite:
            return float("inf"), False, False, False
        return float(worst), True, bool(any_done), bool(any_stuck)

    def _seen(self, groups: np.ndarray) -> np.ndarray:
        """The largest |x| or |g(x)| of each block so far, (blocks, batch) (``block_maxima``)."""
        if self.seen is None:
            self.seen = np.zeros((max(groups.size - 1, 1), self.best.size))
        return self.seen

    def _watched_error(self, w: np.ndarray, tiny: float) -> np.ndarray:
        """The estimated relative error of watched quantities w (q, k): their relative step over
        (1 - their own rate), the largest ratio of successive steps over the last
        ``RATE_WINDOW`` (inf until two steps are known, or when the steps do not shrink)."""
        size = np.maximum(np.max(np.abs(w), axis=0, initial=0.0), tiny)
        error = np.full(w.shape[1], np.inf)
        if self.last_watched is not None:
            step = np.max(np.abs(w - self.last_watched), axis=0, initial=0.0) / size
            if self.watched_steps:
                ratios = [
                    new / np.maximum(old, tiny) for old, new in zip(self.watched_steps, [*self.watched_steps[1:], step])
                ]
                rate = np.max(ratios[-RATE_WINDOW:], axis=0)
                error = np.where(rate < 1, step / (1 - np.minimum(rate, 1)), np.inf)
                error[step == 0] = 0.0
            self.watched_steps = [*self.watched_steps[-RATE_WINDOW:], step]
        self.last_watched = w
        return error

    def keep(self, keep: np.ndarray) -> None:
        """Keep the samples at positions ``keep`` of the running ones (ascending), in front."""
        k = keep.size
        if self.previous is not None:
            self.previous = tuple(kernels.take_columns(a, keep) for a in self.previous)
        for vector in (self.best, self.since_best, self.accelerating, self.residual, self.rate, self.error):
            vector[:k] = vector[keep]
        self.finished[:k] = False
        if self.last_watched is not None:
            self.last_watched = self.last_watched[:, keep]
            self.watched_steps = [step[keep] for step in self.watched_steps]
        self.rates[:, :k] = self.rates[:, keep]
        self.flags[:, :k] = self.flags[:, keep]
        self.maxima_out[:, :k] = self.maxima_out[:, keep]
        if self.seen is not None:
            self.seen[:, :k] = self.seen[:, keep]
        if self.ring_f is not None:
            self.ring_f, self.ring_g = (self._packed(ring, keep) for ring in (self.ring_f, self.ring_g))
            self.gram[:k] = self.gram[keep]

    def _packed(self, ring: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """The ring's columns ``keep`` packed in place into a C-ordered (memory, rows, k) ring."""
        memory, rows, batch = ring.shape
        flat = ring.view()
        flat.shape = (ring.size,)  # (raises rather than copies: the rings are always C-ordered)
        kernels.compact(flat, self.filled, rows, batch, keep)
        return flat[: memory * rows * keep.size].reshape(memory, rows, keep.size)

    def step(self, x: np.ndarray, gx: np.ndarray, regularization: float) -> np.ndarray:
        """The next iterate: Anderson's for the samples it is on for, Picard's for the others.
        Remembers (x, g(x)) as the last step."""
        previous, self.previous = self.previous, (x, gx)
        k = x.shape[1]
        # (no history is kept until a sample turns acceleration on: a fast contraction never
        # pays for the ring's passes; 4 of 5 steps on a signed dense A, n = 2000, batch 256)
        if not self.memory or previous is None or not self.accelerating[:k].any():
            return gx
        if self.ring_f is None:
            self.ring_f, self.ring_g = (np.zeros((self.memory, *x.shape), dtype=self.dtype) for _ in range(2))
            self.gram = np.zeros((k, self.memory, self.memory))
        slot, self.filled = self.slot, min(self.filled + 1, self.memory)
        self.slot = (slot + 1) % self.memory
        if self.method == "broyden":
            mixed = self._broyden_step(x, gx, *previous, slot)
        else:
            mixed = np.empty_like(gx)
            kernels.anderson(
                self.ring_f, self.ring_g, self.gram, slot, self.filled, x, gx, *previous, self.accelerating[:k],
                self.flags[2, :k], self.maxima_out[4, :k], self.rate[:k], TRUST, TRUST_RATE, regularization, mixed,
            )  # fmt: skip
        restart = self.flags[2, :k]
        if restart.any():
            self._step_back(restart, mixed, previous)
        return mixed

    def _step_back(self, restart: np.ndarray, mixed: np.ndarray, previous: tuple[np.ndarray, np.ndarray]) -> None:
        """Samples whose residual grew past twice their best (their history is dropped) after an
        accelerated step go on from the iterate before: its plain step g(x_prev), as if the step
        that overshot had not been taken. Going on from the overshot iterate instead can cycle:
        on a relu model whose Anderson step overshoots to all-negative pre-activations, g of it
        is 0, the start, and the same steps repeat forever. After a plain step (x = g(x_prev))
        the growth is the map's own (a non-normal linear map grows before it contracts, as an
        adjoint A^T D does): it goes on from there."""
        px, pg = previous
        x, gx = self.previous
        back = restart & np.any(x != pg, axis=0)
        if not back.any():
            return
        mixed[:, back] = pg[:, back]
        x, gx = x.copy(), gx.copy()
        x[:, back], gx[:, back] = px[:, back], pg[:, back]
        self.previous = (x, gx)

    def _broyden_step(self, x, gx, px, pg, slot: int) -> np.ndarray:
        """Broyden's ("good") method on F(x) = g(x) - x per sample, its inverse Jacobian
        H = -I + sum_i u_i v_i^T kept as rank-one terms in the rings (u in ring_f, v in ring_g;
        the oldest overwritten once ``memory`` are kept). With s = x - px and y = F - F_prev:

            H y = -y + sum_i u_i (v_i . y),  u = (s - H y) / (s . H y),  v = H^T s = -s + sum_i v_i (u_i . s)

        and the step x - H F = g(x) - sum_i u_i (v_i . F). Samples not accelerating, or
        restarting, take g(x); the same trust test as Anderson's drops an overshooting step."""
        k = x.shape[1]
        U, V = self.ring_f[:, :, :k], self.ring_g[:, :, :k]
        f, s, y = gx - x, x - px, (gx - x) - (pg - px)
        others = [i for i in range(self.filled) if i != slot]
        U[slot] = 0
        V[slot] = 0
        Hy, Hs = -y, -s
        for i in others:
            Hy = Hy + U[i] * np.einsum("rb,rb->b", V[i], y)
            Hs = Hs + V[i] * np.einsum("rb,rb->b", U[i], s)
        denominator = np.einsum("rb,rb->b", s, Hy)
        usable = np.abs(denominator) > 1e-12 * np.sqrt(np.einsum("rb,rb->b", s, s) * np.einsum("rb,rb->b", Hy, Hy))
        U[slot] = np.where(usable, (s - Hy) / np.where(usable, denominator, 1.0), 0)
        V[slot] = np.where(usable, Hs, 0)
        restart = self.flags[2, :k]
        U[:, :, restart] = 0
        V[:, :, restart] = 0
        mixed = gx.copy()
        for i in range(self.filled):
            mixed -= U[i] * np.einsum("rb,rb->b", V[i], f)
        use = self.accelerating[:k] & ~restart
        mixed[:, ~use] = gx[:, ~use]
        move = np.max(np.abs(mixed - x), axis=0, initial=0.0)
        reach = self.maxima_out[4, :k] / (1 - np.minimum(self.rate[:k], TRUST_RATE))
        untrusted = ~(move <= TRUST * reach)
        if untrusted.any():
            mixed[:, untrusted] = gx[:, untrusted]
            U[:, :, untrusted] = 0
            V[:, :, untrusted] = 0
        return mixed


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
