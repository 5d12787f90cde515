"""Refusing graphs that mix samples along the batch axis.

The model is lowered at batch size 1 and applied to each sample (``graph``'s batch convention).
That is exact only when the graph keeps samples apart: an op that reduces, reshapes, slices or
contracts across the batch axis, or reads the batch size itself (``x / Shape(x)[0]``), computes
something else at batch 3 than three runs at batch 1, and at batch 1 it cannot be seen. So before
lowering, ``check_batch_independence`` looks at the graph at two batch sizes.

Why this way (generic, from the ONNX graph) rather than a batch-axis rule in every op lowering:
the lowerings only ever see batch 1, where the batch axis is a size-1 axis like any other, and
a rule per lowering would have to be written (and kept right) for every op. Instead:

1. onnx shape inference (with data propagation; shape operands it cannot follow, such as
   ``Shape(x)[0] // 2``, are evaluated here and given back to it as constants) runs on the
   prepared graph with each dynamic batch axis set to 2, then to 3. A value computed from a
   batched input keeps the samples apart only if exactly one of its axes is 2, then 3, all
   others equal: that axis is its batch axis (it may move, e.g. through a Transpose). An
   output whose shape is the same at both sizes lost the batch axis (a reduction over it,
   Gather of one sample); one that changes otherwise merged it with other axes or changed its
   length (Flatten(axis=0), a Reshape to (-1,), a Concat, Pad or Tile along it).
2. Ops that keep the batch axis's size but still combine along it are named: a reduction over
   it, a contraction over it (MatMul, Gemm), convolution, pooling and the per-sample ops with a
   fixed sample axis (Conv reads axis 0 as N, RNNs axis 1 or 0), a reversing Slice.
3. Shape and Size of a batched value are evaluated (with the reference, like constant folding)
   at both batch sizes; a constant that differs is batch-size dependent. It may only feed the
   shape operand of a shape op (Reshape's shape, Expand, Tile, Slice, Pad...), whose effect is
   on the output's shape and so checked by 1.; anywhere else (``x / Shape(x)[0]``) the batch
   size would be read as a number, which the lowering fixes at 1. A constant that only repeats
   one slice along a batch axis (``ConstantOfShape(Shape(x))``, an RNN's zero initial state) is
   the same for every sample and may be read anywhere.

Merged batch axes. Attention as torch exports it reshapes (S, N, E) to (S, N * heads, d) and
(S, N, heads, d) to (S * N, E): the batch axis becomes one factor of a merged axis of size
``outer * N * inner`` (``outer``, ``inner`` fixed; both shapes give its size 2k, then 3k). In
row-major order a value whose batch factor sits there is laid out as (P, N, Q) (P: every index
before the factor, Q: every index after it), so sample n's values are the same P x Q block at
every batch size, and a Reshape (Flatten, Squeeze, Unsqueeze) that keeps the row-major order keeps
that block exactly when its output splits into the same (P, N, Q) around one axis: that axis then
holds the batch as (P / before, N, Q / after). Per sample this is what the batch-1 lowering
computes, so such a merge is followed (its ``outer``, ``inner`` recorded), through the ops in
``SLICEWISE`` (which treat every index of a batch-like axis alone: elementwise ops, MatMul and Gemm
not contracting it, Softmax, reductions and LayerNormalization over other axes, Transpose, Gather
and Slice along other axes), until a Reshape splits it back to a batch axis of its own. Anything
else reading a merged axis is refused, as is a graph output with one, or a merging Reshape whose
target is computed from the batch size yet the same at both sizes (``Shape(x)[0] // 2``, which
the two sizes cannot tell apart from a constant).

Only inputs whose batch axis the model leaves dynamic are checked: a model declaring a static
batch of 1 is defined for one sample only and applying it per sample is its meaning. So is a
graph that does not run at other batch sizes after the offending node (a Reshape to one
sample's size, or to ``[1, -1]`` then a Gemm one sample wide, as some exporters write even with
a dynamic N): onnxruntime refuses a batch there, so nothing is silently wrong, and it is not
refused. Where shape inference cannot give a shape, that value is not checked here; ``verify``
runs a real batch through onnxruntime and catches what slips past.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import GraphError, UnsupportedAttributeError
from .context import NodeView
from .fold import evaluate_constant_node
from .graph import PreparedModel
from .ops.bilinear import parse_equation
from .registry import PATTERN_DOMAIN

BATCH_SIZES = (2, 3)
# A third batch size at which the constants read from the batch size are also evaluated (from the
# shapes at 2 and 3, without inference): one the same at 2 and 3 but not at this size
# (``Shape(x)[0] // 2``) depends on the batch size in a way the two sizes do not show.
PROBE_SIZE = 5
# Initializers above this many values are given to shape inference by shape only (their values
# can only matter to shapes when they are small, e.g. a Reshape target).
SMALL_INITIALIZER = 4096
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
# onnx's data propagation gives up on much shape arithmetic (even an Identity): the shape
# operands it could not follow are evaluated here and handed back to shape inference as
# constants, at most this many times.
MAX_INFERENCE_ROUNDS = 3

Shapes = dict[str, tuple[int, ...] | None]


def check_batch_independence(prepared: PreparedModel) -> None:
    """Raise GraphError or UnsupportedAttributeError at the first node that mixes samples."""
    batched_inputs = [i for i in prepared.inputs if i.batch_dynamic]
    if not batched_inputs:
        return
    names = {i.name for i in batched_inputs}
    known: list[dict[str, np.ndarray]] = [{} for _ in BATCH_SIZES]
    for round_ in range(MAX_INFERENCE_ROUNDS):
        shapes = [_inferred_shapes(prepared, size, values) for size, values in zip(BATCH_SIZES, known)]
        walk = _Walk(prepared, shapes, names, pending=True)
        walk.run()
        found = walk.shape_operand_values()
        if round_ == MAX_INFERENCE_ROUNDS - 1 or all(set(new) <= set(old) for new, old in zip(found, known)):
            _Walk(prepared, shapes, names).run()
            return
        known = [{**old, **new} for old, new in zip(known, found)]


class _Walk:
    """One pass over the sorted nodes, tracking batched values and batch-size dependent constants."""

    def __init__(self, prepared: PreparedModel, shapes: list[Shapes], batched: set[str], pending=False) -> None:
        self.prepared = prepared
        # before the last round of inference: a merge seen from operands of unknown shape is left
        # for a later round (where their shapes may be known) rather than refused
        self.pending = pending
        self.shapes = shapes
        self.batched = set(batched)
        self.sized: dict[str, list[np.ndarray]] = {}  # constants that depend on the batch size
        self.per_sample: set[str] = set()  # of those, the ones only repeated along a batch axis
        # constants read from the batch size that are the same at both sizes (``Shape(x)[0] // 2``)
        self.derived: set[str] = set()
        self.probes: dict[str, np.ndarray] = {}  # constants read from the batch size, at PROBE_SIZE
        # batched values whose batch axis is merged with others: (outer, inner) sizes around it
        self.layouts: dict[str, tuple[int, int]] = {}
        self.merged_by: dict[str, str] = {}  # the node that merged each one's batch axis
        self.producers = {out: index for index, node in enumerate(prepared.graph.node) for out in node.output if out}
        self.constants: dict[str, np.ndarray | None] = dict(prepared.constants)

    def run(self) -> None:
        for index, proto in enumerate(self.prepared.graph.node):
            node = NodeView(proto, self.prepared.opset, index)
            data = [name for position, name in enumerate(proto.input) if position != TYPE_OPERANDS.get(proto.op_type)]
            if any(name in self.batched for name in data):
                if proto.op_type in SIZE_READERS:
                    self._read_sizes(node)
                else:
                    self._check_batched_node(node)
            elif any(name in self.sized or name in self.derived for name in proto.input):
                self._propagate_sizes(node)
        for output in self.prepared.graph.output:
            if self.reads_batch_size(output.name):
                index = self.producers[output.name]
                where = NodeView(self.prepared.graph.node[index], self.prepared.opset, index).where
                raise GraphError(
                    f"{where}: graph output {output.name!r} is computed from the batch size (through Shape or "
                    "Size of a batched value), which the compiled model fixes at 1; output only values computed "
                    "per sample"
                )

    # ------------------------------------------------------------------ batched values
    def _check_batched_node(self, node: NodeView) -> None:
        """Refuse the node if it mixes samples, unless the graph after it does not run at other
        batch sizes at all (then it is defined for one sample, and nothing after it is tracked)."""
        if node.op_type == "Reshape" and self._only_at_batch_one(node):
            return
        try:
            self._check_mixing(node)
        except (GraphError, UnsupportedAttributeError):
            if self._runs_at_other_batch_sizes(node):
                raise
            return
        for name in node.proto.output:
            if name:
                self.batched.add(name)

    def _check_mixing(self, node: NodeView) -> None:
        for position, name in enumerate(node.proto.input):
            if self.reads_batch_size(name) and position not in SHAPE_OPERANDS.get(node.op_type, ()):
                raise GraphError(
                    f"{node.where}: operand {position} ({name!r}) is computed from the batch size (Shape or "
                    "Size of a batched value, e.g. Shape(x)[0]), which differs per batch but is fixed at 1 "
                    "when compiling; compute it from feature dimensions only (the batch axis is the sample axis)"
                )
        axes = {name: self.batch_axis(name) for name in node.proto.input if name in self.batched}
        self._check_merged_operands(node, axes)
        _check_op_axes(node, axes, self._constant, self.rank)
        for name in node.proto.output:
            if name:
                self._check_output(node, name, axes)

    def _runs_at_other_batch_sizes(self, node: NodeView) -> bool:
        """Whether shape inference finds a shape at both batch sizes for every graph output that
        depends on the node. Where it does not, the graph does not run at those sizes (e.g. a
        Reshape to ``[1, -1]`` then a Gemm with one sample's width, whose inner dimensions onnx's
        inference does not compare, so they are compared here): it is defined per sample."""
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for proto in self.prepared.graph.node:
            for name in proto.input:
                consumers.setdefault(name, []).append(proto)
        if not self._inner_dimensions_agree(node.proto):
            return False
        outputs = {output.name for output in self.prepared.graph.output}
        pending, seen = [name for name in node.proto.output if name], set()
        while pending:
            name = pending.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in outputs and any(shapes.get(name) is None for shapes in self.shapes):
                return False
            for proto in consumers.get(name, ()):
                if not self._inner_dimensions_agree(proto):
                    return False
                pending.extend(out for out in proto.output if out)
        return True

    def _inner_dimensions_agree(self, proto: onnx.NodeProto) -> bool:
        """For Gemm and MatMul, whether the summed dimensions of the operands match at both batch
        sizes (True where not known or for other ops)."""
        if proto.op_type not in ("Gemm", "MatMul") or len(proto.input) < 2:
            return True
        attributes = {a.name: a.i for a in proto.attribute}
        for shapes in self.shapes:
            a, b = shapes.get(proto.input[0]), shapes.get(proto.input[1])
            if a is None or b is None or not a or not b:
                continue
            if proto.op_type == "Gemm":
                inner_a = a[0] if attributes.get("transA", 0) else a[-1]
                inner_b = b[-1] if attributes.get("transB", 0) else b[0]
            else:
                inner_a, inner_b = a[-1], (b[0] if len(b) == 1 else b[-2])
            if inner_a != inner_b:
                return False
        return True

    def shape_operand_values(self) -> list[dict[str, np.ndarray]]:
        """Per batch size, the values of shape operands (Reshape's target...) of nodes whose output
        shape inference did not find, where this walk knows them: to hand back to the inference."""
        per_size: list[dict[str, np.ndarray]] = [{} for _ in BATCH_SIZES]
        for proto in self.prepared.graph.node:
            outputs = [name for name in proto.output if name]
            if all(shapes.get(name) is not None for shapes in self.shapes for name in outputs):
                continue
            for position in SHAPE_OPERANDS.get(proto.op_type, ()):
                name = proto.input[position] if position < len(proto.input) else ""
                if not name or name in self.prepared.constants:
                    continue
                values = self.sized.get(name) or [self._constant(name)] * len(BATCH_SIZES)
                if values[0] is not None:
                    for index, value in enumerate(values):
                        per_size[index][name] = value
        return per_size

    def _only_at_batch_one(self, node: NodeView) -> bool:
        """A Reshape to a fixed target holding one sample's values (``[1, 6, 2, 2]``, as some
        exporters write): the graph does not run at any other batch size (onnxruntime refuses it),
        so it is defined per sample and nothing after it is tracked."""
        for shapes in self.shapes:
            source, target = shapes.get(node.proto.input[0]), shapes.get(node.proto.output[0])
            if source is not None and target is not None and np.prod(source) != np.prod(target):
                return True
        return False

    def _check_output(self, node: NodeView, name: str, input_axes: dict[str, int | None]) -> None:
        before, after = (shapes.get(name) for shapes in self.shapes)
        if before is None or after is None:
            return
        found = _merged_axis_of(before, after)
        layout = self._output_layout(node, name, found)
        if (
            self.pending
            and layout is None
            and any(self.batch_axis(n) is None for n in node.proto.input if n in self.batched)
        ):
            return
        if found is not None and layout is not None:
            if layout != (1, 1):
                self.layouts[name] = layout
                self.merged_by[name] = self.merged_by.get(node.proto.input[0], node.where)
            return
        where = ", ".join(f"{n!r} at axis {a}" for n, a in input_axes.items() if a is not None) or "its input"
        if before == after:
            what = "removes the batch axis (reduces over it or keeps one sample of it)"
        else:
            what = "merges the batch axis with other axes or changes its length"
        raise GraphError(
            f"{node.where}: output {name!r} has shape {before} at batch size {BATCH_SIZES[0]} and {after} at "
            f"batch size {BATCH_SIZES[1]}: the node {what}, so samples would mix (batch axis of {where}). "
            "Operate on the feature axes only and keep the batch axis (the sample axis) as its own axis (e.g. "
            "Flatten with axis=1, a Reshape target starting with 0); or, for a model meant for one sample, "
            "declare a static batch of 1"
        )

    def _output_layout(self, node: NodeView, name: str, found: tuple[int, int] | None) -> tuple[int, int] | None:
        """The (outer, inner) sizes around the batch factor of the output's batch axis ((1, 1): an
        axis of its own), or None where the node is not known to keep every sample's block whole."""
        if found is None:
            return None
        axis, k = found
        if node.op_type in REORDERS_NOTHING:
            layout = self._reshaped_layout(node, name, axis)
        else:
            layouts = {self.layout(n) for n in node.proto.input if n in self.batched}
            known = layouts - {None}
            if len(known) > 1 or (None in layouts and known - {(1, 1)}):
                return None  # operands merged differently (or not known): their indices do not line up
            layout = known.pop() if known else (1, 1)
        if layout is None or layout[0] * layout[1] != k:
            return None
        if layout != (1, 1) and any(output.name == name for output in self.prepared.graph.output):
            return None  # the graph's output would not have the (N, ...) shape the compiled model gives
        return layout

    def _reshaped_layout(self, node: NodeView, name: str, axis: int) -> tuple[int, int] | None:
        """Where a row-major-order-keeping op puts the batch factor (see the module docstring): the
        input is (P, N, Q) in row-major order; the output must be (P, N, Q) around ``axis``."""
        source = node.proto.input[0]
        shape, out_shape = self.shapes[0].get(source), self.shapes[0].get(name)
        source_axis, layout = self.batch_axis(source), self.layout(source)
        if shape is None or source_axis is None or layout is None or out_shape is None:
            return (1, 1)  # not known: only an output with a batch axis of its own is taken
        outer, inner = layout
        prefix = int(np.prod(shape[:source_axis], dtype=np.int64)) * outer
        suffix = inner * int(np.prod(shape[source_axis + 1 :], dtype=np.int64))
        before = int(np.prod(out_shape[:axis], dtype=np.int64))
        after = int(np.prod(out_shape[axis + 1 :], dtype=np.int64))
        if prefix % before or suffix % after:
            return None
        result = (prefix // before, suffix // after)
        if (layout != (1, 1) or result != (1, 1)) and node.op_type == "Reshape":
            target = node.proto.input[1] if len(node.proto.input) > 1 else ""
            if target in self.derived:
                return None  # read from the batch size yet the same at both: not known at others
        return result

    def _check_merged_operands(self, node: NodeView, axes: dict[str, int | None]) -> None:
        """A merged batch axis may only reach the ops known to keep its slices apart."""
        if node.op_type in SLICEWISE or node.op_type in REORDERS_NOTHING:
            return
        for name, axis in axes.items():
            if name in self.layouts:
                outer, inner = self.layouts[name]
                raise GraphError(
                    f"{node.where}: the batch axis of operand {name!r} is merged with other axes (axis {axis}, "
                    f"{outer} x N x {inner} values, merged at {self.merged_by.get(name)}) and {node.op_type} is "
                    "not known to keep the slices of such an axis apart, so samples could mix. Split the batch "
                    "axis back out (a Reshape to (N, ...)) before this op; or, for a model meant for one "
                    "sample, declare a static batch of 1"
                )

    def layout(self, name: str) -> tuple[int, int] | None:
        """A batched value's (outer, inner) around its batch factor, None where its shapes are unknown."""
        if self.batch_axis(name) is None:
            return None
        return self.layouts.get(name, (1, 1))

    def batch_axis(self, name: str) -> int | None:
        """The value's batch axis, None when shape inference does not know its shapes."""
        before, after = (shapes.get(name) for shapes in self.shapes)
        if before is None or after is None:
            return None
        found = _merged_axis_of(before, after)
        if found is None or (found[1] != 1 and name not in self.layouts):
            return None
        return found[0]

    def rank(self, name: str) -> int | None:
        shape = self.shapes[0].get(name)
        return None if shape is None else len(shape)

    @staticmethod
    def _batch_axis_of(before: tuple[int, ...], after: tuple[int, ...]) -> int | None:
        if len(before) != len(after):
            return None
        changed = [axis for axis, (b, a) in enumerate(zip(before, after)) if b != a]
        if len(changed) == 1 and (before[changed[0]], after[changed[0]]) == BATCH_SIZES:
            return changed[0]
        return None

    # ------------------------------------------------------------------ batch-size dependent constants
    def _read_sizes(self, node: NodeView) -> None:
        """Shape or Size of a batched value: its result at each batch size."""
        results = []
        for shapes in self.shapes:
            shape = shapes.get(node.proto.input[0])
            if shape is None:
                return  # unknown shape: nothing to track (verify still runs a batch)
            results.append(evaluate_constant_node(node, [np.zeros(shape, dtype=np.float64)])[0])
        found = _merged_axis_of(*(shapes.get(node.proto.input[0]) for shapes in self.shapes))
        if found is not None:
            probe = list(self.shapes[0][node.proto.input[0]])
            probe[found[0]] = found[1] * PROBE_SIZE
            self.probes[node.proto.output[0]] = evaluate_constant_node(node, [np.zeros(probe, dtype=np.float64)])[0]
        self._record(node.proto.output[0], results)

    def _propagate_sizes(self, node: NodeView) -> None:
        """A constant node reading a batch-size dependent constant: evaluate it at each size."""
        per_size: list[list[np.ndarray]] = []
        for index in range(len(BATCH_SIZES)):
            inputs = [
                self.sized[name][index] if name in self.sized else (self._constant(name) if name else None)
                for name in node.proto.input
            ]
            if any(value is None for name, value in zip(node.proto.input, inputs) if name):
                return
            if not any(name in self.sized for name in node.proto.input):
                try:  # only constants the same at both sizes: followed to mark what they give
                    per_size.append(evaluate_constant_node(node, inputs))
                except GraphError:
                    return
                continue
            per_size.append(evaluate_constant_node(node, inputs))
        self._propagate_probe(node)
        for position, name in enumerate(node.proto.output):
            if name:
                self._record(name, [values[position] for values in per_size])

    def _propagate_probe(self, node: NodeView) -> None:
        """The node's outputs at PROBE_SIZE, where every operand read from the batch size has one."""
        names = node.proto.input
        if not all(name in self.probes for name in names if name in self.sized or name in self.derived):
            return
        inputs = [
            self.probes[name] if name in self.probes else (self._constant(name) if name else None) for name in names
        ]
        try:
            values = evaluate_constant_node(node, inputs)
        except GraphError:  # (e.g. shape arithmetic that only fits the sizes inferred)
            return
        for name, value in zip(node.proto.output, values):
            if name:
                self.probes[name] = value

    def _record(self, name: str, values: list[np.ndarray]) -> None:
        """Keep a constant that differs between the batch sizes; one that only repeats the same
        slice along a batch axis (``ConstantOfShape(Shape(x))``, an RNN's zero initial state) is
        the same for every sample, so it may be read anywhere (its shape is checked as a value's)."""
        first, second = values
        if first.shape == second.shape and np.array_equal(first, second):
            self.constants[name] = first
            probe = self.probes.get(name)
            if probe is None or probe.shape != first.shape or not np.array_equal(probe, first):
                self.derived.add(name)
            return
        self.sized[name] = values
        axis = self._batch_axis_of(first.shape, second.shape)
        if (
            axis is not None
            and all(_repeats_along(value, axis) for value in values)
            and np.array_equal(np.take(first, [0], axis), np.take(second, [0], axis))
        ):
            self.per_sample.add(name)

    def reads_batch_size(self, name: str) -> bool:
        """A constant computed from the batch size that is not the same for every sample."""
        return name in self.sized and name not in self.per_sample

    def _constant(self, name: str) -> np.ndarray | None:
        """The value of a constant not depending on the batch size (folded on demand), or None."""
        if name in self.constants:
            return self.constants[name]
        self.constants[name] = None  # a guard against cycles and values that are not constants
        index = self.producers.get(name)
        if index is None:
            return None
        proto = self.prepared.graph.node[index]
        if any(n in self.batched or n in self.sized for n in proto.input):
            return None
        inputs = [self._constant(n) if n else None for n in proto.input]
        if any(value is None for n, value in zip(proto.input, inputs) if n):
            return None
        try:
            values = evaluate_constant_node(NodeView(proto, self.prepared.opset, index), inputs)
        except GraphError:
            return None
        for out, value in zip(proto.output, values):
            if out:
                self.constants[out] = value
        return self.constants[name]


def _merged_axis_of(before: tuple[int, ...] | None, after: tuple[int, ...] | None) -> tuple[int, int] | None:
    """(axis, k) where only that axis changes, from 2k to 3k (k = 1: a batch axis of its own)."""
    if before is None or after is None or len(before) != len(after):
        return None
    changed = [axis for axis, (b, a) in enumerate(zip(before, after)) if b != a]
    if len(changed) != 1:
        return None
    axis = changed[0]
    k, rest = divmod(before[axis], BATCH_SIZES[0])
    if rest or k < 1 or after[axis] != BATCH_SIZES[1] * k:
        return None
    return axis, k


def _repeats_along(value: np.ndarray, axis: int) -> bool:
    """Every slice along ``axis`` equals the first."""
    return bool(np.all(value == np.take(value, [0], axis)))


# ---------------------------------------------------------------------- ops that combine along an axis
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
    folded_norm = node.proto.domain == PATTERN_DOMAIN and op == "LayerNormalization"  # patterns.py: axes
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


# ---------------------------------------------------------------------- shape inference
def _inferred_shapes(prepared: PreparedModel, batch_size: int, values: dict[str, np.ndarray]) -> Shapes:
    """Every value's static shape with each dynamic batch axis set to ``batch_size`` (None where
    shape inference cannot tell); ``values``: constants (at this batch size) to read in place of
    the values of those names."""
    source = prepared.model
    model = onnx.ModelProto(
        ir_version=source.ir_version,
        opset_import=source.opset_import,
        functions=source.functions,
        graph=onnx.GraphProto(name=source.graph.name, node=source.graph.node, output=source.graph.output),
    )
    graph = model.graph  # (the constructor copied the graph given)
    large = []
    for tensor in source.graph.initializer:  # large weights by shape only: no copy of them
        if _element_count(tensor) <= SMALL_INITIALIZER:
            graph.initializer.append(tensor)
        else:
            large.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    del graph.input[:]
    for graph_input in prepared.inputs:
        shape = list(graph_input.shape)
        if graph_input.batch_dynamic:
            shape[graph_input.batch_axis] = batch_size
        graph.input.append(onnx.helper.make_tensor_value_info(graph_input.name, onnx.TensorProto.DOUBLE, shape))
    graph.input.extend(large)
    for name, value in values.items():
        given = f"{name}::at_batch_{batch_size}"
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), given))
        for node in graph.node:
            if name in node.input:
                renamed = [given if n == name else n for n in node.input]
                del node.input[:]
                node.input.extend(renamed)
    for output in graph.output:
        output.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # inference gaps are not the user's error: those values are just not checked
        return {}
    shapes: Shapes = {}
    for value in _value_infos(inferred.graph):
        shapes[value.name] = _static_shape(value)
    return shapes


def _element_count(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count


def _value_infos(graph: onnx.GraphProto) -> Iterable[onnx.ValueInfoProto]:
    yield from graph.input
    yield from graph.value_info
    yield from graph.output


def _static_shape(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = []
    for dim in tensor_type.shape.dim:
        if not dim.HasField("dim_value"):
            return None
        dims.append(int(dim.dim_value))
    return tuple(dims)
