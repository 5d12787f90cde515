"""Structured matrices (issue 20, step 1): convolution and dense terms plus a sparse remainder,
checked against the model's own CSR matrices (to_csr, products, |M|, non-zero counts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from onnx import TensorProto, helper, numpy_helper

import implicit_compiler as ic
from implicit_compiler.runtime.structured import Convolution, Dense
from implicit_compiler.structure import StructuredMatrix, convolution_transposed, lift

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rng():
    return np.random.default_rng(20)


def conv_net(rng, stride, pads, dilation, size=14) -> ic.ImplicitModel:
    """u (1, 3, size, size) -> Conv 3x3 (8 channels) -> Relu -> Conv 3x3 (6) -> Relu -> Flatten -> Gemm (5)."""
    first = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    second = rng.normal(size=(6, 8, 3, 3)).astype(np.float32)
    attributes = dict(kernel_shape=[3, 3], strides=[stride] * 2, pads=[pads] * 4, dilations=[dilation] * 2)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], **attributes),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "L"], ["y"], transB=1),
    ]
    extent = dilation * 2 + 1
    out = (size + 2 * pads - extent) // stride + 1
    last = rng.normal(size=(5, 6 * out * out)).astype(np.float32)
    graph = helper.make_graph(
        nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [numpy_helper.from_array(first, "W1"), numpy_helper.from_array(second, "W2"), numpy_helper.from_array(last, "L")],
    )  # fmt: skip
    return ic.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), dtype=np.float64)


def models(rng):
    yield "lenet5", ic.from_onnx(ROOT / "zoo" / "lenet5.onnx", dtype=np.float64)
    for stride, pads, dilation in [(1, 0, 1), (2, 1, 1), (1, 2, 2), (3, 0, 1)]:
        yield f"conv s{stride} p{pads} d{dilation}", conv_net(rng, stride, pads, dilation)


def assert_same_matrix(structured: StructuredMatrix, matrix) -> None:
    csr, expected = structured.to_csr(), sp.csr_array(matrix)
    csr.sum_duplicates()
    expected.sum_duplicates()
    assert csr.shape == expected.shape and structured.nnz == expected.nnz == csr.nnz
    difference = abs(csr - expected)
    assert difference.max() <= 1e-12 * abs(expected).max()  # (kernels are read from the CSR to a few ulps)
    assert ((csr != 0) != (expected != 0)).nnz == 0  # the same pattern


def test_lift_keeps_the_matrices_and_finds_their_structure(rng):
    for name, model in models(rng):
        B, A = lift(model)
        assert_same_matrix(B, model.B)
        assert_same_matrix(A, model.A)
        assert B.terms and all(isinstance(term.op, Convolution) for term in B.terms), name
        assert A.terms, name
        kept = B.remainder.nnz + A.remainder.nnz
        assert kept < 0.1 * (model.A.nnz + model.B.nnz), f"{name}: {kept} non-zeros left to the remainder"
    lenet_B, lenet_A = lift(ic.from_onnx(ROOT / "zoo" / "lenet5.onnx", dtype=np.float64))
    assert any(isinstance(term.op, Dense) for term in lenet_A.terms)  # the fully connected layers
    assert sum(term.op.weight.size for term in lenet_B.terms) == 150  # 6 kernels of 5x5, not 117,600 entries


def test_products_and_absolute_values_equal_the_csr_ones(rng):
    for name, model in models(rng):
        for structured, matrix in zip(lift(model), (model.B, model.A)):
            X = rng.normal(size=(matrix.shape[1], 3))
            Y = rng.normal(size=(matrix.shape[0], 4))
            np.testing.assert_allclose(structured.matvec(X), matrix @ X, rtol=1e-11, atol=1e-11, err_msg=name)
            np.testing.assert_allclose(structured.rmatvec(Y), matrix.T @ Y, rtol=1e-11, atol=1e-11, err_msg=name)
            assert_same_matrix(structured.abs(), abs(matrix))


@pytest.mark.parametrize("segment", [1, 3, 7])
def test_the_transposed_convolution_skips_zero_segments_exactly(segment, rng):
    """Segments of ``segment`` columns that are zero at a position are skipped: the product is
    the same as the CSR's transpose whatever the zeros."""
    model = conv_net(rng, 2, 1, 1)
    B, _ = lift(model)
    (term,) = B.terms
    T = rng.normal(size=(term.rows.stop - term.rows.start, 21))
    T[rng.uniform(size=T.shape) < 0.7] = 0.0
    T[:, :segment] = 0.0  # a whole first segment zero everywhere
    expected = model.B[term.rows].T @ T
    np.testing.assert_allclose(convolution_transposed(term.op, T, segment), expected, rtol=1e-12, atol=1e-12)
