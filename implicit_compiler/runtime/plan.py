"""The order in which the runtime solves the state: blocks, their dependencies, their cycles.

Block i depends on block j when A[rows of i, columns of j] has a non-zero. Condensing the
strongly connected components of that graph (networkx) gives a DAG; walking it in topological
order, an acyclic component (one block, no self-loop) is computed once from blocks already
known (forward substitution), and a cyclic component is solved by fixed-point iteration on its
own states only.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from ..model import ImplicitModel


@dataclass(frozen=True)
class Component:
    """A strongly connected set of blocks, solved together.

    Attributes:
        blocks: indices into ``model.blocks``, in state order.
        cyclic: True when the blocks feed themselves through A (needs fixed-point iteration).
    """

    blocks: tuple[int, ...]
    cyclic: bool


def block_dependency_graph(model: ImplicitModel) -> nx.DiGraph:
    """A directed graph on block indices with an edge j -> i when block i reads block j: through
    A's stored entries, or through a structured term of A (``model.structure``; a term reads
    every block its source columns overlap), never materializing A."""
    graph = nx.DiGraph()
    graph.add_nodes_from((index, {"name": block.name}) for index, block in enumerate(model.blocks))
    # block_of[state] = index of the block holding it (a lookup beats sorting 37M column indices)
    block_of = np.repeat(np.arange(len(model.blocks)), [block.size for block in model.blocks])
    structure = model.structure.A
    A = structure.remainder
    for target, block in enumerate(model.blocks):
        columns = A.indices[A.indptr[block.start] : A.indptr[block.stop]]
        if columns.size == 0:
            continue
        sources = np.flatnonzero(np.bincount(block_of[columns], minlength=len(model.blocks)))
        graph.add_edges_from((int(source), target) for source in sources)
    for term in structure.terms:
        source = term.op.source
        if term.rows.stop > term.rows.start and source.stop > source.start:
            targets = np.unique(block_of[term.rows.start : term.rows.stop])
            readers = np.unique(block_of[source.start : source.stop])
            graph.add_edges_from((int(j), int(i)) for i in targets for j in readers)
    return graph


def execution_order(model: ImplicitModel) -> tuple[Component, ...]:
    """The strongly connected components of the block graph, in topological order."""
    graph = block_dependency_graph(model)
    condensed = nx.condensation(graph)
    order = nx.lexicographical_topological_sort(condensed, key=lambda node: min(condensed.nodes[node]["members"]))
    components = []
    for node in order:
        members = tuple(sorted(condensed.nodes[node]["members"]))
        cyclic = len(members) > 1 or graph.has_edge(members[0], members[0])
        components.append(Component(members, cyclic))
    return tuple(components)
