"""One sample in one compiled call: an acyclic model's forward pass as a program.

At batch 1 a small network is a few hundred thousand multiply-adds, tens of microseconds; run
step by step from Python (a BLAS product per convolution, a numba call per chain of blocks,
scipy for y) the calls cost more than the arithmetic (LeNet-5: 150 us in all). So the execution
order of an acyclic model is compiled once into a table of operations on one array

    values = [u; x; y]   (p + n + q values, then ``SLACK``)

and ``Program.run`` executes the whole table in one numba call (LeNet-5: 28 us):

    CONV      values[t : t + Co Ho Wo] (=|+=) conv(K, values[s : s + C H W])   (then relu)
    DENSE     values[t : t + m] (=|+=) W values[s : s + k]                      (then relu)
    CSR       values[t : t + m] += M values     (remainders; y += [D C] [u; x])
    ACTIVATE  values[t : t + m] = phi(values[t : t + m])
    ELL       values[t + r] = phi(b_r + sum_k E[k, r] values[J[k, r]])    (short rows)
    SPARSE    values[p + i] = phi(b_i + B_i u + A_i x)    (other rows: the model's CSR)
    BIAS      values[t : t + m] = b

A block found structured (``structured``: convolutions and dense products read off its rows of
[B A], exactly the same linear map) is its terms, the first starting from the bias, the last
applying relu as it stores; a remainder (a residual identity) is a CSR operation. Other blocks
are ELL when their rows are short (pooling trees, sums: lanes of rows at once, the inputs
gathered), SPARSE otherwise. A structured model's blocks take their terms from
``model.structure`` (a term cut by a block's bounds writes from its row in the block, the bias
then an operation of its own), its other blocks and ``[D C]`` read the remainders, and y adds
C's and D's terms.

A direct convolution holds, for 4 output channels, two vectors of an output plane (two rows,
or two parts of a wide row) in registers (``simd``) and adds each kernel tap as

    acc[co, ho, wo : wo + lanes] += K[co, c, i, j] * image[c, ho s_h + i d_h, wo s_w + j d_w]

one load of the image feeding 4 multiply-adds. The image is read in place, or from a copy with
the pads written as zeros and, for a stride s_w > 1, each row split in s_w phases (columns
w = s_w q + r at r W_q + q): the columns an output row reads for one tap are then contiguous.
A dense product holds 4 vectors of output rows and adds W^T[k] * values[s + k] for each k.

``sample_tiles`` runs the same table on a batch, the samples as the vector lanes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from ..structure import _term_entries
from . import kernels
from .structured import Convolution, Dense, Operator, Part, StructuredBlock, TransposedConvolution, shifted, term_rows

SPARSE, BIAS, CONV, DENSE, CSR, ACTIVATE, ELL = range(7)
OP_FIELDS = 24  # columns of the operation table; an operation uses its first few
CHANNELS = 4  # output channels per register tile of a convolution (accumulators a0..a3)
DENSE_VECTORS = 4  # vectors of output rows per register tile of a dense product
# A block whose rows have at most ELL_WIDTH entries, together at least ELL_FILL of that many,
# runs as ELL: lanes of rows at once, each entry gathered (pooling trees, sums, identities).
ELL_WIDTH = 8
ELL_FILL = 0.5
ELL_ROWS = 16  # ELL arrays pad the rows to a multiple of this (the widest vector's lanes)
# Slack after ``values``, ``floats`` and ``scratch``: a vector load near an end may read (never
# keep) values past it: at most a dense tile (4 vectors of at most 16 values), so 256 is ample.
SLACK = 256


@dataclass(frozen=True)
class Program:
    """An acyclic model's forward pass for one sample (see the module docstring).

    Attributes:
        operations: (operations, OP_FIELDS) int64, one row per operation: its code, then fields.
        floats: weights, biases and alphas the operations read, in the model's dtype.
        csr_indptr, csr_columns, csr_data: the CSR matrices of the CSR operations, one after
            another; row pointers are positions in csr_columns / csr_data (uint64), columns
            are positions in values.
        ell_columns: the columns (positions in values) of the ELL operations, uint32.
        matrices: the model's A and B (a structured model's remainders: the rows of blocks
            without terms are whole there) as (indptr, indices, data) each, indices unsigned
            (see ``kernels.unsigned``): SPARSE operations read the model's rows where they are.
        scratch_size: floats of the scratch array (padded copies of images).
        p, n, q: the model's sizes.
        entries: multiply-adds per sample; sparse_entries: those of SPARSE operations (rows
            read one by one from the model's CSR).
    """

    operations: np.ndarray
    floats: np.ndarray
    csr_indptr: np.ndarray
    csr_columns: np.ndarray
    csr_data: np.ndarray
    ell_columns: np.ndarray
    matrices: tuple[np.ndarray, ...]
    scratch_size: int
    p: int
    n: int
    q: int
    entries: int
    sparse_entries: int

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """New (values, scratch) arrays for ``run``: values holds p + n + q and the slack."""
        size = self.p + self.n + self.q + SLACK
        return np.zeros(size, dtype=self.floats.dtype), np.zeros(self.scratch_size, dtype=self.floats.dtype)

    def run(self, values: np.ndarray, scratch: np.ndarray) -> None:
        """Fill values[p : p + n + q] = [x; y] from values[:p] = u (one sample)."""
        _run(
            self.operations, self.floats, self.csr_indptr, self.csr_columns, self.csr_data, self.ell_columns,
            *self.matrices,
            values, scratch, self.p,
        )  # fmt: skip


class _Builder:
    """Collects operations, floats and CSR matrices."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self.operations: list[list[int]] = []
        self.floats: list[np.ndarray] = []
        self.float_count = 0
        self.indptr: list[np.ndarray] = []
        self.columns: list[np.ndarray] = []
        self.data: list[np.ndarray] = []
        self.entry_count = 0
        self.indptr_count = 0
        self.scratch_size = 0
        self.ell_columns: list[np.ndarray] = []
        self.ell_count = 0
        self.entries = 0  # multiply-adds per sample
        self.sparse_entries = 0  # of which SPARSE operations

    def add(self, code: int, *fields: int) -> None:
        self.operations.append([code, *map(int, fields)] + [0] * (OP_FIELDS - 1 - len(fields)))

    def put(self, array: np.ndarray) -> int:
        """Store floats; return their offset."""
        offset = self.float_count
        self.floats.append(np.ascontiguousarray(array, dtype=self.dtype).ravel())
        self.float_count += self.floats[-1].size
        return offset

    def put_csr(self, matrix: sp.csr_array, columns: np.ndarray) -> int:
        """Store a CSR matrix whose column k is values[columns[k]]; return its indptr offset."""
        offset = self.indptr_count
        self.indptr.append(matrix.indptr.astype(np.uint64) + np.uint64(self.entry_count))
        self.columns.append(columns[matrix.indices].astype(np.uint64))
        self.data.append(matrix.data.astype(self.dtype))
        self.entry_count += matrix.nnz
        self.entries += matrix.nnz
        self.indptr_count += matrix.shape[0] + 1
        return offset

    def put_ell(self, matrix: sp.csr_array, width: int) -> tuple[int, int, int]:
        """Store a CSR matrix (columns: positions in values) as ELL arrays (width, padded rows):
        entry t of row r at [t, r], missing entries 0 reading values[0]. Returns the offsets
        of the columns and of the data, and the padded row count."""
        rows = matrix.shape[0]
        padded = -(-rows // ELL_ROWS) * ELL_ROWS
        lengths = np.diff(matrix.indptr)
        row = np.repeat(np.arange(rows), lengths)
        entry = np.arange(matrix.nnz) - np.repeat(matrix.indptr[:-1], lengths)
        columns = np.zeros((width, padded), dtype=np.uint32)
        data = np.zeros((width, padded), dtype=self.dtype)
        columns[entry, row] = matrix.indices
        data[entry, row] = matrix.data
        offset = self.ell_count
        self.entries += matrix.nnz
        self.ell_columns.append(columns.ravel())
        self.ell_count += columns.size
        return offset, self.put(data), padded

    def program(self, model) -> Program:
        table = np.array(self.operations, dtype=np.int64).reshape(-1, OP_FIELDS)
        slack = np.zeros(SLACK, dtype=self.dtype)
        return Program(
            operations=table,
            floats=np.concatenate([*self.floats, slack]),
            csr_indptr=np.concatenate([*self.indptr, np.zeros(1, np.uint64)]),
            csr_columns=np.concatenate([*self.columns, np.zeros(1, np.uint64)]),
            csr_data=np.concatenate([*self.data, np.zeros(1, self.dtype)]),
            ell_columns=np.concatenate([*self.ell_columns, np.zeros(ELL_ROWS, np.uint32)]),
            matrices=tuple(
                array
                for M in (model.structure.A.remainder, model.structure.B.remainder)
                for array in (kernels.unsigned(M.indptr), kernels.unsigned(M.indices), M.data)
            ),
            scratch_size=self.scratch_size + SLACK,
            p=model.p,
            n=model.n,
            q=model.q,
            entries=self.entries,
            sparse_entries=self.sparse_entries,
        )


def build_program(model, steps, outputs: bool = True) -> Program | None:
    """The program of ``steps`` (``solve._execution_steps(model, structured=True)``), then y
    unless not ``outputs``; None when a step is cyclic (fixed-point iteration stays in
    ``solve``) or has no operations here (a convolution cut inside a channel, ``Part``)."""
    if any(step.cyclic for step in steps) or not kernels.available():
        return None
    build = _Builder(model.dtype)
    for step in steps:
        if isinstance(step, StructuredBlock):
            if not _structured(build, step):
                return None
        elif hasattr(step, "groups"):  # a chain of blocks read straight from the model's CSR
            for k in range(len(step.starts)):
                first = int(step.states[step.starts[k]])
                last = int(step.states[step.stops[k] - 1]) + 1
                _sparse_block(build, model, first, last, step.codes[k], step.alphas[k], step.betas[k])
        else:
            return None
    if not outputs:
        return build.program(model)
    p, n, q = model.p, model.n, model.q
    build.add(BIAS, p + n, q, build.put(model.bias_y))
    structure = model.structure
    output = sp.hstack([structure.D.remainder, structure.C.remainder], format="csr")  # [D C] [u; x]
    if output.nnz:
        build.add(CSR, p + n, q, build.put_csr(output, np.arange(p + n)))
    for matrix, offset in ((structure.D, 0), (structure.C, p)):  # y's terms (a final Gemm kept dense)
        if any(not _computed(term.op) for term in matrix.terms):
            return None
        for term in matrix.terms:
            _term(build, p + n + term.rows.start, shifted(term.op, offset), bias=-1, relu=0)
    return build.program(model)


def _sparse_block(build: _Builder, model, first: int, last: int, code: int, alpha: float, beta: float) -> None:
    """States first:last, rows of the model's A and B (of their remainders: the rows of a block
    without terms): as ELL when their rows are short."""
    bias, alpha_offset = build.put(model.bias_x[first:last]), build.put(np.array([alpha, beta]))
    A, B = model.structure.A.remainder, model.structure.B.remainder  # (whole rows: a block without terms)
    rows = sp.hstack([B[first:last], A[first:last]], format="csr")  # columns: [u; x]
    width = int(np.diff(rows.indptr).max(initial=0))
    small = model.p + model.n + model.q < 2**32
    if small and 0 < width <= ELL_WIDTH and rows.nnz >= ELL_FILL * width * (last - first):
        columns, data, padded = build.put_ell(rows, width)
        build.add(ELL, model.p + first, last - first, width, columns, data, bias, code, alpha_offset, padded)
    else:
        build.add(SPARSE, first, last, bias, code, alpha_offset)
        build.entries += rows.nnz
        build.sparse_entries += rows.nnz


def _structured(build: _Builder, block: StructuredBlock) -> bool:
    """A block's operations: the first term starts from the bias, and the last applies relu as
    it stores (or identity); what else there is gets its own operation. When the first term
    writes only some rows (a ``Part``: a term cut by the block's bounds), the bias is an
    operation of its own. False for a term no operation computes (a convolution cut inside a
    channel, a transposed convolution)."""
    if any(isinstance(term, Part) and term.taken != slice(0, term_rows(term.op)) for term in block.terms):
        return False
    if not all(_computed(term.op if isinstance(term, Part) else term) for term in block.terms):
        return False
    target, size = block.rows.start, block.rows.stop - block.rows.start
    code = kernels.ACTIVATION_CODES[block.activation.name]
    whole_first, whole_last = (bool(block.terms) and not isinstance(block.terms[i], Part) for i in (0, -1))
    fused_activation = block.remainder is None and (code == 0 or (code == 1 and whole_last))
    if not whole_first:
        build.add(BIAS, target, size, build.put(block.bias))
    for index, term in enumerate(block.terms):
        bias = build.put(block.bias) if index == 0 and whole_first else -1
        relu = int(fused_activation and code == 1 and index == len(block.terms) - 1)
        op, at = (term.op, term.at) if isinstance(term, Part) else (term, 0)
        _term(build, target + at, op, bias, relu)
    if block.remainder is not None:
        build.add(CSR, target, size, build.put_csr(block.remainder.tocsr(), block.remainder_columns))
    if not fused_activation:
        parameters = np.array([block.activation.alpha or 0.0, block.activation.beta or 0.0])
        build.add(ACTIVATE, target, size, code, build.put(parameters))
    return True


def _computed(op: Operator) -> bool:
    """Whether an operation computes op (a transposed convolution has none)."""
    return not isinstance(op, TransposedConvolution)


def _term(build: _Builder, target: int, op: Convolution | Dense, bias: int, relu: int) -> None:
    """values[target : target + rows] (= bias |+=) op(values[op.source]) (then relu). A grouped
    convolution is a convolution per group, each writing its output channels from its input
    channels (and its part of the bias); one of fewer than ``CHANNELS`` output channels per
    group (depthwise) is its entries as a CSR operation (``_term_rows``)."""
    if isinstance(op, Convolution) and op.groups > 1 and op.out_shape[0] // op.groups < CHANNELS:
        _term_rows(build, target, op, bias, relu)
    elif isinstance(op, Convolution):
        (C, H, W), (Co, Ho, Wo), groups = op.in_shape, op.out_shape, op.groups
        rows, columns = Co // groups * Ho * Wo, C // groups * H * W
        for g in range(groups):
            group = replace(
                op,
                source=slice(op.source.start + g * columns, op.source.start + (g + 1) * columns),
                in_shape=(C // groups, H, W),
                out_shape=(Co // groups, Ho, Wo),
                weight=op.weight[g * (Co // groups) : (g + 1) * (Co // groups)],
                groups=1,
            )
            _convolution(build, target + g * rows, group, bias if bias < 0 else bias + g * rows, relu)
    else:
        weights = build.put(op.weight.T)  # (k, m): one row per input
        m, k = op.weight.shape
        build.add(DENSE, target, op.source.start, weights, m, k, bias, relu)
        build.entries += m * k


def _term_rows(build: _Builder, target: int, op: Convolution, bias: int, relu: int) -> None:
    """``_term`` by op's entries (its rows of the CSR, from the geometry): a depthwise
    convolution as CONV operations would fill one channel of each register tile of ``CHANNELS``
    (onnx's light ShuffleNet at 224, float32, batch 16 by tiles, 2 busy cores: 395 ms with a
    CONV operation per group, 300 ms as rows; batch 1: 62 ms, 16-20 ms)."""
    rows, columns, values = _term_entries(op)
    size, width = term_rows(op), op.source.stop - op.source.start
    matrix = sp.csr_array((values, (rows, columns - op.source.start)), shape=(size, width))
    if bias >= 0:
        build.add(BIAS, target, size, bias)
    build.add(CSR, target, size, build.put_csr(matrix, np.arange(op.source.start, op.source.stop)))
    if relu:
        build.add(ACTIVATE, target, size, kernels.ACTIVATION_CODES["relu"], build.put(np.zeros(2)))


def _convolution(build: _Builder, target: int, term: Convolution, bias: int, relu: int) -> None:
    (C, H, W), (Co, Ho, Wo) = term.in_shape, term.out_shape
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = term.kernel, term.stride, term.dilation, term.pads
    # the padded image: pads before, and after as far as the last window reaches
    Hp = max(H + ph, (Ho - 1) * sh + dh * (kh - 1) + 1)
    Wp = max(W + pw, (Wo - 1) * sw + dw * (kw - 1) + 1)
    Wq = -(-Wp // sw)  # the width of each of the sw phases
    if (ph, pw, Hp, Wp, sw) != (0, 0, H, W, 1):
        build.scratch_size = max(build.scratch_size, C * Hp * sw * Wq)
    weights = build.put(term.weight)  # (Co, C kh kw)
    by_tap = build.put(term.weight.T)  # (C kh kw, Co): the layout of ``sample_tiles``
    build.entries += term.weight.size * Ho * Wo
    geometry = (kh, kw, sh, sw, dh, dw, ph, pw, Hp, Wq)
    build.add(CONV, target, term.source.start, weights, C, H, W, Co, Ho, Wo, *geometry, bias, relu, by_tap)


if kernels.available():
    import numba

    from .kernels import phi
    from .simd import vfma, vgather, vlanes, vload, vload_first, vrelu, vstore_first

    _options = dict(cache=True, nogil=True, _nrt=False, fastmath={"contract", "reassoc"})

    @numba.njit(**_options)
    def _run(  # pragma: no cover - jitted
        operations, floats, csr_indptr, csr_columns, csr_data, ell_columns,
        a_indptr, a_indices, a_data, b_indptr, b_indices, b_data, values, scratch, p,
    ):  # fmt: skip
        """The operation table, row by row, on values = [u; x; y] (see the module docstring)."""
        for k in range(operations.shape[0]):
            op = operations[k]
            code = op[0]
            if code == SPARSE:
                _sparse(op, floats, a_indptr, a_indices, a_data, b_indptr, b_indices, b_data, values, p)
            elif code == BIAS:
                _copy(floats, op[3], values, op[1], op[2])
            elif code == CONV:
                _convolve(op, floats, values, scratch)
            elif code == DENSE:
                _dense(op, floats, values)
            elif code == CSR:
                _csr(op, csr_indptr, csr_columns, csr_data, values)
            elif code == ACTIVATE:
                _activate(values, op[1], op[2], op[3], floats[op[4]], floats[op[4] + 1])
            elif code == ELL:
                _ell(op, floats, ell_columns, values)

    @numba.njit(**_options)
    def _ell(op, floats, ell_columns, values):  # pragma: no cover - jitted
        """values[t + r] = phi(b_r + sum_k data[k, r] values[columns[k, r]]), lanes of rows at
        once, the values gathered."""
        target, rows, width, columns, data = op[1], op[2], op[3], op[4], op[5]
        bias, code, alpha, padded = op[6], op[7], op[8], op[9]
        lanes = vlanes(values)
        for r in range(0, rows, lanes):
            accumulator = vload_first(floats, bias, r, rows - r)
            for k in range(width):
                gathered = vgather(values, ell_columns, columns + k * padded + r)
                accumulator = vfma(accumulator, gathered, vload(floats, data + k * padded, r))
            if code == 1:
                accumulator = vrelu(accumulator)
            vstore_first(values, target, r, accumulator, rows - r)
        if code > 1:
            _activate(values, target, rows, code, floats[alpha], floats[alpha + 1])

    @numba.njit(inline="always", **_options)
    def _copy(source, start, target, first, size):  # pragma: no cover - jitted
        """target[first : first + size] = source[start : start + size], a vector at a time."""
        lanes = vlanes(target)
        for i in range(0, size, lanes):
            vstore_first(target, first, i, vload_first(source, start, i, size - i), size - i)

    @numba.njit(inline="always", **_options)
    def _activate(values, first, size, code, alpha, beta):  # pragma: no cover - jitted
        if code == 1:
            lanes = vlanes(values)
            for i in range(0, size, lanes):
                vstore_first(values, first, i, vrelu(vload_first(values, first, i, size - i)), size - i)
        elif code != 0:
            for i in range(first, first + size):
                values[i] = phi(values[i], code, alpha, beta)

    @numba.njit(**_options)
    def _sparse(op, floats, a_indptr, a_indices, a_data, b_indptr, b_indices, b_data, values, p):  # pragma: no cover
        """values[p + i] = phi(b_i + B_i u + A_i x) for the block's rows i (the model's CSR)."""
        first, last, bias, code, alpha, beta = op[1], op[2], op[3], op[4], floats[op[5]], floats[op[5] + 1]
        state = np.uint64(p)
        reads_u = b_indptr[np.uint64(first)] != b_indptr[np.uint64(last)]
        for i in range(first, last):
            row = np.uint64(i)
            total = floats[bias + i - first]
            if reads_u:
                for k in range(b_indptr[row], b_indptr[row + 1]):
                    total += b_data[k] * values[b_indices[k]]
            for k in range(a_indptr[row], a_indptr[row + 1]):
                total += a_data[k] * values[state + a_indices[k]]
            values[state + row] = total
        _activate(values, p + first, last - first, code, alpha, beta)

    @numba.njit(inline="always", **_options)
    def _csr(op, csr_indptr, csr_columns, csr_data, values):  # pragma: no cover - jitted
        target, rows, offset = op[1], op[2], op[3]
        for r in range(rows):
            total = values[target + r]
            for k in range(csr_indptr[offset + r], csr_indptr[offset + r + 1]):
                total += csr_data[k] * values[csr_columns[k]]
            values[target + r] = total

    @numba.njit(inline="always", **_options)
    def _start(floats, bias, values, target, offset, first, count):  # pragma: no cover - jitted
        """An accumulator's first value, count lanes from ``first`` on at ``offset`` in the
        block: the bias (bias >= 0: its offset in floats) or what values[target:] holds."""
        if bias >= 0:
            return vload_first(floats, bias + offset, first, count)
        return vload_first(values, target + offset, first, count)

    @numba.njit(inline="always", **_options)
    def _finish(values, target, first, accumulator, count, relu):  # pragma: no cover - jitted
        if relu:
            accumulator = vrelu(accumulator)
        vstore_first(values, target, first, accumulator, count)

    @numba.njit(**_options)
    def _dense(op, floats, values):  # pragma: no cover - jitted
        """values[t : t + m] += W values[s : s + k], W^T stored (k, m) at floats[w]."""
        target, source, w, m, k, bias, relu = op[1], op[2], op[3], op[4], op[5], op[6], op[7]
        lanes = vlanes(values)
        for first in range(0, m, DENSE_VECTORS * lanes):
            a0 = _start(floats, bias, values, target, 0, first, m - first)
            a1 = _start(floats, bias, values, target, 0, first + lanes, m - first - lanes)
            a2 = _start(floats, bias, values, target, 0, first + 2 * lanes, m - first - 2 * lanes)
            a3 = _start(floats, bias, values, target, 0, first + 3 * lanes, m - first - 3 * lanes)
            for j in range(k):
                x = values[source + j]
                row = w + j * m + first
                a0 = vfma(a0, vload(floats, row, 0), x)
                a1 = vfma(a1, vload(floats, row, lanes), x)
                a2 = vfma(a2, vload(floats, row, 2 * lanes), x)
                a3 = vfma(a3, vload(floats, row, 3 * lanes), x)
            _finish(values, target, first, a0, m - first, relu)
            _finish(values, target, first + lanes, a1, m - first - lanes, relu)
            _finish(values, target, first + 2 * lanes, a2, m - first - 2 * lanes, relu)
            _finish(values, target, first + 3 * lanes, a3, m - first - 3 * lanes, relu)

    @numba.njit(**_options)
    def _convolve(op, floats, values, scratch):  # pragma: no cover - jitted
        """values[t : t + Co Ho Wo] += the convolution of values[s : s + C H W] (see above)."""
        target, source, w, C, H, W, Co, Ho, Wo = op[1], op[2], op[3], op[4], op[5], op[6], op[7], op[8], op[9]
        kh, kw, sh, sw, dh, dw = op[10], op[11], op[12], op[13], op[14], op[15]
        ph, pw, Hp, Wq, bias, relu = op[16], op[17], op[18], op[19], op[20], op[21]
        if ph == 0 and pw == 0 and Hp == H and Wq == W and sw == 1:
            image, base = values, source
        else:
            _pad(values, source, C, H, W, scratch, Hp, sw, Wq, ph, pw)
            image, base = scratch, 0
        taps = C * kh * kw
        row_length = sw * Wq  # a row of the image: its sw phases one after another
        step_place, step_phase = dw // sw, dw % sw
        lanes = vlanes(values)
        chunks = (Wo + lanes - 1) // lanes  # vectors per output row
        positions = Ho * chunks  # (row, vector) pairs of the output plane, by twos
        for c0 in range(0, Co, CHANNELS):
            # the tile's channels; past Co the last is repeated (computed, not stored)
            c1, c2, c3 = min(c0 + 1, Co - 1), min(c0 + 2, Co - 1), min(c0 + 3, Co - 1)
            w0, w1, w2, w3 = w + c0 * taps, w + c1 * taps, w + c2 * taps, w + c3 * taps
            for position in range(0, positions, 2):
                # two vectors of the plane; when their count is odd the last is done twice
                ho, first = position // chunks, position % chunks * lanes
                hp, fp = (position + 1) // chunks, (position + 1) % chunks * lanes
                if position + 1 == positions:
                    hp, fp = ho, first
                count, count_p = Wo - first, Wo - fp
                o0, o1, o2, o3 = (c0 * Ho + ho) * Wo, (c1 * Ho + ho) * Wo, (c2 * Ho + ho) * Wo, (c3 * Ho + ho) * Wo
                q0, q1, q2, q3 = (c0 * Ho + hp) * Wo, (c1 * Ho + hp) * Wo, (c2 * Ho + hp) * Wo, (c3 * Ho + hp) * Wo
                a0 = _start(floats, bias, values, target, o0, first, count)
                a1 = _start(floats, bias, values, target, o1, first, count)
                a2 = _start(floats, bias, values, target, o2, first, count)
                a3 = _start(floats, bias, values, target, o3, first, count)
                b0 = _start(floats, bias, values, target, q0, fp, count_p)
                b1 = _start(floats, bias, values, target, q1, fp, count_p)
                b2 = _start(floats, bias, values, target, q2, fp, count_p)
                b3 = _start(floats, bias, values, target, q3, fp, count_p)
                tap = 0
                for c in range(C):
                    for i in range(kh):
                        row = base + (c * Hp + ho * sh + i * dh) * row_length + first
                        row_p = base + (c * Hp + hp * sh + i * dh) * row_length + fp
                        phase, place = 0, 0  # of kernel column j: j dw = place sw + phase
                        for _ in range(kw):
                            column = phase * Wq + place
                            phase, place = phase + step_phase, place + step_place
                            if phase >= sw:
                                phase, place = phase - sw, place + 1
                            x, y = vload(image, row, column), vload(image, row_p, column)
                            k0, k1, k2, k3 = floats[w0 + tap], floats[w1 + tap], floats[w2 + tap], floats[w3 + tap]
                            a0, b0 = vfma(a0, x, k0), vfma(b0, y, k0)
                            a1, b1 = vfma(a1, x, k1), vfma(b1, y, k1)
                            a2, b2 = vfma(a2, x, k2), vfma(b2, y, k2)
                            a3, b3 = vfma(a3, x, k3), vfma(b3, y, k3)
                            tap += 1
                _finish(values, target + o0, first, a0, count, relu)
                _finish(values, target + q0, fp, b0, count_p, relu)
                if c0 + 1 < Co:
                    _finish(values, target + o1, first, a1, count, relu)
                    _finish(values, target + q1, fp, b1, count_p, relu)
                if c0 + 2 < Co:
                    _finish(values, target + o2, first, a2, count, relu)
                    _finish(values, target + q2, fp, b2, count_p, relu)
                if c0 + 3 < Co:
                    _finish(values, target + o3, first, a3, count, relu)
                    _finish(values, target + q3, fp, b3, count_p, relu)

    @numba.njit(**_options)
    def _pad(values, source, C, H, W, scratch, Hp, sw, Wq, ph, pw):  # pragma: no cover - jitted
        """scratch = the image values[source : source + C H W] with ph, pw zeros before (and
        zeros after up to Hp rows), each row split in sw phases of Wq columns: column w of a
        padded row at (w % sw) Wq + w // sw. Then the columns a stride-sw output row reads for
        one kernel column are contiguous."""
        for i in range(C * Hp * sw * Wq):
            scratch[i] = 0
        for c in range(C):
            for h in range(H):
                row, padded = source + (c * H + h) * W, (c * Hp + h + ph) * sw * Wq
                if sw == 1:
                    _copy(values, row, scratch, padded + pw, W)
                else:
                    for w in range(W):
                        scratch[padded + (w + pw) % sw * Wq + (w + pw) // sw] = values[row + w]
