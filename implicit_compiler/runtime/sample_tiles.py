"""A batch by tiles of samples: the program of ``one_sample`` with the samples as vector lanes.

The batch is cut in tiles of ``TILE_VECTORS`` vectors of samples (32 in float32), and the tiles
in one contiguous part per thread. A thread runs each of its tiles through the whole operation
table of ``one_sample.Program`` before the next one, in its own slab

    values = [u; x; y]   (p + n + q rows, tile lanes: one row per value, one lane per sample)

so what a tile reads and writes stays in the core's cache (LeNet-5: 12,812 rows x 128 bytes,
1.6 MB) and the threads need no barrier between layers; the tile's y is then copied out. (The
tiles as column ranges of one (p + n + q, batch) array were slower than the row groups: rows
1 KB apart fall into a few cache sets.) Every operation computes rows as vectors of samples:

    CONV   for an output pixel and 8 output channels, 8 x 2 accumulators; per kernel tap
           (c, i, j) inside the image, one load of the input row's lanes feeds 8 x 2
           multiply-adds with K[co, c, i, j] (stored tap by tap, channels contiguous);
    DENSE  8 output rows x 2 vectors; per input k, W^T[k, r] times the input row's lanes;
    ELL, SPARSE, CSR   a row's entries times their input rows' lanes;
    ACTIVATE, BIAS     row by row.

The weights are the compact kernels ``structured`` found (LeNet-5: 2,550 + 58,920 values), not
the rows of A (433,856 entries with their indices), so reading them again per tile is cheap.
A tile is loaded with ``kernels.transpose_into``, which also checks it for NaN and inf. Only y
comes out: ``predict`` takes this path, ``solve`` (which returns x) does not.

What keeps it (float32 predict, 2 cores, AMD EPYC, 2026-12-07, medians of two rounds): at batch
256 LeNet-5 0.77 ms by tiles against 0.97 by row groups, ResNet20 64-75 ms against 102-124.
"""

from __future__ import annotations

import numpy as np

from . import kernels
from .one_sample import ACTIVATE, BIAS, CONV, CSR, DENSE, ELL, SPARSE, Program

_1, _2, _3, _4, _5, _6, _7 = (np.uint64(k) for k in range(1, 8))  # unsigned offsets of weights
TILE_VECTORS = 2  # vectors of samples per tile (the accumulators of an operation: 8 rows x 2)
ROWS = 8  # output rows (channels) per register tile


def run_tiles(program: Program, batch: np.ndarray, work: np.ndarray, out: np.ndarray) -> float:
    """y of each sample of ``batch`` (batch, p), C-contiguous, into out (q, batch). work:
    scratch of ``work_shape``, one slab per thread. Returns the sum of 0 x the inputs:
    NaN when one is not finite."""
    checks = np.zeros(work.shape[0], dtype=work.dtype)  # one per part
    _run_tiles(
        program.operations, program.floats, program.csr_indptr, program.csr_columns, program.csr_data,
        program.ell_columns, *program.matrices, work, batch, out, program.p, program.n, checks,
    )  # fmt: skip
    return float(checks.sum())


def tile_size(dtype) -> int:
    """Samples per tile: ``TILE_VECTORS`` vectors of the dtype."""
    from .simd import VECTOR_BYTES

    return TILE_VECTORS * VECTOR_BYTES // np.dtype(dtype).itemsize


def least_batch(dtype) -> int:
    """The smallest batch worth going by tiles: a tile for every thread."""
    return tile_size(dtype) * numba.get_num_threads()


def work_shape(program: Program, dtype, batch: int) -> tuple[int, int, int]:
    """The shape of the scratch ``run_tiles`` takes for ``batch`` samples: a (p + n + q, tile)
    slab per thread, or per tile when there are fewer tiles."""
    tile = tile_size(dtype)
    slabs = max(1, min(numba.get_num_threads(), -(-batch // tile)))
    return (slabs, program.p + program.n + program.q, tile)


def slabs_shape(program: Program, dtype, batch: int) -> tuple[int, int, int]:
    """The shape of the slabs ``load_tiles`` / ``run_on_tiles`` keep: a (p + n + q, tile)
    slab for every tile of the batch (a fixed-point iteration sweeps them again and again)."""
    tile = tile_size(dtype)
    return (-(-batch // tile), program.p + program.n + program.q, tile)


def load_tiles(batch: np.ndarray, slabs: np.ndarray) -> float:
    """u of ``batch`` (batch, p), C-contiguous, into each tile's slab; returns the sum of 0 x
    the inputs (NaN when one is not finite)."""
    checks = np.zeros(slabs.shape[0], dtype=slabs.dtype)
    _load_tiles(batch, slabs, checks)
    return float(checks.sum())


def run_on_tiles(program: Program, slabs: np.ndarray, tiles: np.ndarray, samples: int) -> None:
    """The program's operations on the slabs of ``tiles`` (tile indices), in parallel; the
    last tile of the batch (``samples`` in all) runs on its own samples only."""
    _run_on_tiles(
        program.operations, program.floats, program.csr_indptr, program.csr_columns, program.csr_data,
        program.ell_columns, *program.matrices, slabs, tiles, samples, program.p,
    )  # fmt: skip


def outputs_from_tiles(slabs: np.ndarray, first: int, out: np.ndarray) -> None:
    """out (rows, batch) = rows first: first + rows of every slab, sample by sample."""
    _outputs_from_tiles(slabs, first, out)


if kernels.available():
    import numba

    from .kernels import phi, transpose_into
    from .simd import vfma, vlanes, vload, vload_first, vrelu, vsplat, vstore_first

    _options = dict(cache=True, nogil=True, _nrt=False, fastmath={"contract"})

    @numba.njit(parallel=True, **_options)
    def _run_tiles(  # pragma: no cover - jitted
        operations, floats, csr_indptr, csr_columns, csr_data, ell_columns,
        a_indptr, a_indices, a_data, b_indptr, b_indices, b_data, work, batch, out, p, n, checks,
    ):  # fmt: skip
        """The tiles split in len(checks) parts, one per thread, each in its own slab of work;
        checks[part] gets the sum of 0 x the part's inputs."""
        matrices = (a_indptr, a_indices, a_data, b_indptr, b_indices, b_data)
        csr = (csr_indptr, csr_columns, csr_data)
        samples, tile = batch.shape[0], work.shape[2]
        tiles = (samples + tile - 1) // tile
        parts = max(1, min(checks.shape[0], tiles))
        for part in numba.prange(parts):
            values = work[part]
            for t in range(tiles * part // parts, tiles * (part + 1) // parts):
                first, count = t * tile, min(tile, samples - t * tile)
                checks[part] += transpose_into(batch[first : first + count], values[:p, :count])
                _run_operations(operations, floats, csr, ell_columns, matrices, values, p, count)
                for r in range(out.shape[0]):
                    for lane in range(count):
                        out[r, first + lane] = values[p + n + r, lane]

    @numba.njit(parallel=True, **_options)
    def _load_tiles(batch, slabs, checks):  # pragma: no cover - jitted
        samples, p, tile = batch.shape[0], batch.shape[1], slabs.shape[2]
        for t in numba.prange(slabs.shape[0]):
            first, count = t * tile, min(tile, samples - t * tile)
            checks[t] = transpose_into(batch[first : first + count], slabs[t, :p, :count])

    @numba.njit(parallel=True, **_options)
    def _run_on_tiles(  # pragma: no cover - jitted
        operations, floats, csr_indptr, csr_columns, csr_data, ell_columns,
        a_indptr, a_indices, a_data, b_indptr, b_indices, b_data, slabs, tiles, samples, p,
    ):  # fmt: skip
        matrices = (a_indptr, a_indices, a_data, b_indptr, b_indices, b_data)
        csr = (csr_indptr, csr_columns, csr_data)
        tile = slabs.shape[2]
        for k in numba.prange(tiles.shape[0]):
            t = tiles[k]
            count = min(tile, samples - t * tile)
            _run_operations(operations, floats, csr, ell_columns, matrices, slabs[t], p, count)

    @numba.njit(**_options)
    def _outputs_from_tiles(slabs, first, out):  # pragma: no cover - jitted
        samples, tile = out.shape[1], slabs.shape[2]
        for t in range(slabs.shape[0]):
            for r in range(out.shape[0]):
                for lane in range(min(tile, samples - t * tile)):
                    out[r, t * tile + lane] = slabs[t, first + r, lane]

    @numba.njit(**_options)
    def _run_operations(operations, floats, csr, ell_columns, matrices, values, p, count):  # pragma: no cover
        """The operation table on the first count lanes of values (p + n + q, tile)."""
        j = 0
        for k in range(operations.shape[0]):
            op = operations[k]
            code = op[0]
            if code == CONV:
                _convolve(op, floats, values, j, count)
            elif code == DENSE:
                _dense(op, floats, values, j, count)
            elif code == ELL:
                _ell(op, floats, ell_columns, values, j, count)
            elif code == SPARSE:
                _sparse(op, floats, matrices, values, p, j, count)
            elif code == CSR:
                _csr(op, csr, values, j, count)
            elif code == ACTIVATE:
                _activate_rows(values, op[1], op[2], op[3], floats[op[4]], floats[op[4] + 1], j, count)
            elif code == BIAS:
                for r in range(op[2]):
                    bias = vsplat(values, floats[op[3] + r])
                    _store(values, op[1] + r, j, count, bias, bias, 0)

    @numba.njit(inline="always", **_options)
    def _load(values, row, j, count):  # pragma: no cover - jitted
        lanes = vlanes(values)
        if count >= 2 * lanes:  # a whole tile: plain loads
            return vload(values, row, j), vload(values, row, j + lanes)
        return vload_first(values, row, j, count), vload_first(values, row, j + lanes, count - lanes)

    @numba.njit(inline="always", **_options)
    def _first_inside(position, step):  # pragma: no cover - jitted
        """The least i >= 0 with 0 <= position + i step (step > 0)."""
        return 0 if position >= 0 else (step - 1 - position) // step

    @numba.njit(inline="always", **_options)
    def _past_inside(position, step, size, count):  # pragma: no cover - jitted
        """1 + the largest i < count with position + i step < size (step > 0), at least 0."""
        if position >= size:
            return 0
        return min(count, (size - 1 - position) // step + 1)

    @numba.njit(inline="always", **_options)
    def _store(values, row, j, count, first, second, relu):  # pragma: no cover - jitted
        lanes = vlanes(values)
        if relu:
            first, second = vrelu(first), vrelu(second)
        vstore_first(values, row, j, first, count)
        vstore_first(values, row, j + lanes, second, count - lanes)

    @numba.njit(inline="always", **_options)
    def _start_row(floats, bias, values, row, offset, j, count):  # pragma: no cover - jitted
        """A row's two accumulators: its bias (bias >= 0: offset in floats, the row's at +
        offset) or what the row holds."""
        if bias >= 0:
            value = vsplat(values, floats[bias + offset])
            return value, value
        return _load(values, row, j, count)

    @numba.njit(inline="always", **_options)
    def _rows(first, limit, stride, base):  # pragma: no cover - jitted
        """Offsets in a block of the register tile's 8 rows: min(first + r, limit - 1) x stride
        + base."""
        last = limit - 1
        return (
            first * stride + base, min(first + 1, last) * stride + base, min(first + 2, last) * stride + base,
            min(first + 3, last) * stride + base, min(first + 4, last) * stride + base,
            min(first + 5, last) * stride + base, min(first + 6, last) * stride + base,
            min(first + 7, last) * stride + base,
        )  # fmt: skip

    @numba.njit(inline="always", **_options)
    def _start(floats, bias, values, target, rows, j, count):  # pragma: no cover - jitted
        """The register tile: 8 rows x 2 vectors of accumulators, (a0, b0, ..., a7, b7)."""
        a0, b0 = _start_row(floats, bias, values, target + rows[0], rows[0], j, count)
        a1, b1 = _start_row(floats, bias, values, target + rows[1], rows[1], j, count)
        a2, b2 = _start_row(floats, bias, values, target + rows[2], rows[2], j, count)
        a3, b3 = _start_row(floats, bias, values, target + rows[3], rows[3], j, count)
        a4, b4 = _start_row(floats, bias, values, target + rows[4], rows[4], j, count)
        a5, b5 = _start_row(floats, bias, values, target + rows[5], rows[5], j, count)
        a6, b6 = _start_row(floats, bias, values, target + rows[6], rows[6], j, count)
        a7, b7 = _start_row(floats, bias, values, target + rows[7], rows[7], j, count)
        return a0, b0, a1, b1, a2, b2, a3, b3, a4, b4, a5, b5, a6, b6, a7, b7

    @numba.njit(inline="always", **_options)
    def _multiply_add(acc, x, y, floats, k):  # pragma: no cover - jitted
        """acc[row r] += floats[k + r] x (x, y): one input row's lanes into the 8 rows (k is
        unsigned: no negative-index test on the weights)."""
        a0, b0, a1, b1, a2, b2, a3, b3, a4, b4, a5, b5, a6, b6, a7, b7 = acc
        k0, k1, k2, k3 = floats[k], floats[k + _1], floats[k + _2], floats[k + _3]
        k4, k5, k6, k7 = floats[k + _4], floats[k + _5], floats[k + _6], floats[k + _7]
        return (
            vfma(a0, x, k0), vfma(b0, y, k0), vfma(a1, x, k1), vfma(b1, y, k1),
            vfma(a2, x, k2), vfma(b2, y, k2), vfma(a3, x, k3), vfma(b3, y, k3),
            vfma(a4, x, k4), vfma(b4, y, k4), vfma(a5, x, k5), vfma(b5, y, k5),
            vfma(a6, x, k6), vfma(b6, y, k6), vfma(a7, x, k7), vfma(b7, y, k7),
        )  # fmt: skip

    @numba.njit(inline="always", **_options)
    def _finish(values, target, rows, acc, j, count, relu, valid):  # pragma: no cover - jitted
        """Store the register tile's first ``valid`` rows (relu first when asked)."""
        a0, b0, a1, b1, a2, b2, a3, b3, a4, b4, a5, b5, a6, b6, a7, b7 = acc
        _store(values, target + rows[0], j, count, a0, b0, relu)
        if valid > 1:
            _store(values, target + rows[1], j, count, a1, b1, relu)
        if valid > 2:
            _store(values, target + rows[2], j, count, a2, b2, relu)
        if valid > 3:
            _store(values, target + rows[3], j, count, a3, b3, relu)
        if valid > 4:
            _store(values, target + rows[4], j, count, a4, b4, relu)
        if valid > 5:
            _store(values, target + rows[5], j, count, a5, b5, relu)
        if valid > 6:
            _store(values, target + rows[6], j, count, a6, b6, relu)
        if valid > 7:
            _store(values, target + rows[7], j, count, a7, b7, relu)

    @numba.njit(inline="always", **_options)
    def _activate_rows(values, first, size, code, alpha, beta, j, count):  # pragma: no cover - jitted
        """phi of code ``code`` on rows first : first + size (relu a vector at a time)."""
        if code == 1:
            for row in range(first, first + size):
                x, y = _load(values, row, j, count)
                _store(values, row, j, count, x, y, 1)
        elif code != 0:
            for row in range(first, first + size):
                for lane in range(j, j + count):
                    values[row, lane] = phi(values[row, lane], code, alpha, beta)

    @numba.njit(**_options)
    def _convolve(op, floats, values, j, count):  # pragma: no cover - jitted
        """values[t + (co, ho, wo)] (+)= sum over taps inside the image of K[co, c, i, j] x
        values[s + (c, h, w)], 8 channels x the tile's lanes at a time."""
        target, source, C, H, W, Co, Ho, Wo = op[1], op[2], op[4], op[5], op[6], op[7], op[8], op[9]
        kh, kw, sh, sw, dh, dw, ph, pw = op[10], op[11], op[12], op[13], op[14], op[15], op[16], op[17]
        bias, relu, by_tap = op[20], op[21], op[22]
        plane = Ho * Wo
        for c0 in range(0, Co, ROWS):
            for ho in range(Ho):
                for wo in range(Wo):
                    # the block's rows of the 8 channels; past Co the last channel's again
                    # (computed from the next weights, never stored)
                    rows = _rows(c0, Co, plane, ho * Wo + wo)
                    acc = _start(floats, bias, values, target, rows, j, count)
                    # the kernel rows and columns that fall inside the image
                    top, left = ho * sh - ph, wo * sw - pw
                    i0, i1 = _first_inside(top, dh), _past_inside(top, dh, H, kh)
                    j0, j1 = _first_inside(left, dw), _past_inside(left, dw, W, kw)
                    for c in range(C):
                        for i in range(i0, i1):
                            row = source + (c * H + top + i * dh) * W + left
                            tap = np.uint64(by_tap + ((c * kh + i) * kw) * Co + c0)
                            for jj in range(j0, j1):
                                x, y = _load(values, row + jj * dw, j, count)
                                acc = _multiply_add(acc, x, y, floats, tap + np.uint64(jj * Co))
                    _finish(values, target, rows, acc, j, count, relu, Co - c0)

    @numba.njit(**_options)
    def _dense(op, floats, values, j, count):  # pragma: no cover - jitted
        """values[t + r] (+)= sum_k W^T[k, r] values[s + k], 8 rows x the tile's lanes at a time."""
        target, source, w, m, k, bias, relu = op[1], op[2], op[3], op[4], op[5], op[6], op[7]
        for r0 in range(0, m, ROWS):
            rows = _rows(r0, m, 1, 0)  # past m the last row again (never stored)
            acc = _start(floats, bias, values, target, rows, j, count)
            for kk in range(k):
                x, y = _load(values, source + kk, j, count)
                # rows past m read the next input's weights: never stored
                acc = _multiply_add(acc, x, y, floats, np.uint64(w + kk * m + r0))
            _finish(values, target, rows, acc, j, count, relu, m - r0)

    @numba.njit(**_options)
    def _ell(op, floats, ell_columns, values, j, count):  # pragma: no cover - jitted
        target, rows, width, columns, data = op[1], op[2], op[3], op[4], op[5]
        bias, code, alpha, beta, padded = op[6], op[7], floats[op[8]], floats[op[8] + 1], op[9]
        for r in range(rows):
            x = vsplat(values, floats[bias + r])
            y = x
            for t in range(width):
                weight = floats[data + t * padded + r]
                u, v = _load(values, ell_columns[columns + t * padded + r], j, count)
                x, y = vfma(x, u, weight), vfma(y, v, weight)
            _store(values, target + r, j, count, x, y, code == 1)
        if code > 1:
            _activate_rows(values, target, rows, code, alpha, beta, j, count)

    @numba.njit(**_options)
    def _sparse(op, floats, matrices, values, p, j, count):  # pragma: no cover - jitted
        a_indptr, a_indices, a_data, b_indptr, b_indices, b_data = matrices
        first, last, bias, code, alpha, beta = op[1], op[2], op[3], op[4], floats[op[5]], floats[op[5] + 1]
        for i in range(first, last):
            x = vsplat(values, floats[bias + i - first])
            y = x
            for k in range(b_indptr[i], b_indptr[i + 1]):
                u, v = _load(values, b_indices[k], j, count)
                x, y = vfma(x, u, b_data[k]), vfma(y, v, b_data[k])
            for k in range(a_indptr[i], a_indptr[i + 1]):
                u, v = _load(values, p + a_indices[k], j, count)
                x, y = vfma(x, u, a_data[k]), vfma(y, v, a_data[k])
            _store(values, p + i, j, count, x, y, code == 1)
        if code > 1:
            _activate_rows(values, p + first, last - first, code, alpha, beta, j, count)

    @numba.njit(**_options)
    def _csr(op, csr, values, j, count):  # pragma: no cover - jitted
        csr_indptr, csr_columns, csr_data = csr
        target, rows, offset = op[1], op[2], op[3]
        for r in range(rows):
            x, y = _load(values, target + r, j, count)
            for k in range(csr_indptr[offset + r], csr_indptr[offset + r + 1]):
                u, v = _load(values, csr_columns[k], j, count)
                x, y = vfma(x, u, csr_data[k]), vfma(y, v, csr_data[k])
            _store(values, target + r, j, count, x, y, 0)
