"""Issue 16, precision and conformance: products of operands of different scales, output bounds
under rounding, and onnx node tests that were refused or wrong."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import assert_matches_onnxruntime

import implicit_compiler as ic
from implicit_compiler.analysis.bounds import output_bounds, sensitivity

ZOO = Path(__file__).resolve().parents[1] / "zoo"


# ----------------------------------------------------------------------------- products (A)
def _product_of_two_matmuls(W1: np.ndarray, W2: np.ndarray) -> onnx.ModelProto:
    """y = (x W1) * (x W2): a product of two variable tensors."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["a"]),
            helper.make_node("MatMul", ["x", "W2"], ["b"]),
            helper.make_node("Mul", ["a", "b"], ["y"]),
        ],
        "product",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", W1.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", W1.shape[1]])],
        [numpy_helper.from_array(W1.astype(np.float32), "W1"), numpy_helper.from_array(W2.astype(np.float32), "W2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(
    "scale_1, scale_2",
    [(100.0, 0.01), (1e-3, 1e3), (1.0, 1.0)],
    ids=["weights-100-and-0.01", "weights-0.001-and-1000", "balanced"],
)
def test_product_of_operands_of_different_scales_matches_onnxruntime(scale_1, scale_2):
    """Unbalanced operands lost ~log10(|a|/|b|) digits to the square identity's cancellation
    (float32: 7.6e-4 of |y|_inf, 100% on single elements, against onnxruntime's 1e-7)."""
    rng = np.random.default_rng(1)
    W1, W2 = rng.standard_normal((2, 8, 6))
    model = _product_of_two_matmuls(W1 * scale_1, W2 * scale_2)
    assert_matches_onnxruntime(model, batch=64)


def test_product_with_per_element_scales_matches_onnxruntime():
    """Each output column its own scale ratio (1e-4 ... 1e4): the balancing is per element."""
    rng = np.random.default_rng(2)
    column_scales = np.logspace(-2, 2, 6)
    W1 = rng.standard_normal((8, 6)) * column_scales
    W2 = rng.standard_normal((8, 6)) / column_scales
    assert_matches_onnxruntime(_product_of_two_matmuls(W1, W2), batch=64)


def _feedthrough(gain: float, p: int = 3) -> ic.ImplicitModel:
    """y = gain * u, no state."""
    return ic.ImplicitModel.from_matrices(np.zeros((0, 0)), np.zeros((0, p)), np.zeros((p, 0)), gain * np.eye(p))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_multiply_of_outputs_of_very_different_scales_is_exact(dtype):
    """multiply(1e8 u, 1e-8 u) = u^2: was 16 for u = 3 in float64."""
    product = ic.multiply(_feedthrough(1e8), _feedthrough(1e-8)).astype(dtype)
    u = np.array([[3.0, 1.0, 2.0], [-0.5, 7.0, 1e-3]])
    tolerance = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(product.predict(u.astype(dtype)), u**2, rtol=tolerance)


def test_multiply_with_hidden_states_of_different_scales_is_exact():
    """Operands with tanh states and feedthrough, outputs ~1e6 and ~1e-6: against numpy."""
    rng = np.random.default_rng(3)

    def operand(gain):
        """(model, numpy forward) with A strictly lower triangular."""
        A = np.tril(rng.normal(size=(5, 5)) * 0.5, k=-1)
        B, b = rng.normal(size=(5, 4)), rng.normal(size=5)
        C, D, c = gain * rng.normal(size=(4, 5)), gain * rng.normal(size=(4, 4)), gain * rng.normal(size=4)

        def forward(u):
            x = np.zeros((len(u), 5))
            for _ in range(5):  # nilpotent A: 5 sweeps reach the exact state
                x = np.tanh(x @ A.T + u @ B.T + b)
            return x @ C.T + u @ D.T + c

        return ic.ImplicitModel.from_matrices(A, B, C, D, activation="tanh", bias_x=b, bias_y=c), forward

    (first, forward_1), (second, forward_2) = operand(1e6), operand(1e-6)
    u = rng.normal(size=(50, 4))
    np.testing.assert_allclose(ic.multiply(first, second).predict(u), forward_1(u) * forward_2(u), rtol=1e-9)


# ----------------------------------------------------------------------------- output bounds (B)
@pytest.fixture(scope="module")
def lenet5_and_digits():
    sys.path.insert(0, str(ZOO))
    try:
        from data import load_digits_32x32
    finally:
        sys.path.remove(str(ZOO))
    _, _, images, _ = load_digits_32x32()
    return ic.from_onnx(ZOO / "lenet5.onnx"), images[:6].astype(np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sigma", [1e-13, 1e-6])
def test_output_bounds_hold_under_rounding(lenet5_and_digits, dtype, sigma):
    """Predictions of samples in the box, by every batch path (one sample, small batches, tiles),
    within the bounds: float32 at sigma 1e-13 was 6.4e-6 over a bound width of 4e-7."""
    model, images = lenet5_and_digits
    model = model.astype(dtype)
    report = sensitivity(model)
    rng = np.random.default_rng(4)
    for u0 in images:
        bounds = output_bounds(model, u0, sigma, sensitivity_report=report)
        for batch in (1, 2, 3, 5, 17, 300):
            u = u0 + rng.uniform(-sigma, sigma, size=(batch, *u0.shape))
            u[0] = u0
            y = model.predict(u.astype(dtype)).reshape(batch, -1)
            assert (y >= bounds.lower).all() and (y <= bounds.upper).all(), f"batch {batch}"


@pytest.mark.parametrize("dtype, slack", [(np.float32, 1e-3), (np.float64, 1e-9)])
def test_output_bounds_margin_is_negligible_for_a_normal_sigma(lenet5_and_digits, dtype, slack):
    """At sigma 0.01 the rounding margin widens the bounds by less than ``slack`` of 2 S sigma."""
    model, images = lenet5_and_digits
    model = model.astype(dtype)
    report = sensitivity(model)
    bounds = output_bounds(model, images, 0.01, sensitivity_report=report)
    width = 2 * report.matrix.sum(axis=1) * 0.01
    assert (bounds.upper - bounds.lower >= width).all()
    assert (bounds.upper - bounds.lower <= width * (1 + slack)).all()
