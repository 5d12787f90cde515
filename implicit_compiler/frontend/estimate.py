"""Estimating the size of a lowered model before building it.

The estimate follows each value's affine expression through the graph, as the lowering builds
it (``_follow_expressions``): the non-zeros a linear layer makes reading a selection of states
are its multiply-accumulates, per sample (batch 1):

    Conv           prod(output shape) * C_in / groups * prod(kernel)
    ConvTranspose  prod(input shape) * C_out / groups * prod(kernel)
    Gemm / MatMul  rows of the output * the contracted dimension (with two variable operands,
                   4 per product a_ik b_kj in two square blocks, 2 in the rows reading the sum)
    Resize         prod(output shape) * taps ** (axes resized), taps 1 / 2 / 4 (nearest / linear / cubic)

and an activation stores its input's expression as state rows (once per activation reading
it), max pools store relu trees, recurrent layers their weights per step. Measured against
real lowerings (onnx's light SqueezeNet, DenseNet-121's first block, ResNet-50's and
Inception-v2's first stages, the CNNs of the test corpus) it is within 1.4x, within 2x on
single-op models; a recurrent layer whose input shape inference cannot see is missed.

Shapes come from ONNX shape inference on the prepared graph (with data propagation, so exporter
shape subgraphs resolve, and every initializer listed as an input, so that weights made by
nodes from their shapes, as in onnx's "light" models, resolve at any IR version). The estimate
is checked against the memory limit (the least of MemAvailable, the process's rlimits and its
cgroup's limit) before any matrix is allocated; the lowering also checks its running count as
it goes.

Structured (``from_onnx(structure="auto")``, ``structured=True`` here): a Conv or ConvTranspose
(any groups, 1-D or 2-D, N = 1) or a Gemm / MatMul with one row that
the lowering keeps as kernels adds its weights, not its multiply-accumulates; reading a value
that is not a selection of states, it first stores that value as an identity block (its
expression and one entry per row). An op that does not read terms gets any operand carrying
them as an identity block the same way (the choke point in ``lower._lower_node``). Every state
adds 1 (its bias, its size, its row pointer), the one cost that grows with the resolution where
the kernels do not."""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx

from ..errors import ModelTooLargeError
from ..runtime.structured import MIN_STRUCTURED_NONZEROS
from .context import BYTES_PER_NONZERO_WHILE_LOWERING, FOLD_GROWTH_LIMIT
from .graph import FLOAT_TYPES, PreparedModel
from .registry import STRUCTURED_OPS

FINAL_BYTES_PER_NONZERO = 12  # float64 value + int32 column index
# Bytes a kernel weight costs while lowering (structured): the float32 initializer, its float64
# copy, the kernel as lowered and as folded (BatchNormalization) in float64, the one stored.
BYTES_PER_KERNEL_WEIGHT = 32
# How the lowering treats expressions, op by op (see ``_follow_expressions``): activations that
# store their input as state blocks (how many), linear maps, maxima (relu trees), products.
BLOCKS = {"Relu": 1, "Sigmoid": 1, "Tanh": 1, "LeakyRelu": 1, "PRelu": 2, "Clip": 2, "Abs": 2, "Pow": 1}
BLOCKS.update(
    dict.fromkeys(("Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Gelu", "Elu", "Selu", "Celu", "Softplus", "Softsign"), 1)
)
BLOCKS.update(dict.fromkeys(("HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu", "Swish"), 1))
BLOCKS.update(dict.fromkeys(("Silu", "GeluTanh"), 1))  # the folded patterns (``patterns``) without an ONNX op
BLOCKS.update(dict.fromkeys(("Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or"), 1))  # ops.select
BLOCKS.update({"Equal": 3, "LRN": 4})  # Equal: two comparisons and an And; LRN: square, power, the product's two
LINEAR_MAPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Resize", "Upsample"})
# Resize / Upsample: input elements per output element along each resized axis, by mode.
RESIZE_TAPS = {"nearest": 1, "linear": 2, "cubic": 4}
# Floating initializers given to shape inference with their values (Resize's scales, roi).
SMALL_FLOATS = 16
MAXIMA = frozenset({"MaxPool", "GlobalMaxPool", "ReduceMax"})
# Softmax and LogSoftmax: the exp blocks reading the logits (``ops.softmax``).
SOFTMAXES = {"Softmax": 2, "LogSoftmax": 1}
PRODUCTS = frozenset({"Mul", "Div"})
# Layer, instance and group normalization (``ops.standardize``): the input's rows in the mean,
# the centred rows read by three blocks (or kept once, as states read three times), and per
# entry about 5 more (the exp rows, the variance's log); out: 2 per entry.
STANDARDIZATIONS = frozenset({"LayerNormalization", "InstanceNormalization", "GroupNormalization"})
# Recurrent layers: per step the input and recurrent weights' non-zeros, times about this
# (the gates' products in LSTM and GRU): measured on tests/recurrent-models.
RECURRENT = {"RNN": 1, "GRU": 2, "LSTM": 2}


def estimate_nonzeros(prepared: PreparedModel, structured: bool = False) -> int:
    """About the non-zeros of the lowered model (an upper bound for the linear layers' share);
    ``structured``: of its structured form (kernels, remainders and states: module docstring)."""
    return int(sum(_estimate(prepared, structured)))


def estimate_lowering_bytes(prepared: PreparedModel, structured: bool = False) -> float:
    """About the peak bytes of the lowering: ``BYTES_PER_NONZERO_WHILE_LOWERING`` per non-zero,
    ``BYTES_PER_KERNEL_WEIGHT`` per kernel weight (structured)."""
    rows, kernels = _estimate(prepared, structured)
    return rows * BYTES_PER_NONZERO_WHILE_LOWERING + kernels * BYTES_PER_KERNEL_WEIGHT


def _estimate(prepared: PreparedModel, structured: bool) -> tuple[float, float]:
    """(non-zeros of CSR rows and states, kernel weights) of the lowered model: 0 and 0 when
    shape inference fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_shapes_model(prepared), data_prop=True)
    except Exception:  # inference is best effort; the running check in the lowering still holds
        return 0.0, 0.0
    shapes = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in tensor_type.shape.dim):
            shapes[value.name] = [d.dim_value for d in tensor_type.shape.dim]
    if structured:
        total, kernels = _follow_structured(prepared, inferred.graph, shapes)
        return total - kernels, kernels
    return _follow_expressions(prepared, inferred.graph, shapes), 0.0


def _follow_structured(
    prepared: PreparedModel, graph: onnx.GraphProto, shapes: dict[str, list[int]]
) -> tuple[float, float]:
    """``_follow_expressions`` for the structured lowering: a value's count is its CSR rows'
    non-zeros plus its terms' weights, and ``with_terms`` holds the values that carry terms.
    Returns (the count, the kernels' share: each kernel's weights once)."""
    nonzeros = {graph_input.name: float(math.prod(graph_input.shape)) for graph_input in prepared.inputs}
    with_terms: set[str] = set()
    total = kernels = 0.0
    for node in graph.node:
        read = [name for name in node.input if name in nonzeros]
        if not read:
            continue  # constant: folded
        weights = _term_weights(node, shapes, nonzeros)
        if node.op_type not in STRUCTURED_OPS or weights:  # operands with terms, or not selections, kept
            for name in read[:1] if weights else read:
                if name in with_terms or (weights and not _is_selection(name, nonzeros, shapes)):
                    total += nonzeros[name] + _size(name, shapes, nonzeros[name])
                    nonzeros[name] = _size(name, shapes, nonzeros[name])
                    with_terms.discard(name)
        kernels += weights
        if weights:
            stored, made = 0.0, lambda name, weights=weights: weights
        else:
            stored, made = _node_expressions(node, read, nonzeros, shapes, prepared.opset)
        if node.op_type in BLOCKS:  # the states themselves
            stored += BLOCKS[node.op_type] * _size(node.output[0], shapes, 0.0)
        total += stored
        carries = weights or (node.op_type not in BLOCKS and any(name in with_terms for name in read))
        for name in node.output:
            if name:
                nonzeros[name] = made(name)
                if carries:
                    with_terms.add(name)
    total += sum(nonzeros.get(value.name, 0.0) for value in graph.output)
    return total, min(kernels, total)


def _size(name: str, shapes: dict[str, list[int]], default: float) -> float:
    return float(math.prod(shapes[name])) if name in shapes else default


def _is_selection(name: str, nonzeros: dict[str, float], shapes: dict[str, list[int]]) -> bool:
    return nonzeros[name] <= _size(name, shapes, nonzeros[name])


def _term_weights(node: onnx.NodeProto, shapes: dict[str, list[int]], variables: dict[str, float]) -> float:
    """The weights of the terms a node becomes in the structured lowering, 0 when it builds CSR
    rows (``ops.conv`` and ``ops.linear``'s conditions, read off the shapes)."""
    inputs = [shapes.get(name) for name in node.input]
    if len(inputs) < 2 or node.input[0] not in variables or node.input[1] in variables:
        return 0.0
    if node.op_type in ("Conv", "ConvTranspose") and len(inputs) > 1 and inputs[0] and inputs[1]:
        single = len(inputs[0]) in (3, 4) and inputs[0][0] == 1
        if single and _node_nonzeros(node, shapes) >= MIN_STRUCTURED_NONZEROS:
            return float(math.prod(inputs[1]))
    if node.op_type in ("Gemm", "MatMul") and len(inputs) > 1 and inputs[0] and inputs[1]:
        one_row = math.prod(inputs[0][:-1]) == 1 and not _attribute(node, "transA") and len(inputs[1]) == 2
        if one_row and math.prod(inputs[1]) >= MIN_STRUCTURED_NONZEROS:
            return float(math.prod(inputs[1]))
    return 0.0


def _follow_expressions(prepared: PreparedModel, graph: onnx.GraphProto, shapes: dict[str, list[int]]) -> float:
    """The non-zeros the lowering stores, following each value's expression through the graph.

    A value that depends on the inputs is an affine expression with some non-zeros (a selection
    of states has one per element). Linear layers, concatenations and elementwise maps make a
    new expression (a layer's non-zeros are its multiply-accumulates when it reads a selection);
    an activation stores its input's expression as the rows of a state block and gives a
    selection. An expression read by several activations is stored once by each: DenseNet's
    concatenated convolutions are stored again by every later layer of their block, several
    times their multiply-accumulates. The graph outputs' expressions are the rows of C and D.
    """
    nonzeros = {graph_input.name: float(math.prod(graph_input.shape)) for graph_input in prepared.inputs}
    total = 0.0
    for node in graph.node:
        read = [name for name in node.input if name in nonzeros]
        if not read:
            continue  # constant: folded
        stored, made = _node_expressions(node, read, nonzeros, shapes, prepared.opset)
        total += stored
        for name in node.output:
            if name:
                nonzeros[name] = made(name)
    return total + sum(nonzeros.get(value.name, 0.0) for value in graph.output)


def _node_expressions(
    node: onnx.NodeProto, read: list[str], nonzeros: dict[str, float], shapes: dict[str, list[int]], opset: int = 13
) -> tuple[float, Callable[[str], float]]:
    """(non-zeros the node stores in state blocks, its outputs' non-zeros by name)."""

    def size(name: str) -> float | None:
        return float(math.prod(shapes[name])) if name in shapes else None

    first = nonzeros[read[0]]
    density = first / max(size(read[0]) or first, 1.0)
    op = node.op_type
    if op in BLOCKS:  # the input's expression as state rows; out: a selection (two with two blocks)
        return BLOCKS[op] * first, lambda name: BLOCKS[op] * (size(name) or first)
    if op in ("Gemm", "MatMul") and set(node.input[:2]) <= set(read) and _node_nonzeros(node, shapes):
        products = float(_node_nonzeros(node, shapes))  # two variables: a_ik b_kj as two square rows
        return 4 * products + sum(nonzeros[name] for name in node.input[:2]), lambda name: 2 * products
    if op in LINEAR_MAPS and _node_nonzeros(node, shapes):
        mapped = float(_node_nonzeros(node, shapes))
        if density <= 1:
            return 0.0, lambda name: mapped
        if mapped * density > FOLD_GROWTH_LIMIT * (mapped + first):  # the operand is kept as a block
            return first, lambda name: mapped
        return 0.0, lambda name: mapped * density
    if op in RECURRENT and all(name in shapes for name in node.input[:3]) and len(shapes[node.input[0]]) == 3:
        x, w, r = (shapes[name] for name in node.input[:3])
        steps = x[1] if _attribute(node, "layout") else x[0]
        stored = RECURRENT[op] * steps * (math.prod(w) * density + math.prod(r))
        return stored, lambda name: size(name) or first
    if op in MAXIMA and size(node.output[0]) and size(read[0]):
        window = _kernel(node) if op == "MaxPool" else max(size(read[0]) / size(node.output[0]), 1.0)
        levels = math.ceil(math.log2(window)) if window > 1 else 0
        uses = size(node.output[0]) * window  # the window elements the tree reads
        kept = first if 2 * uses * density > FOLD_GROWTH_LIMIT * (first + 2 * uses) else 0.0  # see tree_max
        density = 1.0 if kept else density
        # level k: a relu row per pair of values, each value the input's plus k - 1 relus; out: b + relus
        pairs = [uses / 2**k for k in range(1, levels + 1)]
        stored = sum(count * 2 * (density + k) for k, count in enumerate(pairs))
        return kept + stored, lambda name: (size(name) or first) * (density + levels)
    if op in SOFTMAXES and size(read[0]) and node.input[0] in shapes:
        return _softmax(node, shapes[node.input[0]], first, density, opset)
    if op in PRODUCTS and len(read) > 1:  # two variable operands: (a + b)^2 and (a - b)^2 blocks
        both = sum(nonzeros[name] for name in read)
        divisor = nonzeros[read[-1]] if op == "Div" else 0.0  # stored once more, as reciprocal(b)
        return 2 * both + divisor, lambda name: 2 * (size(name) or both)
    if op in STANDARDIZATIONS:
        entries = size(read[0]) or first
        centred = min(3 * (first + entries), first + 4 * entries)
        return first + centred + 5 * entries, lambda name: 2 * (size(name) or entries)
    if op in ("Max", "Min") and len(read) > 1:  # b + relu(a - b)
        both = sum(nonzeros[name] for name in read)
        return both, lambda name: nonzeros[read[-1]] + (size(name) or 0.0)
    if op == "Concat":
        joined = sum(nonzeros[name] for name in read)
        return 0.0, lambda name: joined
    densities = sum(nonzeros[name] / max(size(name) or nonzeros[name], 1.0) for name in read)
    return 0.0, lambda name: densities * size(name) if size(name) is not None else first


def _softmax(
    node: onnx.NodeProto, shape: list[int], first: float, density: float, opset: int
) -> tuple[float, Callable[[str], float]]:
    """The relu tree of each row's maximum, the maximum kept, exp(z - m), the log of the row sums,
    and for Softmax exp(z - m - L); logits read by several blocks are kept as one (see ``ops.softmax``)."""
    blocks, size = SOFTMAXES[node.op_type], float(math.prod(shape))
    named = any(attribute.name == "axis" for attribute in node.attribute)
    axis = (_attribute(node, "axis") if named else -1 if opset >= 13 else 1) % max(len(shape), 1)
    width = float(shape[axis] if opset >= 13 else math.prod(shape[axis:]))
    if width <= 1:
        return 0.0, lambda name: 0.0
    kept = first if (2 + blocks) * first > FOLD_GROWTH_LIMIT * (first + (2 + blocks) * size) else 0.0
    density = 1.0 if kept else density
    levels = math.ceil(math.log2(width))
    tree = sum(size / 2**k * 2 * (density + k - 1) for k in range(1, levels + 1))  # level k's relu rows
    maximum = size / width * (density + levels)
    stored = kept + tree + maximum + size * (density + 1) + size + (blocks - 1) * size * (density + 2)
    return stored, lambda name: size if blocks == 2 else size * (density + 2)


def _kernel(node: onnx.NodeProto) -> float:
    for attribute in node.attribute:
        if attribute.name == "kernel_shape":
            return float(math.prod(attribute.ints))
    return 1.0


def _shapes_model(prepared: PreparedModel) -> onnx.ModelProto:
    """The prepared model as shape inference should see it: every initializer also a graph input.

    Below IR version 4 shape inference ignores initializers that are not graph inputs, and
    ``prepare`` removed them from the inputs: every weight's shape, and all that follows, went
    unknown (onnx's light DenseNet-121, IR 3, was estimated at 4% of its size). Floating weights
    are given by their shape alone (inference reads only their dims, and copying them is costly);
    integer initializers keep their values, which data propagation reads (shapes, axes), and so
    do floating ones of at most ``SMALL_FLOATS`` values (Resize's scales set its output shape).
    """
    graph = prepared.graph
    listed = {value.name for value in graph.input}
    inputs = list(graph.input)
    initializers = []
    for tensor in graph.initializer:
        if tensor.name not in listed:
            inputs.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        if tensor.data_type not in FLOAT_TYPES or math.prod(tensor.dims) <= SMALL_FLOATS:
            initializers.append(tensor)
    shapes_graph = onnx.helper.make_graph(
        graph.node, graph.name, inputs, graph.output, initializers, value_info=graph.value_info
    )
    model = onnx.helper.make_model(
        shapes_graph, opset_imports=prepared.model.opset_import, functions=prepared.model.functions
    )
    model.ir_version = prepared.model.ir_version
    return model


def _node_nonzeros(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    inputs = [shapes.get(name) for name in node.input]
    output = shapes.get(node.output[0]) if node.output else None
    if node.op_type == "Conv" and output and len(inputs) > 1 and inputs[1]:
        weight = inputs[1]  # (C_out, C_in / groups, k...)
        return math.prod(output) * math.prod(weight[1:])
    if node.op_type == "ConvTranspose" and inputs and inputs[0] and len(inputs) > 1 and inputs[1]:
        weight = inputs[1]  # (C_in, C_out / groups, k...)
        return math.prod(inputs[0]) * math.prod(weight[1:])
    if node.op_type in ("Gemm", "MatMul") and output and inputs and inputs[0]:
        contracted = inputs[0][-1] if node.op_type == "MatMul" or not _attribute(node, "transA") else inputs[0][0]
        return math.prod(output) * contracted
    if node.op_type in ("Resize", "Upsample") and output and inputs and inputs[0]:
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
        resized = sum(before != after for before, after in zip(inputs[0], output))
        return math.prod(output) * RESIZE_TAPS.get(mode, 4) ** resized
    return 0


def _attribute(node: onnx.NodeProto, name: str) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return attribute.i
    return 0


def check_model_fits(prepared: PreparedModel, limit_bytes: float, structured: bool = False) -> int:
    """Raise ModelTooLargeError, with the estimate, when the lowering cannot fit; else return it."""
    rows, kernels = _estimate(prepared, structured)
    nonzeros = int(rows + kernels)
    needed = rows * BYTES_PER_NONZERO_WHILE_LOWERING + kernels * BYTES_PER_KERNEL_WEIGHT
    if needed > limit_bytes:
        if structured:
            stored = f"{kernels / 1e9:,.2f}G of them kernel weights"
        else:
            stored = f"~{nonzeros * FINAL_BYTES_PER_NONZERO / 1e9:,.1f} GB as float64 CSR"
        raise ModelTooLargeError(
            f"the lowered model would have about {nonzeros / 1e9:,.2f}G non-zeros "
            f"({stored}, ~{needed / 1e9:,.1f} GB while "
            f"lowering), more than the {limit_bytes / 1e9:,.1f} GB available. Lower a smaller input resolution "
            "or a smaller network, or use a machine with more memory (memory_limit_bytes raises the limit)"
        )
    return nonzeros
