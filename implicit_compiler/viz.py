"""Pictures of implicit models: sparsity patterns, sensitivity maps, residual curves (PNG files).

Each function writes one PNG and returns its path; figures are rendered off screen with
matplotlib's Agg canvas (no display, no pyplot state) at ``DPI`` = 150. An existing file is only
replaced when asked with ``overwrite=True`` (like ``ImplicitModel.save``); otherwise
``OverwriteError`` names it.

- ``spy``: the sparsity pattern of A, or with ``whole=True`` of [[A, B], [C, D]], with the state
  blocks marked by thin lines and named on the axes (rows: the block computed, columns: the
  block read), in one of three orders (``ORDERS``):
  "paper", the last block first (the orientation of El Ghaoui et al.: a feedforward network's A
  is strictly upper block triangular); "topological", the runtime's execution order (strictly
  lower block triangular for a feedforward network); "state", as stored. A matrix whose longer
  side fits in ``resolution`` is drawn exactly, one pixel per entry, black where non-zero;
  a bigger one as a density image: s x s entries per pixel (s the smallest integer that fits the
  longer side in ``resolution`` pixels), coloured by log10(1 + non-zeros in the pixel), empty
  pixels white. Convolutions show as Toeplitz stripes, residual connections as identity lines.
  Always 1200 x 1200 pixels (8 x 8 inches). A structured model (``model.structure``:
  convolutions kept as kernels) is never materialized: its CSR is built a run of rows at a time
  and counted, the same pixels as the plain model's.
- ``sensitivity_image``: for each output (row of a q x p sensitivity matrix S, e.g. the
  analysis ``SensitivityReport``), how strongly each input can move it, shown as an image of the
  input's shape (channels summed), one panel with its own colour bar per output. 1200 pixels
  wide, ``SENSITIVITY_TITLE_PX + rows * (1200 // columns)`` pixels high (columns at most q,
  rows = ceil(q / columns)).
- ``residual_plot``: fixed-point residual against iteration on a log scale, one curve per
  cyclic component of a ``Solution`` (or per given sequence), with an optional tolerance line.
  Always 1200 x 750 pixels (8 x 5 inches).
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import scipy.sparse as sp
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from .errors import NonFiniteError, OverwriteError, ShapeError
from .model import ImplicitModel
from .runtime.plan import execution_order
from .structure import Dense, StructuredMatrix, TransposedConvolution

DPI = 150
SPY_SIZE_PX = (1200, 1200)  # (width, height)
RESIDUAL_SIZE_PX = (1200, 750)
SENSITIVITY_WIDTH_PX = 1200
SENSITIVITY_TITLE_PX = 90
ORDERS = ("paper", "topological", "state")

_LABEL_FONT_PT = 7
_LABEL_CHARACTERS = 24  # longer block names are shortened in the middle
_CHUNK_ENTRIES = 1 << 22  # stored entries binned at a time
_AXIS_PX_ESTIMATE = 0.7  # share of the figure an axis of the spy spans, to judge crowding before layout
_LINE_GAP_PX = 6  # block boundaries closer than this to the last one drawn are left out


# --------------------------------------------------------------------------------------- spy
@dataclass(frozen=True)
class _Axis:
    """One axis of a spy picture.

    Attributes:
        position: for each stored row (or column) of the pictured matrix, where it is drawn.
        segments: (label, start, stop) in drawn positions: the state blocks, then inputs/outputs.
        separator: drawn position where the state part ends (whole=True only).
    """

    position: np.ndarray
    segments: tuple[tuple[str, int, int], ...]
    separator: int | None

    @property
    def size(self) -> int:
        return len(self.position)


@dataclass(frozen=True)
class _SpyLayout:
    """What ``spy`` draws: the binned non-zero counts and the axes they sit on."""

    counts: np.ndarray  # (ceil(rows / bin_size), ceil(cols / bin_size)) int64
    bin_size: int
    rows: _Axis
    columns: _Axis
    nnz: int


def spy(
    model: ImplicitModel,
    path: str | Path,
    *,
    whole: bool = False,
    order: str = "paper",
    resolution: int = 1000,
    labels: bool = True,
    title: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Draw the sparsity pattern of A (or of [[A, B], [C, D]]) with its blocks marked.

    Args:
        model: the implicit model.
        path: where to write the PNG (parent folders are created).
        whole: draw [[A, B], [C, D]] instead of A, the state, input and output parts separated
            by heavier lines.
        order: "paper" (blocks last first), "topological" (as solved) or "state" (as stored).
        resolution: the most pixels along the longer side of the pattern; a matrix that fits is
            drawn exactly, a bigger one as a density image.
        labels: name the blocks on the axes (a legible subset when they are too many).
        title: the figure title; by default the matrix, its size, non-zeros and order.
        overwrite: replace an existing file; by default an existing file (or symbolic link) is
            left as it is and ``OverwriteError`` raised.

    Returns:
        The path written, 1200 x 1200 pixels.

    Raises:
        ShapeError: an unknown order, a resolution below 1, or an empty matrix.
        OverwriteError: the file exists and ``overwrite`` is False.
    """
    path = _check_target(path, overwrite)
    layout = _spy_layout(model, order, whole, resolution)
    figure = _figure(SPY_SIZE_PX)
    axes = figure.add_subplot()
    if title is None:
        matrix = "[[A, B], [C, D]]" if whole else "A"
        shape = f"{layout.rows.size:,} x {layout.columns.size:,}"
        scale = (
            "one pixel per entry"
            if layout.bin_size == 1
            else f"each pixel counts {layout.bin_size} x {layout.bin_size} entries"
        )
        title = f"{matrix}: {shape}, {layout.nnz:,} non-zeros, {order} order\n{scale}"
    axes.set_title(title, fontsize=10)
    _draw_pattern(figure, axes, layout)
    _draw_blocks(axes, layout, labels)
    return _save(figure, path, overwrite)


def spy_pattern(model: ImplicitModel, order: str = "paper", whole: bool = False, resolution: int = 1000) -> np.ndarray:
    """The pixel grid ``spy`` draws: non-zeros of the reordered matrix counted per pixel.

    Returns:
        int64 counts, (ceil(rows / s), ceil(cols / s)) with s = ceil(max(rows, cols) /
        resolution) at least 1, rows x cols = n x n (or (n + q) x (n + p) when whole). With s = 1
        it is the exact 0/1 pattern of the permuted matrix; its sum is always the number of
        non-zero values (stored zeros are not counted).
    """
    return _spy_layout(model, order, whole, resolution).counts


def _spy_layout(model: ImplicitModel, order: str, whole: bool, resolution: int) -> _SpyLayout:
    if order not in ORDERS:
        raise ShapeError(f"unknown spy order {order!r}: expected one of {', '.join(ORDERS)}")
    if int(resolution) < 1:
        raise ShapeError(f"expected a resolution of at least 1 pixel, got {resolution}")
    state_position, state_segments = _state_layout(model, order)
    n, p, q = model.n, model.p, model.q
    if whole:
        rows = _Axis(
            np.concatenate([state_position, n + np.arange(q, dtype=np.int64)]),
            state_segments + _spec_segments(model.outputs, n, "y"),
            n,
        )
        columns = _Axis(
            np.concatenate([state_position, n + np.arange(p, dtype=np.int64)]),
            state_segments + _spec_segments(model.inputs, n, "u"),
            n,
        )
        structure = model.structure
        parts = ((structure.A, 0, 0), (structure.B, 0, n), (structure.C, n, 0), (structure.D, n, n))
    else:
        rows = columns = _Axis(state_position, state_segments, None)
        parts = ((model.structure.A, 0, 0),)
    if rows.size == 0 or columns.size == 0:
        raise ShapeError(f"nothing to draw: the matrix is {rows.size} x {columns.size}")
    bin_size = max(1, -(-max(rows.size, columns.size) // int(resolution)))
    height, width = -(-rows.size // bin_size), -(-columns.size // bin_size)
    row_bins, column_bins = rows.position // bin_size, columns.position // bin_size
    counts = np.zeros(height * width, dtype=np.int64)
    nnz = 0
    for matrix, row_offset, column_offset in parts:
        m_rows, m_columns = matrix.shape
        nnz += _count_structured(
            counts,
            matrix,
            row_bins[row_offset : row_offset + m_rows] * width,
            column_bins[column_offset : column_offset + m_columns],
        )
    return _SpyLayout(counts.reshape(height, width), bin_size, rows, columns, nnz)


def _count_structured(
    counts: np.ndarray, matrix: StructuredMatrix, row_base: np.ndarray, column_bins: np.ndarray
) -> int:
    """``_count_into`` for a structured matrix, never materialized: the remainder's CSR as it
    is, each convolution's entries placed by its geometry in a compiled loop (``_count_taps``;
    a transposed convolution's are its convolution's, rows and columns swapped), each dense
    term's non-zeros, so the counts are exactly those of the whole CSR (the terms and the
    remainder never overlap). ResNet-18 at 224 (1.57G non-zeros in A): 104 s when the CSR was
    built a run of rows at a time, 1.8 s so."""
    total = _count_into(counts, matrix.remainder, row_base, column_bins)
    for term in matrix.terms:
        op, rows = term.op, row_base[term.rows]
        columns = column_bins[op.source]
        if isinstance(op, Dense):
            out, read = np.nonzero(op.weight)
            if out.size:
                counts += np.bincount(rows[out].astype(np.int64) + columns[read], minlength=counts.size)
            total += out.size
            continue
        out_bins, in_bins = rows, columns  # pixel = out_bins[convolution's row] + in_bins[its column]
        if isinstance(op, TransposedConvolution):
            op, out_bins, in_bins = op.adjoint, columns, rows
        (C, H, W), (Co, Ho, Wo) = op.in_shape, op.out_shape
        kernel = op.weight.reshape(Co, C // op.groups, *op.kernel)
        geometry = np.array([H, W, Ho, Wo, *op.stride, *op.dilation, *op.pads, op.groups], dtype=np.int64)
        total += _count_taps(counts, kernel != 0, geometry, out_bins.astype(np.int64), in_bins.astype(np.int64))
    return total


@numba.njit(cache=True, nogil=True)  # (jitted: coverage cannot see inside)
def _count_taps(counts, nonzero, geometry, out_bins, in_bins):
    """counts[out_bins[(co Ho + ho) Wo + wo] + in_bins[(c H + h) W + w]] += 1 for every non-zero
    kernel entry K[co, c - g C / groups, i, j] (g = co // (Co / groups), the group's input
    channels c) and output pixel (ho, wo) reading an in-bounds input pixel h = s_h ho + d_h i -
    p_h, w = s_w wo + d_w j - p_w; returns the entries counted."""
    H, W, Ho, Wo, sh, sw, dh, dw, ph, pw, groups = (
        geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5], geometry[6], geometry[7],
        geometry[8], geometry[9], geometry[10],
    )  # fmt: skip
    Co, C_group, kh, kw = nonzero.shape
    total = 0
    for co in range(Co):
        for c_group in range(C_group):
            c = co // (Co // groups) * C_group + c_group
            for i in range(kh):
                for j in range(kw):
                    if not nonzero[co, c_group, i, j]:
                        continue
                    for ho in range(Ho):
                        h = sh * ho + dh * i - ph
                        if h < 0 or h >= H:
                            continue
                        row = (co * Ho + ho) * Wo
                        column = (c * H + h) * W
                        for wo in range(Wo):
                            w = sw * wo + dw * j - pw
                            if w < 0 or w >= W:
                                continue
                            counts[out_bins[row + wo] + in_bins[column + w]] += 1
                            total += 1
    return total


def _count_into(counts: np.ndarray, matrix: sp.csr_array, row_base: np.ndarray, column_bins: np.ndarray) -> int:
    """Add matrix's non-zeros to the flat pixel counts; pixel = row_base[row] + column_bins[column].

    Works on the CSR arrays directly, a run of rows at a time (about ``_CHUNK_ENTRIES`` stored
    entries, so memory stays bounded): an int64 pixel index per entry, then one bincount.
    Returns the number of non-zeros counted.
    """
    indptr, total, row, rows = matrix.indptr, 0, 0, matrix.shape[0]
    while row < rows:
        stop = int(np.searchsorted(indptr, indptr[row] + _CHUNK_ENTRIES, side="right")) - 1
        stop = min(max(stop, row + 1), rows)
        entries = slice(int(indptr[row]), int(indptr[stop]))
        pixel = np.repeat(row_base[row:stop].astype(np.int64, copy=False), np.diff(indptr[row : stop + 1]))
        pixel += column_bins[matrix.indices[entries]]
        nonzero = matrix.data[entries] != 0
        if not nonzero.all():
            pixel = pixel[nonzero]
        if pixel.size:
            counts += np.bincount(pixel, minlength=counts.size)
        total += pixel.size
        row = stop
    return total


def _state_layout(model: ImplicitModel, order: str) -> tuple[np.ndarray, tuple[tuple[str, int, int], ...]]:
    """Drawn position of each state, and the blocks as (name, start, stop) in drawn positions."""
    if order == "state":
        block_order = list(range(len(model.blocks)))
    elif order == "paper":
        block_order = _execution_blocks(model)[::-1]
    else:
        block_order = _execution_blocks(model)
    position = np.empty(model.n, dtype=np.int64)
    segments = []
    offset = 0
    for index in block_order:
        block = model.blocks[index]
        position[block.start : block.stop] = np.arange(offset, offset + block.size, dtype=np.int64)
        segments.append((block.name, offset, offset + block.size))
        offset += block.size
    return position, tuple(segments)


def _execution_blocks(model: ImplicitModel) -> list[int]:
    """Block indices in the runtime's execution order (``runtime.plan.execution_order``).

    When A is strictly block lower triangular as stored, that order is the stored one (the
    lexicographic topological sort then takes the blocks in index order): found in one pass
    over the CSR arrays, without building the block graph.
    """
    if _stored_order_is_topological(model):
        return list(range(len(model.blocks)))
    return [index for component in execution_order(model) for index in component.blocks]


def _stored_order_is_topological(model: ImplicitModel) -> bool:
    """Whether every stored entry of A reads a state of an earlier block than its row's (a
    term's rows counted as reading the last column of its source: when that says no, the block
    graph decides, with the same answer)."""
    A = model.structure.A
    remainder = A.remainder
    nonempty = np.diff(remainder.indptr) > 0
    last_read = np.full(A.shape[0], -1, dtype=np.int64)
    if nonempty.any():
        last_read[nonempty] = np.maximum.reduceat(remainder.indices, remainder.indptr[:-1][nonempty])
    for term in A.terms:
        last_read[term.rows] = np.maximum(last_read[term.rows], term.op.source.stop - 1)
    sizes = [block.size for block in model.blocks]
    block_start = np.repeat(np.array([block.start for block in model.blocks], dtype=np.int64), sizes)
    return bool((last_read < block_start).all())


def _spec_segments(specs: Sequence[Any], offset: int, prefix: str) -> tuple[tuple[str, int, int], ...]:
    segments = []
    for spec in specs:
        segments.append((f"{prefix}: {spec.name}", offset, offset + spec.size))
        offset += spec.size
    return tuple(segments)


def _draw_pattern(figure: Figure, axes: Any, layout: _SpyLayout) -> None:
    height, width = layout.counts.shape
    extent = (0, width * layout.bin_size, height * layout.bin_size, 0)  # axes in matrix entries
    ratio = layout.rows.size / layout.columns.size
    aspect = "equal" if 1 / 4 <= ratio <= 4 else "auto"
    if layout.bin_size == 1:
        axes.imshow(
            layout.counts > 0,
            cmap=ListedColormap(["white", "black"]),
            vmin=0,
            vmax=1,
            extent=extent,
            aspect=aspect,
            interpolation="auto",
        )
    else:
        density = np.ma.masked_equal(np.log10(1.0 + layout.counts), 0.0)
        cmap = colormaps["viridis"].with_extremes(bad="white")
        image = axes.imshow(density, cmap=cmap, vmin=0, extent=extent, aspect=aspect, interpolation="auto")
        colorbar = figure.colorbar(image, cax=axes.inset_axes((1.02, 0.0, 0.03, 1.0)))  # as tall as the image
        colorbar.set_label(f"log10(1 + non-zeros per {layout.bin_size} x {layout.bin_size} pixel)")
    axes.set_xlim(0, layout.columns.size)
    axes.set_ylim(layout.rows.size, 0)


def _draw_blocks(axes: Any, layout: _SpyLayout, labels: bool) -> None:
    """Block boundaries as thin lines (thinned where they crowd), part separators in red, block names."""
    axis_px = _AXIS_PX_ESTIMATE * SPY_SIZE_PX[0]
    for axis, draw in ((layout.rows, axes.axhline), (layout.columns, axes.axvline)):
        boundaries = [stop for _, _, stop in axis.segments[:-1] if stop != axis.separator]
        for position in _spread(boundaries, _LINE_GAP_PX * axis.size / axis_px):
            draw(position, color="0.55", linewidth=0.4, alpha=0.8)
        if axis.separator is not None:
            draw(axis.separator, color="tab:red", linewidth=1.0)
    if not labels:
        axes.set_xticks([])
        axes.set_yticks([])
        return
    _label_blocks(axes, layout, (axis_px, axis_px))
    figure = axes.get_figure()
    figure.get_layout_engine().execute(figure)  # measure the axes as laid out, then label again
    axes.apply_aspect()
    box = axes.get_window_extent()
    _label_blocks(axes, layout, (box.height, box.width))


def _label_blocks(axes: Any, layout: _SpyLayout, axis_px: tuple[float, float]) -> None:
    """Name the blocks at their centres, a legible subset when they crowd (axis_px: rows, columns)."""
    min_gap_px = 1.3 * _LABEL_FONT_PT * DPI / 72
    for axis, length_px, set_ticks, set_label, words in (
        (layout.rows, axis_px[0], axes.set_yticks, axes.set_ylabel, "rows: block computed"),
        (layout.columns, axis_px[1], axes.set_xticks, axes.set_xlabel, "columns: block read"),
    ):
        chosen = _legible(axis.segments, axis.size, length_px, min_gap_px, first=axis.separator)
        set_ticks(
            [(axis.segments[i][1] + axis.segments[i][2]) / 2 for i in chosen],
            [_abbreviate(axis.segments[i][0]) for i in chosen],
            fontsize=_LABEL_FONT_PT,
        )
        if len(chosen) < len(axis.segments):
            words += f" ({len(chosen)} of {len(axis.segments)} labelled)"
        set_label(words, fontsize=9)
    axes.tick_params(axis="both", length=0)
    axes.tick_params(axis="x", labelrotation=90)


def _legible(
    segments: Sequence[tuple[str, int, int]], total: int, axis_px: float, min_gap_px: float, first: int | None = None
) -> list[int]:
    """Indices of the segments to label, none closer than min_gap_px to another.

    Segments starting at or after ``first`` (the inputs or outputs) are labelled first, then the
    biggest blocks.
    """
    centers = [(start + stop) / 2 / total * axis_px for _, start, stop in segments]
    priority = lambda i: (first is None or segments[i][1] < first, segments[i][1] - segments[i][2])
    taken: list[float] = []
    chosen = []
    for index in sorted(range(len(segments)), key=priority):
        slot = bisect.bisect(taken, centers[index])
        neighbours = taken[max(slot - 1, 0) : slot + 1]
        if all(abs(centers[index] - other) >= min_gap_px for other in neighbours):
            taken.insert(slot, centers[index])
            chosen.append(index)
    return sorted(chosen)


def _spread(positions: Sequence[int], min_gap: float) -> list[int]:
    """The positions, dropping each one closer than min_gap to the last one kept."""
    kept: list[int] = []
    for position in positions:
        if not kept or position - kept[-1] >= min_gap:
            kept.append(position)
    return kept


def _abbreviate(name: str, limit: int = _LABEL_CHARACTERS) -> str:
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return f"{name[:head]}…{name[-(limit - 1 - head) :]}"


# ------------------------------------------------------------------------------ sensitivity
def sensitivity_image(
    matrix: Any,
    path: str | Path,
    *,
    image_shape: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
    columns: int = 5,
    title: str | None = None,
    model: ImplicitModel | None = None,
    overwrite: bool = False,
) -> Path:
    """Draw each output's row of a sensitivity matrix as an image of the input.

    Args:
        matrix: S, (q, p): a dense array, or an object with a ``.matrix`` attribute (the
            analysis ``SensitivityReport``).
        path: where to write the PNG (parent folders are created).
        image_shape: the shape of one input sample, e.g. (32, 32) or (3, 32, 32); size-1 axes
            are dropped and a leading channel axis is summed. Default: the input shape of
            ``model`` (or of the report's ``model``/``inputs`` attribute, where it has one),
            else a square when p is a perfect square, else a one-row strip.
        labels: one panel title per output (default "class 0", "class 1", ...).
        columns: panels per row.
        title: the figure title.
        model: the model S belongs to, for its input shape.
        overwrite: replace an existing file; by default an existing file (or symbolic link) is
            left as it is and ``OverwriteError`` raised.

    Returns:
        The path written: 1200 pixels wide, SENSITIVITY_TITLE_PX + rows * (1200 // columns)
        high, with columns reduced to q when fewer outputs than that and rows = ceil(q / columns).

    Raises:
        ShapeError: S is not 2-D, labels or image_shape do not fit it.
        NonFiniteError: S holds inf or NaN (an invalid sensitivity report).
        OverwriteError: the file exists and ``overwrite`` is False.
    """
    path = _check_target(path, overwrite)
    source = matrix
    S = np.asarray(getattr(matrix, "matrix", matrix), dtype=np.float64)
    if S.ndim != 2 or S.size == 0:
        raise ShapeError(f"expected a non-empty (q, p) sensitivity matrix, got shape {S.shape}")
    if not np.isfinite(S).all():
        raise NonFiniteError("the sensitivity matrix holds inf or NaN; expected finite values (was the report valid?)")
    q, p = S.shape
    columns = int(columns)
    if columns < 1:
        raise ShapeError(f"expected at least 1 column of panels, got {columns}")
    if labels is None:
        labels = [f"class {i}" for i in range(q)]
    elif len(labels) != q:
        raise ShapeError(f"expected {q} labels (one per output), got {len(labels)}")
    shape = _panel_shape(p, image_shape, model if model is not None else source)
    columns = min(columns, q)
    rows = -(-q // columns)
    cell = SENSITIVITY_WIDTH_PX // columns
    figure = _figure((SENSITIVITY_WIDTH_PX, SENSITIVITY_TITLE_PX + rows * cell))
    for index in range(rows * columns):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.set_xticks([])
        axes.set_yticks([])
        if index >= q:
            axes.set_axis_off()
            continue
        panel = S[index].reshape(shape)
        if panel.ndim == 3:
            panel = panel.sum(axis=0)
        aspect = "equal" if panel.shape[0] > 1 else "auto"
        image = axes.imshow(panel, cmap="magma", aspect=aspect, interpolation="nearest")
        figure.colorbar(image, ax=axes, shrink=0.8, pad=0.03).ax.tick_params(labelsize=6)
        axes.set_title(str(labels[index]), fontsize=8)
    figure.suptitle(title if title is not None else f"sensitivity of each output to each input ({q} x {p})")
    return _save(figure, path, overwrite)


def _panel_shape(p: int, image_shape: Sequence[int] | None, source: Any) -> tuple[int, ...]:
    """The shape to reshape one row of S to: 2-D, or 3-D with the channels first."""
    if image_shape is None:
        image_shape = _input_shape(source, p)
    if image_shape is None:
        side = math.isqrt(p)
        image_shape = (side, side) if side * side == p else (1, p)
    shape = tuple(int(d) for d in image_shape)
    if math.prod(shape) != p:
        raise ShapeError(f"image_shape {shape} holds {math.prod(shape)} values, expected p = {p}")
    squeezed = tuple(d for d in shape if d != 1)
    if len(squeezed) in (2, 3):
        return squeezed
    return (1, p)


def _input_shape(source: Any, p: int) -> tuple[int, ...] | None:
    """The single input's shape of a model (or of a report's model), when it matches p."""
    for candidate in (source, getattr(source, "model", None)):
        inputs = getattr(candidate, "inputs", None)
        if inputs is not None and len(inputs) == 1 and getattr(inputs[0], "size", None) == p:
            return tuple(inputs[0].shape)
    return None


# --------------------------------------------------------------------------------- residuals
def residual_plot(
    history_or_solution: Any,
    path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    tolerance: float | None = None,
    title: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Draw fixed-point residuals against iteration on a log scale.

    Args:
        history_or_solution: a ``Solution`` (one curve per cyclic component, named by its
            blocks; its ``residual_history`` when it has no components), anything else with a
            ``residual_history`` (e.g. a ``ConvergenceError``), one sequence of residuals, or a
            mapping label -> sequence.
        path: where to write the PNG (parent folders are created).
        labels: curve names replacing the default ones, one per curve.
        tolerance: draw this tolerance as a dashed line.
        title: the figure title.
        overwrite: replace an existing file; by default an existing file (or symbolic link) is
            left as it is and ``OverwriteError`` raised.

    Returns:
        The path written, 1200 x 750 pixels.

    Raises:
        ShapeError: labels do not match the curves.
        OverwriteError: the file exists and ``overwrite`` is False.
    """
    path = _check_target(path, overwrite)
    curves = _residual_curves(history_or_solution)
    if labels is not None:
        if len(labels) != len(curves):
            raise ShapeError(f"expected {len(curves)} labels (one per curve), got {len(labels)}")
        curves = dict(zip((str(label) for label in labels), curves.values()))
    figure = _figure(RESIDUAL_SIZE_PX)
    axes = figure.add_subplot()
    plotted = False
    for label, history in curves.items():
        values = np.asarray(history, dtype=np.float64).reshape(-1)
        shown = np.where(np.isfinite(values) & (values > 0), values, np.nan)  # log scale: no zeros
        if values.size:
            axes.plot(np.arange(1, values.size + 1), shown, marker="o", markersize=3, linewidth=1.2, label=label)
            plotted = True
    if tolerance is not None:
        axes.axhline(float(tolerance), color="0.4", linestyle="--", linewidth=1.0, label=f"tolerance {tolerance:g}")
    if not plotted:
        axes.text(
            0.5,
            0.5,
            "no fixed-point iterations\n(solved by forward substitution)",
            transform=axes.transAxes,
            ha="center",
            va="center",
        )
    axes.set_yscale("log")
    axes.set_xlabel("iteration")
    axes.set_ylabel("residual")
    axes.grid(True, which="both", alpha=0.3)
    if plotted or tolerance is not None:
        axes.legend(fontsize=8)
    axes.set_title(title if title is not None else "fixed-point residual")
    return _save(figure, path, overwrite)


def _residual_curves(source: Any) -> dict[str, Sequence[float]]:
    if isinstance(source, Mapping):
        return {str(label): history for label, history in source.items()}
    components = getattr(source, "component_histories", ())
    if components:
        return {_component_label(names): history for names, history in components}
    if hasattr(source, "residual_history"):
        return {"residual": source.residual_history}
    return {"residual": source}


def _component_label(names: Sequence[str], shown: int = 3) -> str:
    if len(names) <= shown:
        return ", ".join(names)
    return f"{', '.join(names[:shown])} (+{len(names) - shown} more)"


# ---------------------------------------------------------------------------------- figures
def _figure(size_px: tuple[int, int]) -> Figure:
    """A figure of exactly size_px = (width, height) pixels at DPI, with an Agg canvas."""
    figure = Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def bounds_plot(
    bounds: Any,
    path: str | Path,
    *,
    sample: int = 0,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Draw certified output bounds per class beside the nominal outputs of one sample.

    Args:
        bounds: an ``OutputBounds`` (``analysis.output_bounds``).
        path: where to write the PNG (parent folders are created).
        sample: which sample of a batch.
        class_names: one label per output (default 0..q-1).
        title: the figure title (default: the method).
        overwrite: replace an existing file; by default an existing file (or symbolic link) is
            left as it is and ``OverwriteError`` raised.

    Returns:
        The path written, 1200 x 750 pixels.

    Raises:
        ShapeError: no such sample, or class_names do not match the outputs.
    """
    path = _check_target(path, overwrite)
    arrays = (bounds.center, bounds.lower, bounds.upper)
    center, lower, upper = (np.atleast_2d(np.asarray(a, dtype=np.float64)) for a in arrays)
    if not 0 <= sample < center.shape[0]:
        raise ShapeError(f"sample: expected an index in [0, {center.shape[0]}), got {sample}")
    center, lower, upper = center[sample], lower[sample], upper[sample]
    names = [str(k) for k in range(center.size)] if class_names is None else [str(name) for name in class_names]
    if len(names) != center.size:
        raise ShapeError(f"expected {center.size} class names (one per output), got {len(names)}")
    figure = _figure(RESIDUAL_SIZE_PX)
    axes = figure.add_subplot()
    positions = np.arange(center.size)
    best = int(center.argmax())
    colors = ["tab:red" if k == best else "tab:blue" for k in positions]
    axes.vlines(positions, lower, upper, colors=colors, linewidth=6, alpha=0.45, label="certified bounds")
    axes.scatter(positions, center, color="black", zorder=3, s=18, label="nominal output")
    robust = lower[best] > np.delete(upper, best).max(initial=-np.inf)
    axes.axhline(lower[best], color="tab:red", linestyle=":", linewidth=1.0, label="lower bound of the top class")
    axes.set_xticks(positions, names)
    axes.set_xlabel("output")
    axes.set_ylabel("value over the box")
    method = getattr(bounds, "method", "")
    verdict = "robust (bounds separate)" if robust else "bounds overlap"
    axes.set_title(title or f"{method} bounds, sample {sample}: {verdict}")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path, overwrite)


def _check_target(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing path before drawing; a dangling symbolic link counts as existing."""
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise OverwriteError(f"expected a new file, but {path} exists; pass overwrite=True to replace it")
    return path


def _save(figure: Figure, path: str | Path, overwrite: bool) -> Path:
    """Write the figure as PNG at DPI, creating parent folders; never replace a file unless asked.

    Without ``overwrite`` the file is created exclusively, so a file that appeared meanwhile is
    left as it is. The figure is cleared afterwards (it belongs to no pyplot manager).
    """
    path = _check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if overwrite:
            figure.savefig(path, dpi=DPI, format="png")
        else:
            try:
                stream = open(path, "xb")  # noqa: SIM115 (removed again if rendering fails)
            except FileExistsError:
                raise OverwriteError(
                    f"expected a new file, but {path} exists; pass overwrite=True to replace it"
                ) from None
            try:
                with stream:
                    figure.savefig(stream, dpi=DPI, format="png")
            except BaseException:
                path.unlink(missing_ok=True)
                raise
    finally:
        figure.clear()
    return path
