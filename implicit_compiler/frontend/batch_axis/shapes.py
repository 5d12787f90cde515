"""Every value's static shape at the two batch sizes (step 1 of ``batch_axis``): onnx shape
inference with each dynamic batch axis set to 2, then 3, and a value's batch axis read from the
two shapes it has."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import PreparedModel

BATCH_SIZES = (2, 3)
# Initializers above this many values are given to shape inference by shape only (their values
# can only matter to shapes when they are small, e.g. a Reshape target).
SMALL_INITIALIZER = 4096

Shapes = dict[str, tuple[int, ...] | None]


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
