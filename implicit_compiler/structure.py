"""Matrices kept as structure: convolution and dense terms plus a sparse remainder.

Issue 20's representation (step 1 of docs/design/issue20.md): a matrix M (rows x columns) is

    M = R + sum_t  E_t op_t S_t

with R a CSR remainder and each term t an operator ``op_t`` (``Convolution``, kernel and
geometry, grouped or not; ``TransposedConvolution``, the adjoint of a convolution, as ONNX's
ConvTranspose; or ``Dense``) reading the columns ``op_t.source`` and writing the rows
``rows_t`` (E_t, S_t: the row and column selections). A convolution's term stores its kernel
once, where its CSR stores it once per output pixel (LeNet-5's B: 117,600 non-zeros from 150
weights).

``StructuredMatrix`` does what the runtime and the analysis need without materializing:
``matvec`` (M X), ``rmatvec`` (M^T Y: each operator's ``apply_adjoint``), ``abs`` (|M|: the same
geometry with |K|, as the terms never overlap the remainder or each other), ``nnz`` (from the
geometry: the in-bounds (output pixel, kernel entry) pairs with a non-zero entry; ``row_nnz``
per row), and ``to_csr`` (exact: the same entries the CSR holds, summed once; of some rows, or
a run of rows at a time with ``row_chunks``). ``lift`` makes one from a
model's CSR, with ``runtime.structured``'s exact detection.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numba
import numpy as np
import scipy.sparse as sp

from . import blas_threads
from .blas_threads import matmul
from .errors import ShapeError

ROW_BLOCK = 256  # columns of the transposed convolution's right-hand side per pass (kept in cache)
ADJOINT_CHUNK_BYTES = 64 << 20
COMPILED_IM2COL_BATCH = 8  # from this many samples on, im2col by the compiled kernel
BAND_BYTES = 512 << 10  # a band's im2col columns (``Convolution._apply_by_bands``)


@dataclass(frozen=True)
class Convolution:
    """Y (Co, Ho, Wo) += conv(X (C, H, W)) with X = V[source] (V = [u; x], rows by batch).

    With ``groups`` g, output channel co reads the input channels of its group only: group
    co // (Co / g), channels of C / g each (g = C: depthwise)."""

    source: slice
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int]  # leading pads (top, left); trailing pads follow from the shapes
    weight: np.ndarray  # (Co, C / groups * kh * kw)
    groups: int = 1

    @property
    def columns_per_sample(self) -> int:
        """Entries of im2col's columns per sample (C kh kw Ho Wo)."""
        return self.in_shape[0] * self.kernel[0] * self.kernel[1] * self.out_shape[1] * self.out_shape[2]

    def apply(self, source: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The convolution of source (C H W, batch) as (Co Ho Wo, batch), written into ``out``
        (a C-contiguous array of that shape) when given."""
        batch = source.shape[1]
        (C, H, W), (_, Ho, Wo) = self.in_shape, self.out_shape
        X = np.ascontiguousarray(source).reshape(C, H, W, batch)  # C order: a faster im2col
        if (*self.kernel, *self.stride, *self.pads) == (1, 1, 1, 1, 0, 0) and (Ho, Wo) == (H, W):
            cols = X.reshape(C, H * W * batch)
        elif (
            self.groups == 1 and batch >= COMPILED_IM2COL_BATCH and blas_threads.active()
            and blas_threads.GEMM is not None and X.dtype == self.weight.dtype
            and Ho * Wo * batch < blas_threads.INT32_LIMIT
        ):  # fmt: skip
            return self._apply_by_bands(X, out)
        else:
            cols = self._im2col(X).reshape(-1, Ho * Wo * batch)
        return _grouped_product(self.weight, cols, self.groups, out, batch)

    def apply_adjoint(self, Y: np.ndarray) -> np.ndarray:
        """M^T Y for Y (Co Ho Wo, batch): ``convolution_adjoint``."""
        return convolution_adjoint(self, Y)

    def _apply_by_bands(self, X: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        """The convolution of X (C, H, W, batch) by bands of output rows, each band's im2col
        (about ``BAND_BYTES``) and its GEMM on one of numba's threads (``_convolution_bands``):
        the band's columns are read by the GEMM while in cache. Float32, 2 cores, in-process,
        alternating, medians: ResNet-18 at 224 x 224 and batch 16 took 290 ms by the whole
        batch's im2col and OpenBLAS's threads, 244 ms by bands of 0.5 MB (238 of 2 MB); ResNet-50
        640 against 595 (627). (Bands handed to Python threads took 261-277 ms: waking one costs
        up to 0.3 ms.) At batch 1 bands lost (44 against 29 ms): one sample's im2col vectorizes
        poorly, and OpenBLAS's threads win on its small products."""
        C, H, W, batch = X.shape
        Co, Ho, Wo = self.out_shape
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = self.kernel, self.stride, self.dilation, self.pads
        if out is None:
            out = np.empty((Co * Ho * Wo, batch), dtype=X.dtype)
        per_row = C * kh * kw * Wo * batch
        height = max(1, min(Ho, BAND_BYTES // (per_row * X.itemsize)))
        buffers = _workspace((numba.get_num_threads(), per_row * height), X.dtype)
        geometry = np.array([sh, sw, dh, dw, ph, pw, kh, kw, Ho, Wo, height], dtype=np.int64)
        weight = np.ascontiguousarray(self.weight, dtype=X.dtype)
        bands = range(0, Ho, height)
        sizes = np.stack([
            blas_threads.gemm_sizes(Co, columns, C * kh * kw, C * kh * kw, columns, Ho * Wo * batch)
            for columns in ((min(Ho, first + height) - first) * Wo * batch for first in bands)
        ])  # fmt: skip
        Y = out.reshape(Co, Ho * Wo * batch)
        _convolution_bands(X, weight, Y, geometry, buffers, sizes, blas_threads.GEMM, X.dtype == np.float32)
        return out

    def _im2col(self, X: np.ndarray) -> np.ndarray:
        """cols (C, kh, kw, Ho, Wo, batch) of X (C, H, W, batch).

        From ``COMPILED_IM2COL_BATCH`` samples on by ``_im2col_into`` (threads, the pads written
        as zeros), below it a strided view of the padded image copied once: ResNet-18's
        convolutions at 224 x 224 and batch 16 took 4.3 / 4.2 / 1.9 / 0.9 ms (conv1, 64 x 56^2,
        128 x 28^2, 256 x 14^2) against 19 / 10 / 6.6 / 2.2 by the view; at batch 1 the view
        took 0.25 ms against 2.6 (LeNet-5 batch 1: 27 us, against 71 for a compiled loop)."""
        C, H, W, batch = X.shape
        (kh, kw), (sh, sw), (dh, dw), (ph, pw) = self.kernel, self.stride, self.dilation, self.pads
        _, Ho, Wo = self.out_shape
        if batch >= COMPILED_IM2COL_BATCH:
            cols = _workspace((C, kh, kw, Ho, Wo, batch), X.dtype)
            _im2col_into(X, cols, np.array([sh, sw, dh, dw, ph, pw], dtype=np.int64))
            return cols
        extent_h, extent_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        bottom = max(0, (Ho - 1) * sh + extent_h - H - ph)
        right = max(0, (Wo - 1) * sw + extent_w - W - pw)
        if ph or pw or bottom or right:
            padded = np.zeros((C, H + ph + bottom, W + pw + right, batch), dtype=X.dtype)
            padded[:, ph : ph + H, pw : pw + W] = X
            X = padded
        windows = np.lib.stride_tricks.sliding_window_view(X, (extent_h, extent_w), axis=(1, 2))
        windows = windows[:, : (Ho - 1) * sh + 1 : sh, : (Wo - 1) * sw + 1 : sw, :, ::dh, ::dw]
        cols = _workspace((C, kh, kw, Ho, Wo, batch), X.dtype)
        np.copyto(cols, windows.transpose(0, 4, 5, 1, 2, 3))
        return cols


_scratch = threading.local()


def _workspace(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized C-contiguous array of this shape, on memory kept by this thread for the
    next call (the largest asked for so far: 118 MB for ResNet-18 at 224 x 224 and batch 16).
    A new array of that size is mapped fresh by the system and faults on every page it writes:
    conv1's im2col at batch 16 took 10.0 ms so against 4.3 ms in a kept buffer."""
    size = math.prod(shape) * np.dtype(dtype).itemsize
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.size < size:
        buffer = _scratch.buffer = np.empty(size, dtype=np.uint8)
    return buffer[:size].view(dtype).reshape(shape)


@numba.njit(parallel=True, cache=True, nogil=True)  # (jitted: coverage cannot see inside)
def _im2col_into(X, cols, geometry):
    """cols[c, i, j, ho, wo] = X[c, s_h ho + d_h i - p_h, s_w wo + d_w j - p_w] (a vector of
    samples), 0 outside the image; (c, i) pairs on threads."""
    kh = cols.shape[1]
    for task in numba.prange(X.shape[0] * kh):
        _im2col_rows(X, cols, geometry, 0, task // kh, task % kh)


@numba.njit(cache=True, nogil=True)  # (jitted: coverage cannot see inside)
def _im2col_band(X, cols, geometry, first):
    """``_im2col_into`` for the output rows first:first + cols.shape[3], on this thread:
    cols[c, i, j, r, wo] = X[c, s_h (first + r) + d_h i - p_h, s_w wo + d_w j - p_w]."""
    for c in range(X.shape[0]):
        for i in range(cols.shape[1]):
            _im2col_rows(X, cols, geometry, first, c, i)


@numba.njit(cache=True, nogil=True, inline="always")  # (jitted: coverage cannot see inside)
def _im2col_rows(X, cols, geometry, first, c, i):
    """cols[c, i, j, r, wo] for every j, r, wo: the output rows first + r read by kernel row i
    of channel c. The output columns of kernel column j that read inside the image are wo in
    [low, high)."""
    sh, sw, dh, dw, ph, pw = geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5]
    H, W, batch = X.shape[1], X.shape[2], X.shape[3]
    kw, rows, Wo = cols.shape[2], cols.shape[3], cols.shape[4]
    for j in range(kw):
        offset = dw * j - pw  # w = s_w wo + offset
        low = 0 if offset >= 0 else min(Wo, (sw - 1 - offset) // sw)
        high = max(low, 0 if offset > W - 1 else min(Wo, (W - 1 - offset) // sw + 1))
        for r in range(rows):
            h = sh * (first + r) + dh * i - ph
            if h < 0 or h >= H:
                for wo in range(Wo):
                    for t in range(batch):
                        cols[c, i, j, r, wo, t] = 0
                continue
            for wo in range(low):
                for t in range(batch):
                    cols[c, i, j, r, wo, t] = 0
            for wo in range(low, high):
                w = sw * wo + offset
                for t in range(batch):
                    cols[c, i, j, r, wo, t] = X[c, h, w, t]
            for wo in range(high, Wo):
                for t in range(batch):
                    cols[c, i, j, r, wo, t] = 0


@numba.njit(parallel=True, cache=True, nogil=True)  # (jitted: coverage cannot see inside)
def _convolution_bands(X, weight, out, geometry, buffers, sizes, functions, single):
    """out (Co, Ho Wo batch) = weight (Co, C kh kw) @ im2col(X), by bands of ``height``
    output rows (geometry: strides, dilations, pads, kh, kw, Ho, Wo, height): each band's
    columns built in its thread's row of ``buffers``, then its GEMM (``sizes``: the bands'
    ``blas_threads.gemm_sizes``; ``functions``: ``blas_threads.GEMM``) writing the band's
    columns of out."""
    kh, kw, Ho, Wo, height = geometry[6], geometry[7], geometry[8], geometry[9], geometry[10]
    C, batch, item = X.shape[0], X.shape[3], X.itemsize
    inner = weight.shape[1]
    for band in numba.prange((Ho + height - 1) // height):
        first = band * height
        rows = min(Ho, first + height) - first
        columns = rows * Wo * batch
        cols = buffers[numba.get_thread_id(), : inner * columns].reshape((C, kh, kw, rows, Wo, batch))
        _im2col_band(X, cols, geometry, first)
        target = out.ctypes.data + first * Wo * batch * item
        blas_threads.row_major_gemm(sizes[band], weight.ctypes.data, cols.ctypes.data, target, functions, single)


@dataclass(frozen=True)
class TransposedConvolution:
    """Y (Co, Ho, Wo) += M^T X for X (C, H, W) = V[source]: a transposed convolution (ONNX
    ConvTranspose), the adjoint of the convolution M (``adjoint``) from images (Co, Ho, Wo) to
    (C, H, W) with this kernel, stride, dilation, leading pads and groups. Entry

        M^T[(co, ho, wo), (c, h, w)] = K[c, co - g Co / groups, i, j]   for ho = s_h h + d_h i - p_h,
                                                                         wo = s_w w + d_w j - p_w

    (g = c // (C / groups)): input pixel (h, w) scatters into the output pixels its kernel
    reaches, and ConvTranspose's W (C, Co / groups, kh, kw) is M's weight as it is."""

    source: slice
    in_shape: tuple[int, int, int]  # (C, H, W): what it reads, M's output
    out_shape: tuple[int, int, int]  # (Co, Ho, Wo): what it writes, M's input
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int]
    weight: np.ndarray  # (C, Co / groups * kh * kw)
    groups: int = 1

    @property
    def adjoint(self) -> Convolution:
        """M, the convolution this is the transpose of (reading rows 0: Co Ho Wo of what it is
        applied to)."""
        return Convolution(
            source=slice(0, math.prod(self.out_shape)),
            in_shape=self.out_shape,
            out_shape=self.in_shape,
            kernel=self.kernel,
            stride=self.stride,
            dilation=self.dilation,
            pads=self.pads,
            weight=self.weight,
            groups=self.groups,
        )

    @property
    def columns_per_sample(self) -> int:
        """Entries of the GEMM's columns per sample (Co kh kw H W, ``convolution_adjoint``)."""
        return self.out_shape[0] * self.kernel[0] * self.kernel[1] * self.in_shape[1] * self.in_shape[2]

    def apply(self, source: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """M^T source for source (C H W, batch), as (Co Ho Wo, batch) in their dtype (float32
        stays float32), written into ``out`` (C-contiguous) when given."""
        return convolution_adjoint(self.adjoint, source, out)

    def apply_adjoint(self, Y: np.ndarray) -> np.ndarray:
        """M Y for Y (Co Ho Wo, batch): the forward convolution."""
        return self.adjoint.apply(Y)


@dataclass(frozen=True)
class Dense:
    """Y += W V[source] for a sub-matrix that is mostly non-zero."""

    source: slice
    weight: np.ndarray  # (rows, source size)

    columns_per_sample = 0

    def apply(self, source: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty((self.weight.shape[0], source.shape[1]), dtype=np.result_type(self.weight, source))
        return matmul(self.weight, source, out)

    def apply_adjoint(self, Y: np.ndarray) -> np.ndarray:
        return self.weight.T @ Y


Operator = Convolution | TransposedConvolution | Dense


def _grouped_product(weight: np.ndarray, cols: np.ndarray, groups: int, out: np.ndarray | None, batch: int):
    """K cols for K (Co, C / g kh kw) and cols (C kh kw, N): one GEMM per group (np.matmul of
    (g, Co / g, C / g kh kw) by (g, C / g kh kw, N): group g's output channels from its rows
    of cols), as (Co N / batch, batch), into ``out`` (C-contiguous) when given."""
    Co, columns = weight.shape[0], cols.shape[1]
    if out is None:
        out = np.empty((Co * columns // batch, batch), dtype=np.result_type(weight, cols))
    matmul(
        weight.reshape(groups, Co // groups, -1),
        cols.reshape(groups, -1, columns),
        out.reshape(groups, Co // groups, columns),
    )
    return out


def _reach(size_out: int, size_in: int, stride: int, dilation: int, pad: int, kernel: int) -> np.ndarray:
    """For each kernel index, how many output positions read an in-bounds input."""
    out = np.arange(size_out)[:, None]
    position = stride * out + dilation * np.arange(kernel)[None, :] - pad
    return ((position >= 0) & (position < size_in)).sum(axis=0)


@dataclass(frozen=True)
class Term:
    """op (a ``Convolution``, ``TransposedConvolution`` or ``Dense`` reading the columns
    op.source) writing ``rows``."""

    rows: slice
    op: Operator


@dataclass(frozen=True, eq=False)
class StructuredMatrix:
    """R + sum of the terms (module docstring), shape (rows, columns).

    The terms' rectangles (rows x op.source) do not overlap each other, and the remainder has no
    entry inside them (checked here): so |M| is the terms' |K| beside |R|, and an entry of M is
    either a kernel's or the remainder's."""

    shape: tuple[int, int]
    terms: tuple[Term, ...]
    remainder: sp.csr_array

    def __post_init__(self) -> None:
        rows, columns = self.shape
        if self.remainder.shape != self.shape:
            raise ShapeError(f"structured matrix {self.shape}: its remainder has shape {self.remainder.shape}")
        rectangles = []
        for term in self.terms:
            op, source = term.op, term.op.source
            out_size, in_size = term_shape(op)
            if not (0 <= term.rows.start <= term.rows.stop <= rows and 0 <= source.start <= source.stop <= columns):
                raise ShapeError(f"a term writes rows {term.rows} reading columns {source}, outside {self.shape}")
            if (term.rows.stop - term.rows.start, source.stop - source.start) != (out_size, in_size):
                raise ShapeError(
                    f"a term writes rows {term.rows} reading columns {source}, but its operator maps "
                    f"{in_size} values to {out_size}"
                )
            rectangles.append((term.rows.start, term.rows.stop, source.start, source.stop))
        rectangles.sort()
        for index, (_, r1, c0, c1) in enumerate(rectangles):
            for s0, _, d0, d1 in rectangles[index + 1 :]:
                if s0 >= r1:
                    break
                if d0 < c1 and c0 < d1:
                    raise ShapeError("the terms of a structured matrix overlap (rows and columns shared)")
        if self.terms and _covered(self.remainder, self.terms).any():
            raise ShapeError("the remainder of a structured matrix has entries where a term writes")

    @classmethod
    def plain(cls, matrix: sp.csr_array) -> StructuredMatrix:
        """A CSR matrix as a structured one without terms."""
        return cls(tuple(matrix.shape), (), matrix)

    @property
    def dtype(self) -> np.dtype:
        return self.remainder.dtype

    @property
    def nnz(self) -> int:
        """The non-zeros of ``to_csr()``, counted from the geometry."""
        return int(self.remainder.nnz) + sum(_term_nonzeros(term.op) for term in self.terms)

    @property
    def stored_bytes(self) -> int:
        """Bytes held: the remainder's arrays and the terms' weights."""
        remainder = self.remainder
        stored = remainder.data.nbytes + remainder.indices.nbytes + remainder.indptr.nbytes
        return stored + sum(term.op.weight.nbytes for term in self.terms)

    def csr_bytes(self) -> int:
        """Bytes the CSR of ``to_csr`` holds (values, int32 or int64 column indices, row pointers)."""
        nnz, index = self.nnz, 4 if max(self.nnz, *self.shape) < np.iinfo(np.int32).max else 8
        return nnz * (self.dtype.itemsize + index) + (self.shape[0] + 1) * index

    def astype(self, dtype) -> StructuredMatrix:
        terms = tuple(Term(term.rows, replace(term.op, weight=term.op.weight.astype(dtype))) for term in self.terms)
        return StructuredMatrix(self.shape, terms, self.remainder.astype(dtype))

    def is_finite(self) -> bool:
        return bool(np.isfinite(self.remainder.data).all()) and all(
            np.isfinite(term.op.weight).all() for term in self.terms
        )

    def with_columns(self, columns: sp.csr_array) -> StructuredMatrix:
        """[M columns]: the extra columns appended to the remainder (the terms stay)."""
        remainder = sp.hstack([self.remainder, columns], format="csr")
        return StructuredMatrix((self.shape[0], self.shape[1] + columns.shape[1]), self.terms, remainder)

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
            result[term.op.source] += term.op.apply_adjoint(Y[term.rows])
        return result

    def abs(self) -> StructuredMatrix:
        """|M|: the terms with |weight|, the remainder with |entries|."""
        terms = tuple(Term(term.rows, replace(term.op, weight=np.abs(term.op.weight))) for term in self.terms)
        return StructuredMatrix(self.shape, terms, abs(self.remainder))

    def row_nnz(self) -> np.ndarray:
        """The stored entries of each row of ``to_csr()``, (rows,) int64, from the geometry."""
        counts = np.diff(self.remainder.indptr).astype(np.int64)
        for term in self.terms:
            pattern = replace(term.op, weight=(term.op.weight != 0).astype(np.float64))
            counts[term.rows] += np.rint(pattern.apply(np.ones((term_shape(term.op)[1], 1)))[:, 0]).astype(np.int64)
        return counts

    def row_chunks(self, entries: int) -> Iterator[tuple[slice, sp.csr_array]]:
        """(rows, ``to_csr(rows)``) for consecutive runs of rows of about ``entries`` entries each
        (at least one row): the CSR a part at a time, never whole. Without terms, the remainder
        in one piece (it is the CSR already)."""
        if not self.terms:
            yield slice(0, self.shape[0]), self.remainder
            return
        ends = np.cumsum(self.row_nnz())
        row = 0
        while row < self.shape[0]:
            done = ends[row - 1] if row else 0
            stop = min(max(int(np.searchsorted(ends, done + entries, side="right")), row + 1), self.shape[0])
            yield slice(row, stop), self.to_csr(slice(row, stop))
            row = stop

    def to_csr(self, rows: slice | None = None) -> sp.csr_array:
        """The matrix, or its rows ``rows`` (a slice of step 1), as CSR, exactly (each term's
        entries are the kernel's, placed by geometry; no entry is summed, as the terms and the
        remainder do not overlap)."""
        start, stop, _ = (rows or slice(0, self.shape[0])).indices(self.shape[0])
        stop = max(start, stop)
        remainder = self.remainder if rows is None else self.remainder[start:stop]
        if not self.terms:
            return remainder
        coo = remainder.tocoo()
        entries = [(coo.row, coo.col, coo.data)]
        for term in self.terms:
            first, last = max(start, term.rows.start), min(stop, term.rows.stop)
            if first < last:
                term_rows, term_columns, term_values = _term_entries(
                    term.op, first - term.rows.start, last - term.rows.start
                )
                entries.append((term_rows + first - start, term_columns, term_values))
        row_indices, column_indices, values = (np.concatenate(part) for part in zip(*entries))
        coo = sp.coo_array(
            (values.astype(self.dtype, copy=False), (row_indices, column_indices)), shape=(stop - start, self.shape[1])
        )
        csr = coo.tocsr()
        csr.sum_duplicates()
        return csr


def lift(model):
    """``model`` with B and A as structured matrices: each block's convolutions and dense
    products found by ``runtime.structured.structured_block`` (exact, or not taken), the rest
    remainder; C and D stay plain. The materialized model equals ``model`` exactly."""
    from .model import ImplicitModel
    from .runtime.structured import structured_block, tensor_sources

    p, n = model.p, model.n
    sources = tensor_sources(model)
    terms_B, terms_A = [], []
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
    B = StructuredMatrix((n, p), tuple(terms_B), _without_terms(model.B, terms_B))
    A = StructuredMatrix((n, n), tuple(terms_A), _without_terms(model.A, terms_A))
    return ImplicitModel(A, B, model.C, model.D, model.bias_x, model.bias_y, model.blocks, model.inputs, model.outputs)


def term_shape(op: Operator) -> tuple[int, int]:
    """(rows written, columns read) of a term's operator."""
    if isinstance(op, Dense):
        return op.weight.shape
    return int(np.prod(op.out_shape)), int(np.prod(op.in_shape))


def _covered(matrix: sp.csr_array, terms) -> np.ndarray:
    """A mask of ``matrix``'s stored entries that lie in some term's rectangle (each term reads
    only the entries of its own rows)."""
    covered = np.zeros(matrix.nnz, dtype=bool)
    for term in terms:
        source = term.op.source
        first, last = matrix.indptr[term.rows.start], matrix.indptr[term.rows.stop]
        columns = matrix.indices[first:last]
        covered[first:last] |= (columns >= source.start) & (columns < source.stop)
    return covered


def _without_terms(matrix: sp.csr_array, terms: list[Term]) -> sp.csr_array:
    """``matrix`` with the entries each term accounts for (its rows x its source columns) dropped."""
    matrix = sp.csr_array(matrix, copy=True)
    matrix.sum_duplicates()
    matrix.data[_covered(matrix, terms)] = 0
    matrix.eliminate_zeros()
    return matrix


def _term_entries(op: Operator, first: int = 0, last: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, columns, values) of the term's non-zeros in its rows first:last, the rows counted
    from ``first``."""
    last = term_shape(op)[0] if last is None else last
    if isinstance(op, Dense):
        rows, columns = np.nonzero(op.weight[first:last])
        return rows, columns + op.source.start, op.weight[first:last][rows, columns]
    if isinstance(op, TransposedConvolution):  # M^T's entries: M's, transposed
        columns, rows, values = _convolution_entries(op.adjoint, slice(0, term_shape(op)[1]), slice(first, last))
    else:
        rows, columns, values = _convolution_entries(op, slice(first, last), slice(0, term_shape(op)[1]))
    return rows - first, columns + op.source.start, values


def _taps(op: Convolution) -> tuple[np.ndarray, ...]:
    """(co, c, i, j, K[co, c, i, j]) of a convolution's non-zero kernel entries, c counted over
    all input channels (its group's)."""
    (C, _, _), (Co, _, _) = op.in_shape, op.out_shape
    weight = op.weight.reshape(Co, C // op.groups, *op.kernel)
    co, c, i, j = np.nonzero(weight)
    return co, c + co // (Co // op.groups) * (C // op.groups), i, j, weight[co, c, i, j]


def _convolution_entries(op: Convolution, rows: slice, columns: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, columns, values) of a convolution's non-zeros inside rows x columns (counted from
    0, not from op.source), expanded from the taps of the channels those reach only."""
    (_, H, W), (_, Ho, Wo) = op.in_shape, op.out_shape
    co, c, i, j, values = _taps(op)
    wanted = (co >= rows.start // (Ho * Wo)) & (co * Ho * Wo < rows.stop)
    wanted &= (c >= columns.start // (H * W)) & (c * H * W < columns.stop)
    co, c, i, j, values = co[wanted], c[wanted], i[wanted], j[wanted], values[wanted]
    h = op.stride[0] * np.arange(Ho)[:, None] + op.dilation[0] * i[None, :] - op.pads[0]  # (Ho, taps)
    w = op.stride[1] * np.arange(Wo)[:, None] + op.dilation[1] * j[None, :] - op.pads[1]  # (Wo, taps)
    inside = ((h >= 0) & (h < H))[:, None, :] & ((w >= 0) & (w < W))[None, :, :]  # (Ho, Wo, taps)
    out_h, out_w, tap = np.nonzero(inside)
    entry_rows = (co[tap] * Ho + out_h) * Wo + out_w
    entry_columns = (c[tap] * H + h[out_h, tap]) * W + w[out_w, tap]
    kept = (entry_rows >= rows.start) & (entry_rows < rows.stop)
    kept &= (entry_columns >= columns.start) & (entry_columns < columns.stop)
    return entry_rows[kept], entry_columns[kept], values[tap][kept]


def _term_nonzeros(op: Operator) -> int:
    if isinstance(op, Dense):
        return int(np.count_nonzero(op.weight))
    if isinstance(op, TransposedConvolution):
        op = op.adjoint
    (C, H, W), (Co, Ho, Wo) = op.in_shape, op.out_shape
    kh, kw = op.kernel
    nonzero = op.weight.reshape(Co, C // op.groups, kh, kw) != 0
    reach_h = _reach(Ho, H, op.stride[0], op.dilation[0], op.pads[0], kh)
    reach_w = _reach(Wo, W, op.stride[1], op.dilation[1], op.pads[1], kw)
    return int((nonzero * reach_h[:, None] * reach_w[None, :]).sum())


def convolution_adjoint(convolution: Convolution, Y: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """M^T Y for M the convolution (Co Ho Wo, C H W) and a dense Y (Co Ho Wo, r), in the dtype
    of Y and the kernel (float32 stays float32), into ``out`` (C-contiguous) when given: one
    GEMM K^T Y per chunk of columns (C kh kw, Ho Wo r) (per group: np.matmul of (g, C / g kh kw,
    Co / g) by (g, Co / g, Ho Wo r)), then each tap's plane added at its strided window of the
    padded image (col2im), the pads cut off. ``rmatvec``'s product and a transposed
    convolution's (``TransposedConvolution``): the sensitivity of ResNet-18 at 32 x 32 took
    15.4 s with ``convolution_transposed``'s loops (10.6 s of it in them), 3.9 s so (6.5 s from
    the CSR). (CROWN's products, mostly zero, keep the skipping loops.)"""
    (C, H, W), (Co, Ho, Wo) = convolution.in_shape, convolution.out_shape
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = (
        convolution.kernel,
        convolution.stride,
        convolution.dilation,
        convolution.pads,
    )
    rows, groups, dtype = Y.shape[1], convolution.groups, np.result_type(Y, convolution.weight)
    weight = convolution.weight.astype(dtype, copy=False)
    weight_t = weight.reshape(groups, Co // groups, -1).transpose(0, 2, 1)  # (g, C / g kh kw, Co / g)
    height = max(ph + H, (Ho - 1) * sh + (kh - 1) * dh + 1)
    width = max(pw + W, (Wo - 1) * sw + (kw - 1) * dw + 1)
    result = np.empty((C * H * W, rows), dtype=dtype) if out is None else out
    image = result.reshape(C, H, W, rows)
    step = max(1, min(rows, ADJOINT_CHUNK_BYTES // max(1, dtype.itemsize * C * kh * kw * Ho * Wo)))
    for first in range(0, rows, step):
        last = min(rows, first + step)
        part = np.ascontiguousarray(Y[:, first:last], dtype=dtype).reshape(groups, Co // groups, -1)
        cols = np.empty((groups, weight_t.shape[1], part.shape[2]), dtype=dtype)
        cols = matmul(weight_t, part, cols).reshape(C, kh, kw, Ho, Wo, last - first)
        padded = np.zeros((C, height, width, last - first), dtype=dtype)
        for i in range(kh):
            for j in range(kw):
                window = padded[:, i * dh : i * dh + (Ho - 1) * sh + 1 : sh, j * dw : j * dw + (Wo - 1) * sw + 1 : sw]
                window += cols[:, i, j]
        image[..., first:last] = padded[:, ph : ph + H, pw : pw + W]
    return result


def convolution_transposed(convolution: Convolution, T: np.ndarray, segment: int) -> np.ndarray:
    """M^T @ T for M the convolution (Co Ho Wo, C H W), ungrouped (``runtime.structured``'s
    ``find_convolution`` finds no other): T (Co Ho Wo, r) -> (C H W, r), by
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
