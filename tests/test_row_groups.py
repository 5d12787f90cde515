"""The row-group kernel (runtime/row_groups.py): batches of acyclic blocks, rows sharing columns.

Models are compared with onnxruntime (float32) and onnx.reference (float64) at batch sizes that
reach every part of the kernel: chunks of 2 vectors, of 1, and the masked last lanes; on one
thread and on several. The groups themselves are checked against their definition, and the
generated per-size kernels against their generator.
"""

from __future__ import annotations

import importlib

import numba
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import assert_matches_onnxruntime, gemm_tanh_chain

from implicit_compiler import from_onnx
from implicit_compiler.runtime import codegen, kernels, row_groups, simd

solve_module = importlib.import_module("implicit_compiler.runtime.solve")
# float32 vectors hold 16 lanes, float64 8; the kernels go by 2 vectors, then 1, then masked
# lanes. float32: 8 masked, 29 = 16 + 13 masked, 53 = 32 + 16 + 5 masked; float64: 8 = one
# vector, 29 = 16 + 8 + 5 masked, 53 = 3 x 16 + 5 masked.
BATCHES = (8, 29, 53)
assert simd.Vector(numba.types.float32).lanes == 16 and simd.Vector(numba.types.float64).lanes == 8
assert min(BATCHES) > solve_module.STRUCTURED_BATCH_LIMIT


class _NumpyWithPoisonedEmpty:
    """numpy, but ``empty`` fills float arrays with NaN."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(*args, **kwargs):
        array = np.empty(*args, **kwargs)
        if array.dtype.kind == "f":
            array.fill(np.nan)
        return array


@pytest.fixture(autouse=True)
def poisoned_state(monkeypatch):
    """The solver's state starts as NaN: a lane the kernel forgets to write cannot pass for a
    value left in reused memory by an earlier call. (Only the solver's numpy: numba must keep
    compiling against the real one.)"""
    monkeypatch.setattr(solve_module, "np", _NumpyWithPoisonedEmpty())


def _model(nodes, initializers, x_shape, output) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def residual_network(channels: int = 8, size: int = 6, seed: int = 0) -> onnx.ModelProto:
    """r0 = relu(conv(x)), r1 = relu(conv(r0)), r2 = relu(conv(r1) + r0) -> max pool -> flatten
    -> gemm -> leaky relu -> gemm -> sigmoid: groups of 8 whose rows each have an entry of
    their own (r0's identity), pooling trees in groups of 1, dense layers, four activations."""
    rng = np.random.default_rng(seed)

    def tensor(name, shape, scale):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    pooled = channels * (size // 2) ** 2
    initializers = [
        tensor("W0", (channels, 3, 3, 3), 0.3), tensor("B0", (channels,), 0.1),
        tensor("W1", (channels, channels, 3, 3), 0.15), tensor("B1", (channels,), 0.1),
        tensor("W2", (channels, channels, 3, 3), 0.15), tensor("B2", (channels,), 0.1),
        tensor("G0", (pooled, 20), 0.2), tensor("C0", (20,), 0.1),
        tensor("G1", (20, 12), 0.3), tensor("C1", (12,), 0.1),
    ]  # fmt: skip
    pads = {"pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "W0", "B0"], ["c0"], **pads),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "W1", "B1"], ["c1"], **pads),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], **pads),
        helper.make_node("Add", ["c2", "r0"], ["s2"]),
        helper.make_node("Relu", ["s2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["m"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["m"], ["f"]),
        helper.make_node("Gemm", ["f", "G0", "C0"], ["g0"]),
        helper.make_node("LeakyRelu", ["g0"], ["l0"], alpha=0.1),
        helper.make_node("Gemm", ["l0", "G1", "C1"], ["g1"]),
        helper.make_node("Sigmoid", ["g1"], ["y"]),
    ]
    return _model(nodes, initializers, (3, size, size), "y")


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("batch", BATCHES)
def test_residual_network_matches_the_references(batch, threaded, monkeypatch):
    monkeypatch.setattr(row_groups, "PARALLEL_THRESHOLD", 0 if threaded else 1 << 62)
    compiled = assert_matches_onnxruntime(residual_network(), batch=batch)
    steps = solve_module._execution_steps(compiled, structured=False)
    assert any(isinstance(step, solve_module._Chain) for step in steps)


def test_tanh_chain_with_odd_sizes_matches_the_references():
    """Dense layers of 13 and 7 rows: groups of 8, 4, 1 and 6, 1."""
    compiled = assert_matches_onnxruntime(gemm_tanh_chain([(13, 5), (7, 13)], seed=4), batch=29)
    (chain,) = solve_module._execution_steps(compiled, structured=False)
    assert sorted(chain.groups.sizes.tolist()) == [1, 1, 4, 6, 8]


def test_groups_cover_every_row_once_and_share_identical_columns():
    """Also: the residual block's rows keep their identity entries as entries of their own."""
    compiled = assert_matches_onnxruntime(residual_network(), batch=3, check_reference=False, structure="csr")
    A, B = compiled.A, compiled.B
    chains = [
        s for s in solve_module._execution_steps(compiled, structured=False) if isinstance(s, solve_module._Chain)
    ]
    assert chains
    for chain in chains:
        groups = chain.groups
        for k in range(len(chain.starts)):
            lo, hi = groups.block_groups[k], groups.block_groups[k + 1]
            covered = np.concatenate([groups.rows[g, : groups.sizes[g]] for g in range(lo, hi)])
            expected = chain.states[chain.starts[k] : chain.stops[k]]
            assert sorted(covered.tolist()) == sorted(expected.tolist())
        for g in range(len(groups.sizes)):
            size = int(groups.sizes[g])
            assert size in row_groups.GROUP_SIZES
            entries, shared = 0, 0
            for M, run in ((A, groups.shared_a[g].astype(np.int64)), (B, groups.shared_b[g].astype(np.int64))):
                length = run[0]
                columns = []
                for r in range(size):
                    row = groups.rows[g, r]
                    start = run[1 + r]
                    assert M.indptr[row] <= start and start + length <= M.indptr[row + 1]
                    columns.append(M.indices[start : start + length])
                    entries += M.indptr[row + 1] - M.indptr[row]
                assert all(np.array_equal(columns[0], c) for c in columns)
                shared += length * size
            assert size == 1 or shared >= row_groups.MIN_SHARED * entries
    residual = compiled.blocks[2]
    own = [
        g for g in range(len(groups.sizes))
        if residual.start <= groups.rows[g, 0] < residual.stop and groups.shared_a[g, 0] < A.indptr[groups.rows[g, 0] + 1] - A.indptr[groups.rows[g, 0]]
    ]  # fmt: skip
    assert own, "the residual identities should be entries of the rows' own"


def test_convolution_rows_form_groups_of_eight_channels():
    compiled = assert_matches_onnxruntime(
        residual_network(channels=16), batch=3, check_reference=False, structure="csr"
    )
    chain = next(
        s for s in solve_module._execution_steps(compiled, structured=False) if isinstance(s, solve_module._Chain)
    )
    groups = chain.groups
    for k, block in enumerate(compiled.blocks[:3]):  # the convolutions: 16 channels per pixel
        sizes = groups.sizes[groups.block_groups[k] : groups.block_groups[k + 1]]
        assert block.shape[0] == 16 and set(sizes.tolist()) == {8}


def test_threaded_and_serial_kernels_are_cached_apart():
    """numba's cache keys entries by qualified name: one name would load one build for both."""
    threaded, serial = kernels.forward_chain_single, kernels.forward_chain_single_serial
    assert threaded.py_func.__qualname__ != serial.py_func.__qualname__
    assert threaded.targetoptions.get("parallel") and not serial.targetoptions.get("parallel")


def test_generated_kernels_are_current():
    assert codegen.GENERATED.read_text() == codegen.generated_source(), (
        "run: python -m implicit_compiler.runtime.codegen"
    )
    assert codegen.GROUP_SIZES == row_groups.GROUP_SIZES


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 5), (3, 70), (8, 8), (29, 131), (67, 64)])
def test_transpose_into_matches_numpy(dtype, shape):
    """Register tiles where both sizes allow them, single values along the edges."""
    source = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    target = np.full((shape[1] + 3, shape[0]), np.nan, dtype=dtype)  # rows past the first stay untouched
    assert kernels.transpose_into(source, target[: shape[1]]) == 0  # every value finite
    np.testing.assert_array_equal(target[: shape[1]], source.T)
    assert np.isnan(target[shape[1] :]).all()
    for position in {(0, 0), (shape[0] - 1, shape[1] - 1), (shape[0] // 2, shape[1] // 2)}:
        source[position] = np.inf
        assert np.isnan(kernels.transpose_into(source, target[: shape[1]])), f"inf at {position} not seen"
        source[position] = 0


def test_solve_loads_a_non_contiguous_batch():
    """The batch is read through the tile transpose, which needs contiguous rows: a flat batch
    (batch, p) in Fortran order or with reversed columns gives the same answer."""
    model = from_onnx(residual_network(), dtype=np.float32)
    u = np.random.default_rng(1).standard_normal((29, model.p)).astype(np.float32)
    expected = model.predict(u)
    np.testing.assert_array_equal(model.predict(np.asfortranarray(u)), expected)
    np.testing.assert_array_equal(model.predict(u[:, ::-1].copy()[:, ::-1]), expected)
