"""The ops that combine values along an axis of the same length (step 2 of ``batch_axis``), and the
tables of ops the walk reads: a reduction, contraction, normalization or reversing Slice over the
batch axis, and the ops with a fixed sample axis, are refused here by name."""

from __future__ import annotations

import numpy as np

from ...errors import UnsupportedAttributeError
from ..context import NodeView
from ..ops.bilinear import parse_equation
from ..registry import PATTERN_DOMAIN

# Operand positions that only set the output's shape (checked through the shapes).
SHAPE_OPERANDS: dict[str, frozenset[int]] = {
    "Reshape": frozenset({1}),
    "Expand": frozenset({1}),
    "Tile": frozenset({1}),
    "Slice": frozenset({1, 2, 3, 4}),
    "Pad": frozenset({1, 3}),
    "Squeeze": frozenset({1}),
    "Unsqueeze": frozenset({1}),
    "Split": frozenset({1}),
    "Resize": frozenset({3}),  # sizes (opset 11 on): F.interpolate(size=...) writes Shape(x)[:2] + (h, w)
}
# Operands read for their element type only (CastLike's target: the constants of onnx's function
# bodies are cast like x), never as data: a batched one does not make the output batched.
TYPE_OPERANDS: dict[str, int] = {"CastLike": 1}
# Ops that read axis 0 as the sample axis N (N, C, spatial...).
SAMPLE_AXIS_ZERO = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "BatchNormalization",
        "DepthToSpace",
        "SpaceToDepth",
        "InstanceNormalization",
        "GroupNormalization",
        "LRN",
    }
)
REDUCTIONS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd"})
RECURRENT = frozenset({"RNN", "GRU", "LSTM"})
NORMALIZED_ALONG_AXIS = frozenset({"Softmax", "LogSoftmax"})
SIZE_READERS = frozenset({"Shape", "Size"})
# Ops that keep the row-major order of their first operand (a merged batch axis is followed through
# them by its position in that order).
REORDERS_NOTHING = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
# Ops that treat every index of a batch-like axis alone, mapping it to the same index of their
# output: a merged batch axis is followed through them with its layout. (The axis it may not be,
# e.g. the one a reduction reduces, is checked by ``_check_op_axes`` as for a batch axis.)
ELEMENTWISE = frozenset(
    {
        "Abs", "Add", "Cast", "Ceil", "Clip", "Cos", "Div", "Dropout", "Elu", "Equal", "Erf", "Exp", "Floor",
        "Gelu", "Greater", "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "Less", "Log", "Max", "Mean",
        "Min", "Mish", "Mul", "Neg", "Not", "Pow", "PRelu", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid",
        "Sign", "Sin", "Softplus", "Softsign", "Sqrt", "Sub", "Sum", "Tanh", "Where",
    }
)  # fmt: skip
ELEMENTWISE |= {"And", "CastLike", "GreaterOrEqual", "LessOrEqual", "Or", "ThresholdedRelu"}  # (ops/select.py)
SLICEWISE = ELEMENTWISE | REDUCTIONS | {"MatMul", "Gemm", "Softmax", "LogSoftmax", "LayerNormalization", "Transpose"}
SLICEWISE |= {"Gather", "Slice"}


def _check_op_axes(node: NodeView, axes: dict[str, int | None], constant, rank) -> None:
    """Ops that keep the batch axis's length but combine values along it. ``constant(name)``: a
    constant operand's value or None; ``rank(name)``: a value's rank or None."""
    inputs = list(node.proto.input)
    op = node.op_type
    first = axes.get(inputs[0]) if inputs else None
    if op in SAMPLE_AXIS_ZERO and first not in (None, 0):
        _refuse(node, first, f"{op} reads axis 0 as the sample axis N", "keep the batch axis first (axis 0)")
    if op in RECURRENT and first is not None:
        sample_axis = 0 if node.attr("layout", 0) else 1
        if first != sample_axis:
            _refuse(
                node,
                first,
                f"{op} with layout={node.attr('layout', 0)} reads axis {sample_axis} as the batch",
                f"put the batch axis at axis {sample_axis} of X",
            )
    if op == "MatMul":
        _check_matmul(node, inputs, axes, rank)
    if op == "Einsum":
        _check_einsum(node, inputs, axes, rank)
    if op == "Gemm":
        for position, transposed in ((0, "transA"), (1, "transB")):
            axis = axes.get(inputs[position]) if len(inputs) > position else None
            contracted = (1 - position) if not node.attr(transposed, 0) else position
            if axis is not None and axis == contracted:
                _refuse(node, axis, f"Gemm sums over axis {axis} of operand {position}", "contract feature axes only")
    folded_norm = node.proto.domain == PATTERN_DOMAIN and op == "LayerNormalization"  # patterns/layer_norm.py: axes
    if op == "LayerNormalization" and not folded_norm and first is not None and rank(inputs[0]) is not None:
        normalized = node.attr("axis", -1) % rank(inputs[0])
        if first >= normalized:
            what = f"LayerNormalization normalizes over axes {normalized}.."
            _refuse(node, first, what, "normalize over feature axes only (an axis after the batch axis)")
    if (op in REDUCTIONS or folded_norm) and first is not None:
        reduced = _reduced_axes(node, constant, rank(inputs[0]))
        if reduced is None or first in reduced:
            _refuse(node, first, f"{op} reduces over it", "reduce over feature axes only")
    if op == "Slice" and first is not None:
        _check_slice(node, first, constant, rank(inputs[0]))
    if op in NORMALIZED_ALONG_AXIS and first is not None:
        _check_softmax(node, first, rank(inputs[0]))


def _check_matmul(node: NodeView, inputs: list[str], axes: dict[str, int | None], rank) -> None:
    """numpy.matmul sums over the last axis of A and the second-to-last of B (the only axis of a
    vector operand)."""
    for position in (0, 1):
        axis = axes.get(inputs[position]) if len(inputs) > position else None
        operand_rank = rank(inputs[position]) if len(inputs) > position else None
        if axis is None or operand_rank is None:
            continue
        contracted = operand_rank - 1 if position == 0 or operand_rank == 1 else operand_rank - 2
        if axis == contracted:
            _refuse(node, axis, f"MatMul sums over axis {axis} of operand {position}", "contract feature axes only")


def _check_einsum(node: NodeView, inputs: list[str], axes: dict[str, int | None], rank) -> None:
    """Einsum sums over every subscript the output does not name: a batch axis must be named."""
    ranks = [rank(name) for name in inputs]
    if any(value is None for value in ranks):
        return
    labels, output = parse_equation(node, [(1,) * value for value in ranks])
    for position, name in enumerate(inputs):
        axis = axes.get(name)
        if axis is not None and labels[position][axis] not in output:
            _refuse(node, axis, f"Einsum sums over axis {axis} of operand {position}", "contract feature axes only")


def _check_softmax(node: NodeView, axis: int, rank: int | None) -> None:
    """Softmax normalizes along ``axis`` (opset 13+), or before opset 13 over every axis from
    ``axis`` on (the input coerced to 2-D): the batch axis must not be one of them."""
    opset13 = node.opset >= 13
    normalized = node.attr("axis", -1 if opset13 else 1)
    if rank is None or not -rank <= normalized < rank:
        return  # the lowering names an axis out of range
    normalized %= rank
    if (axis == normalized) if opset13 else (axis >= normalized):
        along = f"axis {normalized}" if opset13 else f"axes {normalized} to {rank - 1} (coerced to 2-D at {normalized})"
        _refuse(node, axis, f"{node.op_type} normalizes along {along}", "normalize along feature axes only")


def _reduced_axes(node: NodeView, constant, rank: int | None) -> set[int] | None:
    """The axes a reduction reduces, made non-negative; None: all of them (or not known)."""
    axes = node.attr("axes")
    if axes is None and len(node.proto.input) > 1 and node.proto.input[1]:
        value = constant(node.proto.input[1])
        if value is None:
            return None
        axes = [int(a) for a in np.ravel(value)]
    if not axes:
        return set() if node.attr("noop_with_empty_axes", 0) else None
    return {a + rank if a < 0 and rank is not None else a for a in axes}


def _check_slice(node: NodeView, axis: int, constant, rank: int | None) -> None:
    """A slice of the batch axis that starts at 0 with step 1 keeps the samples in order (its
    length is checked through the shapes); any other start or step moves or drops samples."""
    if node.opset < 10:
        sliced, starts, steps = node.attr("axes"), node.attr("starts") or [], None
    else:
        names = list(node.proto.input) + [""] * 5
        starts_value = constant(names[1]) if names[1] else None
        axes_value = constant(names[3]) if names[3] else None
        steps_value = constant(names[4]) if names[4] else None
        starts = [] if starts_value is None else [int(s) for s in np.ravel(starts_value)]
        sliced = None if axes_value is None else [int(a) for a in np.ravel(axes_value)]
        steps = None if steps_value is None else [int(s) for s in np.ravel(steps_value)]
    sliced = list(range(len(starts))) if sliced is None else list(sliced)
    for index, sliced_axis in enumerate(sliced):
        if (sliced_axis + rank if sliced_axis < 0 and rank is not None else sliced_axis) != axis:
            continue
        start = starts[index] if index < len(starts) else 0
        step = steps[index] if steps and index < len(steps) else 1
        if start != 0 or step != 1:
            _refuse(node, axis, f"Slice takes start {start}, step {step} along it", "slice feature axes only")


def _refuse(node: NodeView, axis: int, what: str, remedy: str) -> None:
    raise UnsupportedAttributeError(
        f"{node.where}: the batch axis of its input is axis {axis} and {what}, so samples would mix; "
        f"{remedy} (axis {axis} is the batch axis: the sample axis)"
    )
