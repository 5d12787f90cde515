"""One sample in one compiled call (runtime/one_sample.py) against onnxruntime and onnx.reference.

Every frontend test predicts its first sample alone too (``onnx_helpers``); these tests make
sure the program takes the operations it should (a silent fallback would pass them too), reach
every tile shape of the convolution kernel (rows of several vectors, channel counts that are
not a multiple of the tile, odd vector counts, strides through the phase-split copy), and check
the states, the shapes and the state kept between calls.
"""

from __future__ import annotations

import importlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import scipy.sparse as sp
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import assert_matches_onnxruntime, gemm_tanh_chain
from test_structured import conv_relu_chain

import implicit_compiler as ic
from implicit_compiler.runtime import kernels, one_sample

solve_module = importlib.import_module("implicit_compiler.runtime.solve")
ZOO = Path(__file__).resolve().parents[1] / "zoo"


def program_codes(compiled: ic.ImplicitModel, dtype=np.float64) -> list[int]:
    program = solve_module._one_sample_program(compiled.astype(dtype))
    assert program is not None, "an acyclic model runs as one program"
    return program.operations[:, 0].tolist()


# (input shape, layers): rows of 40 are 3 float32 vectors (the last masked) and 5 float64 ones;
# 5 and 1 output channels leave the 4-channel tile part empty; 7 x 40 positions are odd in
# float32; strides 2 and 3 read the phase-split copy.
WIDE_CASES = {
    "wide rows, 5 channels": ((3, 7, 40), [((5, 3, 3, 3), {"pads": [1, 1, 1, 1]})]),
    "one channel, dilated along the width": ((2, 6, 37), [((1, 2, 3, 5), {"dilations": [1, 2]})]),
    "stride 2 wide": ((3, 9, 41), [((6, 3, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]})]),
    "stride 3 dilation 2": (
        (2, 13, 35),
        [((3, 2, 3, 3), {"strides": [1, 3], "dilations": [2, 2], "pads": [0, 2, 1, 0]})],
    ),
    "two layers, narrow": ((1, 12, 12), [((6, 1, 5, 5), {}), ((16, 6, 5, 5), {"pads": [2, 2, 2, 2]})]),
}


@pytest.fixture(autouse=True)
def small_terms_count(monkeypatch):
    """These models are small: take their structured terms however few non-zeros they have."""
    monkeypatch.setattr(importlib.import_module("implicit_compiler.runtime.structured"), "MIN_STRUCTURED_NONZEROS", 16)


@pytest.mark.parametrize("case", sorted(WIDE_CASES))
def test_convolutions_run_as_direct_convolutions(case):
    x_shape, layers = WIDE_CASES[case]
    compiled = assert_matches_onnxruntime(conv_relu_chain(x_shape, layers), batch=3)
    for dtype in (np.float32, np.float64):
        assert program_codes(compiled, dtype).count(one_sample.CONV) == len(layers)


def lenet_like(activation: str) -> onnx.ModelProto:
    """Conv -> activation -> MaxPool -> flatten -> Gemm -> Relu -> Gemm, random weights."""
    rng = np.random.default_rng(4)
    weights = {
        "K": rng.standard_normal((5, 2, 3, 3)) / 4,
        "KB": rng.standard_normal(5) / 10,
        "W1": rng.standard_normal((5 * 5 * 5, 24)) / 8,
        "B1": rng.standard_normal(24) / 10,
        "W2": rng.standard_normal((24, 7)) / 4,
        "B2": rng.standard_normal(7) / 10,
    }
    extra = {"alpha": 0.2} if activation == "LeakyRelu" else {}
    nodes = [
        helper.make_node("Conv", ["x", "K", "KB"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node(activation, ["c"], ["a"], **extra),
        helper.make_node("MaxPool", ["a"], ["m"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["m"], ["f"]),
        helper.make_node("Gemm", ["f", "W1", "B1"], ["g1"]),
        helper.make_node("Relu", ["g1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "W2", "B2"], ["y"]),
    ]
    return single_input_model(nodes, "lenet_like", (2, 10, 10), weights)


def single_input_model(nodes, name: str, x_shape: tuple[int, ...], weights: dict) -> onnx.ModelProto:
    """A model of ``nodes`` from input x (batch, *x_shape) to output y, float32 initializers."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value.astype(np.float32), key) for key, value in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("activation", ["Relu", "LeakyRelu", "Sigmoid"])
def test_conv_pool_dense_network(activation):
    compiled = assert_matches_onnxruntime(lenet_like(activation), batch=3)
    codes = program_codes(compiled)
    assert {one_sample.CONV, one_sample.ELL, one_sample.DENSE} <= set(codes), codes
    if activation != "Relu":  # relu is applied as the convolution stores; others after it
        assert one_sample.ACTIVATE in codes


def two_convolutions() -> onnx.ModelProto:
    """relu(conv_a(relu(x)) + conv_b(x)), both strided 3x3 (conv_b reads the input: each is
    large enough, 16,524 non-zeros, for the lowering to keep it as a kernel)."""
    rng = np.random.default_rng(5)
    weights = {
        "Ka": rng.standard_normal((6, 3, 3, 3)) / 4,
        "Kb": rng.standard_normal((6, 3, 3, 3)) / 4,
        "Bb": rng.standard_normal(6) / 10,
    }
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Conv", ["r", "Ka"], ["a"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["x", "Kb", "Bb"], ["b"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    return single_input_model(nodes, "two_convolutions", (3, 12, 34), weights)


def test_two_convolutions_into_one_block():
    """Two sources, two terms: the second adds to what the first stored, the bias counted once."""
    compiled = assert_matches_onnxruntime(two_convolutions(), batch=3)
    assert program_codes(compiled).count(one_sample.CONV) == 2


def test_gemm_chain_with_tanh():
    compiled = assert_matches_onnxruntime(gemm_tanh_chain([(40, 30), (20, 40), (3, 20)], seed=2), batch=3)
    assert program_codes(compiled).count(one_sample.DENSE) == 3


TILE_MODELS = {
    "conv chain": lambda: conv_relu_chain(*WIDE_CASES["stride 2 wide"]),
    "lenet-like, sigmoid": lambda: lenet_like("Sigmoid"),
    "lenet-like, leaky relu": lambda: lenet_like("LeakyRelu"),
    "two convolutions": lambda: two_convolutions(),
    "gemm chain": lambda: gemm_tanh_chain([(40, 30), (20, 40), (3, 20)], seed=2),
}


@pytest.mark.parametrize("name", sorted(TILE_MODELS))
def test_tiles_of_samples(name):
    """70 samples: in float32 (tiles of 32) two whole tiles and one of 6, in float64 (tiles of
    16) four and one of 6; split over the threads. ``assert_matches_onnxruntime`` runs the batch
    by tiles too (and predict takes them from ``sample_tiles.least_batch`` on)."""
    compiled = assert_matches_onnxruntime(TILE_MODELS[name](), batch=70)
    assert solve_module._one_sample_program(compiled) is not None


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_zoo_models_one_sample_at_a_time_match_onnxruntime(name, rng):
    path = ZOO / f"{name}.onnx"
    model = ic.from_onnx(path, dtype=np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape[1:]
    for batch in (1, 1, 1, 70):  # one sample at a time, then by tiles of samples
        u = rng.normal(size=(batch, *shape)).astype(np.float32)
        expected = session.run(None, {session.get_inputs()[0].name: u})[0]
        ours = model.predict(u)
        assert ours.shape == expected.shape
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    codes = program_codes(model, np.float32)
    assert one_sample.CONV in codes


def test_states_satisfy_the_equilibrium_and_shapes_follow_the_input(rng):
    """x from the program solves x = phi(A x + B u + b) (checked with scipy, block by block)
    and y = C x + D u + b_y; one sample gives (n,) and (q,), a batch of one (1, n), (1, q)."""
    model = ic.from_onnx(lenet_like("LeakyRelu"))
    u = rng.normal(size=(2, 10, 10))
    single = model.solve(u)
    batch = model.solve(u[None])
    assert single.x.shape == (model.n,) and single.y.shape == (model.q,)
    assert batch.x.shape == (1, model.n) and batch.y.shape == (1, model.q)
    x, flat_u = single.x, u.ravel()
    pre = model.A @ x + model.B @ flat_u + model.bias_x
    phi = {
        "identity": lambda z, alpha: z,
        "relu": lambda z, alpha: np.maximum(z, 0),
        "leaky_relu": lambda z, alpha: np.where(z >= 0, z, alpha * z),
    }
    for block in model.blocks:
        z, activation = pre[block.start : block.stop], block.activation
        expected = phi[activation.name](z, activation.alpha)
        np.testing.assert_allclose(x[block.start : block.stop], expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(single.y, model.C @ x + model.D @ flat_u + model.bias_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(batch.x[0], x)


def test_large_models_take_the_steps_at_batch_one(monkeypatch):
    """Past ``ONE_SAMPLE_WORK`` multiply-adds per thread one sample goes step by step (BLAS
    products on every thread), with the same results."""
    monkeypatch.setattr(solve_module, "ONE_SAMPLE_WORK", 1000)

    def program_call(*args):
        raise AssertionError("one sample past ONE_SAMPLE_WORK ran by the program")

    monkeypatch.setattr(solve_module, "_run_program", program_call)
    compiled = assert_matches_onnxruntime(lenet_like("Relu"), batch=3)  # predicts sample 0 alone too
    fresh = ic.from_onnx(lenet_like("Relu"))
    fresh.predict(np.zeros((1, *fresh.inputs[0].shape)))
    assert "plan" not in fresh._cache  # its non-zeros alone are past the bound: no plan is built
    assert not solve_module._one_call_may_pay(compiled)
    assert not solve_module._one_call_pays(solve_module._one_sample_program(compiled))
    monkeypatch.setattr(solve_module, "ONE_SAMPLE_WORK", compiled.nnz * kernels.thread_count())
    assert solve_module._one_call_may_pay(compiled)  # (the bound itself: the plan's work decides)


def test_cyclic_models_keep_the_iterative_path(rng):
    A = sp.csr_array(np.array([[0.0, 0.5], [0.4, 0.0]]))
    blocks = (ic.StateBlock("loop", 0, 2, "tanh", (2,)),)
    model = ic.ImplicitModel(
        A, np.eye(2), np.eye(2), np.zeros((2, 2)), None, None, blocks, (ic.TensorSpec("u", (2,)),),
        (ic.TensorSpec("y", (2,)),),
    )  # fmt: skip
    assert solve_module._one_sample_program(model) is None
    u = rng.normal(size=2)
    solution = model.solve(u)
    np.testing.assert_allclose(solution.x, np.tanh(A @ solution.x + u), atol=1e-9)
    assert solution.iterations > 0


def test_predictions_survive_the_next_call_and_threads(rng):
    """predict keeps its values array (one sample) and its tile slabs (batches) per thread;
    what it returned is not overwritten."""
    path = ZOO / "lenet5.onnx"
    model = ic.from_onnx(path, dtype=np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [rng.normal(size=(batch, 1, 32, 32)).astype(np.float32) for batch in (1, 70, 1, 70, 1, 70)]
    expected = [session.run(None, {session.get_inputs()[0].name: u})[0] for u in inputs]
    first = model.predict(inputs[0])
    model.predict(inputs[1])
    np.testing.assert_allclose(first, expected[0], rtol=1e-4, atol=1e-4 * np.abs(expected[0]).max())
    with ThreadPoolExecutor(max_workers=3) as pool:
        outputs = list(pool.map(lambda u: [model.predict(u) for _ in range(20)], inputs))
    for ys, y_expected in zip(outputs, expected):
        for y in ys:
            np.testing.assert_allclose(y, y_expected, rtol=1e-4, atol=1e-4 * np.abs(y_expected).max())
