"""Rows of a structured matrix times the tensors they read, as standard ONNX ops.

Tensors are (N, features), row-major, so the rows ``r`` of M applied to the sources give
Z (N, |r|) = X M[r]^T. The columns of M are held by several tensors (``Sources``: the model's
inputs for B and D, the state blocks for A and C); a product reads only the sources it is
given (a cyclic component's loop splits A's rows into what is fixed and what iterates).

- A convolution term (kernel K (Co, C kh kw), strides s, dilations d, leading pads p): the
  source reshaped to (N, C, H, W), ``Conv`` with K as (Co, C, kh, kw) and pads [p, p'], the
  trailing pads p' = max(0, (Ho - 1) s + d (kh - 1) + 1 - H - p) (an output larger than
  (Ho, Wo) sliced back), reshaped to (N, Co Ho Wo); grouped ones with ``group``.
- A transposed convolution term: ``ConvTranspose`` with its W (C, Co / groups, kh, kw), the
  trailing pads cutting what passes (Ho, Wo), ``Pad`` with zeros where it falls short.
- A dense term W (rows, k): ``Gemm(X, W, transB=1)``.
- A term spanning more rows than asked is computed whole and its rows sliced out.
- The CSR remainder, per source: its rows from the first to the last non-empty one, then
  - dense (``Gemm``) when that is no larger than the sparse form (at least ~half full) or
    small (``SMALL_DENSE`` entries);
  - else row-gathered (ELL): each row's column indices padded to the width w of the longest
    row (padding repeats a column of the row with value 0),
        G = Gather(X, idx, axis=1)  (N, m w);  P = G * values;  Z = ReduceSum(P as (N, m, w), 2)
    (no reshape or sum when w = 1). Rows of very unequal lengths (padding would more than
    double the entries) go in groups of widths rounded up to powers of two, each an ELL
    product, put back in row order by one Gather of their concatenation.
  - but when w <= ``BOX_WIDTH`` and each of the w index columns (the j-th entry of every row)
    runs over a strided box of X's columns in C order (``strided_box``: pooling windows,
    strided shortcuts, residual identities), Z = sum_j values_j * Slice_j(X viewed as the
    box's view): Slices, no Gather, and no index stored (used for progressions too: onnxruntime
    sums a last axis of 2 slowly). onnxruntime's Gather along axis 1 copies element by element:
    LeNet-5 exported, 2 threads, the same process, best of 7: 0.069 / 6.4 ms at batch 1 / 256
    with Gathers, 0.043 / 4.3 with Slices (its own ONNX file: 0.018 / 2.1 ms).
  Sizes: Gather indices stored as int16 when the source has fewer than 2^15 columns (Cast to
  int32 at run time), else int32; values as one scalar when all are equal (none when all 1),
  as int8 (Cast) when all are small integers (pooling trees: +-1), else in the model's dtype.
  Indices that are an arithmetic progression are a Slice (a residual identity reads a block as
  it is). LeNet-5 exports to 258 kB (its ONNX file: 260 kB), ResNet20 to 1.09 MB (1.21 MB).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import scipy.sparse as sp

from ..arrays import sorted_unique
from ..errors import GraphError
from ..structure import Convolution, Dense, StructuredMatrix, Term, TransposedConvolution
from .onnx_graph import GraphWriter

SMALL_DENSE = 4096  # a remainder part of at most this many entries (rows x columns) goes dense
ELL_PADDING = 2.0  # one ELL width for all rows while padded entries are at most this times nnz
BOX_WIDTH = 8  # ELL products this wide or narrower whose index columns are strided boxes: Slices


@dataclass(frozen=True)
class Segment:
    """Columns [start, stop) of a matrix, held by the tensor ``tensor`` (N, stop - start)."""

    start: int
    stop: int
    tensor: str


@dataclass(frozen=True)
class Contribution:
    """A tensor (N, length) adding into the rows [offset, offset + length) of a product."""

    offset: int
    length: int
    tensor: str
    convolution: onnx.NodeProto | None = None  # the Conv node it comes from, whole (a bias may join it)
    channels: int = 0  # that Conv's output channels


class Sources:
    """The tensors holding (some of) a matrix's columns, as ``Segment``s."""

    def __init__(self, segments: list[Segment]):
        self.segments = sorted((s for s in segments if s.stop > s.start), key=lambda s: s.start)
        self.starts = np.array([s.start for s in self.segments], dtype=np.int64)

    def covers(self, columns: slice) -> bool:
        """Whether the sources hold every column of ``columns`` (a term's source)."""
        held = sum(max(0, min(s.stop, columns.stop) - max(s.start, columns.start)) for s in self.segments)
        return held == columns.stop - columns.start

    def overlaps(self, columns: slice) -> bool:
        return any(s.start < columns.stop and columns.start < s.stop for s in self.segments)

    def tensor(self, g: GraphWriter, columns: slice, hint: str) -> str:
        """The columns as one (N, stop - start) tensor: a source, a slice of one, or a Concat."""
        pieces = []
        for s in self.segments:
            first, last = max(s.start, columns.start), min(s.stop, columns.stop)
            if first >= last:
                continue
            whole = first == s.start and last == s.stop
            pieces.append(s.tensor if whole else g.columns(s.tensor, first - s.start, last - s.start, hint))
        return pieces[0] if len(pieces) == 1 else g.node("Concat", pieces, hint, axis=1)


def row_products(
    g: GraphWriter, matrix: StructuredMatrix, rows: slice, sources: Sources, hint: str
) -> list[Contribution]:
    """The contributions of M[rows] X for the columns held by ``sources`` (others are left out:
    they are added elsewhere), offsets counted from rows.start."""
    contributions = []
    for term in matrix.terms:
        first, last = max(term.rows.start, rows.start), min(term.rows.stop, rows.stop)
        if first < last and sources.overlaps(term.op.source):
            contributions.append(_term_rows(g, term, first, last, rows.start, sources, hint))
    remainder = matrix.remainder[rows.start : rows.stop]
    if remainder.nnz and sources.segments:
        read = sorted_unique(remainder.indices)  # (only the sources read: a model may have thousands)
        touched = sorted_unique(np.searchsorted(sources.starts, read, side="right") - 1)
        for index in touched[touched >= 0]:
            segment = sources.segments[index]
            part = remainder[:, segment.start : segment.stop]
            contributions += _sparse_rows(g, sp.csr_array(part), segment.tensor, hint)
    return contributions


def total(
    g: GraphWriter, contributions: list[Contribution], size: int, bias: np.ndarray | None, shape: tuple, hint: str
) -> str:
    """sum of the contributions (each padded to the ``size`` rows) + bias: an (N, size) tensor.
    A bias constant over each channel (``shape`` (C, ...)) is stored per channel: as the bias
    of a convolution writing all the rows, else added through an (N, C, size / C) view."""
    parts = [
        c.tensor if c.length == size else g.pad_columns(c.tensor, c.offset, size - c.offset - c.length, hint)
        for c in contributions
    ]
    if bias is not None and (not np.any(bias) or _joins_convolution(g, contributions, size, bias, shape, hint)):
        bias = None
    if not parts:
        if bias is None:
            return g.filled(0.0, size, hint=hint)
        return g.node("Expand", [g.values(bias, f"{hint}/bias"), g.batch_shape(size)], hint)
    result = parts[0]
    for part in parts[1:]:
        result = g.node("Add", [result, part], hint)
    return result if bias is None else _add_bias(g, result, bias, shape, hint)


def _channel_values(bias: np.ndarray, shape: tuple) -> np.ndarray | None:
    """The bias as (C, 1) when ``shape`` is (C, ...) with C > 1 and the bias is constant over
    each channel; else None."""
    if len(shape) < 2 or shape[0] <= 1 or shape[0] == bias.size:
        return None
    per_channel = bias.reshape(shape[0], -1)
    return per_channel[:, :1] if np.all(per_channel == per_channel[:, :1]) else None


def _joins_convolution(g: GraphWriter, contributions, size: int, bias: np.ndarray, shape: tuple, hint: str) -> bool:
    """Give a per-channel bias to a Conv writing all the rows (its input B), if there is one."""
    per_channel = _channel_values(bias, shape)
    if per_channel is None:
        return False
    for c in contributions:
        if c.convolution is not None and c.length == size and c.channels == shape[0]:
            c.convolution.input.append(g.values(per_channel[:, 0], f"{hint}/conv_bias"))
            return True
    return False


def _add_bias(g: GraphWriter, z: str, bias: np.ndarray, shape: tuple, hint: str) -> str:
    """z + bias: a scalar when it is constant, per channel through a view, else the vector."""
    if np.all(bias == bias[0]):
        return g.node("Add", [z, g.scalar(float(bias[0]))], hint)
    per_channel = _channel_values(bias, shape)
    if per_channel is None:
        return g.node("Add", [z, g.values(bias, f"{hint}/bias")], hint)
    view = g.reshape(z, (shape[0], bias.size // shape[0]), f"{hint}/channels")
    added = g.node("Add", [view, g.values(per_channel, f"{hint}/bias")], hint)
    return g.reshape(added, (bias.size,), hint)


# --------------------------------------------------------------------------------- terms
def _term_rows(g: GraphWriter, term: Term, first: int, last: int, origin: int, sources: Sources, hint: str):
    """The term's rows first:last (absolute) as a contribution at first - origin."""
    op = term.op
    if not sources.covers(op.source):
        raise GraphError(
            f"to_onnx: a term of rows {term.rows} reads columns {op.source}, of which only some are inside the cyclic "
            "component being written; export model.materialized() with find_kernels=False"
        )
    x = sources.tensor(g, op.source, f"{hint}/source")
    if isinstance(op, Dense):
        y, convolution = _dense(g, op.weight, x, hint), None
    elif isinstance(op, TransposedConvolution):
        y, convolution = _transposed_convolution(g, op, x, hint)
    else:
        y, convolution = _convolution(g, op, x, hint)
    if (first, last) != (term.rows.start, term.rows.stop):
        y, convolution = g.columns(y, first - term.rows.start, last - term.rows.start, hint), None
    channels = op.out_shape[0] if convolution is not None else 0
    return Contribution(first - origin, last - first, y, convolution, channels)


def _dense(g: GraphWriter, weight: np.ndarray, x: str, hint: str) -> str:
    """X W^T (N, rows) for W (rows, k)."""
    return g.node("Gemm", [x, g.values(weight, f"{hint}/weight")], f"{hint}/gemm", transB=1)


def _convolution(g: GraphWriter, op: Convolution, x: str, hint: str) -> tuple[str, onnx.NodeProto]:
    """The convolution of x (N, C H W) as (N, Co Ho Wo) (module docstring), and its Conv node
    (``group`` = op.groups, K as (Co, C / groups, kh, kw))."""
    (C, H, W), (Co, Ho, Wo) = op.in_shape, op.out_shape
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = op.kernel, op.stride, op.dilation, op.pads
    bottom = max(0, (Ho - 1) * sh + dh * (kh - 1) + 1 - H - ph)
    right = max(0, (Wo - 1) * sw + dw * (kw - 1) + 1 - W - pw)
    natural_h = (H + ph + bottom - dh * (kh - 1) - 1) // sh + 1
    natural_w = (W + pw + right - dw * (kw - 1) - 1) // sw + 1
    weight = g.values(op.weight.reshape(Co, C // op.groups, kh, kw), f"{hint}/kernel")
    image = g.reshape(x, (C, H, W), f"{hint}/image")
    y = g.node(
        "Conv", [image, weight], f"{hint}/conv", kernel_shape=[kh, kw], strides=[sh, sw], dilations=[dh, dw],
        pads=[ph, pw, bottom, right], group=op.groups,
    )  # fmt: skip
    node = g.nodes[-1]
    if (natural_h, natural_w) != (Ho, Wo):
        bounds = [g.integers([0, 0], "start"), g.integers([Ho, Wo], "stop"), g.integers([2, 3], "axes")]
        y = g.node("Slice", [y, *bounds], f"{hint}/crop")
    return g.reshape(y, (Co * Ho * Wo,), f"{hint}/flat"), node


def _transposed_convolution(
    g: GraphWriter, op: TransposedConvolution, x: str, hint: str
) -> tuple[str, onnx.NodeProto | None]:
    """The transposed convolution of x (N, C H W) as (N, Co Ho Wo), and its ConvTranspose node
    (None when padded, see below):
    W (C, Co / groups, kh, kw) as stored, the leading pads p, the trailing pads p' = max(0,
    s (H - 1) + d (kh - 1) + 1 - p - Ho) (the pixels past Ho cut), and an output smaller than
    (Ho, Wo) (output pixels no input reaches) padded with zeros at the end."""
    (C, H, W), (Co, Ho, Wo) = op.in_shape, op.out_shape
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = op.kernel, op.stride, op.dilation, op.pads
    reach_h, reach_w = sh * (H - 1) + dh * (kh - 1) + 1 - ph, sw * (W - 1) + dw * (kw - 1) + 1 - pw
    bottom, right = max(0, reach_h - Ho), max(0, reach_w - Wo)
    weight = g.values(op.weight.reshape(C, Co // op.groups, kh, kw), f"{hint}/kernel")
    image = g.reshape(x, (C, H, W), f"{hint}/image")
    y = g.node(
        "ConvTranspose", [image, weight], f"{hint}/conv_transpose", kernel_shape=[kh, kw], strides=[sh, sw],
        dilations=[dh, dw], pads=[ph, pw, bottom, right], group=op.groups,
    )  # fmt: skip
    node = g.nodes[-1]
    short_h, short_w = Ho - (reach_h - bottom), Wo - (reach_w - right)
    if short_h or short_w:  # (then no bias joins the node: the padded pixels need it too)
        y, node = g.node("Pad", [y, g.integers([0, 0, 0, 0, 0, 0, short_h, short_w], "pads")], f"{hint}/pad"), None
    return g.reshape(y, (Co * Ho * Wo,), f"{hint}/flat"), node


# --------------------------------------------------------------------------------- CSR
def _sparse_rows(g: GraphWriter, part: sp.csr_array, x: str, hint: str) -> list[Contribution]:
    """part (m, k) X^T for x (N, k): its non-empty run of rows, dense or row-gathered."""
    part.sum_duplicates()
    part.eliminate_zeros()
    if part.nnz == 0:
        return []
    filled = np.flatnonzero(np.diff(part.indptr))
    first, last = int(filled[0]), int(filled[-1]) + 1
    part = part[first:last]
    m, k = part.shape
    sparse_bytes = part.nnz * (2 + part.dtype.itemsize)  # (indices at least int16)
    if m * k <= SMALL_DENSE or m * k * part.dtype.itemsize <= sparse_bytes:
        return [Contribution(first, m, _dense(g, part.toarray(), x, hint))]
    counts = np.diff(part.indptr)
    if m * counts.max() <= ELL_PADDING * part.nnz:
        return [Contribution(first, m, _ell(g, part, x, int(counts.max()), hint))]
    return [Contribution(first, m, _ell_groups(g, part, x, counts, hint))]


def _ell(g: GraphWriter, part: sp.csr_array, x: str, width: int, hint: str) -> str:
    """part (m, k) X^T with every row padded to ``width`` entries (module docstring)."""
    m, k = part.shape
    counts = np.diff(part.indptr)
    index = np.empty((m, width), dtype=np.int64)
    values = np.zeros((m, width), dtype=part.dtype)
    row_of = np.repeat(np.arange(m), counts)
    position = np.arange(part.nnz) - np.repeat(part.indptr[:-1], counts)
    # padding reads the row's last column (or column 0 for an empty row) with value 0
    last_column = np.where(counts > 0, part.indices[np.maximum(part.indptr[1:] - 1, 0)], 0)
    index[:] = last_column[:, None]
    index[row_of, position] = part.indices
    values[row_of, position] = part.data
    flat = index.ravel()
    if width <= BOX_WIDTH:  # (a progression too: ReduceSum over a last axis of 2 is slow in onnxruntime)
        boxes = [strided_box(index[:, j], k) for j in range(width)]
        if all(box is not None for box in boxes):
            return _box_sum(g, x, k, boxes, values, hint)
    gathered = _gather_columns(g, x, flat, k, hint)
    product = _scaled(g, gathered, values.ravel(), hint)
    if width == 1:
        return product
    return g.reduce("ReduceSum", g.reshape(product, (m, width), f"{hint}/rows"), [2], f"{hint}/sum")


def _box_sum(g: GraphWriter, x: str, k: int, boxes: list, values: np.ndarray, hint: str) -> str:
    """sum_j values[:, j] * x[:, index[:, j]] where every index column is a strided box of x's
    columns (``strided_box``): Slices of x viewed as the box's view shape, no Gather."""
    m = values.shape[0]
    result = None
    for j, (view, starts, stops, steps) in enumerate(boxes):
        view_name = x if len(view) == 1 else g.reshape(x, view, f"{hint}/view")
        axes = list(range(1, len(view) + 1))
        bounds = [g.integers(starts, "start"), g.integers(stops, "stop"), g.integers(axes, "axes")]
        picked = g.node("Slice", [view_name, *bounds, g.integers(steps, "step")], f"{hint}/box")
        if len(view) > 1:
            picked = g.reshape(picked, (m,), f"{hint}/picked")
        column = values[:, j]
        if result is not None and np.all(np.abs(column) == 1) and np.all(column == column[0]):
            result = g.node("Add" if column[0] == 1 else "Sub", [result, picked], f"{hint}/sum")
            continue
        term = _scaled(g, picked, column, f"{hint}/term")
        result = term if result is None else g.node("Add", [result, term], f"{hint}/sum")
    return result


def strided_box(index: np.ndarray, k: int) -> tuple | None:
    """For indices into k columns that run over a strided box in C order,
    index = base + sum_d s_d i_d (0 <= i_d < n_d, s_d the strides, innermost last), a view of
    the k columns and the Slice of it that picks them: (view shape, starts, stops, steps), the
    view (k / s_top, s_top / s_.., ..., s_1) read with step 1 on each axis but the innermost
    (step s_0). None when the indices are no such box, or no view reaches them (s_{d+1} not a
    multiple of s_d, k not of s_top, a box that would wrap)."""
    dims, strides = _box(index)
    if dims is None:
        return None
    if len(dims) == 1:
        step = strides[0] if strides[0] > 0 else 1
        return (k,), [int(index[0])], [int(index[-1]) + 1], [step]
    outer = strides[1:]  # the view's axes' element strides, innermost first (> the innermost's)
    if any(b % a for a, b in zip(outer, outer[1:])) or k % outer[-1]:
        return None
    view = [k // outer[-1], *(outer[d + 1] // outer[d] for d in reversed(range(len(outer) - 1))), outer[0]]
    place_strides = [*reversed(outer), 1]
    starts = [int(index[0]) // stride % size for stride, size in zip(place_strides, view)]
    steps = [1] * (len(view) - 1) + [strides[0]]
    counts = [*reversed(dims[1:]), dims[0]]
    stops = [start + (count - 1) * step + 1 for start, count, step in zip(starts, counts, steps)]
    if any(stop > size for stop, size in zip(stops, view)) or starts[-1] + (dims[0] - 1) * strides[0] >= outer[0]:
        return None
    return tuple(view), starts, stops, steps


def _box(index: np.ndarray) -> tuple[list[int] | None, list[int]]:
    """(counts n_d, strides s_d), innermost first, of indices running over a strided box in C
    order with increasing strides; (None, []) when they do not."""
    dims, strides, rows = [], [], index.reshape(1, -1)
    while rows.shape[1] > 1 or not dims:
        first = rows[0]
        if first.size == 1:
            dims.append(1), strides.append(1)
        else:
            step = int(first[1] - first[0])
            run = int(np.argmax(np.diff(first) != step)) + 1 if np.any(np.diff(first) != step) else first.size
            if step <= 0 or (strides and step <= strides[-1] * (dims[-1] - 1)) or first.size % run:
                return None, []
            dims.append(run), strides.append(step)
        run = dims[-1]
        blocks = rows.reshape(-1, run) if rows.shape[0] == 1 else None
        if blocks is None:
            return None, []
        if not np.all(blocks - blocks[:, :1] == np.arange(run) * strides[-1]):
            return None, []
        rows = blocks[:, 0].reshape(1, -1)
        if rows.shape[1] == 1:
            break
    return dims, strides


def _ell_groups(g: GraphWriter, part: sp.csr_array, x: str, counts: np.ndarray, hint: str) -> str:
    """Rows grouped by their length rounded up to a power of two, each group an ELL product,
    the groups' results concatenated and put back in row order (empty rows read a zero
    column)."""
    m = part.shape[0]
    widths = np.where(counts > 0, 2 ** np.ceil(np.log2(np.maximum(counts, 1))).astype(np.int64), 0)
    results, order = [], []
    for width in np.unique(widths[widths > 0]):
        rows = np.flatnonzero(widths == width)
        results.append(_ell(g, sp.csr_array(part[rows]), x, int(width), f"{hint}/w{width}"))
        order.append(rows)
    order = np.concatenate(order)
    place = np.full(m, order.size, dtype=np.int64)  # empty rows: the zero column after the groups
    place[order] = np.arange(order.size)
    if order.size < m:
        results.append(g.filled(0.0, 1, hint=f"{hint}/zero"))
    joined = g.node("Concat", results, f"{hint}/groups", axis=1)
    return _gather_columns(g, joined, place, order.size + 1, hint)


def _is_progression(index: np.ndarray) -> bool:
    """Whether the indices are an increasing arithmetic progression (one Slice)."""
    steps = np.diff(index)
    return index.size == 1 or (index.size > 1 and steps[0] > 0 and bool(np.all(steps == steps[0])))


def _gather_columns(g: GraphWriter, x: str, index: np.ndarray, k: int, hint: str) -> str:
    """x[:, index] for x (N, k): x itself, a Slice (an arithmetic progression), or a Gather."""
    if _is_progression(index):
        step = int(index[1] - index[0]) if index.size > 1 else 1
        start, stop = int(index[0]), int(index[-1]) + 1
        if (start, stop, step, index.size) == (0, k, 1, k):
            return x
        return g.columns(x, start, stop, f"{hint}/slice", step=step)
    if k < 2**15:
        indices = g.node("Cast", [g.constant(index.astype(np.int16), f"{hint}/index")], f"{hint}/index32", to=6)
    else:
        indices = g.constant(index.astype(np.int32 if k < 2**31 else np.int64), f"{hint}/index")
    return g.node("Gather", [x, indices], f"{hint}/gather", axis=1)


def _scaled(g: GraphWriter, x: str, values: np.ndarray, hint: str) -> str:
    """x * values (broadcast over the batch): nothing for ones, a scalar when all are equal,
    int8 cast to the dtype when all are small integers, else the values themselves."""
    if np.all(values == values[0]):
        return x if values[0] == 1 else g.node("Mul", [x, g.scalar(float(values[0]))], f"{hint}/scale")
    if np.all(values == np.round(values)) and np.all(np.abs(values) <= 127):
        small = g.constant(values.astype(np.int8), f"{hint}/values")
        values_name = g.node("Cast", [small], f"{hint}/values_cast", to=g.elem_type)
    else:
        values_name = g.values(values, f"{hint}/values")
    return g.node("Mul", [x, values_name], f"{hint}/scale")
