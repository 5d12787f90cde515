"""Resize and Upsample: interpolation is a constant linear map, built per axis.

Every mode of Resize (nearest, linear, cubic; with or without antialias) computes each output
element as a weighted sum of input elements whose weights depend only on the shapes and the
attributes, never on the data; and it is separable: along each axis a, an (out_a x in_a)
weight matrix W_a, and the whole map is their Kronecker product

    y = (W_0 kron W_1 kron ... kron W_{r-1}) x          (x, y flattened in C order)

(an axis left alone has W_a = I). ``tf_crop_and_resize`` adds a constant: an output element
whose source coordinate is outside the input along any axis is ``extrapolation_value``, so its
row of the map is zero and its offset is that value. The map is applied to the expression with
``ctx.apply_map``: exact, and sparse (linear: 2 non-zeros per axis and output element, cubic 4,
antialias about 2 / scale or 4 / scale), so a 16 x 64 x 64 -> 16 x 128 x 128 bilinear upsampling
is a 262144 x 65536 matrix with 4 non-zeros per row.

Why computed here rather than by running the node on a basis, as the data-movement ops are
(``shape.py``): the basis of a 16 x 64 x 64 input is 65536 runs of the node, and the reference
evaluator implements neither Resize-10 nor Upsample beyond integer nearest scales. The weights
follow the ONNX specification, with the reference's arithmetic (``onnx.reference`` op_resize,
which is separable the same way), so float64 results match it to rounding:

Output size and scale along an axis of length n (``axes`` name the axes scales / sizes /
roi refer to; others are left alone):
    scales given: m = floor(n * scale)
    sizes given:  m = sizes, scale = m / n; with keep_aspect_ratio_policy "not_larger" /
                  "not_smaller" one scale = min / max over the axes of sizes / n, and
                  m = round_half_up(scale * n) on those axes.
An axis with scale 1 (to rounding), m = n and the whole roi is the identity.

Source coordinate of output index i (coordinate_transformation_mode):
    half_pixel            x = (i + 0.5) / scale - 0.5
    half_pixel_symmetric  x = n / 2 * (1 - m / (scale n)) + (i + 0.5) / scale - 0.5
    pytorch_half_pixel    x = (i + 0.5) / scale - 0.5 if m > 1 else 0
    align_corners         x = i (n - 1) / (m - 1) if m > 1 else 0
    asymmetric            x = i / scale
    tf_half_pixel_for_nn  x = (i + 0.5) / scale                              (opset 11)
    tf_crop_and_resize    x = start (n - 1) + i (end - start)(n - 1) / (m - 1) if m > 1
                              else (start + end) / 2 (n - 1); outside [0, n - 1]: extrapolated
Resize-10 and Upsample use ``asymmetric`` and onnxruntime's nearest rounding: floor when the
axis is upsampled (scale >= 1), ceil when it is downsampled.

Weights, with r = x - (ceil(x) - 1) in (0, 1] (r = 1 when x is an integer) and the window of
k input indices starting at ceil(x) - k / 2, clamped to [0, n - 1] (edge padding):
    nearest   one index: round_prefer_floor / round_prefer_ceil / floor / ceil of x
    linear    k = 2: (1 - r, r)
    cubic     k = 4: the cubic convolution kernel of coefficient A (cubic_coeff_a) at the
              distances 1 + r, r, 1 - r, 2 - r
    antialias (linear, cubic; opset 18) the kernel stretched by 1 / s, s = min(scale, 1):
              k = 2 - 2 (floor(-w / s) + 1) taps (w = 1 linear, 2 cubic), weight
              kernel(s (j - r)) for tap offsets j, then divided by their sum
    exclude_outside: taps outside [0, n - 1] get weight 0 and the rest is renormalized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ...errors import GraphError
from ..context import LoweringContext, NodeView
from ..registry import lowers
from .common import Affine, optional_input, require_constant

RESIZE_ATTRIBUTES = (
    "mode",
    "coordinate_transformation_mode",
    "nearest_mode",
    "cubic_coeff_a",
    "exclude_outside",
    "extrapolation_value",
    "antialias",
    "axes",
    "keep_aspect_ratio_policy",
)
_COMMON_COORDINATES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_crop_and_resize")
# The coordinate modes each version of Resize defines (from the version key on).
COORDINATE_MODES = {
    11: (*_COMMON_COORDINATES, "tf_half_pixel_for_nn"),
    13: _COMMON_COORDINATES,
    19: (*_COMMON_COORDINATES, "half_pixel_symmetric"),
}
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
ASPECT_POLICIES = ("stretch", "not_larger", "not_smaller")
# onnxruntime's rounding for Resize-10 and Upsample: floor when upsampling, ceil when downsampling.
SIMPLE_NEAREST = "simple"


@dataclass(frozen=True)
class Interpolation:
    """The attributes that set the weights of one Resize or Upsample node."""

    mode: str  # nearest, linear, cubic
    coordinates: str
    nearest: str = "round_prefer_floor"
    cubic_a: float = -0.75
    exclude_outside: bool = False
    antialias: bool = False
    extrapolation: float = 0.0


@dataclass(frozen=True)
class AxisResize:
    """One axis: input and output lengths, the scale, and the roi (start, end) if any."""

    size: int
    out: int
    scale: float
    roi: tuple[float, float] = (0.0, 1.0)

    @property
    def identity(self) -> bool:
        return math.isclose(self.scale, 1.0) and self.out == self.size and self.roi == (0.0, 1.0)


# ------------------------------------------------------------------------------------- attributes
def _coordinate_modes(opset: int) -> tuple[str, ...]:
    return COORDINATE_MODES[max(v for v in COORDINATE_MODES if v <= opset)]


def _legacy_mode(node: NodeView) -> str:
    """Resize-10 and Upsample: nearest or linear (any other name refused)."""
    mode = node.attr("mode", "nearest")
    if mode not in ("nearest", "linear"):
        raise node.unsupported("mode", mode, "use 'nearest' or 'linear'")
    return mode


def interpolation(node: NodeView) -> Interpolation:
    """The node's interpolation settings; an attribute value ONNX does not define is refused."""
    if node.op_type == "Upsample" or node.opset < 11:
        return Interpolation(_legacy_mode(node), "asymmetric", SIMPLE_NEAREST)
    mode = node.attr("mode", "nearest")
    if mode not in ("nearest", "linear", "cubic"):
        raise node.unsupported("mode", mode, "use 'nearest', 'linear' or 'cubic'")
    coordinates = node.attr("coordinate_transformation_mode", "half_pixel")
    if coordinates not in _coordinate_modes(node.opset):
        raise node.unsupported(
            "coordinate_transformation_mode", coordinates, f"use one of {', '.join(_coordinate_modes(node.opset))}"
        )
    nearest = node.attr("nearest_mode", "round_prefer_floor")
    if nearest not in NEAREST_MODES:
        raise node.unsupported("nearest_mode", nearest, f"use one of {', '.join(NEAREST_MODES)}")
    policy = node.attr("keep_aspect_ratio_policy", "stretch")
    if policy not in ASPECT_POLICIES:
        raise node.unsupported("keep_aspect_ratio_policy", policy, f"use one of {', '.join(ASPECT_POLICIES)}")
    antialias = node.attr("antialias", 0)
    if antialias not in (0, 1):
        raise node.unsupported("antialias", antialias, "use 0 or 1")
    return Interpolation(
        mode,
        coordinates,
        nearest,
        float(node.attr("cubic_coeff_a", -0.75)),
        bool(node.attr("exclude_outside", 0)),
        bool(antialias) and mode != "nearest",  # antialias only stretches the linear and cubic kernels
        float(node.attr("extrapolation_value", 0.0)),
    )


def check_resize(node: NodeView) -> None:
    """Refuse attribute values ONNX does not define before any node is lowered."""
    interpolation(node)


# ------------------------------------------------------------------------------------- shapes
def _constant(node: NodeView, value, what: str) -> np.ndarray | None:
    """A constant operand as a flat float64 array, or None when absent or empty."""
    if value is None:
        return None
    if isinstance(value, Affine):
        raise GraphError(
            f"{node.where}: {what} depends on the model input, but the interpolation weights are fixed when "
            f"compiling: make {what} a constant (an initializer, or computed from shapes only)"
        )
    array = np.asarray(require_constant(value, node, what), dtype=np.float64).ravel()
    return array if array.size else None


def axis_plan(node: NodeView, shape: tuple[int, ...], roi, scales, sizes) -> list[AxisResize]:
    """Per axis of the input, its resize (see the module docstring)."""
    rank = len(shape)
    axes = [int(a) for a in (node.attr("axes", None) or range(rank))]
    if any(not -rank <= a < rank for a in axes) or len({a % rank for a in axes}) != len(axes):
        raise GraphError(f"{node.where}: axes={axes} must be distinct axes of the rank-{rank} input")
    axes = [a % rank for a in axes]
    roi = _constant(node, roi, "roi")
    scales, sizes = _constant(node, scales, "scales"), _constant(node, sizes, "sizes")
    if (scales is None) == (sizes is None):
        raise GraphError(f"{node.where}: exactly one of scales and sizes must be given (non-empty)")
    given = scales if scales is not None else sizes
    if given.size != len(axes) or (roi is not None and roi.size != 2 * len(axes)):
        raise GraphError(
            f"{node.where}: the input has rank {rank} and axes {axes}, but scales/sizes has {given.size} values"
            + (f" and roi {roi.size}" if roi is not None else "")
        )
    regions = {a: (0.0, 1.0) for a in range(rank)}
    if roi is not None:
        regions.update({a: (float(roi[i]), float(roi[i + len(axes)])) for i, a in enumerate(axes)})
    factors, outs = [1.0] * rank, list(shape)
    if sizes is not None:
        ratios = {a: sizes[i] / shape[a] for i, a in enumerate(axes)}
        policy = node.attr("keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            for i, a in enumerate(axes):
                factors[a], outs[a] = ratios[a], int(sizes[i])
        else:
            scale = min(ratios.values()) if policy == "not_larger" else max(ratios.values())
            for a in axes:
                factors[a], outs[a] = scale, int(scale * shape[a] + 0.5)
    else:
        for i, a in enumerate(axes):
            factors[a], outs[a] = float(scales[i]), int(scales[i] * shape[a])
    if not all(f > 0 for f in factors) or min(outs) < 1:
        raise GraphError(
            f"{node.where}: scales {factors} and output shape {outs} must be positive: the output would be empty"
        )
    if node.op_type == "Upsample" and min(factors) < 1:
        raise GraphError(f"{node.where}: Upsample scales must be >= 1 (ONNX), got {factors}; use Resize to downsample")
    return [AxisResize(n, m, f, regions[a]) for a, (n, m, f) in enumerate(zip(shape, outs, factors))]


# ------------------------------------------------------------------------------------- weights
def source_coordinates(axis: AxisResize, coordinates: str) -> np.ndarray:
    """x_original of each output index (the reference's arithmetic)."""
    i = np.arange(axis.out, dtype=np.float64)
    n, m, scale = axis.size, axis.out, axis.scale
    if coordinates == "half_pixel":
        return (i + 0.5) / scale - 0.5
    if coordinates == "half_pixel_symmetric":
        offset = n / 2 * (1 - m / (scale * n))
        return offset + (i + 0.5) / scale - 0.5
    if coordinates == "pytorch_half_pixel":
        return (i + 0.5) / scale - 0.5 if m > 1 else np.zeros(m)
    if coordinates == "align_corners":
        return i * (n - 1) / (m - 1) if m > 1 else np.zeros(m)
    if coordinates == "asymmetric":
        return i / scale
    if coordinates == "tf_half_pixel_for_nn":
        return (i + 0.5) / scale
    start, end = axis.roi  # tf_crop_and_resize
    if m == 1:
        return np.full(m, (end - start) * (n - 1) / 2 + start * (n - 1))
    return i * (end - start) * (n - 1) / (m - 1) + start * (n - 1)


def _nearest_index(x: np.ndarray, rule: str, scale: float) -> np.ndarray:
    """The input index nearest to x by ``rule`` (the fraction compared as the reference does)."""
    if rule == SIMPLE_NEAREST:
        rule = "ceil" if scale < 1 else "floor"
    floor = np.floor(x)
    fraction = x - floor
    if rule == "round_prefer_floor":
        return floor + (fraction > 0.5)
    if rule == "round_prefer_ceil":
        return floor + (fraction >= 0.5)
    return floor if rule == "floor" else np.ceil(x)


def _cubic_kernel(distance: np.ndarray, a: float) -> np.ndarray:
    """The cubic convolution kernel (Keys, coefficient a) at |distance|."""
    x = np.abs(distance)
    x2 = x * x
    x3 = x * x2
    inner = (a + 2) * x3 - (a + 3) * x2 + 1
    outer = a * x3 - 5 * a * x2 + 8 * a * x - 4 * a
    return np.where(x <= 1, inner, np.where(x < 2, outer, 0.0))


def _taps(ratio: np.ndarray, settings: Interpolation, scale: float) -> np.ndarray:
    """(outputs x k) weights of the window's taps, for r = ratio (see the module docstring)."""
    r = ratio[:, None]
    if settings.antialias:
        s = min(scale, 1.0)
        width = 1 if settings.mode == "linear" else 2
        first = math.floor(-width / s) + 1
        distances = (np.arange(first, 2 - first) - r) * s
        if settings.mode == "linear":
            weights = np.clip(1 - np.abs(distances), 0, 1)
        else:
            weights = _cubic_kernel(distances, settings.cubic_a)
        return weights / weights.sum(axis=1, keepdims=True)
    if settings.mode == "linear":
        return np.hstack([1 - r, r])
    a = settings.cubic_a
    return np.hstack(
        [
            ((a * (r + 1) - 5 * a) * (r + 1) + 8 * a) * (r + 1) - 4 * a,
            ((a + 2) * r - (a + 3)) * r * r + 1,
            ((a + 2) * (1 - r) - (a + 3)) * (1 - r) * (1 - r) + 1,
            ((a * ((1 - r) + 1) - 5 * a) * ((1 - r) + 1) + 8 * a) * ((1 - r) + 1) - 4 * a,
        ]
    )


def axis_weights(axis: AxisResize, settings: Interpolation) -> tuple[sp.csr_array, np.ndarray]:
    """W_a (out x size, float64) and the outputs extrapolated (tf_crop_and_resize)."""
    n = axis.size
    if axis.identity:
        return sp.identity(n, format="csr", dtype=np.float64), np.zeros(n, dtype=bool)
    x = source_coordinates(axis, settings.coordinates)
    if settings.mode == "nearest":
        columns = _nearest_index(x, settings.nearest, axis.scale)[:, None]
        weights = np.ones_like(columns)
    else:
        ceiling = np.ceil(x)
        ratio = x - (ceiling - 1)  # in (0, 1]: 1 at integers, the window then ends at x
        weights = _taps(ratio, settings, axis.scale)
        k = weights.shape[1]
        columns = ceiling[:, None] - k // 2 + np.arange(k)[None, :]
        if settings.exclude_outside:
            weights = np.where((columns < 0) | (columns > n - 1), 0.0, weights)
            sums = weights.sum(axis=1, keepdims=True)
            weights = weights / np.where(sums == 0, 1.0, sums)
    extrapolated = np.zeros(axis.out, dtype=bool)
    if settings.coordinates == "tf_crop_and_resize":
        extrapolated = (x < 0) | (x > n - 1)
        weights = np.where(extrapolated[:, None], 0.0, weights)
    rows = np.repeat(np.arange(axis.out), weights.shape[1])
    clamped = np.clip(columns, 0, n - 1).astype(np.int64).ravel()
    matrix = sp.csr_array((weights.ravel(), (rows, clamped)), shape=(axis.out, n))  # duplicates summed
    matrix.eliminate_zeros()
    return matrix, extrapolated


def resize_map(plan: list[AxisResize], settings: Interpolation) -> tuple[sp.csr_array, np.ndarray]:
    """The Kronecker product of the axes' weights, and the flat mask of extrapolated outputs."""
    matrix = sp.csr_array(np.ones((1, 1)))
    extrapolated = np.zeros(1, dtype=bool)
    for axis in plan:
        weights, outside = axis_weights(axis, settings)
        matrix = sp.csr_array(sp.kron(matrix, weights, format="csr"))
        extrapolated = (extrapolated[:, None] | outside[None, :]).ravel()
    if extrapolated.any():
        keep = sp.diags_array((~extrapolated).astype(np.float64))
        matrix = sp.csr_array(keep @ matrix)
        matrix.eliminate_zeros()
    return matrix, extrapolated


def _lower(ctx: LoweringContext, node: NodeView, data, roi, scales, sizes) -> list[Affine]:
    if not isinstance(data, Affine):
        raise GraphError(f"{node.where}: only its data input X may depend on the model input")
    settings = interpolation(node)
    plan = axis_plan(node, data.shape, roi, scales, sizes)
    matrix, extrapolated = resize_map(plan, settings)
    offset = np.where(extrapolated, settings.extrapolation, 0.0)
    shape = tuple(axis.out for axis in plan)
    return [ctx.apply_map(data, matrix, shape, offset if extrapolated.any() else None)]


@lowers("Resize", attributes=RESIZE_ATTRIBUTES, check=check_resize)
def lower_resize(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """Resize (every mode, coordinate mode, antialias, axes): a constant linear map, per axis."""
    if node.opset < 11:
        return _lower(ctx, node, inputs[0], None, optional_input(inputs, 1), None)
    roi = optional_input(inputs, 1)
    coordinates = node.attr("coordinate_transformation_mode", "half_pixel")
    roi = roi if coordinates == "tf_crop_and_resize" else None  # ignored by the other modes
    return _lower(ctx, node, inputs[0], roi, optional_input(inputs, 2), optional_input(inputs, 3))


@lowers("Upsample", attributes=("mode", "scales"), since=(7, 9), check=check_resize)
def lower_upsample(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """Upsample (nearest, linear): the linear map of Resize-10 (asymmetric coordinates)."""
    scales = node.attr("scales") if node.opset < 9 else optional_input(inputs, 1)
    return _lower(ctx, node, inputs[0], None, None if scales is None else np.asarray(scales), None)
