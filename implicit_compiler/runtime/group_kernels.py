"""Per-group-size kernels of ``row_groups`` (generated: do not edit).

Regenerate with ``python -m implicit_compiler.runtime.codegen``. ``group_R`` computes, for the
R rows of group g and every sample, bias + the shared runs of B and A in registers, and stores
it to the rows of ``values`` (with relu applied when ``relu``); ``row_groups.finish_group`` adds
the rest. The batch goes by chunks of 2 vectors, then 1, then the last lanes through masked
loads and stores.
"""

# fmt: off
# ruff: noqa: E501, E702

import numba

from .simd import vfma, vlanes, vload, vload_first, vprefetch, vrelu, vsplat, vstore, vstore_first

# _nrt=False: no reference counting of the arrays (see row_groups.forward_groups)
_options = dict(cache=True, nogil=True, fastmath={"contract"}, boundscheck=False, _nrt=False)
PREFETCH = 4  # how far ahead, in vectors, the 2-vector loop asks the cache for a row's lanes


@numba.njit(**_options)
def group_8(values, p, a_indices, a_data, b_indices, b_data, bias, rows, shared_a, shared_b, g, relu):  # pragma: no cover
    lanes, batch = vlanes(values), values.shape[1]
    length_a, length_b = shared_a[g, 0], shared_b[g, 0]
    row0 = rows[g, 0]; bias0 = bias[row0]; start_a0 = shared_a[g, 1]; start_b0 = shared_b[g, 1]
    row1 = rows[g, 1]; bias1 = bias[row1]; start_a1 = shared_a[g, 2]; start_b1 = shared_b[g, 2]
    row2 = rows[g, 2]; bias2 = bias[row2]; start_a2 = shared_a[g, 3]; start_b2 = shared_b[g, 3]
    row3 = rows[g, 3]; bias3 = bias[row3]; start_a3 = shared_a[g, 4]; start_b3 = shared_b[g, 4]
    row4 = rows[g, 4]; bias4 = bias[row4]; start_a4 = shared_a[g, 5]; start_b4 = shared_b[g, 5]
    row5 = rows[g, 5]; bias5 = bias[row5]; start_a5 = shared_a[g, 6]; start_b5 = shared_b[g, 6]
    row6 = rows[g, 6]; bias6 = bias[row6]; start_a6 = shared_a[g, 7]; start_b6 = shared_b[g, 7]
    row7 = rows[g, 7]; bias7 = bias[row7]; start_a7 = shared_a[g, 8]; start_b7 = shared_b[g, 8]
    j = 0
    while j + 2 * lanes <= batch:
        acc0_0 = vsplat(values, bias0); acc0_1 = vsplat(values, bias0)
        acc1_0 = vsplat(values, bias1); acc1_1 = vsplat(values, bias1)
        acc2_0 = vsplat(values, bias2); acc2_1 = vsplat(values, bias2)
        acc3_0 = vsplat(values, bias3); acc3_1 = vsplat(values, bias3)
        acc4_0 = vsplat(values, bias4); acc4_1 = vsplat(values, bias4)
        acc5_0 = vsplat(values, bias5); acc5_1 = vsplat(values, bias5)
        acc6_0 = vsplat(values, bias6); acc6_1 = vsplat(values, bias6)
        acc7_0 = vsplat(values, bias7); acc7_1 = vsplat(values, bias7)
        for t in range(length_b):
            column = b_indices[start_b0 + t]
            x0 = vload(values, column, j); x1 = vload(values, column, j + 1 * lanes)
            vprefetch(values, column, j + PREFETCH * lanes)
            w = b_data[start_b0 + t]; acc0_0 = vfma(acc0_0, x0, w); acc0_1 = vfma(acc0_1, x1, w)
            w = b_data[start_b1 + t]; acc1_0 = vfma(acc1_0, x0, w); acc1_1 = vfma(acc1_1, x1, w)
            w = b_data[start_b2 + t]; acc2_0 = vfma(acc2_0, x0, w); acc2_1 = vfma(acc2_1, x1, w)
            w = b_data[start_b3 + t]; acc3_0 = vfma(acc3_0, x0, w); acc3_1 = vfma(acc3_1, x1, w)
            w = b_data[start_b4 + t]; acc4_0 = vfma(acc4_0, x0, w); acc4_1 = vfma(acc4_1, x1, w)
            w = b_data[start_b5 + t]; acc5_0 = vfma(acc5_0, x0, w); acc5_1 = vfma(acc5_1, x1, w)
            w = b_data[start_b6 + t]; acc6_0 = vfma(acc6_0, x0, w); acc6_1 = vfma(acc6_1, x1, w)
            w = b_data[start_b7 + t]; acc7_0 = vfma(acc7_0, x0, w); acc7_1 = vfma(acc7_1, x1, w)
        for t in range(length_a):
            column = p + a_indices[start_a0 + t]
            x0 = vload(values, column, j); x1 = vload(values, column, j + 1 * lanes)
            vprefetch(values, column, j + PREFETCH * lanes)
            w = a_data[start_a0 + t]; acc0_0 = vfma(acc0_0, x0, w); acc0_1 = vfma(acc0_1, x1, w)
            w = a_data[start_a1 + t]; acc1_0 = vfma(acc1_0, x0, w); acc1_1 = vfma(acc1_1, x1, w)
            w = a_data[start_a2 + t]; acc2_0 = vfma(acc2_0, x0, w); acc2_1 = vfma(acc2_1, x1, w)
            w = a_data[start_a3 + t]; acc3_0 = vfma(acc3_0, x0, w); acc3_1 = vfma(acc3_1, x1, w)
            w = a_data[start_a4 + t]; acc4_0 = vfma(acc4_0, x0, w); acc4_1 = vfma(acc4_1, x1, w)
            w = a_data[start_a5 + t]; acc5_0 = vfma(acc5_0, x0, w); acc5_1 = vfma(acc5_1, x1, w)
            w = a_data[start_a6 + t]; acc6_0 = vfma(acc6_0, x0, w); acc6_1 = vfma(acc6_1, x1, w)
            w = a_data[start_a7 + t]; acc7_0 = vfma(acc7_0, x0, w); acc7_1 = vfma(acc7_1, x1, w)
        if relu:
            acc0_0 = vrelu(acc0_0); acc0_1 = vrelu(acc0_1)
            acc1_0 = vrelu(acc1_0); acc1_1 = vrelu(acc1_1)
            acc2_0 = vrelu(acc2_0); acc2_1 = vrelu(acc2_1)
            acc3_0 = vrelu(acc3_0); acc3_1 = vrelu(acc3_1)
            acc4_0 = vrelu(acc4_0); acc4_1 = vrelu(acc4_1)
            acc5_0 = vrelu(acc5_0); acc5_1 = vrelu(acc5_1)
            acc6_0 = vrelu(acc6_0); acc6_1 = vrelu(acc6_1)
            acc7_0 = vrelu(acc7_0); acc7_1 = vrelu(acc7_1)
        vstore(values, p + row0, j, acc0_0); vstore(values, p + row0, j + 1 * lanes, acc0_1)
        vstore(values, p + row1, j, acc1_0); vstore(values, p + row1, j + 1 * lanes, acc1_1)
        vstore(values, p + row2, j, acc2_0); vstore(values, p + row2, j + 1 * lanes, acc2_1)
        vstore(values, p + row3, j, acc3_0); vstore(values, p + row3, j + 1 * lanes, acc3_1)
        vstore(values, p + row4, j, acc4_0); vstore(values, p + row4, j + 1 * lanes, acc4_1)
        vstore(values, p + row5, j, acc5_0); vstore(values, p + row5, j + 1 * lanes, acc5_1)
        vstore(values, p + row6, j, acc6_0); vstore(values, p + row6, j + 1 * lanes, acc6_1)
        vstore(values, p + row7, j, acc7_0); vstore(values, p + row7, j + 1 * lanes, acc7_1)
        j += 2 * lanes
    while j + lanes <= batch:
        acc0_0 = vsplat(values, bias0)
        acc1_0 = vsplat(values, bias1)
        acc2_0 = vsplat(values, bias2)
        acc3_0 = vsplat(values, bias3)
        acc4_0 = vsplat(values, bias4)
        acc5_0 = vsplat(values, bias5)
        acc6_0 = vsplat(values, bias6)
        acc7_0 = vsplat(values, bias7)
        for t in range(length_b):
            column = b_indices[start_b0 + t]
            x0 = vload(values, column, j)
            w = b_data[start_b0 + t]; acc0_0 = vfma(acc0_0, x0, w)
            w = b_data[start_b1 + t]; acc1_0 = vfma(acc1_0, x0, w)
            w = b_data[start_b2 + t]; acc2_0 = vfma(acc2_0, x0, w)
            w = b_data[start_b3 + t]; acc3_0 = vfma(acc3_0, x0, w)
            w = b_data[start_b4 + t]; acc4_0 = vfma(acc4_0, x0, w)
            w = b_data[start_b5 + t]; acc5_0 = vfma(acc5_0, x0, w)
            w = b_data[start_b6 + t]; acc6_0 = vfma(acc6_0, x0, w)
            w = b_data[start_b7 + t]; acc7_0 = vfma(acc7_0, x0, w)
        for t in range(length_a):
            column = p + a_indices[start_a0 + t]
            x0 = vload(values, column, j)
            w = a_data[start_a0 + t]; acc0_0 = vfma(acc0_0, x0, w)
            w = a_data[start_a1 + t]; acc1_0 = vfma(acc1_0, x0, w)
            w = a_data[start_a2 + t]; acc2_0 = vfma(acc2_0, x0, w)
            w = a_data[start_a3 + t]; acc3_0 = vfma(acc3_0, x0, w)
            w = a_data[start_a4 + t]; acc4_0 = vfma(acc4_0, x0, w)
            w = a_data[start_a5 + t]; acc5_0 = vfma(acc5_0, x0, w)
            w = a_data[start_a6 + t]; acc6_0 = vfma(acc6_0, x0, w)
            w = a_data[start_a7 + t]; acc7_0 = vfma(acc7_0, x0, w)
        if relu:
            acc0_0 = vrelu(acc0_0)
            acc1_0 = vrelu(acc1_0)
            acc2_0 = vrelu(acc2_0)
            acc3_0 = vrelu(acc3_0)
            acc4_0 = vrelu(acc4_0)
            acc5_0 = vrelu(acc5_0)
            acc6_0 = vrelu(acc6_0)
            acc7_0 = vrelu(acc7_0)
        vstore(values, p + row0, j, acc0_0)
        vstore(values, p + row1, j, acc1_0)
        vstore(values, p + row2, j, acc2_0)
        vstore(values, p + row3, j, acc3_0)
        vstore(values, p + row4, j, acc4_0)
        vstore(values, p + row5, j, acc5_0)
        vstore(values, p + row6, j, acc6_0)
        vstore(values, p + row7, j, acc7_0)
        j += lanes
    if j < batch:  # the last lanes
        count = batch - j
        acc0_0 = vsplat(values, bias0)
        acc1_0 = vsplat(values, bias1)
        acc2_0 = vsplat(values, bias2)
        acc3_0 = vsplat(values, bias3)
        acc4_0 = vsplat(values, bias4)
        acc5_0 = vsplat(values, bias5)
        acc6_0 = vsplat(values, bias6)
        acc7_0 = vsplat(values, bias7)
        for t in range(length_b):
            column = b_indices[start_b0 + t]
            x0 = vload_first(values, column, j, count)
            w = b_data[start_b0 + t]; acc0_0 = vfma(acc0_0, x0, w)
            w = b_data[start_b1 + t]; acc1_0 = vfma(acc1_0, x0, w)
            w = b_data[start_b2 + t]; acc2_0 = vfma(acc2_0, x0, w)
            w = b_data[start_b3 + t]; acc3_0 = vfma(acc3_0, x0, w)
            w = b_data[start_b4 + t]; acc4_0 = vfma(acc4_0, x0, w)
            w = b_data[start_b5 + t]; acc5_0 = vfma(acc5_0, x0, w)
            w = b_data[start_b6 + t]; acc6_0 = vfma(acc6_0, x0, w)
            w = b_data[start_b7 + t]; acc7_0 = vfma(acc7_0, x0, w)
        for t in range(length_a):
            column = p + a_indices[start_a0 + t]
            x0 = vload_first(values, column, j, count)
            w = a_data[start_a0 + t]; acc0_0 = vfma(acc0_0, x0, w)
            w = a_data[start_a1 + t]; acc1_0 = vfma(acc1_0, x0, w)
            w = a_data[start_a2 + t]; acc2_0 = vfma(acc2_0, x0, w)
            w = a_data[start_a3 + t]; acc3_0 = vfma(acc3_0, x0, w)
            w = a_data[start_a4 + t]; acc4_0 = vfma(acc4_0, x0, w)
            w = a_data[start_a5 + t]; acc5_0 = vfma(acc5_0, x0, w)
            w = a_data[start_a6 + t]; acc6_0 = vfma(acc6_0, x0, w)
            w = a_data[start_a7 + t]; acc7_0 = vfma(acc7_0, x0, w)
        if relu:
            acc0_0 = vrelu(acc0_0)
            acc1_0 = vrelu(acc1_0)
            acc2_0 = vrelu(acc2_0)
            acc3_0 = vrelu(acc3_0)
            acc4_0 = vrelu(acc4_0)
            acc5_0 = vrelu(acc5_0)
            acc6_0 = vrelu(acc6_0)
            acc7_0 = vrelu(acc7_0)
        vstore_first(values, p + row0, j, acc0_0, count)
        vstore_first(values, p + row1, j, acc1_0, count)
        vstore_first(values, p + row2, j, acc2_0, count)
        vstore_first(values, p + row3, j, acc3_0, count)
        vstore_first(values, p + row4, j, acc4_0, count)
        vstore_first(values, p + row5, j, acc5_0, count)
        vstore_first(values, p + row6, j, acc6_0, count)
        vstore_first(values, p + row7, j, acc7_0, count)


@numba.njit(**_options)
def group_6(values, p, a_indices, a_data, b_indices, b_data, bias, rows, shared_a, shared_b, g, relu):  # pragma: no cover
    lanes, batch = vlanes(values), values.shape[1]
    length_a, length_b = shared_a[g, 0], shared_b[g, 0]
    row0 = rows[g, 0]; bias0 = bias[row0]; start_a0 = shared_a[g, 1]; start_b0 = shared_b[g, 1]
    row1 = rows[g, 1]; bias1 = bias[row1]; start_a1 = shared_a[g, 2]; start_b1 = shared_b[g, 2]
    row2 = rows[g, 2]; bias2 = bias[row2]; start_a2 = shared_a[g, 3]; start_b2 = shared_b[g, 3]
    row3 = rows[g, 3]; bias3 = bias[row3]; start_a3 = shared_a[g, 4]; start_b3 = shared_b[g, 4]
    row4 = rows[g, 4]; bias4 = bias[row4]; start_a4 = shared_a[g, 5]; start_b4 = shared_b[g, 5]
    row5 = rows[g, 5]; bias5 = bias[row5]; start_a5 = shared_a[g, 6]; start_b5 = shared_b[g, 6]
    j = 0
    while j + 2 * lanes <= batch:
        acc0_0 = vsplat(values, bias0); acc0_1 = vsplat(values, bias0)
        acc1_0 = vsplat(values, bias1); acc1_1 = vsplat(values, bias1)
        acc2_0 = vsplat(values, bias2); acc2_1 = vsplat(values, bias2)
        acc3_0 = vsplat(values, bias3); acc3_1 = vsplat(values, bias3)
        acc4_0 = vsplat(values, bias4); acc4_1 = vsplat(values, bias4)
        acc5_0 = vsplat(values, bias5); acc5_1 = vsplat(values, bias5)
        for t in range(length_b):
            column = b_indices[start_b0 + t]
            x0 = vload(values, column, j); x1 = vload(values, column, j + 1 * lanes)
            vprefetch(values, column, j + PREFETCH * lanes)
            w = b_data[start_b0 + t]; acc0_0 = vfma(acc0_0, x0, w); acc0_1 = vfma(acc0_1, x1, w)
            w = b_data[start_b1 + t]; acc1_0 = vfma(acc1_0, x0, w); acc1_1 = vfma(acc1_1, x1, w)
            w = b_data[start_b2 + t]; acc2_0 = vfma(acc2_0, x0, w); acc2_1 = vfma(acc2_1, x1, w)
            w = b_data[start_b3 + t]; acc3_0 = vfma(acc3_0, x0, w); acc3_1 = vfma(acc3_1, x1, w)
            w = b_data[start_b4 + t]; acc4_0 = vfma(acc4_0, x0, w); acc4_1 = vfma(acc4_1, x1, w)
            w = b_data[start_b5 + t]; acc5_0 = vfma(acc5_0, x0, w); acc5_1 = vfma(acc5_1, x1, w)
        for t in range(length_a):
            column = p + a_indices[start_a0 + t]
            x0 = vload(values, column, j); x1 = vload(values, column, j + 1 * lanes)
            vprefetch(values, column, j + PREFETCH * lanes)
            w = a_data[start_a0 + t]; acc0_0 = vfma(acc0_0, x0, w); acc0_1 = vfma(acc0_1, x1, w)
            w = a_data[start_a1 + t]; acc1_0 = vfma(acc1_0, x0, w); acc1_1 = vfma(acc1_1, x1, w)
            w = a_data[start_a2 + t]; acc2_0 = vfma(acc2_0, x0, w); acc2_1 = vfma(acc2_1, x1, w)
            w = a_data[start_a3 + t]; acc3_0 = vfma(acc3_0, x0, w); acc3_1 = vfma(acc3_1, x1, w)
            w = a_data[start_a4 + t]; acc4_0 = vfma(acc4_0, x0, w); acc4_1 = vfma(acc4_1, x1, w)
            w = a_data[start_a5 + t]; acc5_0 = vfma(acc5_0, x0, w); acc5_1 = vfma(acc5_1, x1, w)
        if relu:
            acc0_0 = vrelu(acc0_0); acc0_1 = vrelu(acc0_1)
            acc1_0 = vrelu(acc1_0); acc1_1 = vrelu(acc1_1)
            acc2_0 = vrelu(acc2_0); acc2_1 = vrelu(acc2_1)
            acc3_0 = vrelu(acc3_0); acc3_1 = vrelu(acc3_1)
            acc4_0 = vrelu(acc4_0); acc4_1 = vrelu(acc4_1)
            acc5_0 = vrelu(acc5_0); acc5_1 = vrelu(acc5_1)
        vstore(values, p + row0, j, acc0_0); vstore(values, p + row0, j + 1 * lanes, acc0_1)
        vstore(values, p + row1, j, acc1_0); vstore(values, p + row1, j + 1 * lanes, acc1_1)
        vstore(values, p + row2, j, acc2_0); vstore(values, p + row2, j + 1 * lanes, acc2_1)
        vstore(values, p + row3, j, acc3_0); vstore(values, p + row3, j + 1 * lanes, acc3_1)
        vstore(values, p + row4, j, acc4_0); vstore(values, p + row4, j + 1 * lanes, acc4_1)
        vstore(values, p + row5, j, acc5_0); vstore(values, p + row5, j + 1 * lanes, acc5_1)
        j += 2 * lanes
    while j + lanes <= batch:
        acc0_0 = vsplat(values, bias0)
        acc1_0 = vsplat(values, bias1)
        acc2_0 = vsplat(values, bias2)
        acc3_0 = vsplat(values, bias3)
        acc4_0 = vsplat(values, bias4)
        acc5_0 = vsplat(values, bias5)
        for t in range(length_b):
            column = b_indices[start_b0 + t]
            x0 = vload(values, column, j)
            w = b_data[start_b0 + t]; acc0_0 = vfma(acc0_0, x0, w)
            w = b_data[start_b1 + t]; acc1_0 = vfma(acc1_0, x0, w)
            w = b_data[start_b2 + t]; acc2_0 = vfma(acc2_0, x0, w)
            w = b_data[start_b3 + t]; acc3_0 = vfma(acc3_0, x0, w)
            w = b_data[start_b4 + t]; acc4_0 = vfma(acc4_0, x0, w)
            w = b_data[start_b5 + t]; acc5_0 = vfma(acc5_0, x0, w)
        for t in range(length_a):
            column = p + a_indices[start_a0 + t]
            x0 = vload(values, column, j)
            w = a_data[start_a0 + t]; acc0_0 = vfma(acc0_0, x0, w)
            w = a_data[start_a1 + t]; acc1_0 = vfma(acc1_0, x0, w)
            w = a_data[start_a2 + t]; acc2_0 = vfma(acc2_0, x0, w)
            w = a_data[start_a3 + t]; acc3_0 = vfma(acc3_0, x0, w)
            w = a_data[start_a4 + t]; acc4_0 = vfma(acc4_0, x0, w)
            w = a_data[start_a5 + t]; acc5_0 = vfma(acc5_0, x0, w)
        if relu:
            acc0_0 = vrelu(acc0_0)
            acc1_0 = vrelu(acc1_0)
            acc2_0 = vrelu(acc2_0)
            acc3_0 = vrelu(acc3_0)
            acc4_0 = vrelu(acc4_0)
            acc5_0 = vrelu(acc5_0)
        vstore(values, p + row0, j, acc0_0)
        vstore(values, p + row1, j, acc1_0)
        vstore(values, p + row2, j, acc2_0)
        vstore(values, p + row3, j, acc3_0)
        vstore(values, p + row4, j, acc4_0)
        vstore(values, p + row5, j, acc5_0)
        j += lanes
    if j < batch:  # the last lanes
        count = batch - j
        acc0_0 = vsplat(values, bias0)
        acc1_0 = vsplat(values, bias1)
        acc2_0 = vsplat(values, bias2)
        acc3_0 = vsplat(values, bias3)
        acc4_0 = vsplat(values, bias4)
        acc5_0 = vsplat(values, bias5)
        for t in range(length_b):
            column = b_indices[start_b0 + t]
            x0 = vload_first(values, column, j, count)
            w = b_data[start_b0 + t]; acc0_0 = vfma(acc0_0, x0, w)
            w = b_data[start_b1 + t]; acc1_0 = vfma(acc1_0, x0, w)
            w = b_data[start_b2 + t]; acc2_0 = vfma(acc2_0, x0, w)
            w = b_data[start_b3 + t]; acc3_0 = vfma(acc3_0, x0, w)
            w = b_data[start_b4 + t]; acc4_0 = vfma(acc4_0, x0, w)
            w = b_data[start_b5 + t]; acc5_0 = vfma(acc5_0, x0, w)
        for t in range(length_a):
            column = p + a_indices[start_a0 + t]
            x0 = vload_first(values, column, j, count)
            w = a_data[start_a0 + t]; acc0_0 = vfma(acc0_0, x0, w)
            w = a_data[start_a1 + t]; acc1_0 = vfma(acc1_0, x0, w)
            w = a_data[start_a2 + t]; acc2_0 = vfma(acc2_0, x0, w)
            w = a_data[start_a3 + t]; acc3_0 = vfma(acc3_0, x0, w)
            w = a_data[start_a4 + t]; acc4_0 = vfma(acc4_0, x0, w)
            w = a_data[start_a5 + t]; acc5_0 = vfma(acc5_0, x0, w)
        if relu:
            acc0_0 = vrelu(acc0_0)
            acc1_0 = vrelu(acc1_0)
            acc2_0 = vrelu(acc2_0)
            acc3_0 = vrelu(acc3_0)
            acc4_0 = vrelu(acc4_0)
            acc5_0 = vrelu(acc5_0)
        vstore_first(values, p + row0, j, acc0_0, count)
        vstore_first(values, p + row1, j, acc1_0, count)
        vstore_first(values, p + row2, j, acc2_0, count)
        vstore_first(values, p + row3, j, acc3_0, count)
        vstore_first(values, p + row4, j, acc4_0, count)
        vstore_first(values, p + row5, j, acc5_0, count)


@numba.njit(**_options)
def group_4(values, p, a_indices, a_data, b_indices, b_data, bias, rows, shared_a, shared_b, g, relu):  # pragma: no cover
    lanes, batch = vlanes(values), values.shape[1]
    length_a, length_b = shared_a[g, 0], shared_b[g, 0]
    row0 = rows[g, 0]; bias0 = bias[row0]; start_a0 = shared_a[g, 1]; start_b0 = shared_b[g, 1]
    row1 = rows[g, 1]; bias1 = bias[row1]; start_a1 = shared_a[g, 2]; start_b1 = shared_b[g, 2]
    row2 = rows[g, 2]; bias2 = bias[row2]; start_a2 = shared_a[g, 3]; start_b2 = shared_b[g, 3]
    row3 = rows[g, 3]; bias3 = bias[row3]; start_a3 = shared_a[g, 4]; start_b3 = shared_b[g, 4]
    j = 0
    while j + 2 * lanes <= batch:
        acc0_0 = vsplat(values, bias0); acc0_1 = vsplat(values, bias0)
        acc1_0 = vsplat(values, bias1); acc1_1 = vsplat(values, bias1)
        acc2_0 = vsplat(values, bias2); acc2_1 = vsplat(values, bias2)
        acc3_0 = vsplat(values, bias3); acc3_1 = vsplat(values, bias3)
        for t in range(length_b):
            column = b_indices[start_b0 + t]
            x0 = vload(values, column, j); x1 = vload(values, column, j + 1 * lanes)
            vprefetch(values, column, j + PREFETCH * lanes)
            w = b_data[start_b0 + t]; acc0_0 = vfma(acc0_0, x0, w); acc0_1 = vfma(acc0_1, x1, w)
            w = b_data[start_b1 + t]; acc1_0 = vfma(acc1_0, x0, w); acc1_1 = vfma(acc1_1, x1, w)
            w = b_data[start_b2 + t]; acc2_0 = vfma(acc2_0, x0, w); acc2_1 = vfma(acc2_1, x1, w)
            w = b_data[start_b3 + t]; acc3_0 = vfma(acc3_0, x0, w); acc3_1 = vfma(acc3_1, x1, w)
        for t in range(length_a):
            column = p + a_indices[start_a0 + t]
            x0 = vload(values, column, j); x1 = vload(values, column, j + 1 * lanes)
            vprefetch(values, column, j + PREFETCH * lanes)
            w = a_data[start_a0 + t]; acc0_0 = vfma(acc0_0, x0, w); acc0_1 = vfma(acc0_1, x1, w)
            w = a_data[start_a1 + t]; acc1_0 = vfma(acc1_0, x0, w); acc1_1 = vfma(acc1_1, x1, w)
            w = a_data[start_a2 + t]; acc2_0 = vfma(acc2_0, x0, w); acc2_1 = vfma(acc2_1, x1, w)
            w = a_data[start_a3 + t]; acc3_0 = vfma(acc3_0, x0, w); acc3_1 = vfma(acc3_1, x1, w)
        if relu:
            acc0_0 = vrelu(acc0_0); acc0_1 = vrelu(acc0_1)
            acc1_0 = vrelu(acc1_0); acc1_1 = vrelu(acc1_1)
            acc2_0 = vrelu(acc2_0); acc2_1 = vrelu(acc2_1)
            acc3_0 = vrelu(acc3_0); acc3_1 = vrelu(acc3_1)
        vstore(values, p + row0, j, acc0_0); vstore(values, p + row0, j + 1 * lanes, acc0_1)
        vstore(values, p + row1, j, acc1_0); vstore(values, p + row1, j + 1 * lanes, acc1_1)
        vstore(values, p + row2, j, acc2_0); vstore(values, p + row2, j + 1 * lanes, acc2_1)
        vstore(values, p + row3, j, acc3_0); vstore(values, p + row3, j + 1 * lanes, acc3_1)
        j += 2 * lanes
    while j + lanes <= batch:
        acc0_0 = vsplat(values, bias0)
        acc1_0 = vsplat(values, bias1)
        acc2_0 = vsplat(values, bias2)
        acc3_0 = vsplat(values, bias3)
        for t in range(length_b):
            column = b_indices[start_b0 + t]
            x0 = vload(values, column, j)
            w = b_data[start_b0 + t]; acc0_0 = vfma(acc0_0, x0, w)
            w = b_data[start_b1 + t]; acc1_0 = vfma(acc1_0, x0, w)
            w = b_data[start_b2 + t]; acc2_0 = vfma(acc2_0, x0, w)
            w = b_data[start_b3 + t]; acc3_0 = vfma(acc3_0, x0, w)
        for t in range(length_a):
            column = p + a_indices[start_a0 + t]
            x0 = vload(values, column, j)
            w = a_data[start_a0 + t]; acc0_0 = vfma(acc0_0, x0, w)
            w = a_data[start_a1 + t]; acc1_0 = vfma(acc1_0, x0, w)
            w = a_data[start_a2 + t]; acc2_0 = vfma(acc2_0, x0, w)
            w = a_data[start_a3 + t]; acc3_0 = vfma(acc3_0, x0, w)
        if relu:
            acc0_0 = vrelu(acc0_0)
            acc1_0 = vrelu(acc1_0)
            acc2_0 = vrelu(acc2_0)
            acc3_0 = vrelu(acc3_0)
        vstore(values, p + row0, j, acc0_0)
        vstore(values, p + row1, j, acc1_0)
        vstore(values, p + row2, j, acc2_0)
        vstore(values, p + row3, j, acc3_0)
        j += lanes
    if j < batch:  # the last lanes
        count = batch - j
        acc0_0 = vsplat(values, bias0)
        acc1_0 = vsplat(values, bias1)
        acc2_0 = vsplat(values, bias2)
        acc3_0 = vsplat(values, bias3)
        for t in range(length_b):
            column = b_indices[start_b0 + t]
            x0 = vload_first(values, column, j, count)
            w = b_data[start_b0 + t]; acc0_0 = vfma(acc0_0, x0, w)
            w = b_data[start_b1 + t]; acc1_0 = vfma(acc1_0, x0, w)
            w = b_data[start_b2 + t]; acc2_0 = vfma(acc2_0, x0, w)
            w = b_data[start_b3 + t]; acc3_0 = vfma(acc3_0, x0, w)
        for t in range(length_a):
            column = p + a_indices[start_a0 + t]
            x0 = vload_first(values, column, j, count)
            w = a_data[start_a0 + t]; acc0_0 = vfma(acc0_0, x0, w)
            w = a_data[start_a1 + t]; acc1_0 = vfma(acc1_0, x0, w)
            w = a_data[start_a2 + t]; acc2_0 = vfma(acc2_0, x0, w)
            w = a_data[start_a3 + t]; acc3_0 = vfma(acc3_0, x0, w)
        if relu:
            acc0_0 = vrelu(acc0_0)
            acc1_0 = vrelu(acc1_0)
            acc2_0 = vrelu(acc2_0)
            acc3_0 = vrelu(acc3_0)
        vstore_first(values, p + row0, j, acc0_0, count)
        vstore_first(values, p + row1, j, acc1_0, count)
        vstore_first(values, p + row2, j, acc2_0, count)
        vstore_first(values, p + row3, j, acc3_0, count)


@numba.njit(inline="always", **_options)
def group_2(values, p, a_indices, a_data, b_indices, b_data, bias, rows, shared_a, shared_b, g, relu):  # pragma: no cover
    lanes, batch = vlanes(values), values.shape[1]
    length_a, length_b = shared_a[g, 0], shared_b[g, 0]
    row0 = rows[g, 0]; bias0 = bias[row0]; start_a0 = shared_a[g, 1]; start_b0 = shared_b[g, 1]
    row1 = rows[g, 1]; bias1 = bias[row1]; start_a1 = shared_a[g, 2]; start_b1 = shared_b[g, 2]
    j = 0
    while j + 2 * lanes <= batch:
        acc0_0 = vsplat(values, bias0); acc0_1 = vsplat(values, bias0)
        acc1_0 = vsplat(values, bias1); acc1_1 = vsplat(values, bias1)
        for t in range(length_b):
            column = b_indices[start_b0 + t]
            x0 = vload(values, column, j); x1 = vload(values, column, j + 1 * lanes)
            vprefetch(values, column, j + PREFETCH * lanes)
            w = b_data[start_b0 + t]; acc0_0 = vfma(acc0_0, x0, w); acc0_1 = vfma(acc0_1, x1, w)
            w = b_data[start_b1 + t]; acc1_0 = vfma(acc1_0, x0, w); acc1_1 = vfma(acc1_1, x1, w)
        for t in range(length_a):
            column = p + a_indices[start_a0 + t]
            x0 = vload(values, column, j); x1 = vload(values, column, j + 1 * lanes)
            vprefetch(values, column, j + PREFETCH * lanes)
            w = a_data[start_a0 + t]; acc0_0 = vfma(acc0_0, x0, w); acc0_1 = vfma(acc0_1, x1, w)
            w = a_data[start_a1 + t]; acc1_0 = vfma(acc1_0, x0, w); acc1_1 = vfma(acc1_1, x1, w)
        if relu:
            acc0_0 = vrelu(acc0_0); acc0_1 = vrelu(acc0_1)
            acc1_0 = vrelu(acc1_0); acc1_1 = vrelu(acc1_1)
        vstore(values, p + row0, j, acc0_0); vstore(values, p + row0, j + 1 * lanes, acc0_1)
        vstore(values, p + row1, j, acc1_0); vstore(values, p + row1, j + 1 * lanes, acc1_1)
        j += 2 * lanes
    while j + lanes <= batch:
        acc0_0 = vsplat(values, bias0)
        acc1_0 = vsplat(values, bias1)
        for t in range(length_b):
            column = b_indices[start_b0 + t]
            x0 = vload(values, column, j)
            w = b_data[start_b0 + t]; acc0_0 = vfma(acc0_0, x0, w)
            w = b_data[start_b1 + t]; acc1_0 = vfma(acc1_0, x0, w)
        for t in range(length_a):
            column = p + a_indices[start_a0 + t]
            x0 = vload(values, column, j)
            w = a_data[start_a0 + t]; acc0_0 = vfma(acc0_0, x0, w)
            w = a_data[start_a1 + t]; acc1_0 = vfma(acc1_0, x0, w)
        if relu:
            acc0_0 = vrelu(acc0_0)
            acc1_0 = vrelu(acc1_0)
        vstore(values, p + row0, j, acc0_0)
        vstore(values, p + row1, j, acc1_0)
        j += lanes
    if j < batch:  # the last lanes
        count = batch - j
        acc0_0 = vsplat(values, bias0)
        acc1_0 = vsplat(values, bias1)
        for t in range(length_b):
            column = b_indices[start_b0 + t]
            x0 = vload_first(values, column, j, count)
            w = b_data[start_b0 + t]; acc0_0 = vfma(acc0_0, x0, w)
            w = b_data[start_b1 + t]; acc1_0 = vfma(acc1_0, x0, w)
        for t in range(length_a):
            column = p + a_indices[start_a0 + t]
            x0 = vload_first(values, column, j, count)
            w = a_data[start_a0 + t]; acc0_0 = vfma(acc0_0, x0, w)
            w = a_data[start_a1 + t]; acc1_0 = vfma(acc1_0, x0, w)
        if relu:
            acc0_0 = vrelu(acc0_0)
            acc1_0 = vrelu(acc1_0)
        vstore_first(values, p + row0, j, acc0_0, count)
        vstore_first(values, p + row1, j, acc1_0, count)


@numba.njit(inline="always", **_options)
def group_1(values, p, a_indices, a_data, b_indices, b_data, bias, rows, shared_a, shared_b, g, relu):  # pragma: no cover
    lanes, batch = vlanes(values), values.shape[1]
    length_a, length_b = shared_a[g, 0], shared_b[g, 0]
    row0 = rows[g, 0]; bias0 = bias[row0]; start_a0 = shared_a[g, 1]; start_b0 = shared_b[g, 1]
    j = 0
    while j + 2 * lanes <= batch:
        acc0_0 = vsplat(values, bias0); acc0_1 = vsplat(values, bias0)
        for t in range(length_b):
            column = b_indices[start_b0 + t]
            x0 = vload(values, column, j); x1 = vload(values, column, j + 1 * lanes)
            vprefetch(values, column, j + PREFETCH * lanes)
            w = b_data[start_b0 + t]; acc0_0 = vfma(acc0_0, x0, w); acc0_1 = vfma(acc0_1, x1, w)
        for t in range(length_a):
            column = p + a_indices[start_a0 + t]
            x0 = vload(values, column, j); x1 = vload(values, column, j + 1 * lanes)
            vprefetch(values, column, j + PREFETCH * lanes)
            w = a_data[start_a0 + t]; acc0_0 = vfma(acc0_0, x0, w); acc0_1 = vfma(acc0_1, x1, w)
        if relu:
            acc0_0 = vrelu(acc0_0); acc0_1 = vrelu(acc0_1)
        vstore(values, p + row0, j, acc0_0); vstore(values, p + row0, j + 1 * lanes, acc0_1)
        j += 2 * lanes
    while j + lanes <= batch:
        acc0_0 = vsplat(values, bias0)
        for t in range(length_b):
            column = b_indices[start_b0 + t]
            x0 = vload(values, column, j)
            w = b_data[start_b0 + t]; acc0_0 = vfma(acc0_0, x0, w)
        for t in range(length_a):
            column = p + a_indices[start_a0 + t]
            x0 = vload(values, column, j)
            w = a_data[start_a0 + t]; acc0_0 = vfma(acc0_0, x0, w)
        if relu:
            acc0_0 = vrelu(acc0_0)
        vstore(values, p + row0, j, acc0_0)
        j += lanes
    if j < batch:  # the last lanes
        count = batch - j
        acc0_0 = vsplat(values, bias0)
        for t in range(length_b):
            column = b_indices[start_b0 + t]
            x0 = vload_first(values, column, j, count)
            w = b_data[start_b0 + t]; acc0_0 = vfma(acc0_0, x0, w)
        for t in range(length_a):
            column = p + a_indices[start_a0 + t]
            x0 = vload_first(values, column, j, count)
            w = a_data[start_a0 + t]; acc0_0 = vfma(acc0_0, x0, w)
        if relu:
            acc0_0 = vrelu(acc0_0)
        vstore_first(values, p + row0, j, acc0_0, count)


@numba.njit(inline="always", **_options)
def shared_runs(size, values, p, a_indices, a_data, b_indices, b_data, bias, rows, shared_a, shared_b, g, relu):  # pragma: no cover
    if size == 8:
        group_8(values, p, a_indices, a_data, b_indices, b_data, bias, rows, shared_a, shared_b, g, relu)
    elif size == 6:
        group_6(values, p, a_indices, a_data, b_indices, b_data, bias, rows, shared_a, shared_b, g, relu)
    elif size == 4:
        group_4(values, p, a_indices, a_data, b_indices, b_data, bias, rows, shared_a, shared_b, g, relu)
    elif size == 2:
        group_2(values, p, a_indices, a_data, b_indices, b_data, bias, rows, shared_a, shared_b, g, relu)
    else:
        group_1(values, p, a_indices, a_data, b_indices, b_data, bias, rows, shared_a, shared_b, g, relu)
