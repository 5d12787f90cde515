"""Gemm and MatMul lowerings against onnxruntime and the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper
from onnx_helpers import assert_matches_onnxruntime, float_value, make_model

RNG = np.random.default_rng(7)


def _weight(name, shape):
    return numpy_helper.from_array(RNG.normal(size=shape).astype(np.float32), name)


GEMM_CASES = {
    "plain": (dict(), (5, 3), (3,)),
    "transB": (dict(transB=1), (3, 5), (3,)),
    "alpha-beta": (dict(alpha=0.5, beta=-2.0), (5, 3), (3,)),
    "bias-row": (dict(transB=1), (3, 5), (1, 3)),
    "bias-scalar": (dict(), (5, 3), (1,)),
    "no-bias": (dict(transB=1), (3, 5), None),
}


@pytest.mark.parametrize("attributes,weight_shape,bias_shape", list(GEMM_CASES.values()), ids=list(GEMM_CASES))
def test_gemm_variants(attributes, weight_shape, bias_shape):
    initializers = [_weight("W", weight_shape)]
    inputs = ["x", "W"]
    if bias_shape is not None:
        initializers.append(_weight("b", bias_shape))
        inputs.append("b")
    node = helper.make_node("Gemm", inputs, ["y"], **attributes)
    assert_matches_onnxruntime(
        make_model([node], [float_value("x", ["N", 5])], [float_value("y", ["N", 3])], initializers)
    )


def test_gemm_trans_a_on_a_column_input():
    """transA with a (5, 1) input: the batch-1 column is transposed to a row."""
    node = helper.make_node("Gemm", ["x", "W", "b"], ["y"], transA=1)
    model = make_model(
        [node], [float_value("x", [5, 1])], [float_value("y", [1, 3])], [_weight("W", (5, 3)), _weight("b", (3,))]
    )
    assert_matches_onnxruntime(model)


def test_gemm_with_constant_left_operand():
    node = helper.make_node("Gemm", ["W", "x"], ["y"], transB=1)
    model = make_model([node], [float_value("x", [1, 5])], [float_value("y", [4, 1])], [_weight("W", (4, 5))])
    assert_matches_onnxruntime(model)


MATMUL_CASES = {
    "2d": ((None, 6), (6, 4), (None, 4)),
    "3d-stacked-input": ((None, 3, 6), (6, 4), (None, 3, 4)),
    "batched-weights": ((None, 2, 3, 6), (2, 6, 4), (None, 2, 3, 4)),
    "vector-weight": ((None, 6), (6,), (None,)),
}


@pytest.mark.parametrize("x_shape,w_shape,y_shape", list(MATMUL_CASES.values()), ids=list(MATMUL_CASES))
def test_matmul_variants(x_shape, w_shape, y_shape):
    x_shape = ["N", *x_shape[1:]]
    y_shape = ["N", *y_shape[1:]]
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    assert_matches_onnxruntime(
        make_model([node], [float_value("x", x_shape)], [float_value("y", y_shape)], [_weight("W", w_shape)])
    )


def test_matmul_constant_on_the_left():
    node = helper.make_node("MatMul", ["W", "x"], ["y"])
    model = make_model([node], [float_value("x", [1, 6, 3])], [float_value("y", [1, 4, 3])], [_weight("W", (4, 6))])
    assert_matches_onnxruntime(model)


def test_mlp_is_nilpotent_and_blocks_are_named_after_values():
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h1"], transB=1),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "W2"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("Gemm", ["r2", "W3"], ["y"]),
    ]
    initializers = [_weight("W1", (8, 5)), _weight("b1", (8,)), _weight("W2", (8, 7)), _weight("W3", (7, 2))]
    model = make_model(nodes, [float_value("x", ["N", 5])], [float_value("y", ["N", 2])], initializers)
    compiled = assert_matches_onnxruntime(model, batch=16)
    assert [(b.name, b.size, b.activation.name) for b in compiled.blocks] == [("r1", 8, "relu"), ("r2", 7, "relu")]
    assert compiled.A.nnz == 8 * 7 and compiled.B.nnz == 8 * 5 and compiled.C.nnz == 7 * 2
    dense = compiled.A.toarray()
    assert np.allclose(np.triu(dense), 0), "states in creation order: strictly lower triangular"
    assert not np.linalg.matrix_power(dense, 2).any(), "A is nilpotent"


def test_product_of_two_variable_tensors_goes_through_square_blocks():
    """It used to be refused; now each of the 2 * 3 * 2 products a_ik b_kj is two square states
    (tests/test_modern_products.py covers the forms)."""
    node = helper.make_node("MatMul", ["x", "z"], ["y"], name="bilinear")
    model = make_model(
        [node], [float_value("x", ["N", 2, 3]), float_value("z", ["N", 3, 2])], [float_value("y", ["N", 2, 2])], []
    )
    compiled = assert_matches_onnxruntime(model)
    assert [(block.activation.name, block.size) for block in compiled.blocks] == [("square", 12), ("square", 12)]
