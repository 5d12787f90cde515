"""Data movement and shape ops: no arithmetic, only rows of the expression picked or reordered.

Every op here maps output element i to input element ids[i] (or to a constant). The ids are
computed by running the very ONNX node, with the ONNX reference evaluator, on the tensor of
row numbers ``arange(size).reshape(shape)`` instead of the data, then ``Affine.take(ids)``
picks the rows: Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Slice, Split, Gather,
GatherElements, GatherND, Expand, Tile, DepthToSpace, SpaceToDepth, Pad (padding gets id -1 and the pad
value) and, over the stacked rows of all operands, Concat and Where. So their semantics, every
attribute and opset difference included, are the reference's, not ours.

Identity, Dropout (inference) and Cast to a float type return the expression unchanged.
Shape and Size of an expression are constants (the shape at batch size 1: a model is applied
per sample). Ops that only
compute shapes (Constant, ConstantOfShape, Range, Floor...) are folded when their inputs
are constant and refused otherwise (comparisons and Where on variables: ``select``).
"""

from __future__ import annotations

import numpy as np
import onnx.defs
from onnx import NodeProto, TensorProto, helper

from ...errors import GraphError, UnsupportedOpError
from ..context import LoweringContext, NodeView, Value
from ..fold import evaluate_constant_node
from ..registry import lowers
from . import select
from .common import Affine, as_affine, optional_input

MOVEMENT_OPS = {
    "Reshape": ("allowzero", "shape"),
    "Flatten": ("axis",),
    "Transpose": ("perm",),
    "Squeeze": ("axes",),
    "Unsqueeze": ("axes",),
    "Slice": ("starts", "ends", "axes"),
    "Split": ("axis", "split", "num_outputs"),
    "Gather": ("axis",),
    "GatherElements": ("axis",),
    "GatherND": ("batch_dims",),
    "Expand": (),
    "Tile": (),
    "DepthToSpace": ("blocksize", "mode"),
    "SpaceToDepth": ("blocksize", "mode"),  # mode: from opset 28 on
}
FOLD_ONLY_OPS = (
    "Constant",
    "ConstantOfShape",
    "Range",
    "Floor",
    "Ceil",
    "Round",
    "ReduceProd",
    "NonZero",
    "Mod",
    "CumSum",
    "ReduceMin",
    "ArgMax",
    "ArgMin",
)  # fmt: skip (comparisons, Not, And, Or: ops/select.py)
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _row_ids(expression: Affine, offset: int = 0) -> np.ndarray:
    return np.arange(offset, offset + expression.size, dtype=np.int64).reshape(expression.shape)


def move_rows(node: NodeView, inputs: list[Value | None]) -> list[Affine]:
    """Lower a one-data-operand movement op (data = input 0): run it on row ids, take rows."""
    data = inputs[0]
    others = list(inputs[1:])
    for index, value in enumerate(others, start=1):
        if isinstance(value, Affine):
            raise GraphError(
                f"{node.where}: input {index} depends on the model input, but it must be a constant "
                "(indices, shapes and axes are fixed when compiling)"
            )
    ids = evaluate_constant_node(node, [_row_ids(data), *others])
    return [data.take(out) if out is not None else None for out in ids]


def _movement_lowering(op_type: str):
    def lower_movement(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
        if not isinstance(inputs[0], Affine):
            raise GraphError(f"{node.where}: only its data input may depend on the model input")
        return move_rows(node, inputs)

    lower_movement.__name__ = f"lower_{op_type.lower()}"
    lower_movement.__doc__ = f"{op_type}: rows picked by the reference {op_type} run on row ids."
    return lower_movement


def check_block_mode(node: NodeView) -> None:
    """DepthToSpace's and SpaceToDepth's ``mode`` must be one the schema defines: the reference
    evaluator runs any other DepthToSpace mode as CRD, and before opset 28 SpaceToDepth has no
    mode (its blocks are ordered DCR), so that a mode there would silently change the result."""
    mode = node.attr("mode")
    if mode is None:
        return
    schema = onnx.defs.get_schema(node.op_type, max_inclusive_version=node.opset, domain="")
    if "mode" not in schema.attributes:
        raise node.unsupported(
            "mode",
            mode,
            f"version {schema.since_version} of {node.op_type} has no mode attribute (it orders blocks DCR): "
            "remove it, or convert the model to an opset whose version has one (28 or newer)",
        )
    if mode not in ("DCR", "CRD"):
        raise node.unsupported("mode", mode, f"{node.op_type} orders blocks 'DCR' (the default) or 'CRD'")


for _op, _attributes in MOVEMENT_OPS.items():
    _check = check_block_mode if _op in ("DepthToSpace", "SpaceToDepth") else None
    lowers(_op, attributes=_attributes, check=_check)(_movement_lowering(_op))


def _stacked(ctx: LoweringContext, values: list[Value | None]) -> tuple[Affine, list[np.ndarray | None]]:
    """All operands' rows stacked into one expression, and each operand's row ids in it."""
    expressions, ids, offset = [], [], 0
    for value in values:
        if value is None:
            ids.append(None)
            continue
        expression = as_affine(value, ctx.width)
        expressions.append(expression)
        ids.append(_row_ids(expression, offset))
        offset += expression.size
    return Affine.concatenate(expressions, ctx.width), ids


@lowers("Concat", attributes=("axis",))
def lower_concat(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """Concat: the reference Concat run on the operands' row ids in their stacked rows."""
    stacked, ids = _stacked(ctx, inputs)
    order = evaluate_constant_node(node, ids)[0]
    if stacked.has_terms and not np.array_equal(order.ravel(), np.arange(stacked.size)):
        # not the operands one after another (an axis after the channels'): no terms reordered
        stacked, ids = _stacked(ctx, [ctx.without_terms(v) if isinstance(v, Affine) else v for v in inputs])
    return [stacked.take(order)]


@lowers("Where")
def lower_where(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """Where(c, a, b): with a constant condition rows of a or b; else b + c (a - b) (select.where)."""
    condition = inputs[0]
    if isinstance(condition, Affine):
        return [select.where(ctx, node, inputs)]
    stacked, ids = _stacked(ctx, inputs[1:])
    return [stacked.take(evaluate_constant_node(node, [condition, *ids])[0])]


@lowers("Pad", attributes=("mode", "pads", "value", "paddings"))
def lower_pad(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """Pad: padding positions get id -1 and the constant pad value; other modes copy rows."""
    data = inputs[0]
    if not isinstance(data, Affine):
        raise GraphError(f"{node.where}: only its data input may depend on the model input")
    if any(isinstance(v, Affine) for v in inputs[1:]):
        raise GraphError(f"{node.where}: pads, the pad value and axes must be constants")
    if node.opset < 11:
        pads = list(node.attr("pads", node.attr("paddings", [])))
        fill = float(node.attr("value", 0.0))
        axes = list(range(data.ndim))
    else:
        pads = [int(v) for v in np.asarray(inputs[1]).ravel()]
        value = optional_input(inputs, 2)
        fill = 0.0 if value is None or np.size(value) == 0 else float(np.asarray(value).ravel()[0])
        axes_value = optional_input(inputs, 3)
        axes = [int(a) % data.ndim for a in np.asarray(axes_value).ravel()] if axes_value is not None else None
        axes = axes if axes is not None else list(range(data.ndim))
    if len(pads) != 2 * len(axes):
        raise GraphError(f"{node.where}: expected {2 * len(axes)} pads for axes {axes}, got {pads}")
    # The reference evaluator pads with numpy, which refuses negative pads (crops): pad with the
    # positive part, then crop.
    grown = [max(p, 0) for p in pads]
    if node.opset < 11:
        ids = evaluate_constant_node(_with_attribute(node, "pads", grown, value=-1.0), [_row_ids(data)])[0]
    else:
        rest = [np.array(grown, dtype=np.int64), np.array(-1, dtype=np.int64), *inputs[3:]]
        ids = evaluate_constant_node(node, [_row_ids(data), *rest])[0]
    crop = [slice(None)] * data.ndim
    for index, axis in enumerate(axes):
        begin, end = -min(pads[index], 0), -min(pads[index + len(axes)], 0)
        crop[axis] = slice(begin, ids.shape[axis] - end)
    return [data.take(ids[tuple(crop)], fill=fill)]


def _with_attribute(node: NodeView, name: str, pads: list[int], value: float) -> NodeView:
    """A copy of a Pad (opset < 11) node with other pads and pad value attributes."""
    proto = NodeProto()
    proto.CopyFrom(node.proto)
    kept = [a for a in proto.attribute if a.name not in (name, "paddings", "value")]
    del proto.attribute[:]
    proto.attribute.extend([*kept, helper.make_attribute(name, pads), helper.make_attribute("value", value)])
    return NodeView(proto, node.opset, node.index)


@lowers("Identity")
def lower_identity(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """The input, unchanged."""
    return [inputs[0]]


@lowers("Dropout", attributes=("ratio", "seed", "is_test", "consumed_inputs"))
def lower_dropout(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """Inference-mode dropout: the input unchanged (and an all-true mask)."""
    training = optional_input(inputs, 2)
    if training is not None:
        if isinstance(training, Affine):
            raise GraphError(f"{node.where}: training_mode depends on the model input")
        if bool(np.asarray(training).ravel()[0]):
            raise UnsupportedOpError(
                f"{node.where}: Dropout in training mode (training_mode=true) drops random units, so "
                "the network is not a fixed function; export the model in eval/inference mode"
            )
    data = inputs[0]
    mask = np.ones(data.shape, dtype=bool)
    return [data, mask]


@lowers("Cast", attributes=("to", "saturate", "round_mode"))
def lower_cast(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """A cast to a float type leaves the expression unchanged; other casts are refused."""
    target = node.attr("to")
    if target not in FLOAT_TYPES:
        name = TensorProto.DataType.Name(target) if isinstance(target, int) else target
        raise UnsupportedOpError(
            f"{node.where}: casting a value computed from the model input to {name} rounds it, which is not affine"
        )
    return [inputs[0]]


@lowers("CastLike", attributes=("saturate", "round_mode"))
def lower_cast_like(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """A cast to the type of a float value (e.g. the constants of the expanded function bodies of
    Elu, Selu, HardSigmoid, Gelu cast like x): the value unchanged; to an integer type, refused."""
    value, target = inputs
    if isinstance(target, Affine) or np.asarray(target).dtype.kind == "f":
        return [value]
    raise UnsupportedOpError(
        f"{node.where}: casting a value computed from the model input like the {np.asarray(target).dtype} "
        "tensor rounds it, which is not affine"
    )


@lowers("Shape", attributes=("start", "end"))
def lower_shape(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """The shape of an expression (batch axis at 1): a constant."""
    return evaluate_constant_node(node, [np.zeros(inputs[0].shape, dtype=np.float64)])


@lowers("Size", attributes=())
def lower_size(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """The number of elements of an expression (batch axis at 1): a constant."""
    return evaluate_constant_node(node, [np.zeros(inputs[0].shape, dtype=np.float64)])


def _fold_only(op_type: str):
    def lower_constant_only(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
        raise UnsupportedOpError(
            f"{node.where}: {op_type} is only supported on constants (shape computations), but an "
            "operand depends on the model input"
        )

    lower_constant_only.__name__ = f"lower_{op_type.lower()}"
    lower_constant_only.__doc__ = f"{op_type}: folded on constant inputs only."
    return lower_constant_only


def check_mod(node: NodeView) -> None:
    """Mod's fmod picks the quotient's rounding, floor (0) or truncation (1); the reference
    evaluator would fold any other value as 0."""
    fmod = node.attr("fmod", 0)
    if fmod not in (0, 1):
        raise node.unsupported("fmod", fmod, "Mod's fmod is 0 (floor) or 1 (truncation)")


def check_range(node: NodeView) -> None:
    """Range-27's stash_type, the type float16 and bfloat16 ranges are accumulated in, is FLOAT
    or DOUBLE, the two the reference evaluator computes (without effect here: constants are
    folded in float64); any other value is refused rather than guessed."""
    stash_type = node.attr("stash_type", TensorProto.FLOAT)
    if stash_type not in (TensorProto.FLOAT, TensorProto.DOUBLE):
        raise node.unsupported(
            "stash_type", stash_type, f"Range accumulates in FLOAT ({TensorProto.FLOAT}, the default) or DOUBLE"
        )


FOLD_CHECKS = {"Mod": check_mod, "Range": check_range}
for _op in FOLD_ONLY_OPS:
    lowers(_op, attributes=None, check=FOLD_CHECKS.get(_op))(_fold_only(_op))
