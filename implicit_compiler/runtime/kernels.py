"""The fused forward-substitution kernel for one sample, and compiled helpers.

For a chain of acyclic blocks (consecutive in the execution order), over the stacked variables
V = [u; x] (one sample: a vector of p + n values), block after block:

    V[p + r] = phi(B[r, :] V[:p] + A[r, :] V[p:] + b[r])      for the block's rows r

computed row by row (numba prange over a block's rows, each a dot product), so A is streamed
once, straight from the model's CSR arrays. Rows of one acyclic block never read each other,
which makes writing in place safe. One call runs the whole chain: Python is not in the loop.
Batches of 2 or more samples run in ``row_groups`` instead, rows sharing their columns held in
registers.

Activation codes: ``ACTIVATION_CODES`` (0 identity, 1 relu, 2 leaky_relu(alpha), 3 tanh, 4 sigmoid,
5 square, then those of issue 17); an activation's parameters travel as alpha and beta (see
``activations.Activation``). Index arrays and p are passed unsigned (see ``unsigned``).

What keeps the one-sample chain: models past ``solve.ONE_SAMPLE_WORK`` multiply-adds, where the
one-sample program on one thread loses (5 convolutions of 64 channels on 32 x 32, 153M: 6.0 ms by
the program, 3.3-4.7 by the steps, this kernel on every thread); below it the program wins
(LeNet-5 at batch 1: 0.036 ms against 0.125 by the steps, 2026-12-07).
"""

from __future__ import annotations

import math
import os
import types

import numpy as np

# numba's OpenMP workers spin for about 3 ms after each parallel region unless told otherwise;
# next to the BLAS threads of the structured blocks the spinning starved them (LeNet-5 at batch
# 32: 1.3k img/s instead of 27k). Waiting passively instead costs a wake-up per region (LeNet-5's
# chain at batch 32: 1.5 ms instead of 0.6), so libgomp spins briefly (GOMP_SPINCOUNT, about
# 0.1 ms: a chain's regions follow each other closely) and other OpenMP runtimes wait passively.
# Read when numba first starts its threads; nothing is changed when the user set either.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "10000"

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; kept importable without it
    numba = None

from ..activations import ACTIVATION_NAMES, GELU_TANH_CUBIC, GELU_TANH_SCALE, LOG_POSITIVE_FLOOR

# Rows of a structured block finished by one task of ``finish_rows``.
FINISH_RUN = 4096
# Least rows of a remainder's diagonal read as a stream by ``finish_rows`` (``diagonal_runs``).
DIAGONAL_RUN = 16

# An activation's code: its place in ACTIVATION_NAMES (identity 0, relu 1, leaky_relu 2, tanh 3,
# sigmoid 4, square 5, exp 6, ...: the kernels test code == 1 for relu, code > 1 for "not
# relu nor identity").
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATION_NAMES)}
# numba freezes global integers as constants (not a dict's entries)
_EXP = ACTIVATION_CODES["exp"]
_LOG = ACTIVATION_CODES["log"]
_RECIPROCAL = ACTIVATION_CODES["reciprocal"]
_SQRT = ACTIVATION_CODES["sqrt"]
_RSQRT = ACTIVATION_CODES["rsqrt"]
_ERF = ACTIVATION_CODES["erf"]
_GELU = ACTIVATION_CODES["gelu"]
_GELU_TANH = ACTIVATION_CODES["gelu_tanh"]
_ELU = ACTIVATION_CODES["elu"]
_SELU = ACTIVATION_CODES["selu"]
_CELU = ACTIVATION_CODES["celu"]
_SOFTPLUS = ACTIVATION_CODES["softplus"]
_SOFTSIGN = ACTIVATION_CODES["softsign"]
_HARD_SIGMOID = ACTIVATION_CODES["hard_sigmoid"]
_HARD_SWISH = ACTIVATION_CODES["hard_swish"]
_SILU = ACTIVATION_CODES["silu"]
_MISH = ACTIVATION_CODES["mish"]
_POWER = ACTIVATION_CODES["power"]
_THRESHOLDED_RELU = ACTIVATION_CODES["thresholded_relu"]
_LOG_POSITIVE = ACTIVATION_CODES["log_positive"]
_LOG_OF_FLOOR = math.log(LOG_POSITIVE_FLOOR)
_HEAVISIDE = ACTIVATION_CODES["heaviside"]


def available() -> bool:
    """Whether the compiled kernel can be used (numba importable)."""
    return numba is not None


if numba is not None:

    @numba.njit(cache=True, nogil=True, inline="always")
    def phi(x, code, alpha, beta):  # pragma: no cover - jitted
        """The activation of code ``code`` (see above) at x; those after square computed in
        float64 (``activations._evaluate`` is the same formulas in numpy)."""
        if code == 1:
            return x if x > 0 else 0
        if code == 2:
            return x if x >= 0 else alpha * x
        if code == 3:
            return np.tanh(x)
        if code == 4:
            return 0.5 + 0.5 * np.tanh(0.5 * x)
        if code == 5:
            return x * x
        if code > 5:
            return _phi_float64(float(x), code, float(alpha), float(beta))
        return x

    @numba.njit(cache=True, nogil=True)
    def _softplus(z):  # pragma: no cover - jitted
        return max(z, 0.0) + math.log1p(math.exp(-abs(z)))

    @numba.njit(cache=True, nogil=True)
    def _silu(z, w):  # pragma: no cover - jitted
        """z sigmoid(w), exp of a non-positive number only (no overflow, no cancellation)."""
        return z / (1.0 + math.exp(-w)) if w >= 0 else z * math.exp(w) / (1.0 + math.exp(w))

    @numba.njit(cache=True, nogil=True)
    def _phi_float64(z, code, alpha, beta):  # pragma: no cover - jitted
        """phi(z) of the activations after square, z float64. 1 / z as pow(z, -1) (inf at 0,
        as numpy: numba's division would raise ZeroDivisionError)."""
        if code == _EXP:
            return math.exp(z)
        if code == _LOG:
            return math.log(z)  # -inf at 0, NaN below
        if code == _RECIPROCAL:
            return math.pow(z, -1.0)
        if code == _SQRT:
            return math.sqrt(z)
        if code == _RSQRT:
            return math.pow(math.sqrt(z), -1.0)
        if code == _ERF:
            return math.erf(z)
        if code == _GELU:
            return 0.5 * z * math.erfc(-z / math.sqrt(2.0))
        if code == _GELU_TANH:
            return _silu(z, 2 * GELU_TANH_SCALE * (z + GELU_TANH_CUBIC * z * z * z))  # z sigmoid(2 w)
        if code == _ELU:
            return z if z >= 0 else alpha * math.expm1(z)
        if code == _SELU:
            return beta * (z if z > 0 else alpha * math.expm1(z))
        if code == _CELU:
            return max(z, 0.0) + min(0.0, alpha * math.expm1(min(z, 0.0) / alpha))
        if code == _SOFTPLUS:
            return _softplus(z)
        if code == _SOFTSIGN:
            return z / (1.0 + abs(z))
        if code == _HARD_SIGMOID:
            return min(max(alpha * z + beta, 0.0), 1.0)
        if code == _HARD_SWISH:
            return z * min(max(z * (1 / 6) + 0.5, 0.0), 1.0)
        if code == _SILU:
            return _silu(z, z)
        if code == _MISH:
            return z * math.tanh(_softplus(z))
        if code == _POWER:
            return math.pow(z, alpha)
        if code == _THRESHOLDED_RELU:
            return z if z > alpha else 0.0
        if code == _LOG_POSITIVE:  # NaN stays NaN (neither comparison holds)
            return math.log(z) if z > LOG_POSITIVE_FLOOR else (_LOG_OF_FLOOR if z <= LOG_POSITIVE_FLOOR else z)
        if code == _HEAVISIDE:
            return 1.0 if z > 0 else (alpha if z == 0 else 0.0)
        return math.nan

    def _forward_chain_single(  # pragma: no cover - jitted
        a_indptr, a_indices, a_data, b_indptr, b_indices, b_data, bias, values, p, order, starts, stops, codes, alphas,
        betas,
    ):  # fmt: skip
        """Blocks one after another, block k's rows order[starts[k]:stops[k]] in parallel:
        values[p + i] = phi_k(A_i values[p:] + B_i values[:p] + bias[i]) for one sample (values
        of shape (p + n,)), each row a dot product."""
        for block in range(starts.shape[0]):
            code, alpha, beta = codes[block], alphas[block], betas[block]
            for position in numba.prange(starts[block], stops[block]):
                i = order[position]
                total = bias[i]
                for k in range(b_indptr[i], b_indptr[i + 1]):
                    total += b_data[k] * values[b_indices[k]]
                for k in range(a_indptr[i], a_indptr[i + 1]):
                    total += a_data[k] * values[p + a_indices[k]]
                values[p + i] = phi(total, code, alpha, beta)

    def threaded_and_serial(function, **options):
        """The function compiled twice: with ``prange`` run by threads, and on one thread.

        numba's on-disk cache names an entry by the function's qualified name and bytecode, not
        by its flags: compiled twice under one name, whichever build is cached first is loaded
        for both (ResNet20 then ran its "threaded" kernels on one thread). The serial build is
        therefore a copy of the function under its own name."""
        serial = types.FunctionType(
            function.__code__, function.__globals__, f"{function.__name__}_serial", function.__defaults__
        )
        serial.__qualname__ = f"{function.__qualname__}_serial"
        return numba.njit(parallel=True, **options)(function), numba.njit(parallel=False, **options)(serial)

    # Each kernel twice: threads for big chains, one thread for small ones (where waking the
    # thread pool for every block costs more than the work).
    # The one-sample kernel is a dot product per row: letting the compiler reassociate its sum
    # (several partial sums instead of one chain of dependent additions) makes it much faster.
    _dot_options = dict(cache=True, nogil=True, fastmath={"contract", "reassoc"})
    forward_chain_single, forward_chain_single_serial = threaded_and_serial(_forward_chain_single, **_dot_options)

    def _finish_rows(rows, bias, remainder, values, flat_values, code, alpha, beta):  # pragma: no cover - jitted
        """rows[r] = phi(rows[r] + bias[r] + sum_k data[k] values[sources[k]]) in place, for
        each row r of rows (rows, batch): a structured block's bias, sparse remainder (residual
        identities, shortcuts: ``sources`` are rows of values = V) and activation in one pass
        over its rows, runs of ``FINISH_RUN`` rows on threads, each run's values one flat
        vector for the bias and the activation (vectorized, whatever the batch). The remainder
        is ``diagonal_runs``' (indptr, sources, data, segments, weights, run_segments): its
        entries on runs of a diagonal, rows[r] += w values[r + s - low] for r in [low, high),
        read as streams (of ``flat_values``, values' flat view, where values is C-contiguous;
        else empty), the others by rows. A residual block of ResNet-50 at batch 16 (802,816
        rows, float32, an identity remainder, relu): 27 ms by numpy's and scipy's passes (bias,
        the remainder's rows gathered, its product, the sum, relu), 4 ms so. At batch 1 (2
        cores, 2026-12-07): 4.1 ms reading the identity's entries one by one, 0.9-1.1 ms as a
        stream (0.5-0.8 ms without the remainder); ResNet-50's blocks together 27.6 -> 11.5 ms."""
        indptr, sources, data, segments, weights, run_segments = remainder
        count, batch, per_sample = rows.shape[0], rows.shape[1], bias.shape[1] > 1
        flat, flat_bias = rows.reshape(-1), bias.reshape(-1)
        for run in numba.prange((count + FINISH_RUN - 1) // FINISH_RUN):
            first, last = run * FINISH_RUN, min(count, (run + 1) * FINISH_RUN)
            for r in range(first, last if indptr[last] > indptr[first] else first):
                for k in range(indptr[r], indptr[r + 1]):
                    weight, source = data[k], sources[k]
                    for t in range(batch):
                        rows[r, t] += weight * values[source, t]
            for segment in range(run_segments[run], run_segments[run + 1]):
                low, high, weight = segments[segment, 0], segments[segment, 1], weights[segment]
                shift = segments[segment, 2] - low
                if flat_values.size:  # (slices of flat arrays: 8x faster than rows of 2-d ones)
                    target = flat[low * batch : high * batch]
                    source = flat_values[(low + shift) * batch : (high + shift) * batch]
                    for e in range(target.size):
                        target[e] += weight * source[e]
                else:
                    for r in range(low, high):
                        for t in range(batch):
                            rows[r, t] += weight * values[r + shift, t]
            values_run = flat[first * batch : last * batch]  # (views: indices from 0, no wraparound test)
            if per_sample or batch == 1:
                bias_run = flat_bias[first * batch : last * batch]
                for e in range(values_run.size):
                    values_run[e] += bias_run[e]
            else:
                for r in range(last - first):
                    row_bias = bias[first + r, 0]
                    for t in range(batch):
                        values_run[r * batch + t] += row_bias
            if code == 1:  # relu keeping NaN (phi's would make it 0)
                for e in range(values_run.size):
                    values_run[e] = 0 if values_run[e] <= 0 else values_run[e]
            elif code > 1:
                for e in range(values_run.size):
                    values_run[e] = phi(values_run[e], code, alpha, beta)

    finish_rows, finish_rows_serial = threaded_and_serial(_finish_rows, cache=True, nogil=True, fastmath={"contract"})

    @numba.njit(cache=True, nogil=True)
    def gather_convolution(indptr, indices, data, lo, hi, sizes, geometry, tolerance, weight):  # pragma: no cover
        """Read a convolution kernel off the CSR rows of a block (see ``structured``).

        Every non-zero entry (row (co, ho, wo), column lo + (c, h, w) with lo <= column < hi) is
        put at weight[co, c, i, j] with h = sh ho + dh i - ph, w = sw wo + dw j - pw. Returns the
        count of non-zero entries, or -1 when one lies off that geometry or differs from the
        value already at its kernel entry by more than tolerance x the largest |value|.
        """
        Ho, Wo, H, W = sizes
        sh, sw, dh, dw, ph, pw = geometry
        C, kh, kw = weight.shape[1], weight.shape[2], weight.shape[3]
        # (c, h, w) of each source column, looked up rather than divided out per entry
        channel_of = np.empty(hi - lo, np.int64)
        h_of = np.empty(hi - lo, np.int64)
        w_of = np.empty(hi - lo, np.int64)
        for column in range(hi - lo):
            channel_of[column] = column // (H * W)
            h_of[column] = column % (H * W) // W
            w_of[column] = column % W
        largest = 0.0
        count = 0
        for step in range(2):  # 0: fill the kernel; 1: check every entry against it
            count = 0
            row = 0
            for co in range(weight.shape[0]):
                for ho in range(Ho):
                    for wo in range(Wo):
                        for k in range(indptr[row], indptr[row + 1]):
                            column, value = indices[k] - lo, data[k]
                            if column < 0 or column >= hi - lo or value == 0:
                                continue
                            count += 1
                            i_scaled = h_of[column] - sh * ho + ph
                            j_scaled = w_of[column] - sw * wo + pw
                            if i_scaled < 0 or j_scaled < 0:
                                return -1
                            i, j = i_scaled, j_scaled
                            if dh > 1 or dw > 1:
                                if i_scaled % dh or j_scaled % dw:
                                    return -1
                                i, j = i_scaled // dh, j_scaled // dw
                            c = channel_of[column]
                            if i >= kh or j >= kw or c >= C:
                                return -1
                            if step == 0:
                                weight[co, c, i, j] = value
                                largest = max(largest, abs(value))
                            elif abs(weight[co, c, i, j] - value) > tolerance * largest:
                                return -1
                        row += 1
        return count

    from .simd import TILE_BYTES, vfma, vlanes, vload_first, vsplat, vstore_first, vtranspose_tile

    @numba.njit(cache=True, nogil=True, fastmath={"contract"}, _nrt=False)
    def output_into(c_indptr, c_indices, c_data, d_indptr, d_indices, d_data, bias, values, p, out):  # pragma: no cover
        """out = C values[p:] + D values[:p] + bias[:, None] for values = V = [u; x], (p + n,
        batch) C-contiguous, and out (q, batch): each output row a vector of samples at a time
        (LeNet-5 at batch 256, one after the other: scipy's products and sums 52 us, this 22)."""
        batch, lanes = values.shape[1], vlanes(values)
        for r in range(out.shape[0]):
            for j in range(0, batch, lanes):
                count = batch - j
                acc = vsplat(values, bias[r])
                for k in range(c_indptr[r], c_indptr[r + 1]):
                    acc = vfma(acc, vload_first(values, p + c_indices[k], j, count), c_data[k])
                for k in range(d_indptr[r], d_indptr[r + 1]):
                    acc = vfma(acc, vload_first(values, d_indices[k], j, count), d_data[k])
                vstore_first(out, r, j, acc, count)

    @numba.njit(cache=True, nogil=True, _nrt=False)
    def transpose_into(source, target):  # pragma: no cover - jitted
        """target[i, j] = source[j, i] for C-contiguous rows: by square tiles of one vector per
        row, transposed in registers (``simd.vtranspose_tile``), over strips of 64 columns of
        source, then the leftover edges one value at a time. numpy's transposed copy of a (256,
        1024) float32 batch reads one 4 KiB-strided column at a time (730 us here); one value at a
        time by strips took 200-250 us, the tiles 55-75. Returns the sum of 0 x value: NaN when
        a value is NaN or infinite, else 0 (the finiteness check rides along: a separate pass
        over a batch just pushed out of the cache by the previous call took 50-90 us)."""
        batch, size = source.shape
        lanes = TILE_BYTES // source.itemsize
        tiled_columns, tiled_rows = size - size % lanes, batch - batch % lanes
        check = source.dtype.type(0)
        for first in range(0, tiled_columns, 64):
            for j in range(0, tiled_rows, lanes):
                for i in range(first, min(tiled_columns, first + 64), lanes):
                    check += vtranspose_tile(source, target, j, i)
        for j in range(batch):
            for i in range(tiled_columns, size):
                target[i, j] = source[j, i]
                check += 0 * source[j, i]
        for j in range(tiled_rows, batch):
            for i in range(tiled_columns):
                target[i, j] = source[j, i]
                check += 0 * source[j, i]
        return check


# Below this many multiply-adds (non-zeros x batch) a chain runs on one thread.
PARALLEL_THRESHOLD = 2_000_000


def unsigned(indices: np.ndarray) -> np.ndarray:
    """An index array viewed as unsigned: numba then skips its negative-index wraparound test
    on every access (1.7x faster gathers)."""
    return indices.view(np.uint32 if indices.dtype.itemsize == 4 else np.uint64)


def thread_count() -> int:
    """The threads numba's parallel kernels run on (1 without numba)."""
    return numba.get_num_threads() if numba is not None else 1


def threaded(work: int, batch: int) -> bool:
    """Whether a chain of ``work`` non-zeros on ``batch`` samples is worth the threads."""
    return work * batch >= PARALLEL_THRESHOLD


def diagonal_runs(
    indptr: np.ndarray, sources: np.ndarray, data: np.ndarray, least_run: int | None = DIAGONAL_RUN
) -> tuple[np.ndarray, ...]:
    """A remainder (CSR: rows, ``sources`` rows of V) as ``finish_rows`` reads it: the entries
    on runs of at least ``least_run`` consecutive rows of one diagonal (source - row) and
    one weight, as segments (low, high, source of row low) with their weights, split at
    ``FINISH_RUN`` rows and sorted by row, where ``run_segments[i]`` is the first of run i's;
    the other entries as CSR (indptr, unsigned sources, data). A residual identity is one
    diagonal: read as a stream, not index by index. With ``least_run`` None, no run is looked
    for: the search costs its sorts (0.4-0.6 ms for a trained classifier's 1,984 entries, once
    per solve where its blocks are made anew)."""
    count = indptr.size - 1
    if least_run is None:
        runs = np.zeros((count + FINISH_RUN - 1) // FINISH_RUN + 1, dtype=np.int64)
        none = np.zeros((0, 3), dtype=np.int64)
        return indptr.astype(np.int64), unsigned(sources.astype(np.int64)), data, none, data[:0], runs
    rows = np.repeat(np.arange(count, dtype=np.int64), np.diff(indptr))
    sources = sources.astype(np.int64)
    order = np.lexsort((rows, data, sources - rows))  # by diagonal, weight, then row
    key, weight, row = (sources - rows)[order], data[order], rows[order]
    starts = np.ones(order.size, dtype=bool)
    starts[1:] = (key[1:] != key[:-1]) | (weight[1:] != weight[:-1]) | (row[1:] != row[:-1] + 1)
    starts[1:] |= row[1:] // FINISH_RUN != row[:-1] // FINISH_RUN
    first = np.flatnonzero(starts)
    lengths = np.diff(np.append(first, order.size))
    long = lengths >= least_run
    on_runs = np.zeros(order.size, dtype=bool)
    on_runs[order[np.repeat(long, lengths)]] = True
    heads = first[long]
    segments = np.stack([row[heads], row[heads] + lengths[long], sources[order[heads]]], axis=1)
    by_row = np.argsort(segments[:, 0], kind="stable")
    segments, weights = segments[by_row], weight[heads][by_row]
    runs = (count + FINISH_RUN - 1) // FINISH_RUN
    run_segments = np.searchsorted(segments[:, 0] // FINISH_RUN, np.arange(runs + 1)).astype(np.int64)
    rest = ~on_runs
    rest_indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[rest], minlength=count))]).astype(np.int64)
    return rest_indptr, unsigned(sources[rest]), data[rest], segments, weights, run_segments
