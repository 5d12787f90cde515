"""Convolution and dense blocks run through BLAS (runtime/structured.py) at small batches.

Both runtime paths are compared with onnxruntime (float32) and onnx.reference (float64): batch 3
takes the structured path, a batch past ``STRUCTURED_BATCH_LIMIT`` the row-group kernel
(runtime/row_groups.py). The structured path must also refuse sub-matrices that only look like
convolutions.
"""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import pytest
import scipy.sparse as sp
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import assert_matches_onnxruntime, gemm_tanh_chain

import implicit_compiler as ic
from implicit_compiler.runtime.structured import Convolution, Dense, find_convolution, tensor_sources

solve_module = importlib.import_module("implicit_compiler.runtime.solve")
structured_module = importlib.import_module("implicit_compiler.runtime.structured")
# The structured path, and the row groups: 29 samples are, in float32 (8 lanes), a 2-vector
# chunk, a 1-vector chunk and 5 masked lanes; in float64 (4 lanes) 3 + 1 chunks and 1 lane.
SMALL, LARGE = 3, 29
assert SMALL <= solve_module.STRUCTURED_BATCH_LIMIT < LARGE


@pytest.fixture(autouse=True)
def small_terms_count(monkeypatch):
    """These models are small: take their terms however few non-zeros they have."""
    monkeypatch.setattr(structured_module, "MIN_STRUCTURED_NONZEROS", 16)


def conv_relu_chain(x_shape, layers, seed=0) -> onnx.ModelProto:
    """Conv -> Relu repeated; ``layers`` = [(W shape, attributes)]; x_shape without the batch."""
    rng = np.random.default_rng(seed)
    nodes, initializers, value = [], [], "x"
    for index, (w_shape, attributes) in enumerate(layers):
        weight = rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))
        bias = rng.standard_normal(w_shape[0]) * 0.1
        initializers += [
            numpy_helper.from_array(weight.astype(np.float32), f"W{index}"),
            numpy_helper.from_array(bias.astype(np.float32), f"B{index}"),
        ]
        nodes.append(helper.make_node("Conv", [value, f"W{index}", f"B{index}"], [f"c{index}"], **attributes))
        nodes.append(helper.make_node("Relu", [f"c{index}"], [f"r{index}"]))
        value = f"r{index}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
        [helper.make_tensor_value_info(value, TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CONV_CASES = {
    "3x3 pad 1": ((3, 9, 9), [((4, 3, 3, 3), {"pads": [1, 1, 1, 1]}), ((5, 4, 3, 3), {"pads": [1, 1, 1, 1]})]),
    "stride 2 asymmetric pads": ((2, 11, 8), [((4, 2, 3, 2), {"strides": [2, 2], "pads": [0, 1, 2, 0]})] * 1),
    "dilation 2": ((3, 12, 12), [((4, 3, 3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]})]),
    "1x1": ((6, 5, 5), [((4, 6, 1, 1), {})]),
    "5x5 no pad": ((1, 14, 14), [((6, 1, 5, 5), {}), ((8, 6, 5, 5), {})]),
    "same upper stride 3": ((2, 10, 10), [((3, 2, 4, 4), {"auto_pad": "SAME_UPPER", "strides": [3, 3]})]),
    "conv1d": ((3, 17), [((4, 3, 3), {"pads": [1, 1]}), ((2, 4, 5), {"strides": [2]})]),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("batch", [SMALL, LARGE])
def test_conv_chains_match_the_references_on_both_paths(case, batch):
    x_shape, layers = CONV_CASES[case]
    model = conv_relu_chain(x_shape, layers)
    compiled = assert_matches_onnxruntime(model, batch=batch)
    steps = solve_module._execution_steps(compiled, structured=True)
    convolutions = [term for step in steps if hasattr(step, "terms") for term in step.terms]
    assert len(convolutions) == len(layers), f"expected every Conv as a structured term, got {convolutions}"
    for term, (w_shape, attributes) in zip(convolutions, layers):
        assert isinstance(term, Convolution)
        assert term.kernel[-1] == w_shape[-1]
        assert term.stride[-1] == attributes.get("strides", [1])[-1]
        assert term.dilation[-1] == attributes.get("dilations", [1])[-1]


def test_grouped_convolution_stays_sparse_and_exact():
    model = conv_relu_chain((4, 6, 6), [((4, 1, 3, 3), {"group": 4, "pads": [1, 1, 1, 1]})])
    compiled = assert_matches_onnxruntime(model, batch=SMALL)
    steps = solve_module._execution_steps(compiled, structured=True)
    assert not any(hasattr(step, "terms") for step in steps), "a depthwise kernel is 3/4 zeros: keep it sparse"


def test_gemm_layers_run_as_dense_products():
    model = gemm_tanh_chain([(40, 30), (20, 40)], seed=1)
    for batch in (1, SMALL, LARGE):
        compiled = assert_matches_onnxruntime(model, batch=batch)
    steps = solve_module._execution_steps(compiled, structured=True)
    assert [type(term) for step in steps if hasattr(step, "terms") for term in step.terms] == [Dense, Dense]


def toeplitz_model(perturb: bool) -> ic.ImplicitModel:
    """x2 = relu(conv(x1)) with x1 = relu(u): a 3x3 convolution matrix, optionally with one
    entry changed so that it is no longer shift-invariant."""
    rng = np.random.default_rng(2)
    C, H, W, Co = 2, 6, 6, 3
    kernel = rng.standard_normal((Co, C, 3, 3))
    rows, columns, values = [], [], []
    for co in range(Co):
        for ho in range(H):
            for wo in range(W):
                for c in range(C):
                    for i in range(3):
                        for j in range(3):
                            h, w = ho + i - 1, wo + j - 1
                            if 0 <= h < H and 0 <= w < W:
                                rows.append((co * H + ho) * W + wo)
                                columns.append((c * H + h) * W + w)
                                values.append(kernel[co, c, i, j])
    conv = sp.csr_array((values, (rows, columns)), shape=(Co * H * W, C * H * W))
    if perturb:
        conv.data[len(conv.data) // 2] += 0.25
    n1, n2 = C * H * W, Co * H * W
    A = sp.block_array([[None, sp.csr_array((n1, n2))], [conv, None]], format="csr")
    B = sp.vstack([sp.eye_array(n1), sp.csr_array((n2, n1))], format="csr")
    C_out = sp.hstack([sp.csr_array((n2, n1)), sp.eye_array(n2)], format="csr")
    blocks = (
        ic.StateBlock("x1", 0, n1, "relu", (C, H, W)),
        ic.StateBlock("x2", n1, n1 + n2, "relu", (Co, H, W)),
    )
    return ic.ImplicitModel(
        A, B, C_out, sp.csr_array((n2, n1)), np.zeros(n1 + n2), rng.standard_normal(n2),
        blocks, (ic.TensorSpec("u", (C, H, W)),), (ic.TensorSpec("y", (Co, H, W)),),
    )  # fmt: skip


@pytest.mark.parametrize("perturb", [False, True])
def test_only_exact_convolutions_are_taken(perturb):
    model = toeplitz_model(perturb)
    block = model.block("x2")
    M = sp.hstack([model.B[block.start : block.stop], model.A[block.start : block.stop]], format="csr")
    source = tensor_sources(model)[1][0]  # x1's rows of V = [u; x]
    found = find_convolution(M, source, block.shape, model.block("x1").shape)
    assert (found is None) == perturb
    u = random_inputs_for(model)
    x1 = np.maximum(u, 0)  # the definition, computed directly
    y = np.maximum(model.A[block.start : block.stop, : block.start] @ x1.T, 0).T + model.bias_y
    np.testing.assert_allclose(model.predict(u).reshape(len(u), -1), y, rtol=1e-12, atol=1e-12)


def test_a_convolution_missing_one_border_entry_is_refused():
    model = toeplitz_model(perturb=False)
    block = model.block("x2")
    M = sp.hstack([model.B[block.start : block.stop], model.A[block.start : block.stop]], format="csr")
    M.data[0] = 0.0  # an explicit zero where the kernel entry is non-zero
    source = tensor_sources(model)[1][0]
    assert find_convolution(M, source, block.shape, model.block("x1").shape) is None


def random_inputs_for(model: ic.ImplicitModel) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((SMALL, model.p))
