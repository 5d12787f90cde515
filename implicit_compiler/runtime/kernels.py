"""The fused forward-substitution kernel: each block's product, bias and activation in one pass.

For a chain of acyclic blocks (consecutive in the execution order), over the stacked variables
V = [u; x] held as one (p + n, batch) row-major array, block after block:

    V[p + r, :] = phi(B[r, :] V[:p] + A[r, :] V[p:] + b[r])      for the block's rows r

computed row by row in parallel (numba prange over rows): each row accumulates its non-zeros'
weighted input rows (contiguous in the batch) in a small buffer, adds the bias and writes phi
of it to its own row, so A is streamed once, straight from the model's CSR arrays. Rows of one
acyclic block never read each other, which makes writing in place safe and lets the rows run
in any order: a block shaped (C, H, W) runs its rows
channel-last, (h, w, c), so that consecutive rows (all channels of one pixel) read the same
input window while it is in cache. One call runs the whole chain: Python is not in the loop.

Activation codes: 0 identity, 1 relu, 2 leaky_relu(alpha), 3 tanh, 4 sigmoid, 5 square. Index
arrays and p are passed unsigned (see ``unsigned``).
"""

from __future__ import annotations

import os

import numpy as np

# numba's OpenMP workers spin after each parallel kernel unless told otherwise; next to the BLAS
# threads of the structured blocks the spinning starves them (LeNet-5 at batch 32: 1.3k img/s
# instead of 27k). Read by libgomp when numba first starts it; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; kept importable without it
    numba = None

# Rows of a block handed to one thread at a time by the batched kernel (they share a buffer).
ROWS_PER_TASK = 32
ACTIVATION_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4, "square": 5}


def available() -> bool:
    """Whether the compiled kernel can be used (numba importable)."""
    return numba is not None


if numba is not None:

    def _forward_chain(  # pragma: no cover - jitted
        a_indptr, a_indices, a_data, b_indptr, b_indices, b_data, bias, values, p, order, starts, stops, codes, alphas
    ):
        """Blocks one after another, block k's rows order[starts[k]:stops[k]] in parallel:
        values[p + i] = phi_k(A_i values[p:] + B_i values[:p] + bias[i]); values is (p + n, batch).

        Each row accumulates in a local buffer: accumulating into ``values`` itself, which the
        compiler cannot prove distinct from the rows read, kept the loop from vectorizing
        (2.2x slower on ResNet20 at batch 256).
        """
        batch = values.shape[1]
        for block in range(starts.shape[0]):
            code, alpha = codes[block], alphas[block]
            first, last = starts[block], stops[block]
            for task in numba.prange((last - first + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
                acc = np.empty(batch, values.dtype)  # one buffer per task, not per row
                for position in range(first + task * ROWS_PER_TASK, min(last, first + (task + 1) * ROWS_PER_TASK)):
                    i = order[position]
                    b = bias[i]
                    for j in range(batch):
                        acc[j] = b
                    for k in range(b_indptr[i], b_indptr[i + 1]):
                        weight = b_data[k]
                        source = values[b_indices[k]]
                        for j in range(batch):
                            acc[j] += weight * source[j]
                    for k in range(a_indptr[i], a_indptr[i + 1]):
                        weight = a_data[k]
                        source = values[p + a_indices[k]]
                        for j in range(batch):
                            acc[j] += weight * source[j]
                    out = values[p + i]
                    if code == 0:
                        for j in range(batch):
                            out[j] = acc[j]
                    elif code == 1:
                        for j in range(batch):
                            out[j] = acc[j] if acc[j] > 0 else 0
                    elif code == 2:
                        for j in range(batch):
                            out[j] = acc[j] if acc[j] >= 0 else alpha * acc[j]
                    elif code == 3:
                        for j in range(batch):
                            out[j] = np.tanh(acc[j])
                    elif code == 4:
                        for j in range(batch):
                            out[j] = 0.5 + 0.5 * np.tanh(0.5 * acc[j])
                    else:
                        for j in range(batch):
                            out[j] = acc[j] * acc[j]

    def _forward_chain_single(  # pragma: no cover - jitted
        a_indptr, a_indices, a_data, b_indptr, b_indices, b_data, bias, values, p, order, starts, stops, codes, alphas
    ):
        """``forward_chain`` for one sample (values of shape (p + n,)): a scalar accumulator."""
        for block in range(starts.shape[0]):
            code, alpha = codes[block], alphas[block]
            for position in numba.prange(starts[block], stops[block]):
                i = order[position]
                total = bias[i]
                for k in range(b_indptr[i], b_indptr[i + 1]):
                    total += b_data[k] * values[b_indices[k]]
                for k in range(a_indptr[i], a_indptr[i + 1]):
                    total += a_data[k] * values[p + a_indices[k]]
                if code == 1:
                    total = max(total, 0)
                elif code == 2:
                    total = total if total >= 0 else alpha * total
                elif code == 3:
                    total = np.tanh(total)
                elif code == 4:
                    total = 0.5 + 0.5 * np.tanh(0.5 * total)
                elif code == 5:
                    total = total * total
                values[p + i] = total

    # Each kernel twice: threads for big chains, one thread for small ones (where waking the
    # thread pool for every block costs more than the work).
    # The one-sample kernel is a dot product per row: letting the compiler reassociate its sum
    # (several partial sums instead of one chain of dependent additions) makes it much faster.
    _options = dict(cache=True, nogil=True, fastmath={"contract"})
    _dot_options = dict(cache=True, nogil=True, fastmath={"contract", "reassoc"})
    forward_chain = numba.njit(parallel=True, **_options)(_forward_chain)
    forward_chain_single = numba.njit(parallel=True, **_dot_options)(_forward_chain_single)
    forward_chain_serial = numba.njit(parallel=False, **_options)(_forward_chain)
    forward_chain_single_serial = numba.njit(parallel=False, **_dot_options)(_forward_chain_single)

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

    @numba.njit(cache=True, nogil=True)
    def im2col(source, geometry, cols):  # pragma: no cover - jitted
        """cols[c, i, j, ho, wo, b] = X[c, sh ho + dh i - ph, sw wo + dw j - pw, b], or 0 off the
        image, for X = source (C, H, W, batch) and the geometry (sh, sw, dh, dw, ph, pw)."""
        sh, sw, dh, dw, ph, pw = geometry
        C, H, W, batch = source.shape
        _, kh, kw, Ho, Wo, _ = cols.shape
        for c in range(C):
            for i in range(kh):
                for j in range(kw):
                    for ho in range(Ho):
                        h = sh * ho + dh * i - ph
                        for wo in range(Wo):
                            w = sw * wo + dw * j - pw
                            if 0 <= h < H and 0 <= w < W:
                                for b in range(batch):
                                    cols[c, i, j, ho, wo, b] = source[c, h, w, b]
                            else:
                                for b in range(batch):
                                    cols[c, i, j, ho, wo, b] = 0


# Below this many multiply-adds (non-zeros x batch) a chain runs on one thread.
PARALLEL_THRESHOLD = 2_000_000


def unsigned(indices: np.ndarray) -> np.ndarray:
    """An index array viewed as unsigned: numba then skips its negative-index wraparound test
    on every access (1.7x faster gathers)."""
    return indices.view(np.uint32 if indices.dtype.itemsize == 4 else np.uint64)


def chain_kernel(work: int, batch: int):
    """The kernel for a chain of ``work`` non-zeros on ``batch`` samples."""
    parallel = work * batch >= PARALLEL_THRESHOLD
    if batch == 1:
        return forward_chain_single if parallel else forward_chain_single_serial
    return forward_chain if parallel else forward_chain_serial
