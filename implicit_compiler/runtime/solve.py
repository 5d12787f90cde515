"""Solving the equilibrium x = phi(A x + B u + b_x) and predicting y = C x + D u + b_y.

The state is held as an (n, batch) array. ``method="auto"`` walks the strongly connected
components of the block graph in topological order (see ``plan``): an acyclic block is one
sparse product, bias and activation (forward substitution, about one network forward pass in
cost); a cyclic component is solved by block Gauss-Seidel sweeps of its blocks, accelerated on
its torn states only (``cyclic``: LeNet-5 in a feedback loop iterates on 84 states, not 12,812).
Acyclic blocks, and the blocks of a sweep, run in fused numba chains: one sample by
``kernels``, batches by ``row_groups`` (rows that share their columns computed together, in
registers); up to ``STRUCTURED_BATCH_LIMIT`` samples, blocks whose rows are convolutions or
dense products run through BLAS instead (``structured``; a block reading itself, a dense
implicit layer, always does, out of place). ``method="picard"`` and ``method="anderson"``
iterate on the whole model from x = 0 (the paper's setting; an acyclic model converges
exactly after depth + 1 Picard steps).

A model also compiles into one **plan** (``_plan``): programs of ``one_sample`` (tables of
operations) for its acyclic runs of blocks, the last one computing y, and between them its
cyclic components as sweeps with their own programs. An acyclic model's plan is one program:
one sample is solved by it in one call, and ``predict_outputs`` (``ImplicitModel.predict``)
runs large batches through it by tiles of samples (``sample_tiles``). A cyclic model's plan
runs one sample in one values array (a call per program and per sweep) and large batches on
tiles of samples kept in slabs (each sweep one parallel call over the tiles still running):
the LeNet-5 loop at batch 256, 7.7 ms by tiles against 10.6 ms by row groups (3 sweeps).

A structured model (``model.structure``: convolution and dense terms kept as kernels, plus CSR
remainders) runs the same way without ever materializing A, B, C or D: its blocks with terms
are ``StructuredBlock``s at every batch size (their terms as they are, their rows of the
remainders), the blocks without terms run in chains from the remainders (where their rows are
whole), y is the remainders' product plus C's and D's terms, and a batch of more than
``STRUCTURED_BATCH_LIMIT`` samples is predicted by tiles.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from .. import arguments
from ..activations import Activation
from ..blas_threads import own_threads
from ..errors import ArgumentTypeError, ModelTooLargeError, ShapeError
from ..model import ImplicitModel
from . import kernels, row_groups, sample_tiles
from .batching import flatten_inputs
from .cyclic import Sweep, block_layout, solve_sweep, solve_sweep_in_values, solve_sweep_on_tiles, torn_blocks
from .fixed_point import ACCELERATIONS, Acceleration, FixedPoint, check_tolerance, iterate
from .max_pool import MaxPoolStep, fuse_max_pools
from .one_sample import Program, build_program
from .plan import block_dependency_graph, execution_order
from .structured import (
    REMAINDER_BLOCK_ROWS,
    StructuredBlock,
    StructuredRows,
    block_terms,
    remainder_block,
    structured_block,
    tensor_sources,
    term_entries,
)

METHODS = ("auto", "picard", "anderson")
# Up to this batch size, convolution and dense blocks run as BLAS products with their kernels
# (read once); beyond it every acyclic block runs in row_groups, which streams A once and holds
# the rows of a pixel in registers. Measured on the zoo models (2 cores): structured wins at
# batch 1-4 (ResNet20 batch 2: 300 vs 165 img/s), row groups from 8 on (ResNet20 batch 16:
# 1043 vs 521 img/s; LeNet-5 batch 32: 25k vs 7.7k).
STRUCTURED_BATCH_LIMIT = 7
# A structured model whose terms do more multiply-accumulates per sample than this never goes
# by tiles: BLAS's products of the whole batch win. Float32 predict, 2 cores, quiet, min ms
# (tiles / BLAS steps): ResNet20 (41M) at 16 and 256 samples 14.8 / 18.0 and 61 / 344;
# ResNet-18 at 64 x 64 (148M) 64 / 36 and 59 / 183; at 112 (485M) 231 / 163 at 16; at 224
# (1.8G) 1807 / 703 at 16.
TILES_TERM_WORK = 300_000_000
# A structured model goes by tiles from this batch on (BLAS steps below it). Float32 predict, min
# ms, tiles / BLAS steps, 2 cores: quiet (2026-12-07 13:10 UTC), ResNet20 at 8, 16, 24, 32
# samples 16.3 / 6.9, 16.1 / 12.2, 16.4 / 18.3, 14.4 / 25.3 and LeNet-5 0.21 / 0.24, 0.46 / 0.31,
# 0.21 / 0.42, 0.20 / 0.47; on busy cores BLAS steps swing far more (ResNet20 at 16: 17 / 471
# median), so the tiles start at 16, not 24.
STRUCTURED_TILES_BATCH = 16
# One sample of an acyclic model runs its program in one call (on one thread) up to this many
# multiply-adds per thread of the machine; past it the steps, with BLAS products and the
# one-row kernel on every thread, are faster. Measured on 2 threads: ResNet20 (41M) 2.3 ms by
# the program against 2.8 by the steps, 5 convolutions of 64 channels on 32 x 32 (153M) 6.0
# against 3.3-4.7 ms.
ONE_SAMPLE_WORK = 128_000_000
# ``predict`` goes by tiles of samples when SPARSE operations (rows read one by one, without the
# column sharing of row groups) are at most this share of the program's multiply-adds.
TILES_SPARSE_SHARE = 0.25
DEFAULT_TOLERANCE = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}
WHOLE_MODEL = "the whole model"
# The keyword arguments ``predict`` takes, with their defaults (those of ``solve``).
PREDICT_OPTIONS = MappingProxyType(
    {"method": "auto", "tol": None, "max_iter": 1000, "anderson_memory": 5, "acceleration": "anderson"}
)


@dataclass(frozen=True)
class Solution:
    """The solved state and prediction.

    Attributes:
        x: the state, (batch, n), or (n,) for one unbatched sample.
        y: the flat prediction, (batch, q), or (q,); ``model.predict`` reshapes it.
        iterations: fixed-point iterations run (0 when everything was forward substitution).
        residual_history: the residual after each iteration (for ``auto``, the cyclic
            components' histories one after another; see ``component_histories``).
        method: the method used.
        component_histories: for each cyclic component solved, its block names and history.
        error: the largest estimated relative error of the iterated states when they stopped
            (``fixed_point``: residual / (1 - rate)); 0 when nothing was iterated.
    """

    x: np.ndarray
    y: np.ndarray
    iterations: int
    residual_history: tuple[float, ...]
    method: str
    component_histories: tuple[tuple[tuple[str, ...], tuple[float, ...]], ...] = ()
    error: float = 0.0


@dataclass(frozen=True)
class _Step:
    """One component of the execution order, with its rows of the matrices cut out."""

    names: tuple[str, ...]
    description: str
    rows: slice | np.ndarray
    cyclic: bool
    A_rows: StructuredRows | None  # rows of the component, every column (None: the fused kernel reads A)
    A_self: Any  # rows and columns of the component (cyclic only): ``StructuredRows.on_columns``
    B_rows: StructuredRows | None
    bias: np.ndarray  # (rows, 1)
    segments: tuple[tuple[int, int, Activation], ...]  # (start, stop, activation) within rows


def solve(
    model: ImplicitModel,
    u: Any,
    method: str = "auto",
    tol: float | None = None,
    max_iter: int = 1000,
    anderson_memory: int = 5,
    reuse_state: bool = False,
    acceleration: str = "anderson",
) -> Solution:
    """Solve the model for one sample or a batch.

    Args:
        model: the implicit model.
        u: inputs with a leading batch axis, one sample, a dict keyed by input name, or the
            flat concatenation (p,) / (batch, p). float32 and float64 keep their dtype.
        method: "auto" (forward substitution, iteration only on cyclic components),
            "picard" or "anderson" (iteration on the whole model).
        tol: tolerance on the estimated relative error of the iterated states (default 1e-10 in
            float64, 1e-5 in float32; ``fixed_point``); ToleranceError below what the dtype
            can reach.
        max_iter: iteration cap per fixed-point solve.
        anderson_memory: the acceleration's history length for "auto" and "anderson" (0: plain
            Picard).
        acceleration: how "auto" accelerates the torn states: "anderson" (safeguarded type-II
            Anderson) or "broyden" (Broyden's good method, limited memory); ``fixed_point``.
        reuse_state: work in a state array kept on the model for this thread and batch size
            instead of a new one (``predict`` does: a fresh array of ResNet20's size at batch
            256 is 197 MB of new pages each call, 40-60 ms). The returned x is then a view of
            it, overwritten by the next such call in this thread.

    Raises:
        ConvergenceError: a fixed-point solve did not converge; it carries the history.
        NonFiniteError, ShapeError: bad inputs.
    """
    _check_options(method, tol, max_iter, anderson_memory, acceleration)
    U, single = flatten_inputs(model.inputs, u, check_finite=False)
    try:
        return _solve_flat(
            model, U, single, u, method, tol, max_iter, anderson_memory, reuse_state, True, acceleration
        )  # fmt: skip
    except MemoryError as error:
        raise _too_large(model, U, error) from error


def _check_method(method: str) -> None:
    if not isinstance(method, str) or method not in METHODS:
        raise ShapeError(f"unknown solve method {method!r}: expected one of {', '.join(METHODS)}")


def _check_options(method: Any, tol: Any, max_iter: Any, anderson_memory: Any, acceleration: Any) -> None:
    """Refuse bad solver options up front, on every path: an acyclic model never iterates, so
    without this a max_iter=None or tol="a" would pass there and fail only on a cyclic model."""
    _check_method(method)
    if tol is not None:
        arguments.real(tol, "tol", "a positive number or None (the dtype's default)", finite=False)
    arguments.integer(max_iter, "max_iter", 1)
    memory = arguments.integer(anderson_memory, "anderson_memory", 0)
    if acceleration not in ACCELERATIONS:
        Acceleration(acceleration, memory)  # raises, naming the accelerations


def _tolerance(tol: float | None, dtype: np.dtype) -> float:
    """The solver tolerance for ``dtype`` (its default for None), checked: ToleranceError when
    it is not positive or below what the dtype can reach."""
    tol = DEFAULT_TOLERANCE[np.dtype(dtype)] if tol is None else float(tol)
    check_tolerance(tol, dtype)
    return tol


def _too_large(model: ImplicitModel, U: np.ndarray, error: MemoryError) -> MemoryError:
    """A MemoryError while solving (the work arrays of a batch under a process memory limit) as
    ModelTooLargeError saying how much the batch needs and what to do, not a bare traceback
    (one that already is a ModelTooLargeError as it is)."""
    if isinstance(error, ModelTooLargeError):
        return error
    batch, itemsize = U.shape[0], max(U.dtype.itemsize, 4)
    need = (model.p + model.n + model.q) * batch * itemsize
    return ModelTooLargeError(
        f"ran out of memory solving a batch of {batch} samples: its work arrays take about "
        f"{need / 2**20:.1f} MiB ((p + n + q) = {model.p + model.n + model.q} values a sample) on top of the "
        "model; predict in smaller batches, or allow the process more memory"
    )


def _without_states(model: ImplicitModel, U: np.ndarray, single: bool, method: str) -> Solution:
    """An empty batch, or a model with no states (y = D u + b_y): nothing to solve, and the
    compiled paths index a first sample or state that is not there. An empty batch gives
    empty (0, n) and (0, q) results, as numpy does."""
    X = np.zeros((U.shape[0], model.n), dtype=model.dtype)
    Y = model.structure.D.matvec(U.T).T + model.bias_y
    Y = np.ascontiguousarray(Y, dtype=model.dtype)
    return Solution(X[0], Y[0], 0, (), method) if single else Solution(X, Y, 0, (), method)


def _solve_flat(
    model: ImplicitModel, U: np.ndarray, single: bool, u: Any, method: str = "auto", tol: float | None = None,
    max_iter: int = 1000, anderson_memory: int = 5, reuse_state: bool = False, want_x: bool = True,
    acceleration: str = "anderson",
) -> Solution:  # fmt: skip
    """``solve`` on U = the flat inputs (batch, p), not yet checked for NaN and inf (u: the
    inputs as given, for the error). Without ``want_x``, a batch solved by tiles leaves the
    Solution's x empty."""
    # a batch is checked for NaN and inf as it is loaded (kernels.transpose_into); one sample here
    loads_checked = U.shape[0] > 1 and kernels.available()
    if not loads_checked and not np.isfinite(U).all():
        flatten_inputs(model.inputs, u)  # raises NonFiniteError, naming the input
    model = model.astype(U.dtype)
    tol = _tolerance(tol, model.dtype)
    if U.shape[0] == 0 or model.n == 0:
        return _without_states(model, U, single, method)
    memory = Acceleration(
        acceleration if method == "auto" else "anderson", 0 if method == "picard" else anderson_memory
    )
    if method == "auto" and U.shape[0] == 1 and _one_call_may_pay(model):
        program = _one_sample_program(model)
        if program is not None and _one_call_pays(program):  # an acyclic model: one compiled call
            return _run_program(model, program, U, single, reuse_state)
        plan = _plan(model)
        if plan is not None and len(plan) > 1 and _one_call_pays(_plan_work(plan)):  # cyclic, by the plan
            return _run_plan_one_sample(model, plan, U, single, tol, max_iter, memory)
    if method == "auto" and loads_checked and U.shape[0] >= _least_tiles_batch(model):
        plan = _plan(model)
        if plan is not None and len(plan) > 1 and _tiles_pay(_plan_work(plan)):
            return _solve_plan_by_tiles(model, plan, U, u, tol, max_iter, memory, want_x)
    if method == "auto":
        steps = _execution_steps(model, structured=U.shape[0] <= STRUCTURED_BATCH_LIMIT)
        if not want_x and model.is_structured:
            steps = _with_max_pools(model, steps)
    else:
        steps = (_whole_model_step(model),)
    # V = [u; x] as one (p + n, batch) array: the fused kernel reads both through one index.
    V = _state_array(model, U.shape[0], zeroed=any(step.cyclic for step in steps), reuse=reuse_state)
    if loads_checked:
        if not np.isfinite(kernels.transpose_into(np.ascontiguousarray(U), V[: model.p])):
            flatten_inputs(model.inputs, u)  # raises NonFiniteError, naming the input
    else:
        V[: model.p] = U.T
    U, X = V[: model.p], V[model.p :]
    histories: list[tuple[tuple[str, ...], tuple[float, ...]]] = []
    error = 0.0
    with own_threads(_blas_work(steps) * U.shape[1]):
        for step in steps:
            if isinstance(step, MaxPoolStep):  # (without want_x: the pool's output alone)
                step.run(V, states=False)
                continue
            result = _solve_step(model, step, V, tol, max_iter, memory)
            if result is not None:
                histories.append((step.names, tuple(result.history)))
                error = max(error, result.error)
        Y = _outputs(model, V)
    residuals = tuple(r for _, history in histories for r in history)
    if single:
        return Solution(X[:, 0], Y[:, 0], len(residuals), residuals, method, tuple(histories), error)
    return Solution(X.T, Y.T, len(residuals), residuals, method, tuple(histories), error)


def _with_max_pools(model: ImplicitModel, steps: tuple) -> tuple:
    """``steps`` with their max pools as ``MaxPoolStep``s (``max_pool``), for runs that return no
    states. (A structured model's steps are the same at every batch size.)"""
    key = "max_pool_steps"
    if key not in model._cache:
        model._cache[key] = tuple(fuse_max_pools(model, list(steps)))
    return model._cache[key]


def _blas_work(steps) -> int:
    """Multiply-adds per sample of the average product of the acyclic structured blocks among
    ``steps`` (their BLAS products: ``blas_threads``; 0 without them)."""
    works = [step.work for step in steps if isinstance(step, StructuredBlock) and step.terms and not step.cyclic]
    return sum(works) // max(1, len(works))


def _outputs(model: ImplicitModel, V: np.ndarray) -> np.ndarray:
    """Y = C x + D u + b_y for V = [u; x] (q, batch): the remainders' CSR, then the terms."""
    C, D, p = model.structure.C, model.structure.D, model.p
    U, X = V[:p], V[p:]
    if kernels.available():  # (one sample too: 3 us against scipy's 7 for the classifier's 10 outputs)
        Y = np.empty((model.q, V.shape[1]), dtype=model.dtype)
        c, d = C.remainder, D.remainder
        kernels.output_into(c.indptr, c.indices, c.data, d.indptr, d.indices, d.data, model.bias_y, V, p, Y)
    else:
        Y = C.remainder @ X + D.remainder @ U + model.bias_y[:, None]
    for matrix, source in ((C, X), (D, U)):
        for term in matrix.terms:
            Y[term.rows] += term.op.apply(source[term.op.source])
    return Y


def predict_outputs(model: ImplicitModel, u: Any, **solve_options: Any) -> np.ndarray:
    """The flat prediction, ``solve(model, u, reuse_state=True, **solve_options).y``. A batch
    of an acyclic model whose work is mostly convolutions, dense products and short rows, with
    a tile of samples for every thread, goes by tiles of samples instead (``sample_tiles``:
    faster, and the states are not kept). Options are checked first, whatever path the batch
    takes (the tiles use none of them, and once ignored unknown ones)."""
    options = PREDICT_OPTIONS
    if solve_options:  # (the defaults need no check: a batch of one stays as fast as it was)
        unknown = sorted(set(solve_options) - set(PREDICT_OPTIONS))
        if unknown:
            raise ArgumentTypeError(
                f"predict: unknown keyword argument(s) {', '.join(map(repr, unknown))}; it takes "
                f"{', '.join(PREDICT_OPTIONS)}"
            )
        options = {**PREDICT_OPTIONS, **solve_options}
        _check_options(**options)
    U, single = flatten_inputs(model.inputs, u, check_finite=False)
    try:
        if options["method"] == "auto" and U.shape[0] > 1 and model.n > 0 and kernels.available():
            typed = model.astype(U.dtype)
            _tolerance(options["tol"], typed.dtype)  # checked as on the other paths, though unused
            if U.shape[0] >= _least_tiles_batch(typed):
                plan = _plan(typed)
                if plan is not None and len(plan) == 1 and _tiles_pay(plan[0]):
                    return _predict_by_tiles(typed, plan[0], U, u)
        return _solve_flat(model, U, single, u, reuse_state=True, want_x=False, **options).y
    except MemoryError as error:
        raise _too_large(model, U, error) from error


def _least_tiles_batch(model: ImplicitModel) -> int:
    """The smallest batch that goes by tiles of samples: a tile for every thread; for a
    structured model ``STRUCTURED_TILES_BATCH`` (its blocks with terms have no row groups to run
    on below it, only BLAS steps), or never when its kernels are large (``TILES_TERM_WORK``)."""
    if model.is_structured:
        return STRUCTURED_TILES_BATCH if _term_work(model) <= TILES_TERM_WORK else np.iinfo(np.int64).max
    return sample_tiles.least_batch(model.dtype)


def _term_work(model: ImplicitModel) -> int:
    """Multiply-accumulates per sample in the terms of A and B (kept on the model: read on
    every predict)."""
    if "term_work" not in model._cache:
        structure = model.structure
        model._cache["term_work"] = sum(term_entries(term.op) for M in (structure.A, structure.B) for term in M.terms)
    return model._cache["term_work"]


def _tiles_pay(program: Program | _Work) -> bool:
    """Whether a batch goes by tiles of samples: SPARSE rows (read one by one, without the
    column sharing of row groups) are at most ``TILES_SPARSE_SHARE`` of the work."""
    return program.sparse_entries <= TILES_SPARSE_SHARE * program.entries


def _plan(model: ImplicitModel) -> tuple[Program | Sweep, ...] | None:
    """The model as one compiled plan: programs (acyclic runs of blocks, the last one also
    computing y) and, between them, cyclic components as sweeps with their programs
    (``cyclic``); an acyclic model is one program. None when a step has no program."""
    if "plan" not in model._cache:
        segments: list[Program | Sweep] = []
        run: list[Any] = []
        plan: tuple[Program | Sweep, ...] | None = None
        for step in _execution_steps(model, structured=True):
            if not isinstance(step, Sweep):
                run.append(step)
                continue
            program = build_program(model, run, outputs=False) if run else None
            if step.program is None or (run and program is None):
                break
            segments += [program, step] if run else [step]
            run = []
        else:
            last = build_program(model, run, outputs=True)
            plan = None if last is None else (*segments, last)
        model._cache["plan"] = plan
    return model._cache["plan"]


@dataclass(frozen=True)
class _Work:
    entries: int
    sparse_entries: int


def _plan_work(plan: tuple[Program | Sweep, ...]) -> _Work:
    """Multiply-adds of one pass over the plan (a sweep counted once)."""
    programs = [segment if isinstance(segment, Program) else segment.program for segment in plan]
    return _Work(sum(p.entries for p in programs), sum(p.sparse_entries for p in programs))


def _run_plan_one_sample(
    model: ImplicitModel, plan, U: np.ndarray, single: bool, tol: float, max_iter: int, memory: int | Acceleration
) -> Solution:
    """One sample of a cyclic model by its plan, in one values = [u; x; y] array: each program
    in one call, each sweep of a cyclic component in one call."""
    p, n, q = model.p, model.n, model.q
    programs = [segment if isinstance(segment, Program) else segment.program for segment in plan]
    values = plan[-1].arrays()[0]
    scratch = np.zeros(max(program.scratch_size for program in programs), dtype=model.dtype)
    values[:p] = U[0]
    histories, error = [], 0.0
    for segment in plan:
        if isinstance(segment, Program):
            segment.run(values, scratch)
        else:
            result = solve_sweep_in_values(segment, values, scratch, tol, max_iter, memory)
            histories.append((segment.names, tuple(result.history)))
            error = max(error, result.error)
    x, y = values[p : p + n].copy(), values[p + n : p + n + q].copy()
    residuals = tuple(r for _, history in histories for r in history)
    if not single:
        x, y = x[None], y[None]
    return Solution(x, y, len(residuals), residuals, "auto", tuple(histories), error)


def _solve_plan_by_tiles(
    model: ImplicitModel,
    plan,
    U: np.ndarray,
    u: Any,
    tol: float,
    max_iter: int,
    memory: int | Acceleration,
    want_x: bool,
) -> Solution:
    """A batch of a cyclic model by its plan on tiles of samples (``sample_tiles``), each tile
    in its own slab kept on the model for this thread: programs on every tile, sweeps on the
    tiles with samples still running. Without ``want_x`` the Solution's x is empty."""
    batch = U.shape[0]
    kept = _thread_local(model, "plan_slabs")
    slabs = getattr(kept, "array", None)
    shape = sample_tiles.slabs_shape(plan[-1], model.dtype, batch)
    if slabs is None or slabs.shape != shape:
        slabs = kept.array = np.zeros(shape, dtype=model.dtype)
    if not np.isfinite(sample_tiles.load_tiles(np.ascontiguousarray(U), slabs)):
        flatten_inputs(model.inputs, u)  # raises NonFiniteError, naming the input
    every_tile = np.arange(shape[0])
    histories, error = [], 0.0
    for segment in plan:
        if isinstance(segment, Program):
            sample_tiles.run_on_tiles(segment, slabs, every_tile, batch)
        else:
            result = solve_sweep_on_tiles(segment, slabs, batch, tol, max_iter, memory)
            histories.append((segment.names, tuple(result.history)))
            error = max(error, result.error)
    p, n, q = model.p, model.n, model.q
    Y = np.empty((q, batch), dtype=model.dtype)
    sample_tiles.outputs_from_tiles(slabs, p + n, Y)
    if want_x:  # (tiles, n, lanes) -> (batch, n)
        X = slabs[:, p : p + n, :].transpose(0, 2, 1).reshape(-1, n)[:batch]
    else:
        X = np.empty((batch, 0), dtype=model.dtype)
    residuals = tuple(r for _, history in histories for r in history)
    return Solution(X, Y.T, len(residuals), residuals, "auto", tuple(histories), error)


def _predict_by_tiles(model: ImplicitModel, program: Program, U: np.ndarray, u: Any) -> np.ndarray:
    """y (batch, q) by ``sample_tiles`` in the scratch kept on the model for this thread."""
    kept = _thread_local(model, "tiles_work")
    work = getattr(kept, "array", None)
    shape = sample_tiles.work_shape(program, model.dtype, U.shape[0])
    if work is None or work.shape != shape:
        work = kept.array = np.zeros(shape, dtype=model.dtype)
    Y = np.empty((model.q, U.shape[0]), dtype=model.dtype)
    if not np.isfinite(sample_tiles.run_tiles(program, np.ascontiguousarray(U), work, Y)):
        flatten_inputs(model.inputs, u)  # raises NonFiniteError, naming the input
    return Y.T


def _one_sample_program(model: ImplicitModel) -> Program | None:
    """The model's forward pass as one compiled program (``one_sample``); None for a model
    with cyclic components."""
    plan = _plan(model)
    return plan[0] if plan is not None and len(plan) == 1 else None


def _one_call_may_pay(model: ImplicitModel) -> bool:
    """Whether a one-sample program (or plan) could pay, by ``_one_call_pays``'s bound on the
    model's non-zeros, which its multiply-adds never fall below (checked on the zoo and 37
    corpus models, both lowerings): past it the plan is not built (ResNet-18 at 224: 1.1 s of
    its 2.0 s first predict). The count is kept with the model's steps (70 ms from ResNet-18's
    geometry)."""
    if "nnz" not in model._cache:
        model._cache["nnz"] = model.nnz
    return model._cache["nnz"] * kernels.thread_count() <= ONE_SAMPLE_WORK


def _one_call_pays(program: Program | _Work) -> bool:
    """Whether one sample is faster by the program than by the steps (``ONE_SAMPLE_WORK``; and
    SPARSE rows that the one-row kernel would run on threads stay with it)."""
    small = program.entries * kernels.thread_count() <= ONE_SAMPLE_WORK
    return small and program.sparse_entries < kernels.PARALLEL_THRESHOLD


def _run_program(model: ImplicitModel, program: Program, U: np.ndarray, single: bool, reuse: bool) -> Solution:
    """Solve one sample by its program: values = [u; x; y] (and slack), filled in one call."""
    p, n, q = model.p, model.n, model.q
    if reuse:
        kept = _thread_local(model, "one_sample_arrays")
        arrays = getattr(kept, "arrays", None)
        if arrays is None:
            arrays = kept.arrays = program.arrays()
    else:
        arrays = program.arrays()
    values = arrays[0]
    values[:p] = U[0]
    program.run(values, *arrays[1:])
    x, y = values[p : p + n], values[p + n : p + n + q].copy()
    return Solution(x, y, 0, (), "auto") if single else Solution(x[None], y[None], 0, (), "auto")


def _thread_local(model: ImplicitModel, key: str) -> threading.local:
    """A per-thread namespace kept on the model (what one thread keeps there, no other sees)."""
    kept = model._cache.get(key)
    if kept is None:
        kept = model._cache.setdefault(key, threading.local())
    return kept


def _state_array(model: ImplicitModel, batch: int, zeroed: bool, reuse: bool) -> np.ndarray:
    """V = [u; x], (p + n, batch): new, or the one this thread last used for this model and
    batch size. Zeroed when cyclic components iterate from x = 0."""
    shape = (model.p + model.n, batch)
    if not reuse:
        return (np.zeros if zeroed else np.empty)(shape, dtype=model.dtype)
    kept = _thread_local(model, "state")
    V = getattr(kept, "array", None)
    if V is None or V.shape != shape:
        V = kept.array = np.empty(shape, dtype=model.dtype)
    if zeroed:
        V.fill(0)
    return V


def _solve_step(
    model: ImplicitModel, step: _Step, V: np.ndarray, tol: float, max_iter: int, memory: int | Acceleration
) -> FixedPoint | None:
    """Fill the step's states of V = [u; x] in place; return the fixed point's result (None
    for acyclic steps)."""
    p = model.p
    U, X = V[:p], V[p:]
    if isinstance(step, Sweep):  # a cyclic component: block Gauss-Seidel sweeps (``cyclic``)
        return solve_sweep(step, V, lambda block, W: _solve_step(model, block, W, tol, max_iter, memory), tol,
                           max_iter, memory)  # fmt: skip
    if isinstance(step, StructuredBlock):  # convolutions and dense products through BLAS
        step.run(V)
        return None
    if isinstance(step, _Chain):  # acyclic blocks: fused kernels, straight from the model's CSR arrays
        A, B = model.structure.A.remainder, model.structure.B.remainder  # (the chain's rows are whole there)
        if V.shape[1] > 1:  # rows sharing their columns, held in registers (row_groups)
            g, matrices = step.groups, (A.indptr, A.indices, A.data, B.indptr, B.indices, B.data)
            row_groups.forward_groups(
                V, p, model.bias_x, matrices, g.arrays, g.block_groups, g.block_work, step.codes, step.alphas,
                step.betas, row_groups.PARALLEL_THRESHOLD,
            )  # fmt: skip
            return None
        threaded = kernels.threaded(step.work, V.shape[1])
        kernel = kernels.forward_chain_single if threaded else kernels.forward_chain_single_serial
        a_indptr, a_indices, b_indptr, b_indices, states, starts, stops = step.unsigned
        kernel(
            a_indptr, a_indices, A.data, b_indptr, b_indices, B.data, model.bias_x, V[:, 0], np.uint64(p),
            states, starts, stops, step.codes, step.alphas, step.betas,
        )  # fmt: skip
        return None
    pre_activation = step.A_rows.matvec(X) + step.B_rows.matvec(U) + step.bias
    if not step.cyclic:
        X[step.rows] = _activate(step.segments, pre_activation)
        return None
    constant = pre_activation  # X[step.rows] is still zero: only outside states contributed

    def g(x: np.ndarray, columns: np.ndarray) -> np.ndarray:
        part = constant if columns.size == constant.shape[1] else constant[:, columns]
        return _activate(step.segments, step.A_self.matvec(x) + part)

    watch = groups = None
    if step.description == WHOLE_MODEL:  # block by block, and the outputs too: scaled states can hide errors
        C, outputs = model.structure.C, model.structure.D.matvec(U) + model.bias_y[:, None]
        watch = lambda x, columns: C.matvec(x) + (outputs if columns.size == outputs.shape[1] else outputs[:, columns])
        groups = np.array([0, *(block.stop for block in model.blocks)])
    result = iterate(
        g, np.zeros_like(constant), tol, max_iter, memory=memory, what=step.description, watch=watch, groups=groups,
        map_work=step.A_self.nnz,
    )  # fmt: skip
    X[step.rows] = result.x
    return result


def _activate(segments: tuple[tuple[int, int, Activation], ...], z: np.ndarray) -> np.ndarray:
    for start, stop, activation in segments:
        activation.apply_inplace(z[start:stop])
    return z


@dataclass(frozen=True)
class _Chain:
    """Consecutive acyclic blocks run by one call of a fused kernel."""

    states: np.ndarray  # the chain's states in storage order (one sample: stream A in order)
    starts: np.ndarray  # block k is states[starts[k] : stops[k]]
    stops: np.ndarray
    codes: np.ndarray
    alphas: np.ndarray
    betas: np.ndarray
    work: int  # non-zeros of the chain's rows of A and B
    groups: row_groups.RowGroups  # the rows by groups sharing their columns (batches of 2+)
    # One sample: A's and B's index arrays, states, starts, stops viewed unsigned (faster
    # gathers, see kernels.unsigned), made once (a view costs about 0.5 us).
    unsigned: tuple[np.ndarray, ...]
    cyclic: bool = False


def _execution_steps(model: ImplicitModel, structured: bool) -> tuple[_Step | _Chain | StructuredBlock | Sweep, ...]:
    """The execution order as steps: chains of fused acyclic blocks and cyclic components as
    sweeps (``cyclic``), and with ``structured``, convolution and dense blocks run through BLAS
    (``structured``). A structured model's blocks with terms always run so (the chains' kernels
    read whole rows of CSR: the remainders' rows are whole only for blocks without terms)."""
    structured = structured or model.is_structured
    key = ("execution_steps", structured)
    if key not in model._cache:
        pairs: list[tuple[_Step | None, Any]] = []
        sources = tensor_sources(model)
        graph = None
        for component in execution_order(model):
            if component.cyclic and kernels.available():
                graph = block_dependency_graph(model) if graph is None else graph
                pairs.append((None, _make_sweep(model, component.blocks, graph, structured, sources)))
                continue
            step = _make_step(model, [model.blocks[i] for i in component.blocks], component.cyclic)
            block = model.blocks[component.blocks[0]]
            fast = structured_block(model, block, sources) if structured and step.A_rows is None else None
            if fast is None and model.is_structured and step.A_rows is None and block.size >= REMAINDER_BLOCK_ROWS:
                fast = remainder_block(model, block)
            pairs.append((step, fast))
        model._cache[key] = tuple(_chained(model, pairs))
    return model._cache[key]


def _chained(model: ImplicitModel, pairs) -> list:
    """Steps from (step, its faster form or None) pairs: a fused step with no faster form joins
    its neighbours in a chain (``_Chain``); anything else is a step of its own."""
    steps: list[Any] = []
    chain: list[_Step] = []
    for step, fast in pairs:
        if fast is None and step.A_rows is None:
            chain.append(step)
            continue
        if chain:
            steps.append(_make_chain(model, chain))
            chain = []
        steps.append(step if fast is None else fast)
    if chain:
        steps.append(_make_chain(model, chain))
    return steps


def _make_sweep(model: ImplicitModel, order, graph, structured: bool, sources) -> Sweep:
    """A cyclic component (block indices in storage order) as a sweep of its blocks: each as
    an acyclic block would run, except that a block reading itself runs out of place (as a
    structured BLAS product when it is one, else by scipy)."""
    torn = torn_blocks(list(order), lambda i: set(graph.predecessors(i)))
    torn_rows, groups = block_layout([model.blocks[i] for i in torn])
    pairs = []
    for index in order:
        block = model.blocks[index]
        reads_itself = graph.has_edge(index, index)
        fast = structured_block(model, block, sources) if structured or reads_itself else None
        pairs.append((_make_step(model, [block], cyclic=False, fused=not reads_itself), fast))
    steps = _chained(model, pairs)
    blocks = [model.blocks[i] for i in order]
    p = model.p
    rows = _state_rows(blocks, offset=p)
    # one sample: the sweep as one program, unless a block reads itself (its operations would
    # overwrite the states they still read)
    in_place = structured and not any(graph.has_edge(i, i) for i in order)
    names = tuple(b.name for b in blocks)
    return Sweep(
        names=names,
        description=f"the cyclic component [{', '.join(names)}]",
        rows=rows,
        torn=p + torn_rows,
        steps=tuple(steps),
        program=build_program(model, steps, outputs=False) if in_place else None,
        torn_groups=groups,
        work=sum(_entries(model, b.start, b.stop) for b in blocks),
    )


def _make_chain(model: ImplicitModel, steps: list[_Step]) -> _Chain:
    activations = [step.segments[0][2] for step in steps]
    sizes = [step.rows.stop - step.rows.start for step in steps]
    stops = np.cumsum(sizes)
    starts = stops - sizes
    # Groups are formed channel-last: the rows of one pixel (all channels) read the same columns.
    channel_last = np.concatenate([_row_order(model.block(step.names[0])) for step in steps])
    states = np.concatenate([np.arange(s.rows.start, s.rows.stop, dtype=np.int64) for s in steps])
    A, B = model.structure.A.remainder, model.structure.B.remainder  # (whole rows: blocks without terms)
    return _Chain(
        states=states,
        starts=starts,
        stops=stops,
        codes=np.array([kernels.ACTIVATION_CODES[a.name] for a in activations], dtype=np.int64),
        alphas=np.array([a.alpha or 0.0 for a in activations], dtype=model.dtype),
        betas=np.array([a.beta or 0.0 for a in activations], dtype=model.dtype),
        work=sum(int(M.indptr[step.rows.stop] - M.indptr[step.rows.start]) for step in steps for M in (A, B)),
        groups=row_groups.group_rows(A, B, channel_last, starts, stops),
        unsigned=tuple(
            kernels.unsigned(array) for array in (A.indptr, A.indices, B.indptr, B.indices, states, starts, stops)
        ),
    )


def _row_order(block) -> np.ndarray:
    """The block's states, channel-last when the block is an image (C, H, W) or (C, L)."""
    rows = np.arange(block.start, block.stop, dtype=np.int64)
    if len(block.shape) in (2, 3) and block.shape[0] > 1:
        return rows.reshape(block.shape).reshape(block.shape[0], -1).T.ravel()
    return rows


def _whole_model_step(model: ImplicitModel) -> _Step:
    return _make_step(model, list(model.blocks), cyclic=True, description=WHOLE_MODEL)


def _state_rows(blocks: list, offset: int = 0) -> slice | np.ndarray:
    """The blocks' states (plus ``offset``): a slice when they are contiguous."""
    if all(a.stop == b.start for a, b in zip(blocks, blocks[1:])):
        return slice(offset + (blocks[0].start if blocks else 0), offset + (blocks[-1].stop if blocks else 0))
    return offset + np.concatenate([np.arange(b.start, b.stop) for b in blocks])


def _make_step(model: ImplicitModel, blocks: list, cyclic: bool, description: str = "", fused: bool = True) -> _Step:
    rows = _state_rows(blocks)
    segments, offset = [], 0
    for block in blocks:
        segments.append((offset, offset + block.size, block.activation))
        offset += block.size
    fused = fused and not cyclic and len(blocks) == 1 and kernels.available()
    A_rows = None if fused else StructuredRows.of(model.structure.A, blocks)
    return _Step(
        names=tuple(b.name for b in blocks),
        description=description or f"the cyclic component [{', '.join(b.name for b in blocks)}]",
        rows=rows,
        cyclic=cyclic,
        A_rows=A_rows,
        A_self=A_rows.on_columns(rows) if cyclic else None,
        B_rows=None if fused else StructuredRows.of(model.structure.B, blocks),
        bias=model.bias_x[rows][:, None],
        segments=tuple(segments),
    )


def _entries(model: ImplicitModel, first: int, last: int) -> int:
    """Multiply-adds per sample of states first:last: their rows of A and B (remainders and terms)."""
    structure = model.structure
    return sum(
        int(M.remainder.indptr[last] - M.remainder.indptr[first])
        + sum(term_entries(term) for term in block_terms(M, first, last))
        for M in (structure.A, structure.B)
    )
