"""The sparse runtime: forward substitution over acyclic blocks, fixed points on cyclic ones."""

from .fixed_point import anderson, picard
from .plan import Component, block_dependency_graph, execution_order
from .solve import Solution, solve

__all__ = [
    "Component",
    "Solution",
    "anderson",
    "block_dependency_graph",
    "execution_order",
    "picard",
    "solve",
]
