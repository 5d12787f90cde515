"""The block dependency graph and the execution order of the runtime."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from implicit_compiler import ImplicitModel, StateBlock, TensorSpec
from implicit_compiler.runtime import Component, block_dependency_graph, execution_order


def _chain_model(edges: list[tuple[int, int]], count: int = 4) -> ImplicitModel:
    """One-state blocks b0..b{count-1}; an edge (j, i) puts A[i, j] = 0.5."""
    A = sp.lil_array((count, count))
    for source, target in edges:
        A[target, source] = 0.5
    blocks = tuple(StateBlock(f"b{i}", i, i + 1, "tanh", (1,)) for i in range(count))
    return ImplicitModel(
        A, np.ones((count, 1)), np.ones((1, count)), np.zeros((1, 1)), None, None, blocks,
        (TensorSpec("u", (1,)),), (TensorSpec("y", (1,)),),
    )  # fmt: skip


def test_feedforward_chain_is_acyclic_and_in_order():
    model = _chain_model([(0, 1), (1, 2), (2, 3)])
    assert sorted(block_dependency_graph(model).edges) == [(0, 1), (1, 2), (2, 3)]
    assert execution_order(model) == tuple(Component((i,), False) for i in range(4))


def test_states_listed_last_layer_first_still_run_in_dependency_order():
    model = _chain_model([(3, 2), (2, 1), (1, 0)])
    assert [c.blocks for c in execution_order(model)] == [(3,), (2,), (1,), (0,)]


def test_loop_is_one_cyclic_component_between_acyclic_ones():
    model = _chain_model([(0, 1), (1, 2), (2, 1), (2, 3)])
    assert execution_order(model) == (
        Component((0,), False),
        Component((1, 2), True),
        Component((3,), False),
    )


def test_self_loop_is_cyclic():
    model = _chain_model([(0, 1), (1, 1)])
    order = execution_order(model)
    assert Component((1,), True) in order and Component((0,), False) in order
