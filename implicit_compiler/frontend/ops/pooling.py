"""Pooling and reductions: averages and sums are linear maps, maxima are relu trees.

Windows. For a pool over X of shape (N, C, d_1, ..., d_n), output position o and kernel
offset j index, along each spatial axis a, the input position

    p_a(o, j) = o_a * stride_a - pad_begin_a + j_a * dilation_a,     0 <= j_a < kernel_a,

and the element is in the window when 0 <= p_a < d_a on every axis (padding positions are
not elements: zeros for AveragePool, -inf for MaxPool). Output sizes and auto_pad padding
follow onnxruntime, the oracle where onnx.reference differs:

    out_a = (d_a + pad_begin_a + pad_end_a - dilation_a (kernel_a - 1) - 1) / stride_a + 1,

the division rounded toward zero, or up with ceil_mode, in which case a last window that would
start past the input and its begin padding is dropped; SAME_UPPER / SAME_LOWER pad
(ceil(d_a / stride_a) - 1) stride_a + kernel_a - d_a in all (for the undilated kernel, as
onnxruntime does), the odd unit at the end / at the start. Each window is one row of an
(outputs x kernel size) table of flat input ids, -1 outside the input, built with numpy
broadcasting over the axes (no loop over output positions).

    AveragePool       y_o = (1 / m_o) * sum of the window's elements: a sparse map T with
                      1 / m_o at (o, id) for each valid id, applied with ``ctx.apply_map``.
                      m_o is the number of valid elements (count_include_pad=0), or with
                      count_include_pad=1 the product over axes of the number of kernel
                      positions p_a < d_a + pad_end_a (padding counts, the extra cells a
                      ceil_mode window reaches past the end padding do not).
    GlobalAveragePool the same with the kernel equal to the spatial shape.
    ReduceSum/Mean    the same over the reduced axes (table: the reduced axes moved last),
                      with weights 1 (sum) or 1 / (number of reduced elements) (mean).

    MaxPool           max(a, b) = b + relu(a - b), exact. A window's valid ids are moved to
                      the front of its row, then reduced pairwise in a balanced tree: at
                      level k the columns (2i, 2i + 1) of the table are paired; where both
                      are valid the pair becomes b + relu(a - b), where only the first is
                      (a short window) it passes through unchanged. All pairs of a level,
                      over every output position, form ONE relu block named
                      "<output>/max_level<k>"; identical pairs (overlapping windows) share
                      their state. A window of K elements takes ceil(log2 K) levels.
    GlobalMaxPool     the same with the kernel equal to the spatial shape.
    ReduceMax         the same over the reduced axes.

When the pooled value is not a plain selection of variables (a max directly after a
convolution), every window element repeats its whole row in the tree's pre-activations;
when that would exceed ``FOLD_GROWTH_LIMIT`` times the cost of an identity block, the value
is first kept as an identity block. MaxPool's optional Indices output (the argmax) is not a
function of the input an implicit model can express and is refused.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from ...errors import GraphError, UnsupportedAttributeError
from ..context import FOLD_GROWTH_LIMIT, LoweringContext, NodeView
from ..registry import lowers
from .common import Affine, constant_ints, normalize_axis, optional_input

POOL_ATTRIBUTES = ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "strides")
REDUCE_ATTRIBUTES = ("axes", "keepdims", "noop_with_empty_axes")


# ------------------------------------------------------------------------------------- windows
def _output_size(size: int, begin: int, end: int, kernel: int, stride: int, dilation: int, ceil_mode: bool) -> int:
    """onnxruntime's output length of one axis.

    (size + begin + end - dilation (kernel - 1) - 1) / stride + 1, the division truncated toward
    zero (C integer division; so a kernel slightly longer than the padded input still gives one
    window) or rounded up with ceil_mode; with ceil_mode, a last window that would start past the
    input and its begin padding is dropped (onnx/onnx#5741).
    """
    numerator = size + begin + end - dilation * (kernel - 1) - 1
    if not ceil_mode:
        return int(numerator / stride) + 1
    out = math.ceil(numerator / stride) + 1
    return out - 1 if (out - 1) * stride >= size + begin else out


def _pool_geometry(node: NodeView, spatial: tuple[int, ...], kernel: list[int]) -> tuple[list[tuple[int, ...]], bool]:
    """Per axis (size, kernel, stride, dilation, pad_begin, pad_end, output size); ceil_mode."""
    rank = len(spatial)
    strides = list(node.attr("strides", None) or [1] * rank)
    dilations = list(node.attr("dilations", None) or [1] * rank)
    pads = list(node.attr("pads", None) or [0] * (2 * rank))
    auto_pad = node.attr("auto_pad", "NOTSET") or "NOTSET"
    ceil_mode = bool(node.attr("ceil_mode", 0))
    if len(kernel) != rank or len(strides) != rank or len(dilations) != rank or len(pads) != 2 * rank:
        raise GraphError(
            f"{node.where}: the input has {rank} spatial axes {spatial}, but kernel_shape={kernel}, "
            f"strides={strides}, dilations={dilations}, pads={pads} do not all match it (pads needs {2 * rank})"
        )
    if min(kernel) < 1 or min(strides) < 1 or min(dilations) < 1:
        raise GraphError(
            f"{node.where}: kernel_shape={kernel}, strides={strides} and dilations={dilations} must be positive"
        )
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise node.unsupported("auto_pad", auto_pad, "use NOTSET, VALID, SAME_UPPER or SAME_LOWER")
    axes = []
    for a in range(rank):
        size, k, s, d = spatial[a], kernel[a], strides[a], dilations[a]
        if auto_pad == "NOTSET":
            begin, end = pads[a], pads[rank + a]
        elif auto_pad == "VALID":
            begin = end = 0
        else:  # SAME_*: onnxruntime pads for the undilated kernel
            needed = ((size + s - 1) // s - 1) * s + k - size
            head = int(needed / 2) if auto_pad == "SAME_UPPER" else int((needed + 1) / 2)  # C division
            begin, end = head, needed - head
        out = _output_size(size, begin, end, k, s, d, ceil_mode)
        if out < 1:
            raise GraphError(
                f"{node.where}: axis {a + 2} of size {size} with pads ({begin}, {end}) is shorter than the "
                f"(dilated) kernel {d * (k - 1) + 1}: the output would be empty"
            )
        axes.append((size, k, s, d, begin, end, out))
    return axes, ceil_mode


def _window_table(axes: list[tuple[int, ...]], clip_end: bool) -> tuple[np.ndarray, np.ndarray]:
    """(outputs x kernel) flat spatial input ids (-1 outside) and each window's count with padding.

    The count with padding is, per axis, the kernel positions before the end of the end padding.
    ``clip_end``: also drop elements at or past size + pad_end, as onnxruntime's AveragePool does
    (it matters only for the negative end padding SAME_* computes when kernel < stride).
    """
    rank = len(axes)
    sizes = [axis[0] for axis in axes]
    in_strides = np.cumprod([1, *sizes[::-1]])[:-1][::-1]
    flat, valid, padded_count = 0, True, 1
    for a, (size, k, s, d, begin, end, out) in enumerate(axes):
        positions = (np.arange(out) * s - begin)[:, None] + np.arange(k)[None, :] * d  # (out, k)
        shape = [1] * (2 * rank)
        shape[a], shape[rank + a] = out, k
        positions = positions.reshape(shape)
        flat = flat + positions * in_strides[a]
        valid = valid & (positions >= 0) & (positions < (min(size, size + end) if clip_end else size))
        counted = (np.arange(out) * s - begin)[:, None] + np.arange(k)[None, :] * d < size + end
        padded_count = padded_count * counted.sum(axis=1).reshape(shape[:rank])
    out_shape = tuple(axis[6] for axis in axes)
    kernel_size = math.prod(axis[1] for axis in axes)
    ids = np.where(valid, flat, -1).reshape(math.prod(out_shape), kernel_size)
    counts = np.broadcast_to(padded_count, out_shape).reshape(-1)
    return ids, counts


def _per_channel(ids: np.ndarray, channels: int, in_size: int) -> np.ndarray:
    """The spatial table repeated for each of ``channels`` leading slices of ``in_size`` elements."""
    offsets = (np.arange(channels, dtype=np.int64) * in_size)[:, None, None]
    return np.where(ids[None] >= 0, ids[None] + offsets, -1).reshape(-1, ids.shape[1])


def _pool_input(node: NodeView, inputs: list, what: str) -> Affine:
    data = inputs[0]
    if not isinstance(data, Affine):
        raise GraphError(f"{node.where}: only its data input X may depend on the model input")
    if data.ndim < 3:
        raise GraphError(f"{node.where}: {what} needs an input of shape (N, C, spatial...), got {data.shape}")
    return data


def _pool_windows(
    node: NodeView, data: Affine, global_pool: bool, average: bool
) -> tuple[np.ndarray, np.ndarray, tuple]:
    """The full table over all (N, C) slices, the per-row padded counts, and the output shape."""
    spatial = data.shape[2:]
    if global_pool:
        axes = [(size, size, 1, 1, 0, 0, 1) for size in spatial]
    else:
        kernel = node.attr("kernel_shape")
        if not kernel:
            raise GraphError(f"{node.where}: the kernel_shape attribute is required")
        axes, _ = _pool_geometry(node, spatial, list(kernel))
    ids, counts = _window_table(axes, clip_end=average)
    channels = math.prod(data.shape[:2])
    table = _per_channel(ids, channels, math.prod(spatial))
    out_shape = (*data.shape[:2], *(axis[6] for axis in axes))
    return table, np.tile(counts, channels), out_shape


# ------------------------------------------------------------------------------------- linear
def _window_map(table: np.ndarray, weights: np.ndarray, columns: int) -> sp.csr_array:
    """The sparse map with ``weights[r]`` at (r, id) for every valid id of row r of the table."""
    rows, slots = np.nonzero(table >= 0)
    matrix = sp.csr_array((weights[rows], (rows, table[rows, slots])), shape=(table.shape[0], columns))
    matrix.sum_duplicates()
    return matrix


def _average(ctx: LoweringContext, data: Affine, table: np.ndarray, divisors: np.ndarray, shape: tuple) -> Affine:
    valid = divisors > 0
    weights = np.where(valid, 1.0 / np.where(valid, divisors, 1), 0.0)  # an empty window averages to 0
    matrix = _window_map(table, weights, data.size)
    ctx.ensure_fits(matrix.nnz, "an averaging map")
    return ctx.apply_map(data, matrix, shape)


# ------------------------------------------------------------------------------------- maxima
def _stack(parts: list[Affine], width: int) -> Affine:
    """The rows of the expressions, one after the other, as one flat expression."""
    coefficients = sp.vstack([part.widen(width).coefficients for part in parts], format="csr")
    offset = np.concatenate([part.offset for part in parts])
    return Affine((offset.size,), sp.csr_array(coefficients), offset)


def _keep_if_costly(ctx: LoweringContext, data: Affine, table: np.ndarray) -> Affine:
    """``data``, or an identity block of it when its rows would be copied too often by the tree.

    Each window element's row goes into the first level's differences and, about half the time,
    up the following levels: ~2 copies per use, against one copy plus 2 selection entries per use.
    """
    if data.is_selection:
        return data
    uses = np.bincount(table[table >= 0], minlength=data.size)
    row_nonzeros = np.diff(data.coefficients.indptr)
    folded = 2.0 * float(uses @ row_nonzeros)
    kept = float(data.coefficients.nnz) + 2.0 * float(uses.sum())
    return ctx.materialize(data) if folded > FOLD_GROWTH_LIMIT * kept else data


def tree_max(ctx: LoweringContext, data: Affine, table: np.ndarray, name: str) -> Affine:
    """The maximum of each row's valid elements (ids into the flattened data), flat (rows,).

    Balanced pairwise tree of max(a, b) = b + relu(a - b): one relu block per level.
    """
    values = _keep_if_costly(ctx, data, table)
    values = values.reshape((values.size,))
    table = np.take_along_axis(table, np.argsort(table < 0, axis=1, kind="stable"), axis=1)
    valid_per_row = (table >= 0).sum(axis=1)
    if table.shape[0] and valid_per_row.min() == 0:
        raise GraphError(
            f"{name}: a pooling window holds no input element (only padding), so its maximum is undefined; "
            "reduce the pads or the dilations"
        )
    table = table[:, : max(int(valid_per_row.max(initial=1)), 1)]
    level = 0
    while table.shape[1] > 1:
        level += 1
        if table.shape[1] % 2:
            table = np.pad(table, ((0, 0), (0, 1)), constant_values=-1)
        first, second = table[:, 0::2], table[:, 1::2]
        paired = second >= 0  # valid ids are at the front: the first is valid too
        alone = (first >= 0) & ~paired
        low, high = np.minimum(first[paired], second[paired]), np.maximum(first[paired], second[paired])
        keys, pair_slot = np.unique(low * values.size + high, return_inverse=True)
        lone_ids, lone_slot = np.unique(first[alone], return_inverse=True)
        a, b = values.take(keys // values.size), values.take(keys % values.size)
        relu = ctx.create_block(a - b, "relu", name=f"{name}/max_level{level}", sample_shape=(keys.size,))
        parts = [b + relu] + ([values.take(lone_ids)] if lone_ids.size else [])
        values = _stack(parts, ctx.width)
        table = np.full(first.shape, -1, dtype=np.int64)
        table[paired] = pair_slot.ravel()
        table[alone] = keys.size + lone_slot.ravel()
    return values.take(table[:, 0])


# ------------------------------------------------------------------------------------- pools
def check_pool_attributes(node: NodeView) -> None:
    """The attribute values refused whatever the shapes (run on every node before lowering any)."""
    auto_pad = node.attr("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise node.unsupported("auto_pad", auto_pad, "use NOTSET, VALID, SAME_UPPER or SAME_LOWER")


@lowers("AveragePool", attributes=(*POOL_ATTRIBUTES, "count_include_pad"), check=check_pool_attributes)
def lower_average_pool(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """Window averages: one sparse linear map.

    Every attribute: kernel_shape, strides, pads (asymmetric), auto_pad, ceil_mode,
    count_include_pad and dilations, with onnxruntime's output shape and divisors.

    Args:
        ctx: the lowering context.
        node: the AveragePool node.
        inputs: [X], X an expression of shape (N, C, spatial...).

    Returns:
        [Y], the averages.
    """
    data = _pool_input(node, inputs, "AveragePool")
    table, padded_counts, out_shape = _pool_windows(node, data, global_pool=False, average=True)
    divisors = padded_counts if node.attr("count_include_pad", 0) else (table >= 0).sum(axis=1)
    return [_average(ctx, data, table, divisors, out_shape)]


@lowers("GlobalAveragePool")
def lower_global_average_pool(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """Mean over the spatial axes: one sparse linear map.

    Args:
        ctx: the lowering context.
        node: the GlobalAveragePool node.
        inputs: [X], X an expression of shape (N, C, spatial...).

    Returns:
        [Y] of shape (N, C, 1, ..., 1).
    """
    data = _pool_input(node, inputs, "GlobalAveragePool")
    table, _, out_shape = _pool_windows(node, data, global_pool=True, average=True)
    return [_average(ctx, data, table, np.full(table.shape[0], table.shape[1]), out_shape)]


@lowers("MaxPool", attributes=(*POOL_ATTRIBUTES, "storage_order"), check=check_pool_attributes)
def lower_max_pool(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """Window maxima, exact: a balanced tree of b + relu(a - b), one relu block per level.

    Args:
        ctx: the lowering context.
        node: the MaxPool node (storage_order only concerns Indices).
        inputs: [X], X an expression of shape (N, C, spatial...).

    Returns:
        [Y], the maxima over the valid (non-padding) window elements.

    Raises:
        UnsupportedAttributeError: the node names its Indices output.
    """
    if len(node.proto.output) > 1 and node.proto.output[1]:
        raise UnsupportedAttributeError(
            f"{node.where}: its Indices output {node.proto.output[1]!r} (the position of each maximum) is not "
            "supported: which element is largest is not an affine or relu function of the input. Export the "
            "MaxPool without indices (e.g. torch MaxPool2d(return_indices=False)), or drop the unused output"
        )
    data = _pool_input(node, inputs, "MaxPool")
    table, _, out_shape = _pool_windows(node, data, global_pool=False, average=False)
    return [tree_max(ctx, data, table, node.proto.output[0]).reshape(out_shape)]


@lowers("GlobalMaxPool")
def lower_global_max_pool(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """Maximum over the spatial axes: a balanced relu tree, one relu block per level.

    Args:
        ctx: the lowering context.
        node: the GlobalMaxPool node.
        inputs: [X], X an expression of shape (N, C, spatial...).

    Returns:
        [Y] of shape (N, C, 1, ..., 1).
    """
    data = _pool_input(node, inputs, "GlobalMaxPool")
    table, _, out_shape = _pool_windows(node, data, global_pool=True, average=False)
    return [tree_max(ctx, data, table, node.proto.output[0]).reshape(out_shape)]


# ------------------------------------------------------------------------------------- reductions
def _reduction(node: NodeView, inputs: list) -> tuple[Affine, np.ndarray | None, tuple[int, ...]]:
    """The data, the (kept x reduced) table of row ids (None: no-op) and the output shape."""
    data = inputs[0]
    if not isinstance(data, Affine):
        raise GraphError(f"{node.where}: only its data input may depend on the model input")
    axes_input = optional_input(inputs, 1)
    if node.attr("axes") is not None:
        axes = [int(a) for a in node.attr("axes")]
    elif axes_input is not None:
        axes = constant_ints(axes_input, node, "the axes (input 1)")
    else:
        axes = []
    if not axes:
        if node.attr("noop_with_empty_axes", 0):
            return data, None, data.shape
        axes = list(range(data.ndim))
    reduced = sorted({normalize_axis(a, data.ndim, node) for a in axes})
    kept = [a for a in range(data.ndim) if a not in reduced]
    ids = np.arange(data.size, dtype=np.int64).reshape(data.shape).transpose(*kept, *reduced)
    table = ids.reshape(math.prod(data.shape[a] for a in kept), math.prod(data.shape[a] for a in reduced))
    if node.attr("keepdims", 1):
        shape = tuple(1 if a in reduced else n for a, n in enumerate(data.shape))
    else:
        shape = tuple(data.shape[a] for a in kept)
    return data, table, shape


def _reduce_linear(ctx: LoweringContext, node: NodeView, inputs: list, mean: bool) -> list:
    data, table, shape = _reduction(node, inputs)
    if table is None:
        return [data]
    weight = 1.0 / table.shape[1] if mean and table.shape[1] else 1.0
    matrix = _window_map(table, np.full(table.shape[0], weight), data.size)
    ctx.ensure_fits(matrix.nnz, "a reduction map")
    return [ctx.apply_map(data, matrix, shape)]


@lowers("ReduceSum", attributes=REDUCE_ATTRIBUTES)
def lower_reduce_sum(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """Sum over axes: one sparse linear map.

    Args:
        ctx: the lowering context.
        node: the ReduceSum node (axes attribute before opset 13; keepdims, noop_with_empty_axes).
        inputs: [data] or [data, axes] (opset 13+), axes constant.

    Returns:
        [reduced].
    """
    return _reduce_linear(ctx, node, inputs, mean=False)


@lowers("ReduceMean", attributes=REDUCE_ATTRIBUTES)
def lower_reduce_mean(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """Mean over axes: one sparse linear map.

    Args:
        ctx: the lowering context.
        node: the ReduceMean node (axes attribute before opset 18; keepdims, noop_with_empty_axes).
        inputs: [data] or [data, axes] (opset 18+), axes constant.

    Returns:
        [reduced].
    """
    return _reduce_linear(ctx, node, inputs, mean=True)


@lowers("ReduceMax", attributes=REDUCE_ATTRIBUTES)
def lower_reduce_max(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """Maximum over axes: a balanced relu tree, one relu block per level.

    Args:
        ctx: the lowering context.
        node: the ReduceMax node (axes attribute before opset 18; keepdims, noop_with_empty_axes).
        inputs: [data] or [data, axes] (opset 18+), axes constant.

    Returns:
        [reduced].
    """
    data, table, shape = _reduction(node, inputs)
    if table is None:
        return [data]
    if table.shape[1] == 0:
        raise GraphError(f"{node.where}: the reduced axes are empty, so the maximum is undefined")
    return [tree_max(ctx, data, table, node.proto.output[0]).reshape(shape)]
