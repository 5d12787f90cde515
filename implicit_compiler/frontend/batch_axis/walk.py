"""The pass over the graph's nodes that follows each batched value's batch axis (``batch_axis``)."""

from __future__ import annotations

import numpy as np
import onnx

from ...errors import GraphError, UnsupportedAttributeError
from ..context import NodeView
from ..graph import PreparedModel, node_reads
from .merged import _MergedAxes
from .rules import SHAPE_OPERANDS, SIZE_READERS, TYPE_OPERANDS, _check_op_axes
from .shapes import BATCH_SIZES, Shapes, _merged_axis_of
from .sized import _SizedConstants


class _Walk(_MergedAxes, _SizedConstants):
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
            data += [name for name in node_reads(proto) if name not in proto.input]  # (a Loop body's reads)
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
