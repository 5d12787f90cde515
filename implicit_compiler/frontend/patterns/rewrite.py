"""The rewrite: each matched decomposition replaced by one private node (``fold_patterns``)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper, numpy_helper

from ..graph import PreparedModel
from ..registry import PATTERN_DOMAIN, PATTERN_LOWERINGS, REGISTRY
from .catalog import MATCHERS, STANDARD
from .functions import _function
from .graph_index import _Graph


@dataclass(frozen=True)
class Fold:
    """One folded pattern: its private op, the nodes it replaced (by name) and the new node."""

    op_type: str
    replaced: tuple[str, ...]
    node: onnx.NodeProto


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
