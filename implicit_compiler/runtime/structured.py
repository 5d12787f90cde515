"""Structured terms of a block: convolutions and dense products found in A and B, run by BLAS.

A block's rows of [B A] read other tensors (the model's inputs and earlier blocks) through
sparse sub-matrices. Many of them are convolutions: a block shaped (Co, Ho, Wo) reading a
tensor shaped (C, H, W) with, for each non-zero,

    M[(co, ho, wo), (c, h, w)] = K[co, c, i, j]   where  h = s_h ho + d_h i - p_h,
                                                          w = s_w wo + d_w j - p_w

(kernel K, strides s, dilations d, leading pads p). Such a sub-matrix stores the kernel once
per output pixel; as a convolution it reads K once per call. ``find_convolution`` recovers
(K, s, d, p) from the sub-matrix alone, whatever ops produced it (Conv, BN folded into it,
ConvTranspose read as a convolution, pooling composed with it), and accepts it only when it
reproduces the sub-matrix exactly: every non-zero equals its kernel entry (to a few ulps) and
the count of in-bounds (output pixel, kernel entry) pairs with a non-zero kernel entry equals
the sub-matrix's non-zero count. So the structured form is the same linear map, never a guess.

With the state held as (values, batch) rows, the source tensor is (C, H, W, batch) and

    Y (Co, Ho Wo batch) = K (Co, C kh kw)  @  cols (C kh kw, Ho Wo batch)   (im2col)

is one GEMM whose result is already in the block's (Co, Ho, Wo, batch) row order. A sub-matrix
that is at least half full runs as a dense GEMM. Whatever is left (residual identities,
pooling trees, shortcuts) stays a sparse product.

A structured model (``structure.StructuredMatrix``) keeps these terms from the lowering (or
``lift``): a block takes the terms of B and A that write its rows, with no search, cut to its
rows where a term spans several blocks or part of one (``piece``, ``Part``); ``StructuredRows``
is the same for the rows of a few blocks (the scipy steps and the whole-model iteration).

What keeps it (float32 predict, 2 cores, AMD EPYC, 2026-12-07): up to ``solve.STRUCTURED_BATCH_LIMIT``
samples, ResNet20 at batch 2 / 4 / 6 took 3.3 / 4.5 / 6.0 ms against 6.4 / 6.4 / 6.7 by row
groups; LeNet-5 0.19 / 0.22 / 0.25 ms against 0.15 ms or, when the row groups' threads had to
wake, 1.2-1.7 ms (a steady time beats a bimodal one).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from ..activations import Activation
from ..arrays import sorted_unique
from ..structure import Convolution, Dense, Operator, TransposedConvolution, _reach, term_shape
from . import kernels

# A sub-matrix becomes a structured term only past this many non-zeros (smaller ones cost more
# in Python calls than they save).
MIN_STRUCTURED_NONZEROS = 2048
# Dense terms: at least this fraction of the sub-matrix is non-zero.
DENSE_FILL = 0.5
# Convolutions whose kernel is mostly zeros (grouped, depthwise) stay sparse.
KERNEL_FILL = 0.5
# A structured model's block without terms runs as a ``remainder_block`` from this many rows.
REMAINDER_BLOCK_ROWS = 65_536
# The im2col buffer of one batch chunk holds about this many bytes.
CHUNK_BYTES = 128 << 20


def _image_shape(shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    if len(shape) == 2:
        return (shape[0], 1, shape[1])
    return None


def find_convolution(
    M: sp.csr_array, source: slice, out_shape: tuple[int, ...], in_shape: tuple[int, ...]
) -> Convolution | None:
    """The convolution equal to M[:, source] (M: the block's rows of [B A], columns are rows of
    V), M's rows shaped ``out_shape`` and the source ``in_shape``; None when it is not one.

    The geometry (strides, dilations, pads, kernel size) is read off a few sample rows; the
    compiled ``kernels.gather_convolution`` then checks every entry against it."""
    out_image, in_image = _image_shape(out_shape), _image_shape(in_shape)
    if out_image is None or in_image is None or not kernels.available():
        return None
    (Co, Ho, Wo), (C, H, W) = out_image, in_image
    sample_rows = _sample_rows(Ho, Wo)
    head = M[sample_rows]
    rows = np.repeat(sample_rows, np.diff(head.indptr))
    inside = (head.indices >= source.start) & (head.indices < source.stop) & (head.data != 0)
    if not inside.any():
        return None
    rows, columns = rows[inside], head.indices[inside].astype(np.int64) - source.start
    pixel = rows % (Ho * Wo)
    geometry = []
    for position_out, position_in, size_out, size_in in (
        (pixel // Wo, columns % (H * W) // W, Ho, H),
        (pixel % Wo, columns % W, Wo, W),
    ):
        axis = _axis_geometry(position_out, position_in, size_out, size_in)
        if axis is None:
            return None
        geometry.append(axis)
    (sh, dh, ph, kh), (sw, dw, pw, kw) = geometry
    weight = np.zeros((Co, C, kh, kw), dtype=M.dtype)
    count = kernels.gather_convolution(
        M.indptr, M.indices, M.data, source.start, source.stop, (Ho, Wo, H, W), (sh, sw, dh, dw, ph, pw),
        16 * np.finfo(M.dtype).eps, weight,
    )  # fmt: skip
    if count < 0:
        return None  # an entry off the geometry, or not shift-invariant
    nonzero = weight != 0
    if nonzero.mean() < KERNEL_FILL:
        return None
    reach_h = _reach(Ho, H, sh, dh, ph, kh)
    reach_w = _reach(Wo, W, sw, dw, pw, kw)
    if int((nonzero * reach_h[:, None] * reach_w[None, :]).sum()) != count:
        return None  # a convolution would have non-zeros this sub-matrix lacks
    return Convolution(
        source=source,
        in_shape=in_image,
        out_shape=out_image,
        kernel=(kh, kw),
        stride=(sh, sw),
        dilation=(dh, dw),
        pads=(ph, pw),
        weight=np.ascontiguousarray(weight.reshape(Co, C * kh * kw)),
    )


def _sample_rows(Ho: int, Wo: int) -> np.ndarray:
    """Rows of output channel 0 at the first, second, middle and last output rows and columns:
    borders show the pads, neighbours the strides, the middle the whole kernel."""
    heights = sorted({0, min(1, Ho - 1), Ho // 2, min(Ho // 2 + 1, Ho - 1), Ho - 1})
    widths = sorted({0, min(1, Wo - 1), Wo // 2, min(Wo // 2 + 1, Wo - 1), Wo - 1})
    return np.array([h * Wo + w for h in heights for w in widths], dtype=np.int64)


def _axis_geometry(position_out: np.ndarray, position_in: np.ndarray, size_out: int, size_in: int):
    """(stride, dilation, pad, kernel size) along one spatial axis, from sample entries."""
    if size_out == 1:
        strides = [1]
    else:
        strides = list(range(1, max(1, size_in // (size_out - 1)) + 2))
    spreads = [np.ptp(position_in - stride * position_out) for stride in strides]
    stride = strides[int(np.argmin(spreads))]  # the first of equals: the smallest stride
    offsets = position_in - stride * position_out
    spread = int(spreads[strides.index(stride)])
    low = int(offsets.min())
    shifted = offsets - low
    distinct = np.flatnonzero(np.bincount(shifted))
    dilation = int(np.gcd.reduce(distinct)) if distinct.size > 1 else 1
    if low > 0 or np.any(shifted % dilation):
        return None  # leading crop or irregular offsets
    return stride, dilation, -low, spread // dilation + 1


@dataclass(frozen=True)
class Part:
    """Rows ``taken`` of op's output, written at row ``at`` on of its block: a term of a
    structured model whose rows a block boundary cuts where no smaller operator fits (a
    convolution cut inside an output channel; ``piece``)."""

    op: Operator
    taken: slice
    at: int

    @property
    def source(self) -> slice:
        return self.op.source

    @property
    def columns_per_sample(self) -> int:
        return self.op.columns_per_sample

    @property
    def rows(self) -> slice:
        """Its rows within the block."""
        return slice(self.at, self.at + self.taken.stop - self.taken.start)

    def apply(self, source: np.ndarray) -> np.ndarray:
        output = self.op.apply(source)
        return output if self.taken == slice(0, output.shape[0]) else output[self.taken]


def piece(op: Operator, first: int, last: int, at: int, size: int) -> Operator | Part:
    """Rows first:last of op's output as a term of a block of ``size`` rows, written at its row
    ``at``: the op itself when it is all of them and fills the block; a dense product's rows or
    an ungrouped convolution's whole output channels as a smaller op; else a ``Part``."""
    rows = term_rows(op)
    if isinstance(op, Dense) and (first, last) != (0, rows):
        op = Dense(op.source, op.weight[first:last])
        first, last = 0, last - first
    elif isinstance(op, Convolution) and op.groups == 1 and (first, last) != (0, rows):
        Co, Ho, Wo = op.out_shape
        plane = Ho * Wo
        if first % plane == 0 and last % plane == 0:
            channels = slice(first // plane, last // plane)
            op = replace(op, out_shape=(channels.stop - channels.start, Ho, Wo), weight=op.weight[channels])
            first, last = 0, last - first
    if (first, last, at) == (0, term_rows(op), 0) and last == size:
        return op
    return Part(op, slice(first, last), at)


def term_rows(op: Operator) -> int:
    """Rows of op's output."""
    return term_shape(op)[0]


def rows_in_block(term: Operator | Part) -> slice:
    """The rows a block's term writes, within the block (all of them for a bare op)."""
    return term.rows if isinstance(term, Part) else slice(None)


@dataclass(frozen=True)
class StructuredBlock:
    """An acyclic block computed as bias + structured terms + a sparse remainder, then phi.

    A term is an op (``Convolution``, ``TransposedConvolution``, ``Dense``) writing every row of
    the block, or a ``Part``
    writing some of them."""

    name: str
    rows: slice  # the block's rows of V
    bias: np.ndarray  # (rows, 1), or (rows, batch) with terms folded in (``cyclic``)
    terms: tuple[Operator | Part, ...]
    remainder: sp.csr_array | None  # (rows, len(remainder_columns))
    remainder_columns: np.ndarray  # rows of V the remainder reads
    activation: Activation
    work: int  # non-zeros handled by structured terms
    cyclic: bool = False
    remainder_only: bool = False  # an acyclic block without terms (``remainder_block``)
    # Whether ``finish_rows`` reads the remainder's diagonal runs as streams, found once per block
    # (``kernels.diagonal_runs``): not for a sweep's blocks, made anew for every solve (``cyclic``).
    diagonal_streams: bool = True

    def run(self, V: np.ndarray, zero_rows: np.ndarray | None = None) -> None:
        """Fill V[rows] (all samples) in place from the rows it reads; terms reading only rows
        that ``zero_rows`` (a mask of V's rows) says are zero are skipped (the first sweep of a
        cyclic component from x = 0: one product fewer per sweep of a dense loop)."""
        batch = V.shape[1]
        terms = self.terms
        if zero_rows is not None:
            terms = tuple(term for term in terms if not zero_rows[term.source].all())
        per_sample = max([term.columns_per_sample for term in terms] + [1]) * V.itemsize
        chunk = batch if batch == 1 else max(1, min(batch, CHUNK_BYTES // per_sample))
        whole_first = bool(terms) and not isinstance(terms[0], Part)
        in_place = whole_first or self.remainder_only
        if chunk == batch and in_place and not self.cyclic and V.flags.c_contiguous:
            self._run_in_place(V, terms)
            return
        for start in range(0, batch, chunk):
            samples = slice(start, min(batch, start + chunk))
            bias = self.bias if self.bias.shape[1] == 1 else self.bias[:, samples]  # (or per sample)
            if whole_first:
                Z = terms[0].apply(V[terms[0].source, samples])
            else:
                Z = np.zeros((self.rows.stop - self.rows.start, samples.stop - samples.start), dtype=V.dtype)
            for term in terms[1:] if whole_first else terms:
                Z[rows_in_block(term)] += term.apply(V[term.source, samples])
            self._finish(Z, bias, V[:, samples])
            V[self.rows, samples] = Z

    def _run_in_place(self, V: np.ndarray, terms) -> None:
        """The whole batch at once, the first term's product written straight into V[rows] (a
        C-contiguous (rows, batch) view of V; an acyclic block never reads its own rows): no
        temporary of the block's size, no copy. ResNet-18 at 224, batch 16, float32 (2 cores,
        quiet): 0.62 s by chunks of 4 MB copied into V, 0.46 s so."""
        Z = V[self.rows]
        if terms:
            terms[0].apply(V[terms[0].source], out=Z)
        else:  # (the remainder alone: ``remainder_block``)
            Z.fill(0)
        for term in terms[1:]:
            Z[rows_in_block(term)] += term.apply(V[term.source])
        self._finish(Z, self.bias, V)

    def _finish(self, Z: np.ndarray, bias: np.ndarray, values: np.ndarray) -> None:
        """Z = phi(Z + bias + remainder values[remainder_columns]) in place, in one compiled
        pass (``kernels.finish_rows``)."""
        if not kernels.available():  # (numba missing) numpy's and scipy's passes
            Z += bias
            if self.remainder is not None:
                Z += self.remainder @ values[self.remainder_columns]
            self.activation.apply_inplace(Z)
            return
        remainder = self._finish_remainder
        threaded = kernels.threaded(Z.shape[0] + self._remainder_rows[2].size, Z.shape[1])
        finish = kernels.finish_rows if threaded else kernels.finish_rows_serial
        code = kernels.ACTIVATION_CODES[self.activation.name]
        alpha, beta = (Z.dtype.type(value or 0.0) for value in (self.activation.alpha, self.activation.beta))
        flat = values.reshape(-1) if values.flags.c_contiguous else np.empty(0, values.dtype)
        finish(Z, np.ascontiguousarray(bias), remainder, values, flat, code, alpha, beta)

    @cached_property
    def _finish_remainder(self) -> tuple[np.ndarray, ...]:
        """The remainder as ``kernels.finish_rows`` reads it: its diagonals' runs as streams
        (``kernels.diagonal_runs``), or every entry by rows without ``diagonal_streams``."""
        if not self.diagonal_streams:
            return kernels.diagonal_runs(*self._remainder_rows, least_run=None)
        return kernels.diagonal_runs(*self._remainder_rows)

    @cached_property
    def _remainder_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The remainder's CSR arrays, its column indices as rows of V (unsigned: no wraparound
        test; empty when none)."""
        if self.remainder is None:
            rows = self.rows.stop - self.rows.start
            return np.zeros(rows + 1, dtype=np.int64), np.zeros(0, dtype=np.uint64), np.zeros(0, self.bias.dtype)
        remainder = self.remainder.tocsr()
        sources = self.remainder_columns[remainder.indices].astype(np.int64)
        return remainder.indptr, kernels.unsigned(sources), remainder.data


def tensor_sources(model) -> list[tuple[slice, tuple[int, ...]]]:
    """The tensors stacked in V = [u; x]: (rows of V, per-sample shape), in row order."""
    sources, offset = [], 0
    for spec in model.inputs:
        sources.append((slice(offset, offset + spec.size), spec.shape))
        offset += spec.size
    for block in sorted(model.blocks, key=lambda block: block.start):
        sources.append((slice(model.p + block.start, model.p + block.stop), block.shape))
    return sources


def structured_block(model, block, sources: list[tuple[slice, tuple[int, ...]]]) -> StructuredBlock | None:
    """The block as a ``StructuredBlock``. A structured model's block takes the terms of B and
    A that write its rows (``block_terms``) and its rows of their remainders: None when it has
    no terms (its rows are then whole in the remainders, for the sparse kernels). A plain
    model's block is searched for convolutions and dense products (``find_convolution``): None
    when they would not carry most of its non-zeros. ``sources``: ``tensor_sources(model)``."""
    if model.is_structured:
        return _block_of_terms(model, block)
    rows_A = model.A[block.start : block.stop]
    rows_B = model.B[block.start : block.stop]
    M = sp.hstack([rows_B, rows_A], format="csr")  # columns are rows of V
    if M.nnz < MIN_STRUCTURED_NONZEROS:
        return None
    M.sum_duplicates()
    starts = np.array([source.start for source, _ in sources])
    counts = np.bincount(np.searchsorted(starts, M.indices, side="right") - 1, minlength=len(sources))
    terms, structured = [], np.zeros(M.nnz, dtype=bool)
    for index in np.flatnonzero(counts >= MIN_STRUCTURED_NONZEROS):
        source, shape = sources[index]
        size_in = source.stop - source.start
        if counts[index] >= DENSE_FILL * block.size * size_in:
            term: Convolution | Dense | None = Dense(source, M[:, source].toarray())
        else:
            term = find_convolution(M, source, block.shape, shape)
        if term is not None:
            terms.append(term)
            structured |= (M.indices >= source.start) & (M.indices < source.stop)
    work = int(structured.sum())
    if not terms or work < M.nnz / 2:
        return None
    rest = M.copy()
    rest.data[structured] = 0
    rest.eliminate_zeros()
    return _assembled(model, block, terms, rest, work)


def _assembled(model, block, terms, rest: sp.csr_array, work: int) -> StructuredBlock:
    """The block of ``terms`` plus ``rest`` (its rows of [B A] the terms do not hold: columns
    are rows of V), kept on the columns it reads."""
    remainder, remainder_columns = _compressed(rest) if rest.nnz else (None, np.zeros(0, dtype=np.int64))
    return StructuredBlock(
        name=block.name,
        rows=slice(model.p + block.start, model.p + block.stop),
        bias=model.bias_x[block.start : block.stop, None],
        terms=tuple(terms),
        remainder=remainder,
        remainder_columns=remainder_columns,
        activation=block.activation,
        work=work,
    )


def block_terms(matrix, first: int, last: int, offset: int = 0) -> list[Operator | Part]:
    """The terms of a ``StructuredMatrix`` that write rows first:last, cut to those rows (as
    ``piece``s of a block of last - first rows) and reading ``offset`` + their columns (p for
    A's: rows of V)."""
    found = []
    for term in matrix.terms:
        low, high = max(first, term.rows.start), min(last, term.rows.stop)
        if low >= high:
            continue
        op = shifted(term.op, offset)
        found.append(piece(op, low - term.rows.start, high - term.rows.start, low - first, last - first))
    return found


def term_entries(term: Operator | Part) -> int:
    """Multiply-adds of a term per sample (its stored weights times the pixels they slide over:
    a transposed convolution's, the pixels it reads)."""
    if isinstance(term, Part):
        return term_entries(term.op) * (term.taken.stop - term.taken.start) // max(1, term_rows(term.op))
    if isinstance(term, Dense):
        return term.weight.size
    pixels = term.in_shape if isinstance(term, TransposedConvolution) else term.out_shape
    return term.weight.size * pixels[1] * pixels[2]


def _block_of_terms(model, block) -> StructuredBlock | None:
    """A structured model's block from its terms and its rows of the remainders (no search)."""
    structure, p = model.structure, model.p
    terms = [
        *block_terms(structure.B, block.start, block.stop),
        *block_terms(structure.A, block.start, block.stop, offset=p),
    ]
    if not terms:
        return None
    terms.sort(key=lambda term: isinstance(term, Part))  # one writing every row first: it starts Z
    return _assembled(model, block, terms, _remainder_of(model, block), sum(term_entries(term) for term in terms))


def remainder_block(model, block) -> StructuredBlock:
    """A structured model's block without terms, as a ``StructuredBlock`` of its rows of the
    remainders alone, for blocks of at least ``REMAINDER_BLOCK_ROWS`` rows: its bias, sparse
    rows and activation in one pass (``kernels.finish_rows``). ResNet-18 at 224 x 224: its max
    pool's five blocks (1.59M rows, 2-6 non-zeros each) took 79 ms at batch 16 in the chains'
    row groups, 36 ms so; at batch 1, 18.5 ms by the one-sample chain, 14 ms so."""
    return replace(_assembled(model, block, [], _remainder_of(model, block), 0), remainder_only=True)


def _remainder_of(model, block) -> sp.csr_array:
    """The block's rows of [B A]'s remainders, side by side (columns are rows of V)."""
    structure = model.structure
    return sp.hstack(
        [structure.B.remainder[block.start : block.stop], structure.A.remainder[block.start : block.stop]],
        format="csr",
    )


def shifted(op: Operator, offset: int) -> Operator:
    """op reading ``offset`` + its columns."""
    if offset == 0:
        return op
    return replace(op, source=slice(op.source.start + offset, op.source.stop + offset))


def _compressed(matrix: sp.csr_array) -> tuple[sp.csr_array, np.ndarray]:
    """The matrix restricted to the columns it reads (at least one), and those columns: each
    entry's new column looked up in a table over the span read (3.2M entries over 4M columns,
    as a pool block of ResNet-18 at 224: 0.19-0.28 s by scipy's column indexing, 0.14-0.16 s
    so, ``sorted_unique`` included)."""
    columns = sorted_unique(matrix.indices)
    position = np.zeros(columns[-1] - columns[0] + 1, dtype=np.int32 if columns.size < 2**31 else np.int64)
    position[columns - columns[0]] = np.arange(columns.size)
    indices = position[matrix.indices - columns[0]]
    return sp.csr_array((matrix.data, indices, matrix.indptr), shape=(matrix.shape[0], columns.size)), columns


@dataclass(frozen=True)
class StructuredRows:
    """Some rows of a ``StructuredMatrix`` (its blocks' rows one after another): their rows of
    the remainder (CSR) and the terms writing them, placed at ``term_rows``. ``matvec`` is
    M[rows] X; a plain matrix's rows are the CSR product alone."""

    remainder: sp.csr_array
    terms: tuple[Operator | Part, ...] = ()
    term_rows: tuple[slice, ...] = ()  # where each term writes, within the rows
    columns: int = 0

    @classmethod
    def of(cls, matrix, blocks) -> StructuredRows:
        """The rows of ``blocks`` (anything with start and stop) of ``matrix``, in that order."""
        rows = np.concatenate([np.arange(b.start, b.stop) for b in blocks]) if blocks else np.zeros(0, int)
        contiguous = all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
        first, last = (blocks[0].start, blocks[-1].stop) if blocks else (0, 0)
        remainder = matrix.remainder[first:last] if contiguous else matrix.remainder[rows]
        terms, term_rows, offset = [], [], 0
        for block in blocks:
            for term in block_terms(matrix, block.start, block.stop):
                inside = rows_in_block(term)
                start = offset + (inside.start or 0)
                stop = offset + (block.stop - block.start if inside.stop is None else inside.stop)
                terms.append(term)
                term_rows.append(slice(start, stop))
            offset += block.stop - block.start
        return cls(remainder, tuple(terms), tuple(term_rows), matrix.shape[1])

    @property
    def nnz(self) -> int:
        """Multiply-adds per sample."""
        return int(self.remainder.nnz) + sum(term_entries(term) for term in self.terms)

    def matvec(self, X: np.ndarray) -> np.ndarray:
        if not self.terms:
            return self.remainder @ X
        Y = np.asarray(self.remainder @ X, dtype=np.result_type(X, self.remainder.dtype))
        for rows, term in zip(self.term_rows, self.terms):
            Y[rows] += term.apply(X[term.source])
        return Y

    def on_columns(self, rows: slice | np.ndarray) -> StructuredRows | _Embedded:
        """The same rows restricted to the columns ``rows``: the CSR's columns, or, with terms
        (whose sources need not fall inside), the product with the vector put at those rows
        of zeros."""
        if not self.terms:
            restricted = self.remainder[:, rows]
            return StructuredRows(restricted, columns=restricted.shape[1])
        if isinstance(rows, slice) and (rows.start, rows.stop) == (0, self.columns):
            return self
        return _Embedded(self, rows)


@dataclass(frozen=True)
class _Embedded:
    """M[:, rows] x as M (x put at ``rows`` of zeros) (``StructuredRows.on_columns``)."""

    full: StructuredRows
    rows: slice | np.ndarray

    @property
    def nnz(self) -> int:
        return self.full.nnz

    def matvec(self, X: np.ndarray) -> np.ndarray:
        embedded = np.zeros((self.full.columns, X.shape[1]), dtype=X.dtype)
        embedded[self.rows] = X
        return self.full.matvec(embedded)
