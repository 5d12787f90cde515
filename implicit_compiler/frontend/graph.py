"""Reading an ONNX model and putting it in the form the lowering expects.

- ``load_onnx``: a path or a ``ModelProto``; a file that does not parse raises ModelFileError.
- ``prepare``: a normalized copy: nodes in topological order (networkx; some exporters write
  them unsorted), initializers that are also graph inputs treated as constants, every
  floating tensor and Cast in float64 (``to_float64``: lowering in float64 is what lets the
  result match the float64 reference to ~1e-9), and every input dimension fixed.

Batch convention: the model is lowered at batch size 1 and applied to each sample. An input's
batch axis is, in order: the axis ``input_shapes`` marks None; the first dynamic dimension
(the leading one, or e.g. the batch of a sequence-first RNN's (seq, batch, features)); a static
leading dimension 1. An input with none of these (a static leading dimension N > 1, or a scalar:
rank 0) has no batch axis: the whole tensor is one sample (a batch of scalars is then an array of
shape (batch,), as ``predict`` reads a leading batch axis). Any other dynamic dimension needs
``input_shapes``. Graphs that would mix samples along a dynamic batch axis are refused before
lowering (``batch_axis``); a static 0-size input dimension is a ShapeError (there is nothing to
compile).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from ..errors import ArgumentTypeError, GraphError, ModelFileError, PathIsDirectoryError, PathNotFoundError, ShapeError

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


@dataclass(frozen=True)
class GraphInput:
    """A true (runtime) input of the network, with its fixed ONNX shape and batch convention."""

    name: str
    shape: tuple[int, ...]  # the shape lowered, batch axis (if any) set to 1
    batch_axis: int | None  # None: the whole tensor is one sample
    batch_name: str | None = None  # the model's name for a dynamic batch dimension
    batch_dynamic: bool = False  # the model leaves the batch axis dynamic (it runs at any batch size)

    @property
    def batched(self) -> bool:
        return self.batch_axis is not None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample: ``shape`` without the batch axis."""
        if self.batch_axis is None:
            return self.shape
        return self.shape[: self.batch_axis] + self.shape[self.batch_axis + 1 :]


@dataclass(frozen=True)
class PreparedModel:
    """A normalized float64 copy of the network and what the lowering needs to know of it."""

    model: onnx.ModelProto
    opset: int
    inputs: tuple[GraphInput, ...]
    constants: dict[str, np.ndarray]

    @property
    def graph(self) -> onnx.GraphProto:
        return self.model.graph


def load_onnx(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """The ModelProto itself, or the file read; unreadable files raise ModelFileError."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = _model_path(model)
    try:
        proto = onnx.load(path)
    except onnx.checker.ValidationError as error:  # what onnx raises for a missing external-data file
        raise ModelFileError(
            f"cannot read the external data of {path}: {str(error).rstrip('.')}. Keep the data files where "
            "the model names them (next to it, as saved), or re-save the model as one file with onnx.save(model, path)"
        ) from error
    except (DecodeError, ValueError, OSError, RuntimeError) as error:
        raise ModelFileError(
            f"cannot read {path} as ONNX: the file is truncated, corrupted or not an ONNX model ({error}). "
            "Re-export it from its framework"
        ) from error
    if not proto.graph.node and not proto.graph.output:
        raise ModelFileError(f"{path} parsed as ONNX but holds no graph: is it really an ONNX model?")
    return proto


def _model_path(model: object) -> str:
    """The file ``from_onnx`` should read, or a typed error saying what to pass instead.

    Bytes are taken as a path (as ``open`` does); bytes holding a NUL cannot be one and are
    most likely a serialized model.
    """
    if not isinstance(model, (str, bytes, os.PathLike)):
        raise ArgumentTypeError(
            f"model must be a path to an .onnx file (str or os.PathLike) or an onnx.ModelProto, "
            f"not {type(model).__name__}"
        )
    path = os.fspath(model)
    if isinstance(path, bytes):
        if b"\0" in path:
            raise ArgumentTypeError(
                f"model is {len(path)} bytes that cannot be a path (they hold a NUL byte); to compile a "
                "serialized model pass onnx.load_model_from_string(data)"
            )
        path = os.fsdecode(path)
    if os.path.isdir(path):
        try:
            found = sorted(name for name in os.listdir(path) if name.endswith(".onnx"))[:5]
        except OSError:  # unreadable: say only that it is a directory
            found = []
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise PathIsDirectoryError(f"{path} is a directory, not an ONNX file; pass the .onnx file itself{hint}")
    if not os.path.isfile(path):
        raise PathNotFoundError(f"no ONNX file at {path}: check the path (relative to {os.getcwd()})")
    return path


def default_opset(model: onnx.ModelProto) -> int:
    """The model's version of the default ONNX domain."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise GraphError("the model imports no version of the default ONNX domain (opset_import is empty)")


def prepare(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int | None]] | None = None) -> PreparedModel:
    """A topologically sorted float64 copy with fixed input shapes (see the module docstring)."""
    input_shapes = _checked_input_shapes(input_shapes)
    model = to_float64(model)
    graph = model.graph
    constants = {tensor.name: tensor_array(tensor) for tensor in graph.initializer}
    runtime_inputs = [value for value in graph.input if value.name not in constants]
    unknown = set(input_shapes or {}) - {value.name for value in runtime_inputs}
    if unknown:
        raise GraphError(
            f"input_shapes names {sorted(unknown)}, which are not runtime inputs of the model; "
            f"its inputs are {[value.name for value in runtime_inputs]}"
        )
    fixed = []
    for value in runtime_inputs:  # in order: the first input's error is the one raised
        _check_float_input(value, graph, default_opset(model))
        fixed.append(_fixed_input(value, (input_shapes or {}).get(value.name)))
    inputs = tuple(fixed)
    del graph.input[:]
    graph.input.extend(onnx.helper.make_tensor_value_info(i.name, TensorProto.DOUBLE, list(i.shape)) for i in inputs)
    return PreparedModel(with_sorted_nodes(model, copy_model=False), default_opset(model), inputs, constants)


def _check_float_input(value: onnx.ValueInfoProto, graph: onnx.GraphProto, opset: int) -> None:
    """An integer (or bool, string) runtime input is refused naming the nodes that read it: an implicit
    model is a function of real vectors, and indices such as token ids are not (a Gather of an
    embedding table by them is a lookup, not an affine map)."""
    element = value.type.tensor_type.elem_type
    if not value.type.HasField("tensor_type") or element in FLOAT_TYPES:
        return
    readers = [
        f"node {node.name or f'{node.op_type}_{index}'!r} ({node.op_type}, opset {opset})"
        for index, node in enumerate(graph.node)
        if value.name in node.input
    ]
    raise GraphError(
        f"input {value.name!r} has element type {TensorProto.DataType.Name(element)} (read by "
        f"{', '.join(readers) or 'no node'}); an implicit model's inputs are real-valued, so integer inputs such "
        "as token ids cannot feed it: feed one-hot or embedded inputs instead (export the model from the "
        f"embedding's output on, or one-hot encode the ids), or make {value.name!r} a constant (an initializer) "
        "if it is an index or a size"
    )


def _checked_input_shapes(input_shapes: object) -> dict[str, tuple[int | None, ...] | None] | None:
    """A mapping of input name to a shape whose entries are positive ints or None (the batch
    axis), as a dict of tuples of Python ints: anything else is refused here, naming the input,
    the axis and the value (it would otherwise read as a dynamic dimension, or a mismatch)."""
    if input_shapes is None:
        return None
    example = "{'x': (None, 3, 32, 32)}"
    if not isinstance(input_shapes, Mapping):
        raise ArgumentTypeError(
            f"input_shapes must be a dict of input name to shape, e.g. {example}; got {type(input_shapes).__name__}"
        )
    checked: dict[str, tuple[int | None, ...] | None] = {}
    for name, shape in input_shapes.items():
        checked[name] = None
        if shape is None:  # no shape given for this input: the model's own
            continue
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence | np.ndarray):
            raise ArgumentTypeError(
                f"input_shapes[{name!r}] is {shape!r}, not a shape: expected a tuple of ints with None for the "
                f"batch axis, e.g. {example}"
            )
        for axis, size in enumerate(shape):
            if size is None:
                continue
            if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
                raise ShapeError(
                    f"input_shapes[{name!r}] gives axis {axis} the size {size!r} ({type(size).__name__}); "
                    "expected a positive int, or None for the batch axis"
                )
        checked[name] = tuple(None if size is None else int(size) for size in shape)
    return checked


def with_sorted_nodes(model: onnx.ModelProto, copy_model: bool = True) -> onnx.ModelProto:
    """The model (a copy unless asked otherwise) with its nodes in topological order."""
    if copy_model:
        model = copy.deepcopy(model)
    nodes = topological_nodes(model.graph)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _fixed_input(value: onnx.ValueInfoProto, override: Sequence[int | None] | None) -> GraphInput:
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise GraphError(f"input {value.name!r} is not a tensor; only tensor inputs are supported")
    if tensor_type.elem_type not in FLOAT_TYPES:
        raise GraphError(
            f"input {value.name!r} has element type {TensorProto.DataType.Name(tensor_type.elem_type)}; "
            "expected a floating-point input (integer inputs cannot feed a real-valued implicit model)"
        )
    if not tensor_type.HasField("shape"):
        if override is None:
            raise GraphError(f"input {value.name!r} has no declared shape: pass input_shapes={{{value.name!r}: (...)}}")
        declared: list[int | str | None] = [None] * len(override)
    else:
        declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
        _check_no_zero_size(value.name, declared)
    model_declared = list(declared)
    marked = None
    if override is not None:
        override = list(override)
        if len(override) != len(declared):
            raise ShapeError(
                f"input_shapes[{value.name!r}] has {len(override)} dimensions, the model declares "
                f"{len(declared)}: {declared}"
            )
        none_axes = [axis for axis, given in enumerate(override) if given is None]
        if len(none_axes) > 1:
            raise ShapeError(
                f"input_shapes[{value.name!r}] marks axes {none_axes} None; only the batch axis may be None"
            )
        marked = none_axes[0] if none_axes else None
        for axis, (given, found) in enumerate(zip(override, declared)):
            static = isinstance(found, int) and found > 0
            if static and given is not None and given != found:
                raise ShapeError(
                    f"input_shapes[{value.name!r}] sets axis {axis} to {given}, but the model fixes it at {found}"
                )
            if static and given is None and found != 1:
                raise ShapeError(
                    f"input_shapes[{value.name!r}] marks axis {axis} as the batch axis (None), but the model "
                    f"fixes it at {found}"
                )
        declared = [g if g is not None else f for g, f in zip(override, declared)]
    dynamic = [axis for axis, dim in enumerate(declared) if not isinstance(dim, int) or dim <= 0]
    if marked is not None:
        batch_axis = marked
    elif dynamic:
        batch_axis = dynamic[0]
    elif declared and declared[0] == 1:
        batch_axis = 0
    else:
        batch_axis = None
    for axis in dynamic:
        if axis != batch_axis:
            example = tuple(
                None if a == batch_axis else (d if isinstance(d, int) and d > 0 else 8) for a, d in enumerate(declared)
            )
            raise GraphError(
                f"input {value.name!r} has a dynamic dimension {declared[axis]!r} at axis {axis}; only the batch "
                f"axis may be dynamic. Pass input_shapes={{{value.name!r}: {example}}} giving every other "
                "dimension (None marks the batch axis)"
            )
    shape = tuple(1 if axis == batch_axis else int(dim) for axis, dim in enumerate(declared))
    batch_name = declared[batch_axis] if batch_axis is not None and isinstance(declared[batch_axis], str) else None
    batch_dynamic = batch_axis is not None and not (
        isinstance(model_declared[batch_axis], int) and model_declared[batch_axis] > 0
    )
    return GraphInput(value.name, shape, batch_axis, batch_name, batch_dynamic)


def _check_no_zero_size(name: str, declared: list[int | str | None]) -> None:
    """A static 0 in the declared shape: the tensor holds no values, so there is nothing to compile
    (and reading that axis as a dynamic batch axis would compile a model of some other shape)."""
    zeros = [axis for axis, dim in enumerate(declared) if isinstance(dim, int) and dim == 0]
    if zeros:
        raise ShapeError(
            f"input {name!r} has a zero-size dimension at axis {zeros[0]} (declared shape {declared}): it holds "
            "no values, so there is nothing to compile. Give that dimension a positive size in the model, or "
            "leave it dynamic (a dim_param) and pass input_shapes"
        )


def node_reads(node: onnx.NodeProto) -> list[str]:
    """The values a node reads: its inputs, and the outer-scope values its subgraphs (a Loop's
    or If's body) read, which are no inputs of the node."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs):
            names.extend(name for name in outer_reads(subgraph) if name not in names)
    return names


def outer_reads(graph: onnx.GraphProto) -> list[str]:
    """The values a (sub)graph's nodes read that it does not define itself (outer scope)."""
    defined = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer}
    defined |= {output for node in graph.node for output in node.output}
    reads = []
    for node in graph.node:
        reads.extend(name for name in node_reads(node) if name not in defined and name not in reads)
    return reads


def topological_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes ordered so that every value is produced before it is read."""
    producers = {}
    for index, node in enumerate(graph.node):
        for output in node.output:
            if output:
                producers[output] = index
    dependencies = nx.DiGraph()
    dependencies.add_nodes_from(range(len(graph.node)))
    for index, node in enumerate(graph.node):
        for name in node_reads(node):
            if name in producers:
                dependencies.add_edge(producers[name], index)
    try:
        order = list(nx.lexicographical_topological_sort(dependencies))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(dependencies)
        names = [graph.node[i].name or graph.node[i].op_type for i, _ in cycle]
        raise GraphError(f"the graph has a cycle through nodes {names}; ONNX graphs must be acyclic") from None
    return [graph.node[i] for i in order]


# ------------------------------------------------------------------------------------- float64
def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy computing in float64: floating initializers, constants, value types and Casts.

    Used for lowering (so that folded constants are exact) and for the float64 reference run.
    """
    model = copy.deepcopy(model)
    _graph_to_float64(model.graph)
    return model


def _graph_to_float64(graph: onnx.GraphProto) -> None:
    kept = _float_only_operands(graph)
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type in FLOAT_TYPES and tensor.data_type != TensorProto.DOUBLE and tensor.name not in kept:
            graph.initializer[index].CopyFrom(_tensor_to_float64(tensor))
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type in FLOAT_TYPES:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    for node in graph.node:
        if node.op_type == "Constant" and set(node.output) <= kept:
            continue
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type in FLOAT_TYPES:
                attribute.t.CopyFrom(_tensor_to_float64(attribute.t))
            elif attribute.type == onnx.AttributeProto.GRAPH:
                _graph_to_float64(attribute.g)
            elif (
                attribute.name in ("to", "dtype")
                and attribute.type == onnx.AttributeProto.INT
                and attribute.i in FLOAT_TYPES
            ):
                attribute.i = TensorProto.DOUBLE


def _float_only_operands(graph: onnx.GraphProto) -> set[str]:
    """Constants read as Resize's roi and scales (or Upsample's scales), which the schemas type
    tensor(float) only: kept float32, so that shape inference (the batch check, the size
    estimate) still gives Resize's output shape. Their values are float32 anyway."""
    float_only = {"Resize": (1, 2), "Upsample": (1,)}
    names, others = set(), {value.name for value in graph.output}
    for node in graph.node:
        for index, name in enumerate(node.input):
            (names if index in float_only.get(node.op_type, ()) else others).add(name)
    return names - others - {""}


def _tensor_to_float64(tensor: onnx.TensorProto) -> onnx.TensorProto:
    array = tensor_array(tensor).astype(np.float64)
    converted = numpy_helper.from_array(array, tensor.name)
    return converted


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values; data that was not loaded, or is shorter than its dims, raises
    ModelFileError naming the tensor (numpy's reshape error names none)."""
    name = tensor.name or "(a Constant node's value)"
    if tensor.data_location == TensorProto.EXTERNAL:
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location", "?")
        raise ModelFileError(
            f"tensor {name!r} keeps its data in the external file {location!r}, which was not loaded: pass "
            "the model's path to from_onnx, or load it with onnx.load(path), which reads the external data"
        )
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError) as error:
        kind = TensorProto.DataType.Name(tensor.data_type) if tensor.data_type in TensorProto.DataType.values() else "?"
        raise ModelFileError(
            f"tensor {name!r} ({kind}, dims {list(tensor.dims)}) cannot be read ({error}): its data is truncated "
            "or corrupted; re-export the model"
        ) from error
