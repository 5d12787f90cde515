"""Constant folding: a node whose inputs are all constants is evaluated once, at compile time.

This is how the shape subgraphs exporters emit (Shape -> Gather -> Unsqueeze -> Concat ->
Reshape, ConstantOfShape, Expand, Range, Cast...) disappear: with every input dimension fixed,
they compute constants. The node is run by ``onnx.reference.ReferenceEvaluator`` (the ONNX
reference semantics) on float64 operands, so folded values are exact in float64.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, version_converter
from onnx.reference import ReferenceEvaluator

from ..errors import GraphError
from .context import NodeView

# Ops onnx.reference evaluates wrongly before an opset: BatchNormalization before 14; Softmax,
# LogSoftmax and Hardmax before 13 (it normalizes along the single axis, not over the input
# coerced to 2-D at the axis as those opsets define). Models holding them are converted first.
REFERENCE_NEEDS_OPSET = {"BatchNormalization": 14, "Softmax": 13, "LogSoftmax": 13, "Hardmax": 13}


def for_reference(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The model, converted to the opset the reference needs for its ops (``REFERENCE_NEEDS_OPSET``)."""
    needed = max((REFERENCE_NEEDS_OPSET.get(node.op_type, 0) for node in model.graph.node), default=0)
    return version_converter.convert_version(model, needed) if opset < needed else model


def evaluate_constant_node(node: NodeView, inputs: list[np.ndarray | None]) -> list[np.ndarray]:
    """Run one node on constant inputs with the ONNX reference evaluator."""
    names = [f"in{i}" if value is not None else "" for i, value in enumerate(inputs)]
    outputs = [f"out{i}" if name else "" for i, name in enumerate(node.proto.output)]
    proto = onnx.NodeProto()
    proto.CopyFrom(node.proto)
    del proto.input[:]
    proto.input.extend(names)
    del proto.output[:]
    proto.output.extend(outputs)
    graph = helper.make_graph(
        [proto],
        "fold",
        [
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype), np.shape(value)
            )
            for name, value in zip(names, inputs)
            if name
        ],
        [helper.make_value_info(name, onnx.TypeProto()) for name in outputs if name],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", node.opset)])
    model.ir_version = min(model.ir_version, 10)
    feeds = {name: np.asarray(value) for name, value in zip(names, inputs) if name}
    try:
        results = ReferenceEvaluator(for_reference(model, node.opset)).run(None, feeds)
    except Exception as error:  # the reference raises many types; report them all the same way
        raise GraphError(f"{node.where}: cannot evaluate it on its constant inputs: {error}") from error
    produced = iter(results)
    return [np.asarray(next(produced)) if name else None for name in outputs]
