"""Bounds through maxima (issue 18): the relu trees of MaxPool / ReduceMax recognized as maxima
(``analysis.max_tree``), checked against sampling, box corners and the exact range of a
maximum of independent inputs, never against our own output."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import scipy.sparse as sp
from onnx import TensorProto, helper, numpy_helper

import implicit_compiler as ic
from implicit_compiler import ImplicitModel, StateBlock, TensorSpec
from implicit_compiler.analysis import output_bounds
from implicit_compiler.analysis.crown import _sparse_spread
from implicit_compiler.analysis.interval import Structure
from implicit_compiler.analysis.max_tree import contenders


@pytest.fixture
def rng():
    return np.random.default_rng(1818)


def conv_pool_net(rng, pool: dict, order: str = "relu-pool", size: int = 7) -> onnx.ModelProto:
    """u (1, 1, size, size) -> Conv 3x3 (3 channels) -> Relu / MaxPool(**pool) -> Flatten -> Gemm (4)."""
    weight = rng.normal(size=(3, 1, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[3, 3])]
    if order == "relu-pool":
        nodes += [helper.make_node("Relu", ["c"], ["r"]), helper.make_node("MaxPool", ["r"], ["p"], **pool)]
    else:
        nodes += [helper.make_node("MaxPool", ["c"], ["m"], **pool), helper.make_node("Relu", ["m"], ["p"])]
    nodes += [helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "L"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "W")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    flat = onnx.shape_inference.infer_shapes(model)
    shape = next(v for v in flat.graph.value_info if v.name == "f").type.tensor_type.shape
    features = shape.dim[1].dim_value
    model.graph.initializer.append(numpy_helper.from_array(rng.normal(size=(4, features)).astype(np.float32), "L"))
    return model


POOLS = [
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [2, 2]},  # 9 elements: lone elements pass up the tree
    {"kernel_shape": [2, 2], "strides": [1, 1]},  # overlapping windows share their pairs
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
]


def samples_and_corners(rng, center, eps, count=3000):
    """Uniform samples in the box around each center and random corners, (batch, count + 200, p)."""
    uniform = center[:, None, :] + rng.uniform(-eps, eps, size=(center.shape[0], count, center.shape[1]))
    corners = center[:, None, :] + eps * np.sign(rng.normal(size=(center.shape[0], 200, center.shape[1])))
    return np.concatenate([uniform, corners], axis=1)


@pytest.mark.parametrize("pool", POOLS)
def test_max_pools_are_recognized_as_maxima(pool, rng):
    model = ic.from_onnx(conv_pool_net(rng, pool), dtype=np.float64)
    trees = Structure.of(model).max_trees
    levels = int(np.ceil(np.log2(np.prod(pool["kernel_shape"]))))
    assert len(trees.levels) == levels
    assert trees.inputs, "the relu states under the pool are its inputs"


@pytest.mark.parametrize("order", ["relu-pool", "pool-relu"])
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("method", ["crown", "ibp"])
def test_bounds_through_max_pools_hold(pool, order, method, rng):
    model = ic.from_onnx(conv_pool_net(rng, pool, order), dtype=np.float64)
    center = rng.uniform(0, 1, size=(3, 49))
    for eps in (0.01, 0.2):
        bounds = output_bounds(model, center, eps, method=method)
        y = model.predict(samples_and_corners(rng, center, eps).reshape(-1, 49)).reshape(3, -1, 4)
        assert (y >= bounds.lower[:, None, :]).all(), (bounds.lower[:, None, :] - y).max()
        assert (y <= bounds.upper[:, None, :]).all(), (y - bounds.upper[:, None, :]).max()


def maximum_of_inputs(p: int) -> ImplicitModel:
    """y = max(relu(u_1), ..., relu(u_p)): a GlobalMaxPool over p independent states."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t"]), helper.make_node("GlobalMaxPool", ["t"], ["y"])],
        "max", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, p])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1])],
    )  # fmt: skip
    return ic.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), dtype=np.float64)


@pytest.mark.parametrize("p", [2, 3, 5, 8])
def test_the_maximum_of_independent_inputs_is_bounded_exactly(p, rng):
    """max(relu(u)) on boxes of positive inputs is max(u), monotone in each input: its range
    over a box is [its value at the lowest corner, at the highest]. CROWN through the tree gives
    it exactly: below, the input with the largest lower bound; above, the constant max of the
    upper bounds (the tree's own relu lines, each on an interval of a difference, would not:
    b + relu(a - b) over [0, 1]^2 reaches 1.5 by the chord)."""
    model = maximum_of_inputs(p)
    center, eps = rng.uniform(1, 2, size=(4, p)), 0.3
    bounds = output_bounds(model, center, eps, method="crown")
    np.testing.assert_allclose(bounds.lower, model.predict(center - eps).reshape(4, -1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bounds.upper, model.predict(center + eps).reshape(4, -1), rtol=1e-9, atol=1e-12)


def test_a_relu_of_a_difference_is_bounded_as_a_maximum(rng):
    """A hand-made model: r = relu(x_a - x_b), y = (x_b + r, r) with x = B u + b (identity
    states): the recognition reads only the matrix, and the bounds hold (a grid) and are exact
    for y_1 = max(x_a, x_b) of independent states."""
    blocks = (StateBlock("x", 0, 2, "identity", (2,)), StateBlock("r", 2, 3, "relu", (1,)))
    A = sp.csr_array(np.array([[0, 0, 0], [0, 0, 0], [1.0, -1.0, 0]]))
    model = ImplicitModel(
        A, np.array([[1.5, 0], [0, 0.8], [0, 0]]), np.array([[0, 1.0, 1.0], [0, 0, 1.0]]), np.zeros((2, 2)),
        np.array([0.1, -0.2, 0.0]), None, blocks, (TensorSpec("u", (2,)),), (TensorSpec("y", (2,)),),
    )  # fmt: skip
    assert list(Structure.of(model).max_trees.levels) == [1]
    center = rng.normal(size=(5, 2)) * 0.5
    bounds = output_bounds(model, center, 0.25)
    for k in range(5):
        grid = center[k] + 0.25 * np.array(list(itertools.product(np.linspace(-1, 1, 41), repeat=2)))
        y = model.predict(grid, tol=1e-14)
        assert (y >= bounds.lower[k]).all() and (y <= bounds.upper[k]).all()
        np.testing.assert_allclose([bounds.lower[k, 0], bounds.upper[k, 0]], [y[:, 0].min(), y[:, 0].max()],
                                   rtol=1e-9, atol=1e-12)  # fmt: skip


def test_the_sparse_spread_equals_the_product(rng):
    weights = sp.random_array((30, 50), density=0.2, random_state=1, format="csr")
    matrix = sp.random_array((50, 40), density=0.1, random_state=2, format="csr")
    radius = rng.uniform(0, 1, 40)
    expected = np.abs((weights @ matrix).toarray()) @ radius
    spread = _sparse_spread(weights.indptr, weights.indices.astype(np.int64), weights.data,
                            matrix.indptr, matrix.indices.astype(np.int64), matrix.data, radius)  # fmt: skip
    np.testing.assert_allclose(spread, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("pool", POOLS)
def test_the_contenders_of_each_window_by_enumeration(pool, rng):
    """A state's bounds matter to the maxima's relaxations only where it can be the maximum of
    a window (its upper bound reaches the window's largest lower bound) that another element
    can be too: checked window by window against the pooling's own windows."""
    model = ic.from_onnx(conv_pool_net(rng, pool), dtype=np.float64)
    structure = Structure.of(model)
    trees = structure.max_trees
    (leaves_part,) = trees.inputs
    states = structure.parts[leaves_part].rows.states
    batch = 3
    bounds = SimpleNamespace(low=rng.normal(size=(batch, model.n)), high=None)
    bounds.high = bounds.low + rng.exponential(0.3, size=(batch, model.n))
    low, high = bounds.low[:, states] - 0.1, bounds.high[:, states] + 0.1
    needed = contenders(trees, states, low, high, bounds)
    expected = np.zeros_like(needed)
    column = {int(state): k for k, state in enumerate(states)}
    windows = trees.windows
    sizes = np.diff(windows.indptr)
    assert sizes.min() >= 2 and sizes.max() == np.prod(pool["kernel_shape"])  # (padding shortens some)
    for w in range(windows.shape[0]):
        members = windows.indices[windows.indptr[w] : windows.indptr[w + 1]]
        at = [column[int(state)] for state in members]
        for b in range(batch):
            top = max(low[b, k] for k in at)
            contending = [k for k in at if high[b, k] >= top]
            if len(contending) > 1:
                expected[b, contending] = True
    np.testing.assert_array_equal(needed, expected)
