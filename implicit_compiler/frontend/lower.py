"""The driver: walk the ONNX graph in topological order and lower every node.

Each ONNX value is held in ``env`` as a constant (numpy array) or an affine expression over
[u; x] (see ``expression``). For each node: if all its inputs are constants it is folded (run
by the reference evaluator); otherwise the lowering registered for its op and opset transforms
the expressions, creating state blocks for activations. Any failure is re-raised with
"while lowering node 'conv1' (Conv, opset 13)" in front, keeping its type.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from ..errors import (
    ArgumentTypeError,
    GraphError,
    ImplicitCompilerError,
    ModelTooLargeError,
    NonFiniteError,
    UnsupportedOpError,
)
from ..memory import available_memory_bytes
from ..model import ImplicitModel, TensorSpec
from .batch_axis import check_batch_independence
from .context import LoweringContext, NodeView, Value
from .estimate import check_model_fits, estimate_nonzeros
from .expression import Affine
from .fold import evaluate_constant_node
from .graph import PreparedModel, load_onnx, node_reads, prepare
from .patterns import fold_patterns
from .registry import REGISTRY, STRUCTURED_OPS, Lowering, find_lowering

# Ops that must not be folded even with constant inputs: a fixed-point Loop's body reads the
# model's values from the outer scope, which are no inputs of the node (``ops.fixed_point``).
NEVER_FOLD: frozenset[str] = frozenset({"Loop"})
# Nodes listed in the error refusing a model before lowering; the rest are counted.
MAX_LISTED = 20
# structure="auto" keeps kernels from this many non-zeros of the CSR form on (about 0.6 GB as
# float64 CSR; ResNet-18 at 64 x 64 has 113M): below it the CSR's compiled paths are faster.
# Ours / onnxruntime, float32, quiet, same runs: ResNet20 (37M) at batch 32 0.52-0.57 as CSR
# (row groups) against 0.45-0.46 as kernels (tiles); the LeNet-5 feedback loop (0.43M) 0.20 /
# 0.73 ms at batch 1 / 16 as CSR against 0.39 / 1.31 ms as kernels.
AUTO_KERNEL_NONZEROS = 50_000_000
# Ops out of scope on values computed from the model input, and why (``_check_in_scope``).
_DATA_DEPENDENT_SHAPE = (
    "its output shape depends on the input's values (a data-dependent shape), and an implicit model's shapes are "
    "fixed when compiling; compute it outside the model, from the predictions"
)
_INDEX = (
    "an index of the input's values is a piecewise constant function of the input with jumps, which no "
    "implicit model computes; output the scores instead (remove the node) and take {op} of the predictions "
    "(numpy.{function})"
)
OUT_OF_SCOPE: dict[str, str] = {
    "ArgMax": _INDEX.format(op="ArgMax", function="argmax"),
    "ArgMin": _INDEX.format(op="ArgMin", function="argmin"),
    "NonZero": _DATA_DEPENDENT_SHAPE,
    "Range": _DATA_DEPENDENT_SHAPE,
    "ConstantOfShape": _DATA_DEPENDENT_SHAPE,
    "TopK": "its indices, and with a k computed from the input its shape, depend on the input's values; "
    + _INDEX.format(op="TopK", function="argsort"),
    "Unique": _DATA_DEPENDENT_SHAPE,
    "Compress": _DATA_DEPENDENT_SHAPE,
    "NonMaxSuppression": _DATA_DEPENDENT_SHAPE,
}


def from_onnx(
    model: str | os.PathLike | onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int | None]] | None = None,
    dtype: Any = np.float64,
    memory_limit_bytes: float | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    structure: str = "auto",
) -> ImplicitModel:
    """Compile an ONNX network into an ImplicitModel, exactly.

    Args:
        model: a path to an .onnx file or an ``onnx.ModelProto``.
        input_shapes: full shapes for inputs with dynamic dimensions other than the batch
            axis, e.g. ``{"x": (None, 3, 32, 32)}`` (the batch entry may be None).
        dtype: float64 (default; matches the float64 reference to ~1e-9) or float32.
        memory_limit_bytes: refuse models whose lowering is estimated to need more (default:
            the memory available on this machine).
        progress: called as progress(done, total, node_name) after each node (the CLI draws a
            progress bar with it).
        structure: "kernels": convolutions and dense products reading whole runs of inputs
            or states are kept as kernels (``structure.StructuredMatrix`` terms of A, B, C, D),
            never as their Toeplitz rows, so ImageNet-size networks compile; an operand that is
            not such a run is first kept as an identity block. "csr": every matrix is built as
            CSR, as before structured terms (the materialized "kernels" model equals it wherever
            no identity block was added: see docs/design/issue20.md). "auto" (default):
            "kernels" for a model whose CSR would hold ``AUTO_KERNEL_NONZEROS`` non-zeros or
            more (the up-front estimate), else "csr", whose compiled paths are faster on smaller
            models (ResNet20, LeNet-5: see ``AUTO_KERNEL_NONZEROS``; as kernels ResNet20 is 4 MB
            instead of 299 MB).

    Raises:
        UnsupportedOpError, UnsupportedAttributeError: an op or attribute without lowering.
        GraphError, ShapeError: a malformed graph, dynamic shapes, runtime weights.
        NonFiniteError: NaN or inf weights. ModelTooLargeError: the estimate does not fit.
        ModelFileError: the file is not readable ONNX.
        PathNotFoundError / PathIsDirectoryError: there is no file at the path / it is a folder.
        ArgumentTypeError: ``model``, ``dtype``, ``input_shapes``, ``memory_limit_bytes`` or
            ``structure`` of a type (or a value) not taken.

    Every node is checked for a lowering (op, opset, attributes) before any is lowered, and the
    size of the result estimated, so that a model that cannot compile is refused in seconds.

    A cyclic model exported by ``to_onnx`` reads back as the same model: its fixed-point Loops
    (marked by the exporter) are lowered as the fixed points they compute, and their residual
    outputs ("fixed_point_residual") are dropped (``ops.fixed_point``); other Loops are refused.
    """
    dtype = _compile_dtype(dtype)
    _check_structure(structure)
    proto = load_onnx(model)
    prepared = prepare(proto, input_shapes)
    fold_patterns(prepared)  # exporters' GELU, SiLU, LayerNorm... chains: one op each
    _check_single_assignment(prepared)
    _check_lowerable(prepared)
    check_batch_independence(prepared)
    structured = _structured(structure, prepared)
    limit = _memory_limit(memory_limit_bytes)
    expected_nonzeros = check_model_fits(prepared, limit, structured)
    _check_finite_constants(prepared)

    p = sum(math.prod(i.sample_shape) for i in prepared.inputs)
    batched = all(i.batched for i in prepared.inputs)
    ctx = LoweringContext(
        p=p,
        batched=batched,
        memory_limit_bytes=limit,
        dtype=np.dtype(dtype),
        structured=structured,
        expected_nonzeros=expected_nonzeros,
    )
    env: dict[str, Value] = dict(prepared.constants)
    ctx.scope = env  # (a Loop body reads the graph's values by name)
    unavailable: dict[str, str] = {}  # outputs a lowering does not provide -> the node
    offset = 0
    specs = []
    for graph_input in prepared.inputs:
        size = math.prod(graph_input.shape)
        env[graph_input.name] = Affine.variables(graph_input.shape, offset, p)
        specs.append(TensorSpec(graph_input.name, graph_input.sample_shape))
        offset += size

    total = len(prepared.graph.node)
    last_use = _last_uses(prepared.graph)
    for index, proto_node in enumerate(prepared.graph.node):
        node = NodeView(proto_node, prepared.opset, index)
        ctx.node = node
        inputs = [env.get(name) if name else None for name in proto_node.input]
        _check_inputs_exist(node, inputs, unavailable)
        outputs = _lower_node(ctx, node, inputs)
        del inputs
        for name, value in zip(proto_node.output, outputs):
            if name and value is None:
                unavailable[name] = node.where
            elif name:
                env[name] = value
        del outputs
        for name in set(proto_node.input):  # drop values nothing reads any more: they can be large
            if last_use.get(name) == index:
                env.pop(name, None)
        if progress is not None:
            progress(index + 1, total, node.name)

    outputs = []
    for value_info in prepared.graph.output:
        if value_info.name in ctx.dropped_outputs:  # (a fixed-point Loop's residual: ``ops.fixed_point``)
            continue
        if value_info.name in unavailable:
            raise GraphError(f"graph output {value_info.name!r} of {unavailable[value_info.name]} cannot be lowered")
        if value_info.name not in env:
            raise GraphError(f"graph output {value_info.name!r} is produced by no node")
        value = env[value_info.name]
        outputs.append((value_info.name, value, _output_batch_axis(value_info, value, prepared)))
    ctx.node = None
    return ctx.assemble(tuple(specs), outputs, np.dtype(dtype))


def _lower_node(ctx: LoweringContext, node: NodeView, inputs: list[Value | None]) -> list[Value | None]:
    try:
        lowering = _lowering_for(node)
        all_constant = all(value is None or not isinstance(value, Affine) for value in inputs)
        if all_constant and node.op_type not in NEVER_FOLD:
            return evaluate_constant_node(node, inputs)
        _check_in_scope(node)
        if node.op_type not in STRUCTURED_OPS:  # the one place terms are kept from other ops
            inputs = [ctx.without_terms(value) if isinstance(value, Affine) else value for value in inputs]
        outputs = lowering.function(ctx, node, inputs)
    except ImplicitCompilerError as error:
        message = str(error)
        if node.where not in message:
            message = f"while lowering {node.where}: {message}"
        raise type(error)(message) from error
    except MemoryError as error:  # past a process or cgroup limit the estimate did not foresee
        raise ModelTooLargeError(
            f"while lowering {node.where}: out of memory ({error}); the model is larger than its estimate. "
            "Use a smaller input resolution, a machine with more memory, or raise the process's memory limit"
        ) from error
    except Exception as error:  # a bug or an unforeseen input: never a bare crash
        raise GraphError(
            f"while lowering {node.where}: internal error {type(error).__name__}: {error}. "
            "Please report it with the model"
        ) from error
    if len(outputs) < len([o for o in node.proto.output if o]):
        raise GraphError(f"{node.where}: produced {len(outputs)} outputs, the node names {len(node.proto.output)}")
    return outputs


def _check_in_scope(node: NodeView) -> None:
    """An op of ``OUT_OF_SCOPE`` reading a value computed from the model input: UnsupportedOpError
    saying why no implicit model computes it and what to do."""
    if node.op_type in OUT_OF_SCOPE and node.proto.domain in ("", "ai.onnx"):
        raise UnsupportedOpError(
            f"{node.where}: {node.op_type} is only supported on constants (shape computations), but an operand "
            f"depends on the model input: {OUT_OF_SCOPE[node.op_type]}"
        )


def _out_of_scope_unregistered(node: NodeView) -> bool:
    """An op of ``OUT_OF_SCOPE`` with no lowering at any version (not even folded on constants)."""
    in_domain = node.proto.domain in ("", "ai.onnx")
    return in_domain and node.op_type in OUT_OF_SCOPE and not any(op == node.op_type for op, _ in REGISTRY)


def _lowering_for(node: NodeView) -> Lowering:
    """The node's lowering, or the typed error saying why it has none (op, attribute name or value)."""
    try:
        lowering = find_lowering(node.op_type, node.proto.domain, node.opset, node.where)
    except UnsupportedOpError as error:
        if _out_of_scope_unregistered(node):
            raise UnsupportedOpError(
                f"{node.where}: {node.op_type} is not supported: {OUT_OF_SCOPE[node.op_type]}"
            ) from error
        raise
    unknown = sorted(set(node.attributes) - lowering.attributes) if lowering.attributes is not None else []
    if unknown:
        raise node.unsupported(
            unknown[0], node.attr(unknown[0]), f"{node.op_type} is lowered without it; remove or fold it first"
        )
    if lowering.check is not None:
        lowering.check(node)
    return lowering


def _check_lowerable(prepared: PreparedModel) -> None:
    """Every node has a lowering that takes its attributes, checked before lowering any: a model
    refused at its last node would otherwise be refused after minutes and gigabytes of work. All
    the nodes refused are listed; the error is UnsupportedOpError when an op is among them."""
    problems = []
    for index, proto_node in enumerate(prepared.graph.node):
        try:
            _lowering_for(NodeView(proto_node, prepared.opset, index))
        except ImplicitCompilerError as error:
            problems.append(error)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise _all_refused(problems)


def _all_refused(problems: list[ImplicitCompilerError]) -> ImplicitCompilerError:
    """One error listing every refused node, on one line (the CLI prints the first line only),
    the list of supported ops given once, at the end."""
    hint = "; supported ops: "
    lines = [f"({number}) {str(problem).split(hint)[0]}" for number, problem in enumerate(problems, 1)]
    if len(lines) > MAX_LISTED:
        lines = [*lines[:MAX_LISTED], f"... and {len(lines) - MAX_LISTED} more"]
    supported = next((str(p).split(hint)[1] for p in problems if hint in str(p)), None)
    ops = [problem for problem in problems if isinstance(problem, UnsupportedOpError)]
    kind = type(ops[0] if ops else problems[0])
    return kind(
        f"{len(problems)} nodes cannot be lowered (all nodes were checked before lowering any): "
        + " ".join(lines)
        + (f". Supported ops: {supported}" if supported else "")
    )


def _check_single_assignment(prepared: PreparedModel) -> None:
    """Each value is produced once (onnx.checker's single static assignment): a second node writing
    the same output, or an output named like an input or initializer, would be silently overwritten."""
    producers = {value.name: f"graph input {value.name!r}" for value in prepared.graph.input}
    producers.update({name: f"initializer {name!r}" for name in prepared.constants})
    for index, proto_node in enumerate(prepared.graph.node):
        node = NodeView(proto_node, prepared.opset, index)
        for name in proto_node.output:
            if name in producers:
                raise GraphError(
                    f"{node.where} writes {name!r}, which {producers[name]} already produces; ONNX values are "
                    "assigned once (onnx.checker refuses this model): rename one of the outputs"
                )
            if name:
                producers[name] = node.where


def _compile_dtype(dtype: Any) -> np.dtype:
    """float32 or float64 (native byte order); any other dtype is refused rather than ignored."""
    try:
        parsed = np.dtype(dtype)
    except (TypeError, ValueError) as error:
        raise ArgumentTypeError(f"dtype={dtype!r} is not a numpy dtype; use np.float64 or np.float32") from error
    if parsed.kind != "f" or parsed.itemsize not in (4, 8):
        raise ArgumentTypeError(
            f"dtype={dtype!r} ({parsed}) is not supported: an implicit model computes in np.float64 (the default) "
            "or np.float32"
        )
    return np.dtype(f"f{parsed.itemsize}")


def _check_structure(structure: Any) -> None:
    if not isinstance(structure, str) or structure not in ("auto", "kernels", "csr"):
        raise ArgumentTypeError(
            f"structure={structure!r} is not taken; use 'auto' (the default: convolutions and dense products kept "
            f"as kernels in models of {AUTO_KERNEL_NONZEROS:,} non-zeros or more), 'kernels' (always) or 'csr' "
            "(every matrix built as CSR)"
        )


def _structured(structure: str, prepared: PreparedModel) -> bool:
    """Whether to keep kernels: "kernels" yes, "csr" no, "auto" when the CSR form would hold at
    least ``AUTO_KERNEL_NONZEROS`` non-zeros."""
    if structure == "auto":
        return estimate_nonzeros(prepared) >= AUTO_KERNEL_NONZEROS
    return structure == "kernels"


def _memory_limit(memory_limit_bytes: Any) -> float:
    """The limit given (a positive number of bytes), else the memory this process may use."""
    if memory_limit_bytes is None:
        return available_memory_bytes()
    try:
        limit = float(memory_limit_bytes)
    except (TypeError, ValueError) as error:
        raise ArgumentTypeError(f"memory_limit_bytes={memory_limit_bytes!r} is not a number of bytes") from error
    if not limit > 0:
        raise ArgumentTypeError(f"memory_limit_bytes={memory_limit_bytes!r} must be a positive number of bytes")
    return limit


def _last_uses(graph: onnx.GraphProto) -> dict[str, int]:
    """For each value, the index of the last node that reads it (graph outputs: never dropped)."""
    last = {}
    for index, node in enumerate(graph.node):
        for name in node_reads(node):
            last[name] = index
    for output in graph.output:
        last[output.name] = len(graph.node)
    return last


def _output_batch_axis(value_info: onnx.ValueInfoProto, value: Value, prepared: PreparedModel) -> int | None:
    """The axis of an output that is the batch axis: the one named like an input's dynamic batch
    dimension, else a leading 1 when the inputs are batched, else None (one whole sample)."""
    shape = value.shape if isinstance(value, Affine) else np.shape(value)
    names = {i.batch_name for i in prepared.inputs if i.batch_name}
    for axis, dim in enumerate(value_info.type.tensor_type.shape.dim):
        if dim.dim_param and dim.dim_param in names and axis < len(shape) and shape[axis] == 1:
            return axis
    if prepared.inputs and all(i.batched for i in prepared.inputs) and len(shape) > 0 and shape[0] == 1:
        return 0
    return None


def _check_inputs_exist(node: NodeView, inputs: list[Value | None], unavailable: dict[str, str]) -> None:
    for name, value in zip(node.proto.input, inputs):
        if name and value is None:
            if name in unavailable:
                raise GraphError(
                    f"{node.where}: reads {name!r}, an output of {unavailable[name]} that cannot be lowered"
                )
            raise GraphError(f"{node.where}: reads {name!r}, which no node, input or initializer produces")


def _check_finite_constants(prepared: PreparedModel) -> None:
    """NaN/inf in an initializer or a Constant node: refuse, naming the nodes that read it."""
    constants = dict(prepared.constants)
    for index, node in enumerate(prepared.graph.node):
        if node.op_type == "Constant":
            view = NodeView(node, prepared.opset, index)
            for name, value in zip(node.output, evaluate_constant_node(view, [])):
                constants[name] = value
    for name, array in constants.items():
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            readers = [
                NodeView(node, prepared.opset, index).where
                for index, node in enumerate(prepared.graph.node)
                if name in node.input
            ]
            raise NonFiniteError(
                f"constant {name!r} holds {bad} NaN or inf value(s) out of {array.size} (read by "
                f"{', '.join(readers) or 'no node'}); the weights are broken: re-export the model from a "
                "finite checkpoint"
            )
