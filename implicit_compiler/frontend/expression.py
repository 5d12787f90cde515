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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..errors import ShapeError


@dataclass(frozen=True, eq=False)
class Affine:
    """A tensor of the given (batch-1) shape equal to ``coefficients @ [u; x] + offset``."""

    shape: tuple[int, ...]
    coefficients: sp.csr_array  # (size, width)
    offset: np.ndarray  # (size,), float64

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.coefficients.shape[0] != self.size or self.offset.shape != (self.size,):
            raise ShapeError(
                f"affine expression of shape {self.shape} needs {self.size} rows, got coefficients "
                f"{self.coefficients.shape} and offset {self.offset.shape}"
            )

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
        return cls((offset.size,), sp.csr_array(coefficients), offset)

    def widen(self, width: int) -> Affine:
        """The same expression over a wider variable vector (new columns are zero)."""
        if width == self.width:
            return self
        if width < self.width:
            raise ShapeError(f"cannot narrow an expression from {self.width} to {width} variables")
        c = self.coefficients
        return Affine(self.shape, sp.csr_array((c.data, c.indices, c.indptr), shape=(self.size, width)), self.offset)

    def reshape(self, shape: tuple[int, ...]) -> Affine:
        """The same rows seen with another shape of equal size."""
        if math.prod(shape) != self.size:
            raise ShapeError(f"cannot reshape {self.shape} ({self.size} values) to {tuple(shape)}")
        return Affine(tuple(shape), self.coefficients, self.offset)

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
        c = self.coefficients
        data = c.data * np.repeat(factors, np.diff(c.indptr))
        coefficients = sp.csr_array((data, c.indices, c.indptr), shape=c.shape)
        return Affine(self.shape, coefficients, self.offset * factors)

    def shift(self, constant: np.ndarray) -> Affine:
        """Elementwise sum with a constant tensor broadcastable to this shape."""
        constant = np.broadcast_to(np.asarray(constant, dtype=np.float64), self.shape).ravel()
        return Affine(self.shape, self.coefficients, self.offset + constant)

    def __add__(self, other: Affine) -> Affine:
        if other.shape != self.shape:
            raise ShapeError(f"cannot add expressions of shapes {self.shape} and {other.shape}")
        width = max(self.width, other.width)
        coefficients = self.widen(width).coefficients + other.widen(width).coefficients
        return Affine(self.shape, sp.csr_array(coefficients), self.offset + other.offset)

    def __neg__(self) -> Affine:
        return Affine(self.shape, sp.csr_array(-self.coefficients), -self.offset)

    def __sub__(self, other: Affine) -> Affine:
        return self + (-other)

    def map(self, matrix: sp.csr_array, shape: tuple[int, ...], offset: np.ndarray | None = None) -> Affine:
        """The linear map T applied to the flattened tensor: (T M, T c + offset)."""
        if matrix.shape[1] != self.size or matrix.shape[0] != math.prod(shape):
            raise ShapeError(f"cannot apply a {matrix.shape} map to {self.size} values giving shape {shape}")
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
        return bool((np.diff(self.coefficients.indptr) <= 1).all())
