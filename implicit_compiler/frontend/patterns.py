"""Folding the exporters' decompositions back into one activation or one normalization.

torch's legacy exporter (and, for SiLU, the dynamo exporter too) writes some layers as chains
of elementwise ops. Lowered as written, every product of two variables there costs two square
blocks (the square identity); recognised, the chain is one componentwise activation block, or
one normalization. ``fold_patterns`` rewrites the prepared (float64) graph before lowering:

====================== ============================================================ ===================
pattern                decomposition matched (x a variable; any operand order)        becomes
====================== ============================================================ ===================
GELU (erf)             x * (1 + Erf(x / sqrt 2)) * 0.5  (or Erf(x * (1 / sqrt 2)))    Gelu
GELU (tanh)            x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 x^3))) * 0.5          Gelu, tanh
                       (x^3 as x * (x * x) or Pow(x, 3))
SiLU / Swish           x * Sigmoid(x)                                                 silu block
Mish                   x * Tanh(Softplus(x))                                          Mish
HardSwish              x * HardSigmoid(x; alpha = 1/6, beta = 1/2)                    HardSwish
LayerNorm (opset < 17) d = x - ReduceMean(x); d / Sqrt(ReduceMean(d^2) + eps)         LayerNormalization
                       [* scale] [+ bias], both means over the same trailing axes
                       (d^2 as Pow(d, 2) or d * d)
====================== ============================================================ ===================

Products of several Muls are flattened (the exporters nest them in different orders), and the
constant factors multiplied together. A match is exact or nothing: each constant must round to
the same float32 as the one of the formula (exporters store float32: sqrt 2 is 1.4142135), the
intermediate values must be read by nothing outside the pattern (nor be graph outputs; a value
read elsewhere keeps its chain), and the result must have x's shape (shape inference; a constant
that broadcasts x to a larger shape is not folded). A chain with any other constant is left as
it is. The folded op uses the exact constants: that changes the model's function by less than
the float32 rounding of its constants (relative 6e-8 of those constants).

The folded nodes are written in the private domain ``PATTERN_DOMAIN``, whatever the model's
opset (Gelu is an op of opset 20, LayerNormalization of 17, Mish of 18: writing them in the
default domain of an opset-14 model would make an invalid model, and raising its opset would
change the meaning of its other ops). Each private op is lowered by the registry's lowering of
the standard op it names (``STANDARD``), given a node of that op; ``Silu`` (which ONNX has no
op for) is lowered here, to the ``silu`` activation. Each private op also gets a model-local
ONNX function with its definition, so that the rewritten graph stays a valid model: shape
inference (the batch-axis check and the size estimate) goes through it, and onnxruntime and
onnx.reference can run it. ``from_onnx`` folds a pattern only when the op it becomes has a
lowering (otherwise the chain is lowered as written).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import GraphError, UnsupportedOpError
from . import select_patterns
from .context import LoweringContext, NodeView
from .estimate import _shapes_model
from .fold import evaluate_constant_node
from .graph import PreparedModel
from .ops.common import as_affine
from .registry import PATTERN_DOMAIN, PATTERN_LOWERINGS, REGISTRY, Lowering, find_lowering

# private op -> (the standard op whose lowering lowers it, its since_version); Silu is ours.
STANDARD = {
    "Gelu": ("Gelu", 20),
    "GeluTanh": ("Gelu", 20),
    "HardSwish": ("HardSwish", 14),
    "Mish": ("Mish", 18),
    "LayerNormalization": ("LayerNormalization", 17),
}
# (pattern, what it becomes) for the op table
FOLDED = (
    ("GELU, erf form: x * (1 + Erf(x / sqrt 2)) * 0.5", "Gelu (approximate='none')"),
    ("GELU, tanh form: x * (1 + Tanh(sqrt(2/pi) (x + 0.044715 x^3))) * 0.5", "Gelu (approximate='tanh')"),
    ("SiLU / Swish: x * Sigmoid(x)", "one silu block"),
    ("Mish: x * Tanh(Softplus(x))", "Mish"),
    ("HardSwish: x * HardSigmoid(x; 1/6, 1/2)", "HardSwish"),
    ("LayerNorm: (x - mean) / Sqrt(mean((x - mean)^2) + eps) [* scale] [+ bias]", "LayerNormalization"),
) + select_patterns.FOLDED
SQRT_HALF_PI = math.sqrt(2 / math.pi)
INTS = onnx.AttributeProto.INTS
GELU_CUBIC = 0.044715


@dataclass(frozen=True)
class Fold:
    """One folded pattern: its private op, the nodes it replaced (by name) and the new node."""

    op_type: str
    replaced: tuple[str, ...]
    node: onnx.NodeProto


# ------------------------------------------------------------------------------ the rewrite
def fold_patterns(prepared: PreparedModel, only_lowerable: bool = True) -> list[Fold]:
    """Rewrite ``prepared`` in place, each matched decomposition replaced by one private node.

    ``only_lowerable``: fold only the patterns whose op has a lowering in the registry (what
    ``from_onnx`` asks; a test of the rewrite alone folds them all). Returns the folds made.
    """
    graph = _Graph(prepared)
    folds: list[tuple[onnx.NodeProto, set[int], onnx.NodeProto]] = []
    taken: set[int] = set()
    for node in reversed(prepared.graph.node):  # last nodes first: the largest match wins
        for matcher in MATCHERS:
            match = matcher(graph, node)
            if match is None:
                continue
            nodes, new_node, constants = match
            if nodes & taken or (only_lowerable and not pattern_lowerable(new_node.op_type)):
                continue
            if not graph.closed(nodes, node):
                continue
            taken |= nodes
            graph.new_constants.update(constants)
            folds.append((node, nodes, new_node))
            break
    if folds:
        _apply(prepared, graph, folds)
    return [
        Fold(new.op_type, tuple(graph.nodes[i].name or graph.nodes[i].op_type for i in sorted(nodes)), new)
        for _, nodes, new in folds
    ]


def pattern_lowerable(op_type: str) -> bool:
    """The registry has a lowering for the op a pattern becomes."""
    if op_type not in STANDARD:
        return op_type in PATTERN_LOWERINGS
    return STANDARD[op_type] in REGISTRY


def _apply(prepared: PreparedModel, graph: _Graph, folds: list) -> None:
    """Replace each root by its new node, drop the other matched nodes and the Constant nodes
    nothing reads any more, declare the private domain and its functions."""
    replacement = {id(root): new for root, _, new in folds}
    removed = {index for _, nodes, _ in folds for index in nodes}
    kept = []
    for index, node in enumerate(graph.nodes):
        if id(node) in replacement:
            kept.append(replacement[id(node)])
        elif index not in removed:
            kept.append(node)
    read = {name for node in kept for name in node.input} | {value.name for value in prepared.graph.output}
    kept = [node for node in kept if node.op_type != "Constant" or any(name in read for name in node.output)]
    del prepared.graph.node[:]
    prepared.graph.node.extend(kept)
    for name, array in graph.new_constants.items():
        prepared.constants[name] = array
        prepared.graph.initializer.append(numpy_helper.from_array(array, name))
    if not any(entry.domain == PATTERN_DOMAIN for entry in prepared.model.opset_import):
        prepared.model.opset_import.append(helper.make_opsetid(PATTERN_DOMAIN, 1))
    defined = {function.name for function in prepared.model.functions if function.domain == PATTERN_DOMAIN}
    for op_type in sorted({new.op_type for _, _, new in folds} - defined):
        prepared.model.functions.append(_function(op_type, prepared.opset))


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


# ------------------------------------------------------------------------------ matching
def _is(value: np.ndarray | None, exact: float) -> bool:
    """A one-element constant equal to ``exact`` (in float64: a fold must compute what the graph
    computes, to the last bit of its constants; a float32-rounded sqrt(2/pi) is not folded)."""
    return value is not None and value.size == 1 and float(value.ravel()[0]) == exact


def _near(value: np.ndarray | None, exact: float) -> bool:
    """A one-element constant that rounds to the same float32 as ``exact`` (GELU's sqrt 2, which
    the fold keeps as the graph has it: ``_match_gelu``)."""
    return value is not None and value.size == 1 and np.float32(value.ravel()[0]) == np.float32(exact)


def _factors(graph: _Graph, name: str, used: set[int], top: bool = False) -> list[str]:
    """The operands of a product of Muls (and of Pow(x, 3): x three times), flattened through
    the Muls whose output nothing else reads; the nodes gone through are added to ``used``."""
    node = graph.produced(name, "Mul")
    power = graph.produced(name, "Pow")
    if not top and len(graph.readers.get(name, ())) != 1:
        return [name]
    if node is not None and len(node.input) == 2:
        used.add(graph.index[id(node)])
        return _factors(graph, node.input[0], used) + _factors(graph, node.input[1], used)
    if power is not None and _exactly(graph.const(power.input[1]), 3.0):
        used.add(graph.index[id(power)])
        return [power.input[0]] * 3
    return [name]


def _product(graph: _Graph, names: list[str]) -> tuple[float | None, list[str]]:
    """(the product of the constant factors: 1.0 when there is none, None when one is not a
    scalar; the variable factors)."""
    constants = [graph.const(name) for name in names if graph.const(name) is not None]
    variables = [name for name in names if graph.const(name) is None]
    if any(value.size != 1 for value in constants):
        return None, variables
    return float(np.prod([value.ravel()[0] for value in constants])), variables


def _one_plus(graph: _Graph, name: str, op_type: str, used: set[int]) -> onnx.NodeProto | None:
    """The ``op_type`` node t in name = Add(1, t) (either order), or None."""
    add = graph.produced(name, "Add")
    if add is None:
        return None
    for one, other in (add.input, reversed(add.input)):
        inner = graph.produced(other, op_type)
        if _is(graph.const(one), 1.0) and inner is not None:
            used.update((graph.index[id(add)], graph.index[id(inner)]))
            return inner
    return None


def _two_variables(graph: _Graph, root: onnx.NodeProto, scale: float):
    """For a Mul root: (the nodes used, [(x, t), (t, x)]) when its flattened product is two
    variables times constants of product ``scale`` (1: none, or ones), else None."""
    if root.op_type != "Mul" or root.domain not in ("", "ai.onnx"):
        return None
    used: set[int] = set()
    product, variables = _product(graph, _factors(graph, root.output[0], used, top=True))
    if len(variables) != 2 or product is None or product != scale:
        return None
    return used, [(variables[0], variables[1]), (variables[1], variables[0])]


def _private_node(op_type: str, root: onnx.NodeProto, inputs: list[str], **attributes):
    name = root.name or root.output[0]
    return helper.make_node(
        op_type, inputs, list(root.output), name=f"{name}/folded_{op_type}", domain=PATTERN_DOMAIN, **attributes
    )


def _half_x_one_plus(graph: _Graph, root: onnx.NodeProto, op_type: str):
    """For a root 0.5 * x * (1 + op_type(...)) (GELU's two forms): each reading (x, the nodes
    matched so far, the op_type node), x being either of the root's two variables."""
    found = _two_variables(graph, root, 0.5)
    if found is None:
        return
    used, orders = found
    for x, t in orders:
        nodes = set(used)
        gate = _one_plus(graph, t, op_type, nodes)
        if gate is not None:
            yield x, nodes, gate


def _match_gelu(graph: _Graph, root: onnx.NodeProto):
    """x * (1 + Erf(x / sqrt 2)) * 0.5, or with Erf(x * (1 / sqrt 2))."""
    for x, nodes, erf in _half_x_one_plus(graph, root, "Erf"):
        div, mul = graph.produced(erf.input[0], "Div"), graph.produced(erf.input[0], "Mul")
        if div is not None and div.input[0] == x and _near(graph.const(div.input[1]), math.sqrt(2)):
            nodes.add(graph.index[id(div)])
            divisor = float(graph.const(div.input[1]).ravel()[0])
        elif mul is not None and x in mul.input and _near(graph.const(_other(mul, x)), math.sqrt(0.5)):
            nodes.add(graph.index[id(mul)])
            divisor = 1.0 / float(graph.const(_other(mul, x)).ravel()[0])
        else:
            continue
        if graph.same_shape(x, root.output[0]):
            name = graph.fresh(f"{root.name or root.output[0]}/gelu_divisor")
            return nodes, _private_node("Gelu", root, [x, name]), {name: np.array(divisor)}
    return None


def _match_gelu_tanh(graph: _Graph, root: onnx.NodeProto):
    """x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3))) * 0.5."""
    for x, nodes, tanh in _half_x_one_plus(graph, root, "Tanh"):
        if len(graph.readers.get(tanh.input[0], ())) != 1:
            continue
        outer, inner = _product(graph, _factors(graph, tanh.input[0], nodes, top=True))
        if outer is None or outer != SQRT_HALF_PI or len(inner) != 1:
            continue
        add = graph.produced(inner[0], "Add")
        if add is None or x not in add.input or len(graph.readers.get(inner[0], ())) != 1:
            continue
        nodes.add(graph.index[id(add)])
        cubic = _other(add, x)
        if len(graph.readers.get(cubic, ())) != 1:
            continue
        factor, powers = _product(graph, _factors(graph, cubic, nodes, top=True))
        if factor is None or factor != GELU_CUBIC or powers != [x, x, x]:
            continue
        if graph.same_shape(x, root.output[0]):
            return nodes, _private_node("GeluTanh", root, [x]), {}
    return None


def _unary_gate(private: str, chain: tuple[str, ...], check: Callable | None = None):
    """A matcher of x * G(x), G the chain of unary ops ``chain`` (outermost first)."""

    def match(graph: _Graph, root: onnx.NodeProto):
        found = _two_variables(graph, root, 1.0)
        if found is None:
            return None
        used, orders = found
        for x, t in orders:
            nodes, name = set(used), t
            for op_type in chain:
                node = graph.produced(name, op_type)
                if node is None or len(graph.readers.get(name, ())) != 1:
                    break
                if check is not None and not check(node):
                    break
                nodes.add(graph.index[id(node)])
                name = node.input[0]
            else:
                if name == x and graph.same_shape(x, root.output[0]):
                    return nodes, _private_node(private, root, [x]), {}
        return None

    return match


def _hard_sigmoid_of_hard_swish(node: onnx.NodeProto) -> bool:
    if node.op_type != "HardSigmoid":
        return True
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return _is(np.array(attributes.get("alpha", 0.2)), 1 / 6) and _is(np.array(attributes.get("beta", 0.5)), 0.5)


def _other(node: onnx.NodeProto, name: str) -> str:
    """The other operand of a two-operand node."""
    return node.input[1] if node.input[0] == name else node.input[0]


def _match_layer_norm(graph: _Graph, root: onnx.NodeProto):
    """d / Sqrt(ReduceMean(d^2) + eps) [* scale] [+ bias], d = x - ReduceMean(x), matched from
    its last node (the Add of the bias, else the Mul of the scale, else the Div)."""
    bias = scale = None
    top = root
    if root.op_type == "Add":
        bias_name = next((n for n in root.input if graph.const(n) is not None), None)
        if bias_name is None:
            return None
        bias, below = graph.const(bias_name), _other(root, bias_name)
        if len(graph.readers.get(below, ())) != 1:
            return None
        top = graph.producer.get(below)
    if top is not None and top.op_type == "Mul" and top.domain in ("", "ai.onnx"):
        scale_name = next((n for n in top.input if graph.const(n) is not None), None)
        if scale_name is None:
            return None
        scale, below = graph.const(scale_name), _other(top, scale_name)
        if len(graph.readers.get(below, ())) != 1:
            return None
        top = graph.producer.get(below)
    if top is None or top.op_type != "Div" or top.domain not in ("", "ai.onnx"):
        return None
    core = _layer_norm_core(graph, top)
    if core is None:
        return None
    nodes, x, axes, epsilon = core
    nodes |= _chain_between(graph, root, top)
    if not graph.same_shape(x, root.output[0]):
        return None
    normalized = graph.shapes[x][len(graph.shapes[x]) - len(axes) :]
    constants = {}
    for value, default, name in ((scale, 1.0, "scale"), (bias, 0.0, "bias")):
        value = np.full(normalized, default) if value is None else value
        try:
            if value.ndim > len(normalized):
                return None
            value = np.broadcast_to(value, normalized).astype(np.float64)
        except ValueError:
            return None
        constants[graph.fresh(f"{root.name or root.output[0]}/folded_{name}")] = np.ascontiguousarray(value)
    epsilon_tensor = numpy_helper.from_array(np.array(epsilon, dtype=np.float64), "epsilon")
    node = _private_node("LayerNormalization", root, [x, *constants], axes=axes, epsilon=epsilon_tensor)
    return nodes, node, constants


def _chain_between(graph: _Graph, root: onnx.NodeProto, div: onnx.NodeProto) -> set[int]:
    """The Add / Mul nodes from the root down to (and without) the Div."""
    nodes, node = set(), root
    while node is not div:
        nodes.add(graph.index[id(node)])
        variable = next(n for n in node.input if graph.const(n) is None)
        node = graph.producer[variable]
    return nodes


def _layer_norm_core(graph: _Graph, div: onnx.NodeProto):
    """(nodes, x, axes, epsilon) of d / Sqrt(ReduceMean(d^2) + eps), d = x - ReduceMean(x)."""
    d, root = div.input[0], graph.produced(div.input[1], "Sqrt")
    sub = graph.produced(d, "Sub")
    if root is None or sub is None or len(graph.readers.get(div.input[1], ())) != 1:
        return None
    add = graph.produced(root.input[0], "Add")
    if add is None or len(graph.readers.get(root.input[0], ())) != 1:
        return None
    eps_name = next((n for n in add.input if graph.const(n) is not None), None)
    if eps_name is None or graph.const(eps_name).size != 1 or not float(graph.const(eps_name).ravel()[0]) > 0:
        return None
    variance = graph.produced(_other(add, eps_name), "ReduceMean")
    if variance is None or len(graph.readers.get(variance.output[0], ())) != 1:
        return None
    square = graph.produced(variance.input[0], "Pow") or graph.produced(variance.input[0], "Mul")
    if square is None or len(graph.readers.get(square.output[0], ())) != 1:
        return None
    if square.op_type == "Pow" and not (square.input[0] == d and _exactly(graph.const(square.input[1]), 2.0)):
        return None
    if square.op_type == "Mul" and list(square.input) != [d, d]:
        return None
    x, mean = sub.input
    mean_node = graph.produced(mean, "ReduceMean")
    if mean_node is None or mean_node.input[0] != x or len(graph.readers.get(mean, ())) != 1:
        return None
    rank = len(graph.shapes.get(x, ())) if x in graph.shapes else None
    axes = _trailing_axes(graph, mean_node, rank)
    if axes is None or axes != _trailing_axes(graph, variance, rank):
        return None
    nodes = {graph.index[id(n)] for n in (div, root, add, variance, square, sub, mean_node)}
    return nodes, x, axes, float(graph.const(eps_name).ravel()[0])


def _exactly(value: np.ndarray | None, number: float) -> bool:
    return value is not None and value.size == 1 and float(value.ravel()[0]) == number


def _trailing_axes(graph: _Graph, node: onnx.NodeProto, rank: int | None) -> list[int] | None:
    """The axes a keepdims ReduceMean reduces, as [-k, ..., -1], when they are the k trailing
    axes of a rank-``rank`` input; else None."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if rank is None or attributes.get("keepdims", 1) != 1:
        return None
    axes = attributes.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = graph.const(node.input[1])
        axes = None if value is None else [int(a) for a in value.ravel()]
    if not axes:
        return None
    positive = sorted({a + rank if a < 0 else a for a in axes})
    if len(positive) != len(axes) or positive != list(range(rank - len(positive), rank)):
        return None
    return [a - rank for a in positive]


MATCHERS = (
    _match_layer_norm,
    _match_gelu,
    _match_gelu_tanh,
    _unary_gate("Silu", ("Sigmoid",)),
    _unary_gate("Mish", ("Tanh", "Softplus")),
    _unary_gate("HardSwish", ("HardSigmoid",), _hard_sigmoid_of_hard_swish),
    *select_patterns.MATCHERS,  # Elu, Selu, ThresholdedRelu from their ONNX function bodies
)


# ------------------------------------------------------------------------------ functions
def _function(op_type: str, opset: int) -> onnx.FunctionProto:
    """The model-local function defining a private op, in float64 (the prepared model's type),
    in ops of the model's own opset."""
    if op_type in select_patterns.FUNCTIONS:
        return select_patterns.FUNCTIONS[op_type](opset)

    def constant(name: str, value: float) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value), name))

    inputs, attributes = ["X"], []
    if op_type == "Silu":
        body = [helper.make_node("Sigmoid", ["X"], ["s"]), helper.make_node("Mul", ["X", "s"], ["Y"])]
    elif op_type == "Mish":
        body = [
            helper.make_node("Softplus", ["X"], ["p"]),
            helper.make_node("Tanh", ["p"], ["t"]),
            helper.make_node("Mul", ["X", "t"], ["Y"]),
        ]
    elif op_type == "HardSwish":
        body = [
            helper.make_node("HardSigmoid", ["X"], ["h"], alpha=1 / 6, beta=0.5),
            helper.make_node("Mul", ["X", "h"], ["Y"]),
        ]
    elif op_type == "Gelu":  # x (1 + erf(x / c)) / 2, c the graph's (float32-rounded) sqrt 2
        inputs = ["X", "C"]
        body = [
            constant("one", 1.0),
            constant("half", 0.5),
            helper.make_node("Div", ["X", "C"], ["z"]),
            helper.make_node("Erf", ["z"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["a"]),
            helper.make_node("Mul", ["X", "half"], ["h"]),
            helper.make_node("Mul", ["h", "a"], ["Y"]),
        ]
    elif op_type == "GeluTanh":  # x (1 + tanh(c (x + 0.044715 x^3))) / 2
        body = [
            constant("c", SQRT_HALF_PI),
            constant("k", GELU_CUBIC),
            constant("one", 1.0),
            constant("half", 0.5),
            helper.make_node("Mul", ["X", "X"], ["x2"]),
            helper.make_node("Mul", ["x2", "X"], ["x3"]),
            helper.make_node("Mul", ["x3", "k"], ["kx3"]),
            helper.make_node("Add", ["X", "kx3"], ["inner"]),
            helper.make_node("Mul", ["inner", "c"], ["z"]),
            helper.make_node("Tanh", ["z"], ["t"]),
            helper.make_node("Add", ["t", "one"], ["a"]),
            helper.make_node("Mul", ["X", "half"], ["h"]),
            helper.make_node("Mul", ["h", "a"], ["Y"]),
        ]
    elif op_type == "LayerNormalization":  # (x - mean) / sqrt(var + eps) * scale + bias
        inputs, attributes = ["X", "Scale", "B"], ["axes", "epsilon"]
        eps = _referring(helper.make_node("Constant", [], ["eps"]), "value", "epsilon", onnx.AttributeProto.TENSOR)
        body = [eps, *_reduce_mean("X", "mean", opset), helper.make_node("Sub", ["X", "mean"], ["d"])]
        body += [helper.make_node("Mul", ["d", "d"], ["d2"]), *_reduce_mean("d2", "var", opset)]
        body += [
            helper.make_node("Add", ["var", "eps"], ["ve"]),
            helper.make_node("Sqrt", ["ve"], ["sd"]),
            helper.make_node("Div", ["d", "sd"], ["n"]),
            helper.make_node("Mul", ["n", "Scale"], ["ns"]),
            helper.make_node("Add", ["ns", "B"], ["Y"]),
        ]
    else:
        raise GraphError(f"no function for the private op {op_type!r}")
    return helper.make_function(
        PATTERN_DOMAIN, op_type, inputs, ["Y"], body, [helper.make_opsetid("", opset)], attributes
    )


def _reduce_mean(source: str, target: str, opset: int) -> list[onnx.NodeProto]:
    """ReduceMean over the node's ``axes`` attribute, keepdims: an attribute below opset 18, an input from."""
    if opset < 18:
        return [_referring(helper.make_node("ReduceMean", [source], [target]), "axes", "axes", INTS)]
    axes = _referring(helper.make_node("Constant", [], [f"{target}_axes"]), "value_ints", "axes", INTS)
    return [axes, helper.make_node("ReduceMean", [source, f"{target}_axes"], [target])]


def _referring(node: onnx.NodeProto, name: str, function_attribute: str, kind: int) -> onnx.NodeProto:
    """``node`` with its attribute ``name`` taken from the function's ``function_attribute``."""
    node.attribute.append(onnx.AttributeProto(name=name, ref_attr_name=function_attribute, type=kind))
    return node


# ------------------------------------------------------------------------------ lowering
def standard_node(node: onnx.NodeProto) -> onnx.NodeProto:
    """The default-domain node of the standard op a private node stands for (STANDARD)."""
    op_type, _ = STANDARD[node.op_type]
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "LayerNormalization":
        epsilon = float(numpy_helper.to_array(attributes["epsilon"]))
        extra = {"axis": int(attributes["axes"][0]), "epsilon": epsilon}
    elif node.op_type in ("Gelu", "GeluTanh"):
        extra = {"approximate": "tanh" if node.op_type == "GeluTanh" else "none"}
    else:
        extra = {}
    inputs = list(node.input)[:1] if node.op_type == "Gelu" else list(node.input)  # (Gelu's divisor: _delegate)
    return helper.make_node(op_type, inputs, list(node.output), name=node.name, **extra)


def _delegate(private: str) -> Lowering:
    """The private op's lowering: the registry's lowering of its standard op, on the standard node."""
    op_type, version = STANDARD[private]

    def view(node: NodeView) -> NodeView:
        return NodeView(standard_node(node.proto), version, node.index)

    def standard(node: NodeView) -> Lowering:
        try:
            return find_lowering(op_type, "", version, node.where)
        except UnsupportedOpError as error:
            raise UnsupportedOpError(
                f"{node.where}: folded from its exporter's decomposition into {op_type} (opset {version}), "
                f"which has no lowering here ({error})"
            ) from error

    def check(node: NodeView) -> None:
        lowering, standard_view = standard(node), view(node)
        unknown = set(standard_view.attributes) - (lowering.attributes or set(standard_view.attributes))
        if unknown:
            raise standard_view.unsupported(sorted(unknown)[0], None, f"{op_type} is lowered without it")
        if lowering.check is not None:
            lowering.check(standard_view)

    def lower(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
        if private != "Gelu":
            return standard(node).function(ctx, view(node), inputs)
        # x (1 + erf(x / c)) / 2 = a gelu(x / a) exactly, a = c / sqrt 2: the graph's own c (its
        # float32 sqrt 2 would leave the exact gelu 5e-8 away from what the graph computes)
        x = as_affine(inputs[0], ctx.width)
        a = float(np.asarray(inputs[1]).ravel()[0]) / math.sqrt(2)
        (y,) = standard(node).function(ctx, view(node), [x.scale(np.full(x.shape, 1 / a))])
        return [as_affine(y, ctx.width).scale(np.full(x.shape, a))]

    lower.__doc__ = f"{private}: the lowering of {op_type}-{version}."
    attributes = {"LayerNormalization": ("axes", "epsilon")}.get(private, ())
    return Lowering(private, 1, lower, frozenset(attributes), __name__, check)


def lower_silu(ctx: LoweringContext, node: NodeView, inputs: list) -> list:
    """x * sigmoid(x) folded: one silu block."""
    return [ctx.create_block(as_affine(inputs[0], ctx.width), "silu")]


PATTERN_LOWERINGS["Silu"] = Lowering("Silu", 1, lower_silu, frozenset(), __name__)
for _private in STANDARD:
    PATTERN_LOWERINGS[_private] = _delegate(_private)


def folded_patterns_table() -> str:
    """A markdown table of the decompositions folded before lowering and what each becomes."""
    lines = ["| folded pattern | becomes |", "| --- | --- |"]
    lines += [f"| {pattern} | {becomes} |" for pattern, becomes in FOLDED]
    return "\n".join(lines)
