"""Matrices kept as structure: convolution and dense terms plus a sparse remainder.

Issue 20's representation (step 1 of docs/design/issue20.md): a matrix M (rows x columns) is

    M = R + sum_t  E_t op_t S_t

with R a CSR remainder and each term t an operator ``op_t`` (``runtime.structured``'s
``Convolution``, kernel and geometry, or ``Dense``) reading the columns ``op_t.source`` and
writing the rows ``rows_t`` (E_t, S_t: the row and column selections). A convolution's term
stores its kernel once, where its CSR stores it once per output pixel (LeNet-5's B: 117,600
non-zeros from 150 weights).

``StructuredMatrix`` does what the runtime and the analysis need without materializing:
``matvec`` (M X), ``rmatvec`` (M^T Y, a transposed convolution per term), ``abs`` (|M|: the same
geometry with |K|, as the terms never overlap the remainder or each other), ``nnz`` (from the
geometry: the in-bounds (output pixel, kernel entry) pairs with a non-zero entry), and
``to_csr`` (exact: the same entries the CSR holds, summed once). ``lift`` makes one from a
model's CSR, with ``runtime.structured``'s exact detection.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numba
import numpy as np
import scipy.sparse as sp

from .runtime.structured import Convolution, Dense, _reach, structured_block, tensor_sources

ROW_BLOCK = 256  # columns of the transposed convolution's right-hand side per pass (kept in cache)


@dataclass(frozen=True)
class Term:
    """op (a ``Convolution`` or ``Dense`` reading the columns op.source) writing ``rows``."""

    rows: slice
    op: Convolution | Dense


@dataclass(frozen=True, eq=False)
class StructuredMatrix:
    """R + sum of the terms (module docstring), shape (rows, columns)."""

    shape: tuple[int, int]
    terms: tuple[Term, ...]
    remainder: sp.csr_array

    @property
    def nnz(self) -> int:
        """The non-zeros of ``to_csr()``, counted from the geometry."""
        return int(self.remainder.nnz) + sum(_term_nonzeros(term.op) for term in self.terms)

    def matvec(self, X: np.ndarray) -> np.ndarray:
        """M X for X (columns, batch): (rows, batch)."""
        result = np.asarray(self.remainder @ X, dtype=np.result_type(X, self.remainder.dtype))
        for term in self.terms:
            result[term.rows] += term.op.apply(X[term.op.source])
        return result

    def rmatvec(self, Y: np.ndarray) -> np.ndarray:
        """M^T Y for Y (rows, batch): (columns, batch)."""
        result = np.asarray(self.remainder.T @ Y, dtype=np.result_type(Y, self.remainder.dtype))
        for term in self.terms:
            op, part = term.op, Y[term.rows]
            if isinstance(op, Dense):
                result[op.source] += op.weight.T @ part
            else:
                result[op.source] += convolution_transposed(op, np.asarray(part, dtype=np.float64), part.shape[1])
        return result

    def abs(self) -> StructuredMatrix:
        """|M|: the terms with |weight|, the remainder with |entries|."""
        terms = tuple(Term(term.rows, replace(term.op, weight=np.abs(term.op.weight))) for term in self.terms)
        return StructuredMatrix(self.shape, terms, abs(self.remainder))

    def to_csr(self) -> sp.csr_array:
        """The matrix as CSR, exactly (each term's entries are the kernel's, placed by geometry)."""
        pieces = [self.remainder]
        for term in self.terms:
            rows, columns, values = _term_entries(term.op)
            pieces.append(sp.csr_array((values, (rows + term.rows.start, columns)), shape=self.shape))
        return sp.csr_array(sum(pieces[1:], pieces[0]))


def lift(model) -> tuple[StructuredMatrix, StructuredMatrix]:
    """(B, A) of ``model`` as structured matrices: each block's convolutions and dense products
    found by ``runtime.structured.structured_block`` (exact, or not taken), the rest remainder."""
    p, n = model.p, model.n
    sources = tensor_sources(model)
    terms_B, terms_A, kept_B, kept_A = [], [], [sp.csr_array(model.B)], [sp.csr_array(model.A)]
    for block in model.blocks:
        found = structured_block(model, block, sources)
        if found is None:
            continue
        rows = slice(block.start, block.stop)
        for op in found.terms:
            if op.source.stop <= p:
                terms_B.append(Term(rows, op))
            else:
                shifted = slice(op.source.start - p, op.source.stop - p)
                terms_A.append(Term(rows, replace(op, source=shifted)))
    B = _without_terms(kept_B[0], terms_B)
    A = _without_terms(kept_A[0], terms_A)
    return StructuredMatrix((n, p), tuple(terms_B), B), StructuredMatrix((n, n), tuple(terms_A), A)


def _without_terms(matrix: sp.csr_array, terms: list[Term]) -> sp.csr_array:
    """``matrix`` with the entries each term accounts for (its rows x its source columns) dropped."""
    matrix = sp.csr_array(matrix, copy=True)
    matrix.sum_duplicates()
    row_of_entry = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    covered = np.zeros(matrix.nnz, dtype=bool)
    for term in terms:
        source = term.op.source
        covered |= (
            (row_of_entry >= term.rows.start) & (row_of_entry < term.rows.stop)
            & (matrix.indices >= source.start) & (matrix.indices < source.stop)
        )  # fmt: skip
    matrix.data[covered] = 0
    matrix.eliminate_zeros()
    return matrix


def _term_entries(op: Convolution | Dense) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows within the term, columns, values) of the term's non-zeros."""
    if isinstance(op, Dense):
        rows, columns = np.nonzero(op.weight)
        return rows, columns + op.source.start, op.weight[rows, columns]
    (C, H, W), (Co, Ho, Wo) = op.in_shape, op.out_shape
    kh, kw = op.kernel
    weight = op.weight.reshape(Co, C, kh, kw)
    co, c, i, j = np.nonzero(weight)
    ho, wo = np.arange(Ho), np.arange(Wo)
    h = op.stride[0] * ho[:, None] + op.dilation[0] * i[None, :] - op.pads[0]  # (Ho, taps)
    w = op.stride[1] * wo[:, None] + op.dilation[1] * j[None, :] - op.pads[1]  # (Wo, taps)
    inside = ((h >= 0) & (h < H))[:, None, :] & ((w >= 0) & (w < W))[None, :, :]  # (Ho, Wo, taps)
    out_h, out_w, tap = np.nonzero(inside)
    rows = (co[tap] * Ho + out_h) * Wo + out_w
    columns = op.source.start + (c[tap] * H + h[out_h, tap]) * W + w[out_w, tap]
    return rows, columns, weight[co[tap], c[tap], i[tap], j[tap]]


def _term_nonzeros(op: Convolution | Dense) -> int:
    if isinstance(op, Dense):
        return int(np.count_nonzero(op.weight))
    (C, H, W), (Co, Ho, Wo) = op.in_shape, op.out_shape
    kh, kw = op.kernel
    nonzero = op.weight.reshape(Co, C, kh, kw) != 0
    reach_h = _reach(Ho, H, op.stride[0], op.dilation[0], op.pads[0], kh)
    reach_w = _reach(Wo, W, op.stride[1], op.dilation[1], op.pads[1], kw)
    return int((nonzero * reach_h[:, None] * reach_w[None, :]).sum())


def convolution_transposed(convolution: Convolution, T: np.ndarray, segment: int) -> np.ndarray:
    """M^T @ T for M the convolution (Co Ho Wo, C H W): T (Co Ho Wo, r) -> (C H W, r), by
    ``_add_windows`` in blocks of about ``ROW_BLOCK`` columns, whole segments of ``segment``
    columns (one sample's rows) each: a segment that is zero at a position (an inactive relu, a
    pooling window's element not selected) is skipped there. LeNet-5's products in CROWN
    (``analysis.crown``) at eps 0.001 and 0.01 took 2.1-38 ms against 7.4-70 ms without
    skipping (conv1), 7.8-66 ms against 16-235 ms (conv2), on the same arrays."""
    (C, H, W), (Co, Ho, Wo) = convolution.in_shape, convolution.out_shape
    kh, kw = convolution.kernel
    weight = convolution.weight.reshape(Co, C, kh, kw)
    rows = T.shape[1]
    source = T.reshape(Co, Ho, Wo, rows)
    result = np.empty((C, H, W, rows))
    geometry = np.array([*convolution.stride, *convolution.dilation, *convolution.pads], dtype=np.int64)
    step = segment * max(1, ROW_BLOCK // segment)
    for first in range(0, rows, step):
        last = min(rows, first + step)
        block = np.zeros((C, H, W, last - first))  # contiguous: the innermost loop vectorizes
        _add_windows(weight, np.ascontiguousarray(source[..., first:last]), block, geometry, segment)
        result[..., first:last] = block
    return result.reshape(C * H * W, rows)


@numba.njit(cache=True, nogil=True)  # (jitted: coverage cannot see inside)
def _add_windows(weight, source, result, geometry, segment):
    """result[c, h, w] += K[co, c, i, j] source[co, ho, wo] for h = s_h ho + d_h i - p_h and
    w = s_w wo + d_w j - p_w inside the image: the adjoint of the convolution, each source
    vector read once and added into the kernel's window (contiguous vectors of rows), segment by
    segment of ``segment`` rows, all-zero segments skipped."""
    sh, sw, dh, dw, ph, pw = geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5]
    Co, C, kh, kw = weight.shape
    _, Ho, Wo, rows = source.shape
    H, W = result.shape[1], result.shape[2]
    for co in range(Co):
        for ho in range(Ho):
            for wo in range(Wo):
                for first in range(0, rows, segment):
                    last = min(rows, first + segment)
                    nonzero = False
                    for t in range(first, last):
                        if source[co, ho, wo, t] != 0:
                            nonzero = True
                            break
                    if not nonzero:
                        continue
                    for c in range(C):
                        for i in range(kh):
                            h = sh * ho + dh * i - ph
                            if h < 0 or h >= H:
                                continue
                            for j in range(kw):
                                w = sw * wo + dw * j - pw
                                value = weight[co, c, i, j]
                                if w < 0 or w >= W or value == 0:
                                    continue
                                for t in range(first, last):
                                    result[c, h, w, t] += value * source[co, ho, wo, t]
