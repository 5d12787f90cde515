"""Conv and ConvTranspose: a sparse (Toeplitz) linear map on the flattened input, plus a bias.

Conv. With X of shape (N, C, S...), W of shape (M, C/G, K...) and G groups (C_g = C/G input
and M_g = M/G output channels per group), the output y = Conv(X, W) + B is y = T vec(X) + b with

    T[(oc, o...), (ic, i...)] = W[oc, ic - g * C_g, k...],    g = oc // M_g,  g * C_g <= ic < (g + 1) * C_g
    i_d = o_d * stride_d - pad_begin_d + k_d * dilation_d          (for every spatial axis d)

and b[(oc, o...)] = B[oc]. Taps with some i_d outside [0, S_d) read the zero padding and are
dropped, as are exact zeros of W. The output size is O_d = floor((S_d + pads - (K_d - 1) *
dilation_d - 1) / stride_d) + 1, with ``auto_pad`` SAME_UPPER / SAME_LOWER padding to
O_d = ceil(S_d / stride_d) (the odd pixel at the end / at the beginning) and VALID not padding.

ConvTranspose is the adjoint scatter: W has shape (C, M/G, K...) and input pixel i feeds the
output pixels o_d = i_d * stride_d - pad_begin_d + k_d * dilation_d inside the output, so

    T[(oc, o...), (ic, i...)] = W[ic, oc - g * M_g, k...]
    where i_d = (o_d + pad_begin_d - k_d * dilation_d) / stride_d is an integer in [0, S_d).

The output shape and pads follow the ONNX spec: O_d = stride_d * (S_d - 1) + output_padding_d
+ (K_d - 1) * dilation_d + 1 - pad_begin_d - pad_end_d; given ``output_shape`` (or SAME_*
auto_pad, which asks for O_d = S_d * stride_d) the pads are ignored, the total padding is that
expression (without pads) minus O_d, put at the beginning as total // 2 for SAME_UPPER and
total - total // 2 otherwise (onnxruntime agrees). An output_shape larger than the full size
(by less than a stride, as output_padding can) gives a negative total: the extra rows and
columns go at the end, where they read no input pixel and hold the bias only, as output_padding
would (onnxruntime, the reference and the node test test_convtranspose_output_shape agree).
SAME_* asking for negative padding is refused (onnxruntime and the reference disagree there).

Both maps are built the same way, vectorized: a spatial pattern (for each output pixel o and
kernel offset k, the input pixel read and whether it exists; prod(O) x prod(K) entries) is
combined with the per-channel weights (M, C_g, K) into CSR rows ordered (oc, o), each row's
columns ordered (ic, k), which is increasing column order (the kernel order is reversed for
the transpose, whose input index decreases with k). Without a batch axis (a leading dimension
N > 1), the N leading entries are independent: T is block diagonal.

Structured (``from_onnx(structure="auto")``, issue 20): a 1-D or 2-D Conv or ConvTranspose
with N = 1 whose T would hold at least ``MIN_STRUCTURED_NONZEROS`` entries is kept as its
kernel, a ``structure.Convolution`` (``TransposedConvolution``: the adjoint of the convolution
with its kernel, strides, dilations and leading pads, from the output image to the input one)
term per run of whole input channels reading contiguous columns of [u; x] (a block's states,
the model input; a Concat of them gives one run per operand, the kernel split along C), each
run's factor folded into its kernel entries. Groups stay in one term (``groups``: a GEMM per
group, depthwise ones included), except where a run ends inside a group: that part of the group
is a term of its own. An operand that is not such a selection (a BatchNormalization output
without an activation, a pooling tree, a Pad) is first kept as an identity block (one entry per
row), so T is never built. 3-D and batched (N > 1) convolutions stay CSR.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from ...errors import GraphError
from ...runtime.structured import MIN_STRUCTURED_NONZEROS
from ...structure import Convolution, Term, TransposedConvolution
from ..context import LoweringContext, NodeView
from ..expression import Affine, source_runs
from ..registry import lowers
from .common import as_affine, optional_input, require_constant

AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
# Elements (weights x pattern entries) handled at once while filling T: bounds the temporaries.
CHUNK_ELEMENTS = 1 << 22


def check_conv_attributes(node: NodeView) -> None:
    """The attribute values refused whatever the shapes (run on every node before lowering any)."""
    _auto_pad(node)
    if int(node.attr("group", 1)) < 1:
        raise node.unsupported("group", node.attr("group"), "the ONNX spec requires group >= 1")


@lowers(
    "Conv",
    attributes=("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"),
    check=check_conv_attributes,
)
def lower_conv(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """A sparse Toeplitz map (zero padding dropped) plus the bias per channel.

    Args:
        ctx: the lowering context.
        node: the Conv node (any opset; 1-D, 2-D, 3-D or more spatial axes).
        inputs: X (an expression of shape (N, C, S...)), W (constant, (M, C / group, K...))
            and the optional constant bias B (M,).

    Returns:
        [Y], the expression of shape (N, M, O...).

    Raises:
        GraphError: W or B not constant, or shapes that do not fit the attributes.
        UnsupportedAttributeError: an auto_pad value outside the ONNX spec, or negative pads.
    """
    x, weights, bias, spatial, group = _operands(ctx, node, inputs, transposed=False)
    channels, sizes = x.shape[1], x.shape[2:]
    out_channels = weights.shape[0]
    in_per_group = channels // group
    if weights.shape[1] != in_per_group or out_channels % group:
        raise GraphError(
            f"{node.where}: W of shape {weights.shape} does not fit X of shape {x.shape} with group={group}: "
            f"expected W of shape ({out_channels} (a multiple of {group}), {in_per_group}, kernel...)"
        )
    kernel, strides, dilations = _geometry(node, weights, spatial)
    auto_pad = _auto_pad(node)
    extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out_sizes = [-(-s // st) for s, st in zip(sizes, strides)]
        begins = []
        for s, o, st, e in zip(sizes, out_sizes, strides, extents):
            total = max(0, (o - 1) * st + e - s)
            begins.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
    else:
        pads = [0] * (2 * spatial) if auto_pad == "VALID" else _pads(node, spatial)
        begins = pads[:spatial]
        out_sizes = [
            (s + pads[d] + pads[d + spatial] - e) // st + 1 for d, (s, e, st) in enumerate(zip(sizes, extents, strides))
        ]
    if min(out_sizes) <= 0:
        raise GraphError(
            f"{node.where}: the kernel (extent {extents} with dilations {dilations}) does not fit the padded "
            f"input of spatial shape {sizes}: the output would be {out_sizes}"
        )
    axes = []
    for o, k, st, b, d, s in zip(out_sizes, kernel, strides, begins, dilations, sizes):
        index = np.arange(o)[:, None] * st - b + np.arange(k)[None, :] * d
        axes.append((index, (index >= 0) & (index < s)))
    in_index, valid = _spatial_pattern(axes, sizes)
    per_channel = weights.reshape(out_channels, in_per_group, -1)
    if _keeps_kernels(ctx, valid, out_channels * in_per_group, x):
        geometry = (kernel, strides, dilations, begins, out_sizes)
        return [_convolution_terms(ctx, node, x, per_channel, bias, geometry, group, transposed=False)]
    x = ctx.without_terms(x)
    return [_apply(ctx, node, x, per_channel, in_index, valid, group, bias, out_sizes)]


@lowers(
    "ConvTranspose",
    attributes=("auto_pad", "dilations", "group", "kernel_shape", "output_padding", "output_shape", "pads", "strides"),
    check=check_conv_attributes,
)
def lower_conv_transpose(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """The transposed (scatter) Toeplitz map plus the bias per channel.

    Args:
        ctx: the lowering context.
        node: the ConvTranspose node (any opset, any number of spatial axes).
        inputs: X (an expression of shape (N, C, S...)), W (constant, (C, M / group, K...))
            and the optional constant bias B (M,).

    Returns:
        [Y], the expression of shape (N, M, O...), O from the ONNX spec's formulas.

    Raises:
        GraphError: W or B not constant, shapes that do not fit, or an empty output.
        UnsupportedAttributeError: an auto_pad value outside the spec, negative pads, or SAME_*
            padding that would be negative (onnxruntime and the reference disagree there).
    """
    x, weights, bias, spatial, group = _operands(ctx, node, inputs, transposed=True)
    channels, sizes = x.shape[1], x.shape[2:]
    if weights.shape[0] != channels or channels % group:
        raise GraphError(
            f"{node.where}: W of shape {weights.shape} does not fit X of shape {x.shape} with group={group}: "
            f"expected W of shape ({channels}, output channels / {group}, kernel...) with {channels} a multiple "
            f"of {group}"
        )
    in_per_group, out_per_group = channels // group, weights.shape[1]
    out_channels = out_per_group * group
    kernel, strides, dilations = _geometry(node, weights, spatial)
    auto_pad = _auto_pad(node)
    output_padding = _ints(node, "output_padding", [0] * spatial, spatial)
    if min(output_padding) < 0:
        raise node.unsupported("output_padding", output_padding, "the ONNX spec requires values >= 0")
    full = [
        st * (s - 1) + op + (k - 1) * d + 1
        for s, st, op, k, d in zip(sizes, strides, output_padding, kernel, dilations)
    ]
    output_shape = node.attr("output_shape")
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if output_shape is not None:
            output_shape = [int(v) for v in output_shape]
            if len(output_shape) == spatial + 2:  # some exporters write (N, C, spatial...)
                output_shape = output_shape[2:]
            if len(output_shape) != spatial:
                raise GraphError(
                    f"{node.where}: output_shape {output_shape} should have one entry per spatial axis ({spatial})"
                )
            out_sizes = output_shape
        else:
            out_sizes = [s * st for s, st in zip(sizes, strides)]
        totals = [f - o for f, o in zip(full, out_sizes)]
        if min(totals) < 0 and output_shape is not None and auto_pad == "NOTSET":
            _check_output_shape_excess(node, out_sizes, full, strides)
        elif min(totals) < 0:
            raise node.unsupported(
                "auto_pad",
                auto_pad,
                f"with these strides and kernel it needs negative padding ({totals}), on which onnxruntime and "
                "the ONNX reference disagree; use explicit pads and output_padding",
            )
        begins = [0 if t < 0 else t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
    else:
        pads = [0] * (2 * spatial) if auto_pad == "VALID" else _pads(node, spatial)
        begins = pads[:spatial]
        out_sizes = [f - pads[d] - pads[d + spatial] for d, f in enumerate(full)]
    if min(out_sizes) <= 0:
        raise GraphError(f"{node.where}: the padding leaves an empty output of spatial shape {out_sizes}")
    axes = []
    for o, k, st, b, d, s in zip(out_sizes, kernel, strides, begins, dilations, sizes):
        numerator = np.arange(o)[:, None] + b - np.arange(k)[None, :] * d
        index = numerator // st
        axes.append((index, (numerator % st == 0) & (index >= 0) & (index < s)))
    in_index, valid = _spatial_pattern(axes, sizes)
    if _keeps_kernels(ctx, valid, out_channels * in_per_group, x):
        geometry = (kernel, strides, dilations, begins, out_sizes)
        flat = weights.reshape(channels, out_per_group, -1)
        return [_convolution_terms(ctx, node, x, flat, bias, geometry, group, transposed=True)]
    x = ctx.without_terms(x)
    # Row oc of group g reads W[g * C_g + icg, oc - g * M_g]; the kernel order reversed makes the
    # input index (and so the column) increase along each row.
    per_channel = (
        weights.reshape(group, in_per_group, out_per_group, -1)
        .transpose(0, 2, 1, 3)
        .reshape(out_channels, in_per_group, -1)
    )
    return [_apply(ctx, node, x, per_channel[:, :, ::-1], in_index[:, ::-1], valid[:, ::-1], group, bias, out_sizes)]


# --------------------------------------------------------------------------------------------- helpers
def _keeps_kernels(ctx: LoweringContext, valid: np.ndarray, channel_pairs: int, x: Affine) -> bool:
    """Whether the (transposed) convolution becomes terms (module docstring): a structured
    lowering, 1-D or 2-D, N = 1, and a T of at least ``MIN_STRUCTURED_NONZEROS`` entries (for a
    kernel without zeros: ``valid``'s pixel-tap pairs times the (output, input) channel pairs
    of the groups)."""
    spatial = x.ndim - 2
    entries = int(valid.sum()) * channel_pairs
    return ctx.structured and spatial <= 2 and x.shape[0] == 1 and entries >= MIN_STRUCTURED_NONZEROS


def _convolution_terms(
    ctx: LoweringContext, node: NodeView, x: Affine, weights: np.ndarray, bias, geometry, group: int, transposed: bool
) -> Affine:
    """Y = conv(X) + B (``transposed``: ConvTranspose) as ``Convolution`` (``TransposedConvolution``)
    terms, one per run of X's channels (module docstring); ``weights`` in ONNX's layout, float64,
    its kernel axes flattened: (M, C / group, K), (C, M / group, K) transposed; ``geometry``
    (kernel, strides, dilations, leading pads, output sizes) of a 1-D or 2-D convolution. Group g
    writes the rows of output channels g M_g ... (g + 1) M_g - 1 from input channels g C_g ...
    (g + 1) C_g - 1: a run of whole groups is one grouped term, a run's part of a group (a Concat
    operand ending inside it) a term of that group."""
    kernel, strides, dilations, begins, out_sizes = (list(part) for part in geometry)
    channels, sizes = x.shape[1], list(x.shape[2:])
    if len(sizes) == 1:  # 1-D as an image of height 1
        kernel, strides, dilations, out_sizes, sizes = ([1, *v] for v in (kernel, strides, dilations, out_sizes, sizes))
        begins = [0, *begins]
    out_channels = weights.shape[1] * group if transposed else weights.shape[0]
    ctx.ensure_fits(weights.size, f"the {node.op_type} kernel")
    runs = source_runs(x, channels, ctx.p)
    if runs is None:  # not whole runs of states or inputs: keep the operand as an identity block
        x = ctx.materialize(x)
        runs = source_runs(x, channels, ctx.p)
    pixels, out_pixels = sizes[0] * sizes[1], out_sizes[0] * out_sizes[1]
    in_per_group, out_per_group = channels // group, out_channels // group

    def term(low: int, high: int, start: int, scales: np.ndarray) -> Term:
        """Input channels low:high (whole groups, or part of one) read at columns start on, each
        channel's factor folded into its kernel entries."""
        first, last = low // in_per_group, -(-high // in_per_group)  # the groups
        groups = last - first if (low % in_per_group, high % in_per_group) == (0, 0) else 1
        if transposed:  # rows of W: input channels
            kernels = weights[low:high] * scales[:, None, None]
        else:
            column = low - first * in_per_group
            kernels = weights[first * out_per_group : last * out_per_group]
            kernels = kernels.reshape(groups, out_per_group, -1, weights.shape[2])
            kernels = kernels[:, :, column : column + (high - low) // groups] * scales.reshape(groups, 1, -1, 1)
        op = (TransposedConvolution if transposed else Convolution)(
            source=slice(start, start + (high - low) * pixels),
            in_shape=(high - low, *sizes),
            out_shape=((last - first) * out_per_group, *out_sizes),
            kernel=tuple(kernel),
            stride=tuple(strides),
            dilation=tuple(dilations),
            pads=tuple(begins),
            weight=kernels.reshape(high - low if transposed else (last - first) * out_per_group, -1),
            groups=groups,
        )
        return Term(slice(first * out_per_group * out_pixels, last * out_per_group * out_pixels), op)

    terms = [
        term(low, high, run.start + (low - run.first) * pixels, run.scales[low - run.first : high - run.first])
        for run in runs
        for low, high in _group_runs(run.first, run.stop, in_per_group)
    ]
    offset = np.zeros(out_channels * out_pixels)
    if x.offset.any():  # T c: the constant part of X through the kernels
        offset += term(0, channels, 0, np.ones(channels)).op.apply(x.offset[:, None]).ravel()
    if bias is not None:
        offset += np.repeat(bias, out_pixels)
    shape = (1, out_channels, *out_sizes[-len(geometry[4]) :])
    return Affine(shape, sp.csr_array((offset.size, ctx.width)), offset, tuple(terms))


def _group_runs(first: int, stop: int, per_group: int) -> list[tuple[int, int]]:
    """Channels first:stop cut at the group bounds (``per_group`` channels each), consecutive
    whole groups kept together: (low, high) of each part, in order."""
    parts: list[tuple[int, int]] = []
    for g in range(first // per_group, -(-stop // per_group)):
        low, high = max(first, g * per_group), min(stop, (g + 1) * per_group)
        whole = high - low == per_group
        if whole and parts and parts[-1][0] % per_group == 0 and parts[-1][1] == low:  # whole groups after whole ones
            parts[-1] = (parts[-1][0], high)
        else:
            parts.append((low, high))
    return parts


def _check_output_shape_excess(node: NodeView, out_sizes: list[int], full: list[int], strides: list[int]) -> None:
    """An output_shape beyond the full size is output padding at the end; onnxruntime and the
    reference refuse an excess of a stride or more (they infer a larger input), so do we."""
    if any(o - f >= st for o, f, st in zip(out_sizes, full, strides)):
        raise GraphError(
            f"{node.where}: output_shape {out_sizes} exceeds the full transposed convolution {full} by a stride "
            f"{strides} or more (onnxruntime and the ONNX reference refuse it too); use a smaller "
            "output_shape or pad the output with Pad"
        )


def _operands(ctx: LoweringContext, node: NodeView, inputs: list, transposed: bool):
    """X as an expression, W and B as float64 arrays, the number of spatial axes, the group."""
    weights = np.asarray(require_constant(optional_input(inputs, 1), node, "the weight W (input 1)"), dtype=np.float64)
    bias = optional_input(inputs, 2)
    if bias is not None:
        bias = np.asarray(require_constant(bias, node, "the bias B (input 2)"), dtype=np.float64).ravel()
    x = as_affine(inputs[0], ctx.width)
    if x.ndim < 3:
        raise GraphError(f"{node.where}: X must have shape (N, C, spatial...), got {x.shape}")
    if weights.ndim != x.ndim:
        raise GraphError(f"{node.where}: W of shape {weights.shape} must have the rank of X {x.shape}")
    group = int(node.attr("group", 1))
    if group < 1:
        raise node.unsupported("group", group, "the ONNX spec requires group >= 1")
    out_channels = weights.shape[1] * group if transposed else weights.shape[0]
    if bias is not None and bias.size != out_channels:
        raise GraphError(
            f"{node.where}: the bias B has {bias.size} values, expected one per output channel ({out_channels})"
        )
    return x, weights, bias, x.ndim - 2, group


def _geometry(node: NodeView, weights: np.ndarray, spatial: int) -> tuple[list[int], list[int], list[int]]:
    kernel = [int(k) for k in weights.shape[2:]]
    given = node.attr("kernel_shape")
    if given is not None and [int(k) for k in given] != kernel:
        raise GraphError(f"{node.where}: kernel_shape {list(given)} does not match the weight's kernel {kernel}")
    strides = _ints(node, "strides", [1] * spatial, spatial)
    dilations = _ints(node, "dilations", [1] * spatial, spatial)
    for name, values in (("strides", strides), ("dilations", dilations)):
        if min(values) < 1:
            raise node.unsupported(name, values, "the ONNX spec requires values >= 1")
    return kernel, strides, dilations


def _auto_pad(node: NodeView) -> str:
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad not in AUTO_PADS:
        raise node.unsupported("auto_pad", auto_pad, f"the ONNX spec allows {', '.join(AUTO_PADS)}")
    return auto_pad


def _pads(node: NodeView, spatial: int) -> list[int]:
    pads = _ints(node, "pads", [0] * (2 * spatial), 2 * spatial)
    if min(pads) < 0:
        raise node.unsupported("pads", pads, "the ONNX spec requires pads >= 0; crop with Slice instead")
    return pads


def _ints(node: NodeView, name: str, default: list[int], count: int) -> list[int]:
    values = node.attr(name)
    if values is None:
        return default
    values = [int(v) for v in values]
    if len(values) != count:
        raise GraphError(f"{node.where}: attribute {name}={values} should have {count} entries")
    return values


def _spatial_pattern(
    axes: list[tuple[np.ndarray, np.ndarray]], sizes: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis (O_d, K_d) input indices and validity combined into (prod O, prod K) arrays.

    Entry [o, k] of the result is the C-order flat input pixel read by output pixel o at kernel
    offset k (0 where invalid) and whether that pixel exists.
    """
    spatial = len(axes)
    in_strides = [math.prod(sizes[d + 1 :]) for d in range(spatial)]
    full_shape = [index.shape[0] for index, _ in axes] + [index.shape[1] for index, _ in axes]
    flat = np.zeros(full_shape, dtype=np.int64)
    valid = np.ones(full_shape, dtype=bool)
    for d, (index, ok) in enumerate(axes):
        shape = [1] * (2 * spatial)
        shape[d], shape[spatial + d] = index.shape
        flat += np.where(ok, index, 0).reshape(shape) * in_strides[d]
        valid &= ok.reshape(shape)
    out_size, kernel_size = math.prod(full_shape[:spatial]), math.prod(full_shape[spatial:])
    return flat.reshape(out_size, kernel_size), valid.reshape(out_size, kernel_size)


def _toeplitz(
    weights: np.ndarray,
    in_index: np.ndarray,
    valid: np.ndarray,
    counts: np.ndarray,
    group: int,
    in_channels: int,
    in_size: int,
) -> sp.csr_array:
    """T with rows (oc, o) and columns (ic, i): entry W[oc, icg, k] at column (g C_g + icg) S + in_index[o, k].

    ``weights`` is (M, C_g, K), ``in_index`` and ``valid`` (P, K) with the input index increasing
    along k for valid entries, so each row's columns come out sorted; ``counts`` (M, P) holds the
    non-zeros of each row.
    """
    out_channels, in_per_group, kernel_size = weights.shape
    positions = in_index.shape[0]
    out_per_group = out_channels // group
    n_cols = in_channels * in_size
    nnz = int(counts.sum())
    index_dtype = np.int32 if max(nnz, n_cols) < 2**31 else np.int64
    nonzero = weights != 0
    indptr = np.zeros(out_channels * positions + 1, dtype=index_dtype)
    np.cumsum(counts.ravel(), out=indptr[1:])
    data = np.empty(nnz, dtype=np.float64)
    indices = np.empty(nnz, dtype=index_dtype)
    in_index = in_index.astype(index_dtype)
    step = max(1, CHUNK_ELEMENTS // max(1, positions * in_per_group * kernel_size))
    for start in range(0, out_channels, step):
        stop = min(out_channels, start + step)
        shape = (stop - start, positions, in_per_group, kernel_size)
        mask = valid[None, :, None, :] & nonzero[start:stop, None, :, :]
        first, last = int(indptr[start * positions]), int(indptr[stop * positions])
        data[first:last] = np.broadcast_to(weights[start:stop, None, :, :], shape)[mask]
        groups = np.arange(start, stop) // out_per_group
        base = ((groups[:, None] * in_per_group + np.arange(in_per_group)[None, :]) * in_size).astype(index_dtype)
        columns = indices[first:last]
        columns[:] = np.broadcast_to(base[:, None, :, None], shape)[mask]
        columns += np.broadcast_to(in_index[None, :, None, :], shape)[mask]
    matrix = sp.csr_array((data, indices, indptr), shape=(out_channels * positions, n_cols))
    matrix.has_sorted_indices = True
    return matrix


def _apply(ctx, node, x, weights, in_index, valid, group, bias, out_sizes):
    """Build T (block diagonal over the leading axis), check the budget, apply it with the bias."""
    batch, in_channels = x.shape[0], x.shape[1]
    in_size = math.prod(x.shape[2:])
    out_channels = weights.shape[0]
    positions = in_index.shape[0]
    # Non-zeros per row (oc, o): the weights W[oc, :, k] != 0 at the kernel offsets k valid at o.
    counts = (weights != 0).sum(axis=1).astype(np.int64) @ valid.T.astype(np.int64)
    ctx.ensure_fits(batch * int(counts.sum()), f"the {node.op_type} matrix")
    matrix = _toeplitz(weights, in_index, valid, counts, group, in_channels, in_size)
    if batch > 1:
        matrix = sp.csr_array(sp.kron(sp.identity(batch, format="csr"), matrix, format="csr"))
    offset = None
    if bias is not None:
        offset = np.tile(np.repeat(bias, positions), batch)
    return ctx.apply_map(x, matrix, (batch, out_channels, *out_sizes), offset)
