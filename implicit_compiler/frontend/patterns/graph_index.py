"""The prepared graph indexed for matching: producers, readers, constants and static shapes."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from ..context import NodeView
from ..estimate import _shapes_model
from ..fold import evaluate_constant_node
from ..graph import PreparedModel


class _Graph:
    """The prepared graph indexed for matching: producers, readers, constants and static shapes."""

    def __init__(self, prepared: PreparedModel) -> None:
        self.nodes = list(prepared.graph.node)
        self.index = {id(node): i for i, node in enumerate(self.nodes)}
        self.producer = {name: node for node in self.nodes for name in node.output if name}
        self.readers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(self.nodes):
            for name in set(node.input):
                if name:
                    self.readers[name].append(i)
        self.graph_outputs = {value.name for value in prepared.graph.output}
        self.constants = dict(prepared.constants)
        for i, node in enumerate(self.nodes):
            if node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]:
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            elif node.op_type == "Constant":
                for name, value in zip(node.output, evaluate_constant_node(NodeView(node, prepared.opset, i), [])):
                    self.constants[name] = value
        self.prepared = prepared
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self.opset = prepared.opset
        self.new_constants: dict[str, np.ndarray] = {}
        self.names = {name for node in self.nodes for name in (*node.input, *node.output)} | set(self.constants)

    def const(self, name: str) -> np.ndarray | None:
        return self.constants.get(name)

    def produced(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The node of type ``op_type`` (default domain) producing ``name``, or None."""
        node = self.producer.get(name)
        if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
            return None
        return node

    def closed(self, nodes: set[int], root: onnx.NodeProto) -> bool:
        """Every value the matched nodes make, except the root's output, is read only by them."""
        for i in nodes:
            node = self.nodes[i]
            if node is root:
                continue
            for name in node.output:
                if name in self.graph_outputs or not set(self.readers.get(name, ())) <= nodes:
                    return False
        return True

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Static shapes, inferred once, when a match first needs them."""
        if self._shapes is None:
            self._shapes = _static_shapes(self.prepared)
        return self._shapes

    def same_shape(self, a: str, b: str) -> bool:
        return self.shapes.get(a) is not None and self.shapes.get(a) == self.shapes.get(b)

    def fresh(self, base: str) -> str:
        name, count = base, 0
        while name in self.names:
            count += 1
            name = f"{base}_{count}"
        self.names.add(name)
        return name


def _static_shapes(prepared: PreparedModel) -> dict[str, tuple[int, ...]]:
    """Every value's static shape, by onnx shape inference (the inputs' shapes are fixed)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_shapes_model(prepared), data_prop=True)
    except Exception:  # no shapes, no folds: a pattern is folded only where its shapes are known
        return {}
    shapes = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in tensor_type.shape.dim):
            shapes[value.name] = tuple(d.dim_value for d in tensor_type.shape.dim)
    for name, array in prepared.constants.items():
        shapes[name] = tuple(array.shape)
    return shapes
