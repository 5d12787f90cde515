"""Affine expressions: every network value as a sparse affine function of [u; x].

While lowering, each ONNX value that depends on the model input is held as

    value = M @ v + c,        v = [u; x] (the p inputs, then the states made so far)

with one row of the sparse matrix M (and one entry of the offset c) per element of the tensor,
in C order at batch size 1. Linear ops only transform (M, c): a data movement op (Reshape,
Transpose, Slice, Concat, Pad, Expand, Gather...) selects rows (``take``), a linear map T
(convolution, Gemm, pooling) gives (T M, T c), elementwise scaling gives (diag(s) M, s * c).
Only activations create states (see ``context.LoweringContext.create_block``).

The number of states grows while lowering, so M may be narrower than the current [u; x]:
missing columns are zero, and ``widen`` pads them when two expressions meet.

Structured terms (issue 20). A convolution or a dense product reading whole contiguous runs of
[u; x] is kept as its kernel instead of its Toeplitz rows:

    value = M @ v + c + sum_t  E_t op_t v[op_t.source]

each ``structure.Term`` writing the rows ``term.rows`` of the value (E_t) with an operator
(``structure.Convolution``, ``TransposedConvolution`` or ``Dense``) reading a slice of v (columns of [u; x], not of x).
With no terms every method below runs as it did before them. With terms: ``reshape``,
``shift`` and ``take`` of every row in order are free, ``-`` negates the kernels, ``scale`` by
factors constant over each output channel of a term (BatchNormalization, a per-channel Mul)
folds them into the kernel rows (the same float64 products the CSR path forms), ``+`` keeps
both sides' terms (two terms over the same rows and columns merge when they have one geometry,
else one becomes CSR rows), and ``concatenate`` shifts them. Any other use turns the terms
into CSR rows (``without_terms``); the lowering keeps that from happening to large ones by
storing such an operand as an identity block first (``lower._lower_node``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from ..errors import ShapeError
from ..structure import Convolution, Term, TransposedConvolution, _term_entries


@dataclass(frozen=True, eq=False)
class Affine:
    """A tensor of the given (batch-1) shape equal to ``coefficients @ [u; x] + offset`` plus
    the structured terms (module docstring)."""

    shape: tuple[int, ...]
    coefficients: sp.csr_array  # (size, width)
    offset: np.ndarray  # (size,), float64
    terms: tuple[Term, ...] = ()  # rows within the value, sources in columns of [u; x]; float64 kernels

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.coefficients.shape[0] != self.size or self.offset.shape != (self.size,):
            raise ShapeError(
                f"affine expression of shape {self.shape} needs {self.size} rows, got coefficients "
                f"{self.coefficients.shape} and offset {self.offset.shape}"
            )
        for term in self.terms:
            if not 0 <= term.rows.start <= term.rows.stop <= self.size:
                raise ShapeError(f"a term writes rows {term.rows} of an expression of {self.size} rows")

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def width(self) -> int:
        return self.coefficients.shape[1]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    # ----------------------------------------------------------------------------- building
    @classmethod
    def variables(cls, shape: tuple[int, ...], start: int, width: int) -> Affine:
        """The expression equal to v[start : start + size] (an input or a new state block)."""
        size = math.prod(shape)
        rows = np.arange(size + 1, dtype=np.int64)
        columns = np.arange(start, start + size, dtype=np.int64)
        coefficients = sp.csr_array((np.ones(size), columns, rows), shape=(size, width))
        return cls(shape, coefficients, np.zeros(size))

    @classmethod
    def concatenate(cls, expressions: list[Affine], width: int) -> Affine:
        """The rows of several expressions one after another, as a flat expression."""
        if not expressions:
            return cls((0,), sp.csr_array((0, width)), np.zeros(0))
        coefficients = sp.vstack([e.widen(width).coefficients for e in expressions], format="csr")
        offset = np.concatenate([e.offset for e in expressions])
        terms, start = [], 0
        for expression in expressions:
            terms.extend(_shifted(term, start) for term in expression.terms)
            start += expression.size
        return cls((offset.size,), sp.csr_array(coefficients), offset, tuple(terms))

    def widen(self, width: int) -> Affine:
        """The same expression over a wider variable vector (new columns are zero)."""
        if width == self.width:
            return self
        if width < self.width:
            raise ShapeError(f"cannot narrow an expression from {self.width} to {width} variables")
        c = self.coefficients
        coefficients = sp.csr_array((c.data, c.indices, c.indptr), shape=(self.size, width))
        return Affine(self.shape, coefficients, self.offset, self.terms)

    def reshape(self, shape: tuple[int, ...]) -> Affine:
        """The same rows seen with another shape of equal size."""
        if math.prod(shape) != self.size:
            raise ShapeError(f"cannot reshape {self.shape} ({self.size} values) to {tuple(shape)}")
        return Affine(tuple(shape), self.coefficients, self.offset, self.terms)

    @property
    def has_terms(self) -> bool:
        return bool(self.terms)

    def without_terms(self) -> Affine:
        """The same expression with its terms written as CSR rows (their Toeplitz rows: only for
        small terms, or where nothing else is possible)."""
        if not self.terms:
            return self
        width = max(self.width, *(term.op.source.stop for term in self.terms))
        coefficients = self.widen(width).coefficients + _terms_csr(self.terms, self.size, width)
        return Affine(self.shape, sp.csr_array(coefficients), self.offset)

    # ----------------------------------------------------------------------------- data movement
    def take(self, ids: np.ndarray, fill: float = 0.0) -> Affine:
        """Rows picked by an integer tensor of row ids; id -1 gives the constant ``fill``.

        Every data movement op is this with ids computed by numpy on ``np.arange(size)``:
        Transpose, Slice, Gather, Concat (on stacked operands), Pad (-1 for padding), Expand.
        """
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.ravel()
        valid = flat >= 0
        if valid.all() and flat.size == self.size and np.array_equal(flat, np.arange(self.size)):
            return self.reshape(ids.shape)
        if self.terms:
            return self.without_terms().take(ids, fill)
        if valid.all():
            coefficients = self.coefficients[flat]
            offset = self.offset[flat]
        else:
            indptr = np.concatenate([[0], np.cumsum(valid)])
            selection = sp.csr_array((np.ones(indptr[-1]), flat[valid], indptr), shape=(flat.size, self.size))
            coefficients = sp.csr_array(selection @ self.coefficients)
            offset = np.where(valid, self.offset[np.where(valid, flat, 0)], fill)
        return Affine(ids.shape, coefficients, offset)

    def broadcast_to(self, shape: tuple[int, ...]) -> Affine:
        """numpy broadcasting of the expression to ``shape``."""
        if tuple(shape) == self.shape:
            return self
        ids = np.broadcast_to(np.arange(self.size).reshape(self.shape), shape)
        return self.take(ids)

    # ----------------------------------------------------------------------------- arithmetic
    def scale(self, factors: np.ndarray) -> Affine:
        """Elementwise product with a constant tensor broadcastable to this shape."""
        factors = np.broadcast_to(np.asarray(factors, dtype=np.float64), self.shape).ravel()
        if self.terms and not self.scale_keeps_terms(factors):
            return self.without_terms().scale(factors)
        c = self.coefficients
        data = c.data * np.repeat(factors, np.diff(c.indptr))
        coefficients = sp.csr_array((data, c.indices, c.indptr), shape=c.shape)
        terms = tuple(_scaled(term, factors[term.rows]) for term in self.terms)
        return Affine(self.shape, coefficients, self.offset * factors, terms)

    def scale_keeps_terms(self, factors: np.ndarray) -> bool:
        """Whether ``scale(factors)`` folds into the kernels: constant over each output channel
        of every convolution term (any factors for a dense term, one per row)."""
        factors = np.asarray(factors, dtype=np.float64)
        factors = factors if factors.shape == (self.size,) else np.broadcast_to(factors, self.shape).ravel()
        for term in self.terms:
            if isinstance(term.op, Convolution | TransposedConvolution):
                per_channel = factors[term.rows].reshape(term.op.out_shape[0], -1)
                if not (per_channel == per_channel[:, :1]).all():
                    return False
        return True

    def shift(self, constant: np.ndarray) -> Affine:
        """Elementwise sum with a constant tensor broadcastable to this shape."""
        constant = np.broadcast_to(np.asarray(constant, dtype=np.float64), self.shape).ravel()
        return Affine(self.shape, self.coefficients, self.offset + constant, self.terms)

    def __add__(self, other: Affine) -> Affine:
        if other.shape != self.shape:
            raise ShapeError(f"cannot add expressions of shapes {self.shape} and {other.shape}")
        width = max(self.width, other.width)
        coefficients = self.widen(width).coefficients + other.widen(width).coefficients
        terms, written = _merged(self.terms + other.terms)
        result = Affine(self.shape, sp.csr_array(coefficients), self.offset + other.offset, terms)
        if written:  # overlapping terms of different geometries: the later ones as CSR rows
            extra = Affine(self.shape, sp.csr_array((self.size, width)), np.zeros(self.size), tuple(written))
            return result + extra.without_terms()
        return result

    def terms_conflict(self, other: Affine) -> bool:
        """Whether ``self + other`` would have a term written as CSR rows: two terms over
        overlapping rows and columns that do not share one geometry, or a term whose rectangle
        holds entries of the other's CSR rows (conv(x) + x)."""
        if self.terms and other.terms and _merged(self.terms + other.terms)[1]:
            return True
        return covers_entries(self.terms, other.coefficients) or covers_entries(other.terms, self.coefficients)

    def __neg__(self) -> Affine:
        terms = tuple(Term(term.rows, replace(term.op, weight=-term.op.weight)) for term in self.terms)
        return Affine(self.shape, sp.csr_array(-self.coefficients), -self.offset, terms)

    def __sub__(self, other: Affine) -> Affine:
        return self + (-other)

    def map(self, matrix: sp.csr_array, shape: tuple[int, ...], offset: np.ndarray | None = None) -> Affine:
        """The linear map T applied to the flattened tensor: (T M, T c + offset)."""
        if matrix.shape[1] != self.size or matrix.shape[0] != math.prod(shape):
            raise ShapeError(f"cannot apply a {matrix.shape} map to {self.size} values giving shape {shape}")
        if self.terms:
            return self.without_terms().map(matrix, shape, offset)
        coefficients = self._map_coefficients(matrix)
        new_offset = matrix @ self.offset
        if offset is not None:
            new_offset = new_offset + np.broadcast_to(offset, (coefficients.shape[0],))
        return Affine(tuple(shape), coefficients, new_offset)

    def _map_coefficients(self, matrix: sp.csr_array) -> sp.csr_array:
        """T M. When every row of M is one variable (the common case: T reads a block's states),
        T M is T with its columns renamed and scaled: no sparse product, no merging."""
        M = self.coefficients
        if M.nnz == self.size and (np.diff(M.indptr) == 1).all():
            T = sp.csr_array(matrix)
            data = T.data * M.data[T.indices]
            result = sp.csr_array((data, M.indices[T.indices], T.indptr), shape=(T.shape[0], M.shape[1]))
            if not result.has_sorted_indices:
                result.sort_indices()
            return result
        return sp.csr_array(matrix @ M)

    def map_nnz_estimate(self, matrix: sp.csr_array) -> int:
        """An upper bound on nnz(T M): sum over T's entries of the row counts of M they pick."""
        row_counts = np.diff(self.coefficients.indptr).astype(np.float64)
        pattern = sp.csr_array((np.ones(matrix.nnz), matrix.indices, matrix.indptr), shape=matrix.shape)
        return int((pattern @ row_counts).sum())

    @property
    def is_selection(self) -> bool:
        """True when every row has at most one non-zero (a copy of single variables)."""
        return not self.terms and bool((np.diff(self.coefficients.indptr) <= 1).all())


def covers_entries(terms, coefficients: sp.csr_array) -> bool:
    """Whether some term's rectangle (its rows x its source) holds an entry of ``coefficients``."""
    for term in terms:
        start, stop = coefficients.indptr[term.rows.start], coefficients.indptr[term.rows.stop]
        columns = coefficients.indices[start:stop]
        if ((columns >= term.op.source.start) & (columns < term.op.source.stop)).any():
            return True
    return False


def _shifted(term: Term, rows: int) -> Term:
    return Term(slice(term.rows.start + rows, term.rows.stop + rows), term.op)


def _scaled(term: Term, factors: np.ndarray) -> Term:
    """A term times per-row factors (``Affine.scale_keeps_terms`` holds): its kernel rows scaled."""
    op = term.op
    if isinstance(op, Convolution):
        per_channel = factors.reshape(op.out_shape[0], -1)[:, :1]
        return Term(term.rows, replace(op, weight=op.weight * per_channel))
    if isinstance(op, TransposedConvolution):  # output channel co: W[c, co - g Co / groups] for c in group g
        C, Co, groups = op.in_shape[0], op.out_shape[0], op.groups
        per_channel = factors.reshape(groups, 1, Co // groups, -1)[..., :1]
        weight = op.weight.reshape(groups, C // groups, Co // groups, -1) * per_channel
        return Term(term.rows, replace(op, weight=weight.reshape(op.weight.shape)))
    return Term(term.rows, replace(op, weight=op.weight * factors[:, None]))


def _same_geometry(first, second) -> bool:
    return (
        type(first) is type(second)
        and all(
            getattr(first, name) == getattr(second, name)
            for name in ("source", "in_shape", "out_shape", "kernel", "stride", "dilation", "pads", "groups")
            if hasattr(first, name)
        )
        and first.weight.shape == second.weight.shape
    )


def _merged(terms: tuple[Term, ...]) -> tuple[tuple[Term, ...], list[Term]]:
    """(terms whose rectangles rows x source do not overlap, terms to write as CSR rows): two
    terms over the same rows and columns with one geometry become one (kernels summed, as the
    CSR path sums their entries); any other overlap sends the later term to CSR."""
    kept: list[Term] = []
    written: list[Term] = []
    for term in terms:
        for index, other in enumerate(kept):
            if not _overlap(term, other):
                continue
            if term.rows == other.rows and _same_geometry(term.op, other.op):
                kept[index] = Term(other.rows, replace(other.op, weight=other.op.weight + term.op.weight))
            else:
                written.append(term)
            break
        else:
            kept.append(term)
    return tuple(kept), written


def _overlap(first: Term, second: Term) -> bool:
    rows = first.rows.start < second.rows.stop and second.rows.start < first.rows.stop
    a, b = first.op.source, second.op.source
    return rows and a.start < b.stop and b.start < a.stop


def _terms_csr(terms, size: int, width: int) -> sp.csr_array:
    """The terms' entries as CSR rows (size x width)."""
    rows, columns, values = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0)]
    for term in terms:
        term_rows, term_columns, term_values = _term_entries(term.op)
        rows.append(term_rows + term.rows.start), columns.append(term_columns), values.append(term_values)
    coo = sp.coo_array((np.concatenate(values), (np.concatenate(rows), np.concatenate(columns))), shape=(size, width))
    return sp.csr_array(coo.tocsr())


# Runs of one operand kept as separate terms at most (Inception's Concat: 4); past it the operand
# is stored as an identity block and read as one run (a Transpose before a Flatten gives one run
# per pixel: marabou's cifar10_small had 579 dense terms).
MAX_RUNS = 16


@dataclass(frozen=True)
class SourceRun:
    """Channels [first, stop) of a selection read the contiguous columns from ``start`` of
    [u; x], each channel's rows times its own factor (``scales``)."""

    first: int
    stop: int
    start: int
    scales: np.ndarray  # (stop - first,)


def source_runs(expression: Affine, channels: int, p: int) -> list[SourceRun] | None:
    """The expression, seen as ``channels`` channels of equal size, as runs of whole channels
    each reading contiguous columns of [u; x] on one side of p (inputs or states), in order, with
    one factor per channel; None when it is not such a selection (a row with no or several
    entries, columns out of order within a channel, a factor varying within one, two runs
    reading overlapping columns, more than ``MAX_RUNS`` runs, terms)."""
    c = expression.coefficients
    if expression.terms or expression.size % channels or c.nnz != expression.size or (np.diff(c.indptr) != 1).any():
        return None
    per_channel = expression.size // channels
    columns = c.indices.astype(np.int64).reshape(channels, per_channel)
    values = c.data.reshape(channels, per_channel)
    starts = columns[:, 0]
    if not (columns == starts[:, None] + np.arange(per_channel)).all() or not (values == values[:, :1]).all():
        return None
    if ((starts < p) & (starts + per_channel > p)).any():
        return None
    breaks = np.flatnonzero((starts[1:] != starts[:-1] + per_channel) | ((starts[1:] < p) != (starts[:-1] < p))) + 1
    if breaks.size >= MAX_RUNS:  # a permuted selection (NHWC flattened): one identity block serves better
        return None
    bounds = [0, *breaks.tolist(), channels]
    runs = [
        SourceRun(first, stop, int(starts[first]), values[first:stop, 0].copy())
        for first, stop in zip(bounds[:-1], bounds[1:])
    ]
    spans = sorted((run.start, run.start + (run.stop - run.first) * per_channel) for run in runs)
    if any(later[0] < earlier[1] for earlier, later in zip(spans[:-1], spans[1:])):
        return None
    return runs
