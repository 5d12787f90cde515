"""Linear relaxation bounds (CROWN) on the implicit form, acyclic and cyclic parts alike.

To bound a linear function g = Lambda x + Omega u + c of the state from below over the box
|u - u0| <= sigma, the blocks are walked in reverse execution order (``interval.Structure``'s
parts). At block k, Lambda_k x_k is replaced by something linear in k's pre-activation z_k:

- k outside loops (x_k = phi(z_k)): with the lines a_lo z + b_lo <= phi(z) <= a_hi z + b_hi on z's
  bounds (``relaxation.linear_relaxation``), Lambda_k x_k >= (Lambda_k^+ a_lo + Lambda_k^- a_hi) z_k
  + Lambda_k^+ b_lo + Lambda_k^- b_hi (Lambda^+ / Lambda^-: the positive / negative entries);
- a loop k (x_k = phi(A_kk x_k + w_k)), two ways, both sound, the tighter kept per bound:
  "system": with one slope per state, phi(z) = s z + e, e in [e_lo, e_hi] on z's bounds
  (``relaxation.parallel_relaxation``), every solution obeys x_k = S (A_kk x_k + w_k) + e,
  that is x_k = (I - S A_kk)^{-1} (S w_k + e), so with mu = (I - S A_kk)^{-T} Lambda_k^T (one
  sparse solve per sample, for all rows at once): Lambda_k x_k = mu^T S w_k + mu^T e >=
  mu^T S w_k + mu^+ e_lo + mu^- e_hi. I - S A_kk is invertible: |S| <= Lambda and
  lambda_pf(Lambda |A_kk|) < 1 (checked by the interval bounds);
  "blocks": block by block in the loop's order as if acyclic, the terms a block reads from
  itself and from later blocks of its loop (the feedback) taken at their interval bounds.

Then z_k = A_k,rest x + B_k u + b_k moves the coefficients onto earlier blocks, the inputs
and the constant. At the end Omega u >= Omega u0 - |Omega| sigma. Upper bounds are
minus the lower bounds of -g.

Maxima (the relu trees of MaxPool and ReduceMax, ``max_tree``): a max level's relus take
auto_LiRPA's MaxPool lines, and a max output part moves each coefficient straight onto one
element of its window (or into the constant), so neither needs bounds on the tree's
differences.

Intermediate bounds: each block's pre-activations are first bounded by intervals
(``interval``), then, where the relaxation is not exact there (relu and leaky relu rows whose
bounds straddle 0; every row of the other nonlinear activations; the rows of a relu block
whose states are maximized that can be the maximum of a window another element can be too,
as the maxima's relaxations read their bounds: ``max_tree.contenders``),
by this same backward pass ("blocks") from z's own rows, and the tighter of the two is kept. A block reading only the
inputs is exact by intervals already. A loop starts from its interval fixed point and is then
narrowed by such passes over its blocks (``interval.refine_loop``): where the feedback is weak
(a network closed by a small gain) its bounds approach the open network's.

The work is batched over samples and rows, in chunks of at most ``CHUNK_VALUES`` coefficients
(chunked along rows when one sample's rows are too many). Sparse coefficients reaching the
inputs through B are not multiplied out: each row of their product is summed in a scratch row
and concretized there (``_sparse_spread``). Everything is in float64.

Measured (``scripts/bench_bounds.py``, LeNet-5, 20 digits, one thread, AMD EPYC, the machine
shared with other jobs): the max trees and the scratch-row concretization took CROWN from 53
to 30 ms per input at eps 0.001 (auto_LiRPA 0.3: 34 ms in the same run) and from 139 to 56 ms
at eps 0.01 (auto_LiRPA: 124 ms), with mean widths 0.213 and 5.05 (were 0.194 and 3.15;
auto_LiRPA's 0.245 and 6.64).
"""

from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from ..arrays import sorted_unique
from ..runtime.structured import MIN_STRUCTURED_NONZEROS, find_convolution
from ..structure import convolution_transposed
from .interval import StateBounds, Structure, intersect, interval_bounds
from .max_tree import contenders, max_lines, select_leaves
from .relaxation import Lines, linear_relaxation, parallel_relaxation

CHUNK_VALUES = 1 << 24  # float64 coefficients of one dense array per chunk at most (128 MiB)
DENSE_FRACTION = 0.15  # coefficient matrices denser than this are kept as dense arrays


class Relaxations:
    """The relaxations of the parts, from the current bounds: ``Lines`` per part (cached until
    ``forget``), and per loop (s, e_lo, e_hi, LU factors of I - S A_kk per sample)."""

    def __init__(self, structure: Structure, bounds: StateBounds | None = None):
        self.structure = structure
        self.bounds = bounds
        self._lines: dict[int, Lines] = {}
        self._loops: dict[int, tuple] = {}
        self._max_outputs: dict[int, tuple] = {}
        self._places = None
        self._products: dict[int, tuple] = structure.products  # transposed_forms' cache, kept with the structure
        # the tensor shapes a block of A (or B) maps between, where both are known
        self._shapes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        inputs = structure.model.inputs
        input_shape = inputs[0].shape if len(inputs) == 1 else None
        for part in structure.parts:
            if part.shape is None:
                continue
            for source, block in part.rows.sources:
                if structure.parts[source].shape is not None:
                    self._shapes[id(block)] = (part.shape, structure.parts[source].shape)
            if input_shape is not None:
                self._shapes[id(part.rows.B)] = (part.shape, input_shape)

    def forget(self, index: int) -> None:
        self._lines.pop(index, None)
        self._max_outputs.pop(index, None)

    def lines(self, index: int) -> Lines:
        if index not in self._lines:
            part = self.structure.parts[index]
            states = part.rows.states
            low, high = self.bounds.pre_low[:, states], self.bounds.pre_high[:, states]
            level = self.structure.max_trees.levels.get(index)
            if level is None:
                self._lines[index] = linear_relaxation(part.activation, low, high)
            else:
                bounds = self.bounds
                self._lines[index] = max_lines(level, bounds.maxima, bounds.low, bounds.high, low, high)
        return self._lines[index]

    def loop(self, number: int) -> tuple:
        if number not in self._loops:
            loop = self.structure.loops[number]
            pieces = []
            for index in loop.parts:
                part = self.structure.parts[index]
                states = part.rows.states
                low, high = self.bounds.pre_low[:, states], self.bounds.pre_high[:, states]
                pieces.append(parallel_relaxation(part.activation, low, high))
            slope, e_lo, e_hi = (np.concatenate(values, axis=1) for values in zip(*pieces))
            matrix = loop.rows.feedback[0][1]
            identity = sp.eye_array(loop.rows.size, format="csc")
            factors = [spla.splu(sp.csc_array(identity - matrix.multiply(row[:, None]))) for row in slope]
            self._loops[number] = (slope, e_lo, e_hi, factors)
        return self._loops[number]

    def max_output(self, index: int):
        """``max_tree.select_leaves`` of a max output part (cached), and where each state is:
        (its part, its row in the part), n-long."""
        if index not in self._max_outputs:
            self._max_outputs[index] = select_leaves(self.structure.max_trees, self.structure.max_trees.outputs[index],
                                                     self.bounds)  # fmt: skip
        if self._places is None:
            part_of, row_of = np.full(self.structure.model.n, -1), np.full(self.structure.model.n, -1)
            for number, part in enumerate(self.structure.parts):
                part_of[part.rows.states] = number
                row_of[part.rows.states] = np.arange(part.rows.size)
            self._places = (part_of, row_of)
        return self._max_outputs[index], self._places

    def transposed_forms(self, matrix: sp.csr_array):
        """How to compute matrix^T @ T for a dense T (cached per matrix, kept alive with it):
        ("convolution", the ``Convolution`` the matrix is) when it is one (found and checked by
        ``runtime.structured.find_convolution``: the same linear map), ("dense", matrix^T) when
        it is denser than ``DENSE_FRACTION``, else ("sparse", matrix^T as CSR)."""
        key = id(matrix)
        if key not in self._products:
            convolution = None
            if key in self._shapes and matrix.nnz >= MIN_STRUCTURED_NONZEROS:
                out_shape, in_shape = self._shapes[key]
                convolution = find_convolution(matrix, slice(0, matrix.shape[1]), out_shape, in_shape)
            if convolution is not None:
                forms = ("convolution", convolution)
            elif matrix.nnz > DENSE_FRACTION * matrix.shape[0] * matrix.shape[1]:
                forms = ("dense", np.ascontiguousarray(matrix.toarray().T))
            else:
                forms = ("sparse", sp.csr_array(matrix.T))
            self._products[key] = (matrix, forms)
        return self._products[key][1]


def crown_bounds(structure: Structure, center: np.ndarray, radius: np.ndarray, objective: np.ndarray | None = None):
    """(lower, upper) of R y over the boxes |u - center[i]| <= radius, each (batch, r), with
    the state bounds used (``StateBounds``, for the rounding margin); R = ``objective`` (r, q),
    the identity by default (margins y_i - y_j bound tighter as rows of R than as differences
    of bounds)."""
    relaxations = Relaxations(structure)

    def refine(index: int, bounds: StateBounds, low: np.ndarray, high: np.ndarray):
        relaxations.bounds = bounds
        relaxations.forget(index)
        part = structure.parts[index]
        needed = None
        if index in structure.max_trees.inputs and part.activation.name == "relu":
            needed = contenders(structure.max_trees, part.rows.states, np.maximum(low, 0), np.maximum(high, 0), bounds)
        rows = _rows_to_refine(part, low, high, needed)
        if any(chosen.size for chosen in rows):
            start = dict(part.rows.sources + part.rows.feedback)
            tight_low, tight_high = _bound_linear(
                relaxations, index - 1, start, part.rows.B, part.rows.bias, center, radius, "blocks", rows
            )
            low, high = intersect(low, high, tight_low, tight_high)
        return low, high

    bounds = interval_bounds(structure, center, radius, refine=refine)
    relaxations = Relaxations(structure, bounds)  # the final bounds
    model = structure.model
    R = sp.csr_array(sp.eye_array(model.q) if objective is None else objective)
    C, D = sp.csr_array(R @ model.C), sp.csr_array(R @ model.D)
    start = {index: sp.csr_array(C[:, part.rows.states]) for index, part in enumerate(structure.parts)}
    start = {index: block for index, block in start.items() if block.nnz}
    arguments = (relaxations, len(structure.parts) - 1, start, D, R @ model.bias_y, center, radius)
    lower, upper = _bound_linear(*arguments, "blocks")
    if structure.loops:
        other_lower, other_upper = _bound_linear(*arguments, "system")
        lower, upper = np.maximum(lower, other_lower), np.minimum(upper, other_upper)
    return lower, upper, bounds


def _rows_to_refine(part, low: np.ndarray, high: np.ndarray, needed: np.ndarray | None) -> list[np.ndarray]:
    """For each sample, the local rows whose relaxation is not exact over [low, high]; for a
    relu part whose states are maximized, also the rows that can be a window's maximum
    (``needed``, ``max_tree.contenders``): the maxima's relaxations read their bounds."""
    name = part.activation.name
    if name == "identity":
        return [np.zeros(0, dtype=np.int64)] * low.shape[0]
    if name in ("relu", "leaky_relu"):
        unstable = (low < 0) & (high > 0)
        if needed is not None:
            unstable |= needed & (high > 0)
        return [np.flatnonzero(row) for row in unstable]
    return [np.arange(part.rows.size)] * low.shape[0]


def _bound_linear(relaxations, last, start, input_matrix, constant, center, radius, loops, rows=None):
    """Lower and upper bounds of g = sum_j start[j] x_j + input_matrix u + constant, (batch, r),
    back-substituted from part ``last`` down; coefficients on parts after ``last`` (a block's
    feedback) are taken at their interval bounds. ``loops``: "blocks" or "system". ``rows``: for
    each sample, the rows of g to bound (the others are left at -inf / inf); None: all."""
    structure = relaxations.structure
    total_rows, batch = input_matrix.shape[0], center.shape[0]
    rows = [np.arange(total_rows)] * batch if rows is None else rows
    lower, upper = np.full((batch, total_rows), -np.inf), np.full((batch, total_rows), np.inf)
    most = max((chosen.size for chosen in rows), default=0)
    if most == 0:
        return lower, upper
    upstream = sum(structure.parts[j].rows.size for j in range(last + 1)) + center.shape[1] + 1
    padded = {j: _with_zero_row(m) for j, m in start.items()}
    padded_inputs = _with_zero_row(input_matrix)
    padded_constant = np.append(np.asarray(constant, dtype=np.float64), 0.0)
    row_chunk = max(1, min(most, CHUNK_VALUES // (2 * upstream)))
    for first_row in range(0, most, row_chunk):
        count = min(row_chunk, most - first_row)
        sample_chunk = max(1, CHUNK_VALUES // (2 * count * upstream))
        for first in range(0, batch, sample_chunk):
            samples = slice(first, min(batch, first + sample_chunk))
            picks = [chosen[first_row : first_row + count] for chosen in rows[samples]]
            index = np.full((len(picks), count), total_rows)  # the zero row pads
            for k, pick in enumerate(picks):
                index[k, : pick.size] = pick
            index = np.concatenate([index, index], axis=1).reshape(-1)  # +g then -g, per sample
            sign = np.tile(np.repeat([1.0, -1.0], count), len(picks))
            signed = {j: _signed_rows(m, index, sign) for j, m in padded.items()}
            walk = _Walk(relaxations, samples, 2 * count, center[samples], loops)
            bound = walk.run(last, signed, _signed_rows(padded_inputs, index, sign), sign * padded_constant[index],
                             radius)  # fmt: skip
            for k, pick in enumerate(picks):
                lower[first + k, pick] = bound[k, : pick.size]
                upper[first + k, pick] = -bound[k, count : count + pick.size]
    return lower, upper


def _with_zero_row(matrix) -> sp.csr_array:
    """``matrix`` (CSR) with one more, empty row (the padding of ``_bound_linear``)."""
    matrix = sp.csr_array(matrix)
    indptr = np.append(matrix.indptr, matrix.indptr[-1])
    return sp.csr_array((matrix.data, matrix.indices, indptr), shape=(matrix.shape[0] + 1, matrix.shape[1]))


def _signed_rows(matrix: sp.csr_array, index: np.ndarray, sign: np.ndarray) -> sp.csr_array:
    """diag(sign) matrix[index], CSR."""
    picked = sp.csr_array(matrix[index])
    picked.data *= np.repeat(sign, np.diff(picked.indptr))
    return picked


class _Walk:
    """One backward pass for a chunk of samples. The coefficients of all samples are stacked
    (sample-major, ``count`` rows per sample): as a CSR matrix (rows x states) while sparse
    (convolutions reach few states), and beyond ``DENSE_FRACTION`` as a dense array stored
    transposed (states x rows), so that products with A run as A^T @ T on contiguous columns
    and the per-sample slopes broadcast over a (states, samples, count) view, with no copies."""

    def __init__(self, relaxations: Relaxations, samples: slice, count: int, center: np.ndarray, loops: str):
        self.relaxations, self.structure = relaxations, relaxations.structure
        self.samples, self.count, self.center, self.loops = samples, count, center, loops
        self.batch = center.shape[0]
        self.sample_of_row = np.repeat(np.arange(self.batch), count)

    def run(self, last, start, input_coefficients, constant, radius) -> np.ndarray:
        """Lower bounds of the rows, (samples, count)."""
        structure = self.structure
        coefficients = {j: _densify(value) for j, value in start.items()}
        self.inputs = _densify(input_coefficients)
        self.pending = []  # (sparse coefficients, their B): multiplied out only at the end
        self.total = np.array(constant, dtype=np.float64)
        for j in [j for j in coefficients if j > last]:  # a block's feedback: at its intervals
            self._concretize(j, coefficients.pop(j))
        index = last
        while index >= 0:
            part = structure.parts[index]
            if part.loop is not None and self.loops == "system":
                loop = structure.loops[part.loop]
                self._through_loop(loop, part.loop, coefficients)
                index = loop.parts.start - 1
                continue
            if index in coefficients:
                weights = coefficients.pop(index)
                lines = None if index in structure.max_trees.outputs else self.relaxations.lines(index)
                if lines is None:
                    self._push_max_output(index, weights, coefficients)
                elif lines.upper_negative_slope is not None:
                    self._push_max_level(part.rows, lines, weights, coefficients)
                else:
                    through = self._through_lines(lines, weights)
                    self._push(part.rows, through, coefficients)
                    for j, block in part.rows.feedback:
                        self._concretize(j, _times(through, block, self.relaxations, self.count))
            index -= 1
        inputs = self.inputs
        if sp.issparse(inputs):
            nominal, spread = self._sparse_input_terms(radius)
        else:
            for weights, matrix in self.pending:
                inputs = _add(inputs, _times(weights, matrix, self.relaxations, self.count))
            by_sample = inputs.reshape(inputs.shape[0], self.batch, self.count)
            nominal = np.einsum("pbc,bp->bc", by_sample, self.center).reshape(-1)
            spread = radius @ np.abs(inputs)
        return (nominal - spread + self.total).reshape(self.batch, self.count)

    def _push(self, rows, through, coefficients) -> None:
        """Coefficients on z = sum_j A_j x_j + B u + b moved onto the sources, inputs and constant."""
        for source, block in rows.sources:
            coefficients[source] = _densify(_add(coefficients.get(source), _times(through, block, self.relaxations,
                                                                                   self.count)))  # fmt: skip
        if sp.issparse(through) and rows.B.nnz:
            self.pending.append((through, rows.B))
        elif rows.B.nnz:
            self.inputs = _densify(_add(self.inputs, _times(through, rows.B, self.relaxations, self.count)))
        self.total += through @ rows.bias if sp.issparse(through) else rows.bias @ through

    def _sparse_input_terms(self, radius: np.ndarray):
        """(Omega u0, |Omega| sigma) per row for the sparse input coefficients Omega =
        inputs + sum of the pending W B: [inputs | W_1 | ...] @ [I; B_1; ...], each row of the
        product accumulated in a dense scratch row and concretized there (``_sparse_spread``),
        never stored."""
        p = self.center.shape[1]
        pieces = [(self.inputs, sp.eye_array(p, format="csr"))] + self.pending
        weights = sp.csr_array(sp.hstack([piece for piece, _ in pieces], format="csr"))
        matrix = sp.csr_array(sp.vstack([piece for _, piece in pieces], format="csr"))
        entry_rows = self._entry_rows(weights)
        centered = matrix @ self.center.T  # (states of all pieces, samples)
        nominal = np.bincount(entry_rows, weights.data * centered[weights.indices, self.sample_of_row[entry_rows]],
                              minlength=weights.shape[0])  # fmt: skip
        spread = _sparse_spread(weights.indptr, weights.indices, weights.data, matrix.indptr, matrix.indices,
                                matrix.data, np.asarray(radius, dtype=np.float64))  # fmt: skip
        return nominal, spread

    def _push_max_level(self, rows, lines: Lines, weights, coefficients) -> None:
        """A max level (``max_tree``): the lines' coefficients on the rows' positive and negative
        terms differ where the upper line is used, so each source block is split in M^+ / M^-
        (no input term, no bias, no feedback)."""
        positive = self._through_lines(lines, weights)
        negative = self._through_lines(replace(lines, upper_slope=lines.upper_negative_slope), weights, total=False)
        for source, block in rows.sources:
            plus, minus, _ = self.structure.signed(block)
            moved = _add(_times(positive, plus, self.relaxations, self.count), _times(negative, minus, self.relaxations,
                                                                                       self.count))  # fmt: skip
            coefficients[source] = _densify(_add(coefficients.get(source), moved))

    def _push_max_output(self, index: int, weights, coefficients) -> None:
        """A max output (``max_tree.select_leaves``): each coefficient moves to the state its
        maximum is bounded by (below for a positive one, above for a negative one), or, where
        that bound is the constant top, into the total."""
        (lower, upper, top), (part_of, row_of) = self.relaxations.max_output(index)
        lower, upper, top = lower[self.samples], upper[self.samples], top[self.samples]
        rows = self.batch * self.count
        owners = sorted_unique(part_of[np.concatenate([lower.ravel(), upper[upper >= 0]])])
        if sp.issparse(weights):
            for number, j in enumerate(owners):
                size = self.structure.parts[j].rows.size  # (a row may name a state twice: summed where used)
                arrays = _select_sparse(weights.indptr, weights.indices, weights.data, self.sample_of_row, lower,
                                        upper, top, part_of, row_of, j, self.total, number == 0)  # fmt: skip
                moved = sp.csr_array(arrays[::-1], shape=(rows, size))
                coefficients[j] = _densify(_add(coefficients.get(j), moved))
            return
        total = self.total.reshape(self.batch, self.count)
        for number, j in enumerate(owners):
            moved = np.zeros((self.structure.parts[j].rows.size, rows))
            _select_dense(self._by_sample(weights), lower, upper, top, part_of, row_of, j, self._by_sample(moved),
                          total, number == 0)  # fmt: skip
            coefficients[j] = _densify(_add(coefficients.get(j), moved))

    def _concretize(self, index: int, weights) -> None:
        """Lambda x_j >= Lambda^+ x_low + Lambda^- x_high at part j's interval bounds."""
        states = self.structure.parts[index].rows.states
        bounds = self.relaxations.bounds
        low, high = bounds.low[self.samples][:, states], bounds.high[self.samples][:, states]
        self.total += self._weighted(weights, low, high)

    def _through_lines(self, lines: Lines, weights, total: bool = True):
        """The coefficients on z of Lambda x >= (Lambda^+ a_lo + Lambda^- a_hi) z + Lambda^+ b_lo +
        Lambda^- b_hi; the intercepts' part is added to the total (unless not ``total``)."""
        samples = self.samples
        lower_slope, upper_slope = lines.lower_slope[samples], lines.upper_slope[samples]
        if sp.issparse(weights):
            if total:
                self.total += self._weighted(weights, lines.lower_intercept[samples], lines.upper_intercept[samples])
            at = self._entries(weights, lower_slope.shape[1])
            slope = np.where(weights.data > 0, lower_slope.take(at), upper_slope.take(at))
            return sp.csr_array((weights.data * slope, weights.indices, weights.indptr), shape=weights.shape)
        through = np.empty_like(weights)
        total_now = self.total.reshape(self.batch, self.count) if total else np.zeros((self.batch, self.count))
        _relax_dense(
            self._by_sample(weights), lower_slope, lines.lower_intercept[samples], upper_slope,
            lines.upper_intercept[samples], self._by_sample(through), total_now,
        )  # fmt: skip
        return through

    def _through_loop(self, loop, number: int, coefficients) -> None:
        """mu = (I - S A_kk)^{-T} Lambda_k^T per sample; mu^+ e_lo + mu^- e_hi added to the
        total; S mu pushed onto w_k = A_k,rest x + B u + b."""
        slope, e_lo, e_hi, factors = self.relaxations.loop(number)
        pieces = []
        for index in loop.parts:
            weights = coefficients.pop(index, None)
            size = self.structure.parts[index].rows.size
            if weights is None:
                pieces.append(np.zeros((size, self.batch * self.count)))
            else:
                pieces.append(weights.T.toarray() if sp.issparse(weights) else weights)
        weights = np.concatenate(pieces, axis=0)
        mu = np.empty_like(weights)
        for k, sample in enumerate(range(self.samples.start, self.samples.stop)):
            columns = slice(k * self.count, (k + 1) * self.count)
            mu[:, columns] = factors[sample].solve(np.ascontiguousarray(weights[:, columns]), trans="T")
        samples = self.samples
        self.total += self._weighted(mu, e_lo[samples], e_hi[samples])
        through = (self._by_sample(mu) * slope[samples].T[:, :, None]).reshape(mu.shape)
        self._push(loop.rows, through, coefficients)

    def _entry_rows(self, matrix: sp.csr_array) -> np.ndarray:
        return np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))

    def _entries(self, matrix: sp.csr_array, states: int) -> np.ndarray:
        """For each stored entry of a CSR (rows, states) matrix, its flat index into a C-ordered
        (samples, states) array of its row's sample."""
        return self.sample_of_row[self._entry_rows(matrix)] * states + matrix.indices

    def _by_sample(self, dense: np.ndarray) -> np.ndarray:
        """A transposed dense coefficient array (states, rows) viewed as (states, samples, count)."""
        return dense.reshape(dense.shape[0], self.batch, self.count)

    def _weighted(self, weights, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        """Per row: sum over states of weights^+ low + weights^- high, low / high (samples, states)
        of the row's sample."""
        if sp.issparse(weights):
            at = self._entries(weights, low.shape[1])
            values = weights.data * np.where(weights.data > 0, low.take(at), high.take(at))
            return np.bincount(self._entry_rows(weights), values, minlength=weights.shape[0])
        view = self._by_sample(weights)
        value = np.einsum("mbc,bm->bc", np.maximum(view, 0), low) + np.einsum("mbc,bm->bc", np.minimum(view, 0), high)
        return value.reshape(-1)


@numba.njit(cache=True, nogil=True)  # (jitted: coverage cannot see inside)
def _relax_dense(weights, lower_slope, lower_intercept, upper_slope, upper_intercept, through, total):
    """One pass over the (states, samples, count) weights: the relaxed coefficients on z into
    ``through`` (a_lo where the weight is positive, a_hi where not) and the intercepts' part
    added to ``total`` (samples, count); the slopes and intercepts are (samples, states)."""
    states, samples, count = weights.shape
    for m in range(states):
        for b in range(samples):
            a_lo, b_lo = lower_slope[b, m], lower_intercept[b, m]
            a_hi, b_hi = upper_slope[b, m], upper_intercept[b, m]
            for c in range(count):
                w = weights[m, b, c]
                if w > 0:
                    through[m, b, c] = w * a_lo
                    total[b, c] += w * b_lo
                else:
                    through[m, b, c] = w * a_hi
                    total[b, c] += w * b_hi


@numba.njit(cache=True, nogil=True)  # (jitted: coverage cannot see inside)
def _sparse_spread(indptr, indices, data, matrix_indptr, matrix_indices, matrix_data, radius):
    """sum_p |(W M)[i, p]| radius[p] for each row i of the CSR product W M, row by row in a
    dense scratch row (Gustavson's order), without storing the product."""
    rows = indptr.size - 1
    scratch = np.zeros(radius.size)
    seen = np.zeros(radius.size, dtype=np.bool_)
    touched = np.empty(radius.size, dtype=np.int64)
    spread = np.zeros(rows)
    for i in range(rows):
        count = 0
        for entry in range(indptr[i], indptr[i + 1]):
            state, value = indices[entry], data[entry]
            for k in range(matrix_indptr[state], matrix_indptr[state + 1]):
                column = matrix_indices[k]
                if not seen[column]:
                    seen[column] = True
                    touched[count] = column
                    count += 1
                scratch[column] += value * matrix_data[k]
        total = 0.0
        for k in range(count):
            column = touched[k]
            total += abs(scratch[column]) * radius[column]
            scratch[column] = 0.0
            seen[column] = False
        spread[i] = total
    return spread


@numba.njit(cache=True, nogil=True)  # (jitted: coverage cannot see inside)
def _select_sparse(indptr, indices, data, sample_of_row, lower, upper, top, part_of, row_of, part, total,
                   add_constants):  # fmt: skip
    """``_select_dense`` for CSR (rows, size) weights: returns the CSR arrays (indptr, indices,
    data) of the coefficients moved onto ``part``'s rows (in the weights' order)."""
    rows = indptr.size - 1
    new_indptr = np.zeros(rows + 1, dtype=np.int64)
    new_indices = np.empty(indices.size, dtype=np.int64)
    new_data = np.empty(indices.size)
    count = 0
    for i in range(rows):
        b = sample_of_row[i]
        for entry in range(indptr[i], indptr[i + 1]):
            m, w = indices[entry], data[entry]
            target = lower[b, m] if w > 0 else upper[b, m]
            if target < 0:
                if add_constants:
                    total[i] += w * top[b, m]
            elif part_of[target] == part:
                new_indices[count] = row_of[target]
                new_data[count] = w
                count += 1
        new_indptr[i + 1] = count
    return new_indptr, new_indices[:count], new_data[:count]


@numba.njit(cache=True, nogil=True)  # (jitted: coverage cannot see inside)
def _select_dense(weights, lower, upper, top, part_of, row_of, part, moved, total, add_constants):
    """``_Walk._push_max_output`` for dense (rows, samples, count) weights: each weight added
    to its selected state's row of ``moved`` when that state is in ``part``; the constant
    tops' part added to ``total`` (samples, count) when ``add_constants``."""
    size, samples, count = weights.shape
    for m in range(size):
        for b in range(samples):
            low, high = lower[b, m], upper[b, m]
            for c in range(count):
                w = weights[m, b, c]
                if w > 0:
                    if part_of[low] == part:
                        moved[row_of[low], b, c] += w
                elif high >= 0:
                    if part_of[high] == part:
                        moved[row_of[high], b, c] += w
                elif add_constants:
                    total[b, c] += w * top[b, m]


def _densify(matrix):
    """A sparse (rows, states) matrix denser than ``DENSE_FRACTION`` as a dense (states, rows) array."""
    if sp.issparse(matrix) and matrix.nnz > DENSE_FRACTION * matrix.shape[0] * matrix.shape[1]:
        return matrix.T.toarray()
    return matrix


def _add(left, right):
    """The sum of two coefficient matrices (either form; None: nothing yet)."""
    if left is None:
        return right
    if sp.issparse(left) and sp.issparse(right):
        return sp.csr_array(left + right)
    if sp.issparse(left):
        left, right = right, left
    left += right.T.toarray() if sp.issparse(right) else right  # (a dense left is always ours to change)
    return left


def _times(coefficients, matrix: sp.csr_array, relaxations: Relaxations, segment: int):
    """coefficients @ matrix in the coefficients' form: sparse by sparse (SpGEMM), or for a dense
    (states, rows) array matrix^T @ it: a transposed convolution where the matrix is one,
    BLAS where it is dense-ish, else scipy's CSR kernel."""
    if sp.issparse(coefficients):
        return sp.csr_array(coefficients @ matrix)
    kind, form = relaxations.transposed_forms(matrix)
    if kind == "convolution":
        return convolution_transposed(form, coefficients, segment)
    return form @ coefficients
