"""Transposed and grouped convolutions as structured terms (issue 20): ConvTranspose kept as a
``TransposedConvolution`` (the adjoint of a convolution, its kernel and geometry), and grouped
or depthwise Conv / ConvTranspose as one term of ``groups`` groups.

Each model is compiled with ``structure="kernels"`` and ``structure="csr"``: the materialized
kernels model must equal the CSR lowering bitwise (the same float64 entries, rounded once), its
products (matvec, rmatvec) must match the CSR's, and onnxruntime (float32) and onnx.reference
(float64) check the predictions independently (onnx.reference refuses grouped ConvTranspose and
some output_shape: there float64 is checked against the CSR model, itself checked by
onnxruntime). With the
memory left patched to one byte, any read of model.A-D of the structured model raises: predict,
save/load, spy and the sensitivity must run on the kernels."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import scipy.sparse as sp
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import assert_matches_onnxruntime, float_value
from test_frontend_structured import _assert_auto_equals_csr, _assert_same_csr, _output, _weight, make_model

import implicit_compiler as ic
from implicit_compiler import model as model_module
from implicit_compiler.analysis import sensitivity
from implicit_compiler.errors import ModelFileError, ModelTooLargeError
from implicit_compiler.frontend import estimate
from implicit_compiler.frontend.graph import prepare
from implicit_compiler.structure import Convolution, StructuredMatrix, Term, TransposedConvolution
from implicit_compiler.viz import spy_pattern


@pytest.fixture
def no_materializing(monkeypatch):
    """Any read of a structured model's A-D (a CSR built from its terms) raises."""
    monkeypatch.setattr(model_module, "available_memory_bytes", lambda: 1.0)


def _ops(model: ic.ImplicitModel, kind) -> list:
    return [term.op for name in "ABCD" for term in getattr(model.structure, name).terms if isinstance(term.op, kind)]


def _conv_transpose_model(spatial: int, group: int, attributes: dict, seed: int = 0) -> onnx.ModelProto:
    """Relu -> ConvTranspose (4 input channels per group, 3 output ones, bias) -> Relu."""
    rng = np.random.default_rng(seed)
    channels = 4 * group
    size, kernel = ([7, 6], [3, 3]) if spatial == 2 else ([64], [4])
    weights = [_weight(rng, "W", [channels, 3, *kernel]), _weight(rng, "B", [3 * group])]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("ConvTranspose", ["r", "W", "B"], ["c"], group=group, **attributes),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    return make_model(nodes, [float_value("x", ["N", channels, *size])], [_output("y")], weights)


CONV_TRANSPOSE_CASES = {
    "plain": (2, 1, {}),
    "stride 2": (2, 1, {"strides": [2, 2]}),
    "stride 3 2 pads output_padding": (2, 1, {"strides": [3, 2], "pads": [1, 0, 2, 1], "output_padding": [2, 1]}),
    "dilation pads": (2, 1, {"dilations": [2, 3], "pads": [1, 2, 0, 1]}),
    "output_shape": (2, 1, {"strides": [2, 2], "output_shape": [14, 13]}),
    "output_shape beyond the full size": (2, 1, {"strides": [2, 2], "output_shape": [16, 14]}),
    "same_upper": (2, 1, {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "same_lower": (2, 1, {"strides": [2, 3], "auto_pad": "SAME_LOWER"}),
    "groups 2": (2, 2, {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "groups 3 dilation": (2, 3, {"dilations": [2, 2], "output_padding": [1, 0], "strides": [2, 1]}),
    "1-D": (1, 1, {"strides": [2], "pads": [1, 2]}),
    "1-D stride 3 groups 2": (1, 2, {"strides": [3], "output_padding": [2], "dilations": [2]}),
}


@pytest.mark.parametrize("case", CONV_TRANSPOSE_CASES.values(), ids=CONV_TRANSPOSE_CASES.keys())
def test_conv_transpose_is_one_term_equal_to_the_csr_lowering(case):
    spatial, group, attributes = case
    model = _conv_transpose_model(spatial, group, attributes)
    structured = _assert_auto_equals_csr(model)  # float32 and float64, bitwise
    (op,) = _ops(structured, TransposedConvolution)
    assert op.groups == group and not structured.structure.A.remainder.nnz
    assert structured.structure.A.nnz == ic.from_onnx(model, structure="csr").A.nnz
    reference = group == 1 and "output_shape" not in attributes  # (where onnx.reference runs)
    assert_matches_onnxruntime(model, structure="kernels", check_reference=reference)
    if not reference:  # float64 against the CSR model (onnxruntime checked it in float32 above)
        u = np.random.default_rng(1).uniform(-1, 1, (3, *structured.inputs[0].shape))
        expected = ic.from_onnx(model, structure="csr").predict(u)
        np.testing.assert_allclose(structured.predict(u), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_products_of_a_conv_transpose_model_match_the_csr(dtype):
    """matvec and rmatvec of A (the transposed convolution, BN folded into it) and of each row
    chunk's CSR, against the CSR lowering's A; float32 stays float32."""
    rng = np.random.default_rng(4)
    weights = [_weight(rng, "W", [6, 5, 4, 4])]
    gamma, beta = (numpy_helper.from_array(rng.uniform(0.5, 2, 5).astype(np.float32), n) for n in ("g", "b"))
    mean, var = (numpy_helper.from_array(rng.uniform(0.5, 2, 5).astype(np.float32), n) for n in ("m", "v"))
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("ConvTranspose", ["r", "W"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"]),
        helper.make_node("Relu", ["n"], ["y"]),
    ]
    model = make_model(nodes, [float_value("x", ["N", 6, 8, 8])], [_output("y")], [*weights, gamma, beta, mean, var])
    structured = _assert_auto_equals_csr(model).astype(dtype)
    plain = ic.from_onnx(model, dtype=dtype, structure="csr")
    A = structured.structure.A
    assert len(_ops(structured, TransposedConvolution)) == 1
    X = rng.standard_normal((A.shape[1], 3)).astype(dtype)
    Y = rng.standard_normal((A.shape[0], 3)).astype(dtype)
    tolerance = 1e-4 if dtype == np.float32 else 1e-12
    product = A.matvec(X)
    assert product.dtype == dtype
    np.testing.assert_allclose(product, plain.A @ X, atol=tolerance * np.abs(product).max())
    np.testing.assert_allclose(A.rmatvec(Y), plain.A.T @ Y, atol=tolerance * np.abs(plain.A.T @ Y).max())
    np.testing.assert_array_equal(A.row_nnz(), np.diff(plain.A.indptr))
    _assert_same_csr(A.abs().to_csr(), abs(plain.A))
    for rows, chunk in A.row_chunks(500):
        _assert_same_csr(chunk, sp.csr_array(plain.A[rows]))


def _random_convolution(rng, groups: int) -> Convolution:
    C, Co = 2 * groups, 3 * groups
    return Convolution(
        source=slice(0, C * 7 * 6),
        in_shape=(C, 7, 6),
        out_shape=(Co, 3, 2),
        kernel=(3, 2),
        stride=(2, 3),
        dilation=(2, 1),
        pads=(1, 1),
        weight=np.where(rng.random((Co, 2 * 6)) < 0.2, 0.0, rng.standard_normal((Co, 2 * 6))),
        groups=groups,
    )


@pytest.mark.parametrize("groups", [1, 3])
def test_a_transposed_term_is_the_transpose_of_its_convolution(groups):
    """to_csr, nnz, row_nnz and the products of M^T, against scipy's transpose of M's CSR (M a
    random convolution with zero taps, strides, dilations and pads), any run of rows included."""
    rng = np.random.default_rng(groups)
    M = _random_convolution(rng, groups)
    rows, columns = M.out_shape[0] * 6, M.in_shape[0] * 42
    forward = StructuredMatrix((rows, columns), (Term(slice(0, rows), M),), sp.csr_array((rows, columns)))
    transposed_op = TransposedConvolution(
        slice(2, 2 + rows), M.out_shape, M.in_shape, M.kernel, M.stride, M.dilation, M.pads, M.weight, groups
    )
    shape = (columns + 1, rows + 2)  # a row above it, two columns before
    transposed = StructuredMatrix(shape, (Term(slice(1, 1 + columns), transposed_op),), sp.csr_array(shape))
    expected = sp.csr_array(sp.bmat([[sp.csr_array((1, 2)), sp.csr_array((1, rows))], [None, forward.to_csr().T]]))
    _assert_same_csr(transposed.to_csr(), expected)
    assert transposed.nnz == forward.nnz == expected.nnz
    np.testing.assert_array_equal(transposed.row_nnz(), np.diff(expected.indptr))
    for first, last in [(0, 5), (7, 50), (41, 43), (60, columns + 1)]:
        _assert_same_csr(transposed.to_csr(slice(first, last)), sp.csr_array(expected[first:last]))
    X = rng.standard_normal((shape[1], 4))
    np.testing.assert_allclose(transposed.matvec(X), expected @ X, rtol=0, atol=1e-12)
    Y = rng.standard_normal((shape[0], 4))
    np.testing.assert_allclose(transposed.rmatvec(Y), expected.T @ Y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(forward.rmatvec(X[2:]), forward.to_csr().T @ X[2:], rtol=0, atol=1e-12)
    out = np.full((columns, 4), np.nan, dtype=np.float32)
    assert transposed_op.apply(X[2:].astype(np.float32), out=out) is out
    np.testing.assert_allclose(out, (expected @ X.astype(np.float32))[1:], rtol=0, atol=1e-5)


def _generator() -> onnx.ModelProto:
    """A DCGAN-style generator: z (16) -> Gemm (64 x 4 x 4) -> Relu -> ConvTranspose 4x4 stride 2
    (32, 16, 8 channels) with BatchNormalization and Relu -> ConvTranspose to 3 channels -> Tanh,
    64 x 64 out."""
    rng = np.random.default_rng(7)
    weights = [numpy_helper.from_array(rng.normal(0, 0.3, (16, 64 * 16)).astype(np.float32), "L")]
    nodes = [
        helper.make_node("Gemm", ["z", "L"], ["g"]),
        helper.make_node("Reshape", ["g", "shape"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["r0"]),
    ]
    weights.append(numpy_helper.from_array(np.array([1, 64, 4, 4], dtype=np.int64), "shape"))
    channels = [64, 32, 16, 8, 3]
    for index, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
        fan = c_in * 16
        weights.append(numpy_helper.from_array(rng.normal(0, 2 / np.sqrt(fan), (c_in, c_out, 4, 4)).astype(np.float32), f"W{index}"))  # fmt: skip
        attributes = dict(strides=[2, 2], pads=[1, 1, 1, 1], kernel_shape=[4, 4])
        nodes.append(helper.make_node("ConvTranspose", [f"r{index}", f"W{index}"], [f"c{index}"], **attributes))
        if c_out == 3:
            nodes.append(helper.make_node("Tanh", [f"c{index}"], ["y"]))
            break
        for suffix, values in (("g", rng.uniform(0.5, 1.5, c_out)), ("b", rng.normal(0, 0.1, c_out))):
            weights.append(numpy_helper.from_array(values.astype(np.float32), f"bn{index}.{suffix}"))
        for suffix, values in (("m", rng.normal(0, 0.1, c_out)), ("v", rng.uniform(0.5, 1.5, c_out))):
            weights.append(numpy_helper.from_array(values.astype(np.float32), f"bn{index}.{suffix}"))
        bn = [f"c{index}", *(f"bn{index}.{s}" for s in "gbmv")]
        nodes.append(helper.make_node("BatchNormalization", bn, [f"n{index}"]))
        nodes.append(helper.make_node("Relu", [f"n{index}"], [f"r{index + 1}"]))
    graph = helper.make_graph(
        nodes,
        "generator",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 64, 64])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_dcgan_generator_runs_from_its_kernels(tmp_path, monkeypatch):
    """The generator compiled with kernels: four transposed convolutions, no CSR rows in A, the
    predictions against onnxruntime and onnx.reference; then, with materializing refused, a
    prediction, a save / load round trip (bitwise), the spy image and the sensitivity equal
    those of the CSR model (predict and solve in float64, a batch of 20 in float32)."""
    model = _generator()
    structured = assert_matches_onnxruntime(model, structure="kernels", batch=2)
    plain = ic.from_onnx(model, structure="csr")
    assert len(_ops(structured, TransposedConvolution)) == 4 and structured.structure.A.remainder.nnz == 0
    u = np.random.default_rng(2).standard_normal((2, 16))
    expected, expected_x = plain.predict(u), plain.solve(u).x
    many = np.random.default_rng(3).standard_normal((20, 16)).astype(np.float32)  # (the batches tiles would take)
    expected_many = plain.astype(np.float32).predict(many)
    path = tmp_path / "generator.npz"
    spy = spy_pattern(plain, whole=True, resolution=300)
    small = ic.from_onnx(_conv_transpose_model(2, 2, {"strides": [2, 2]}), structure="kernels")
    small_plain = ic.from_onnx(_conv_transpose_model(2, 2, {"strides": [2, 2]}), structure="csr")
    expected_sensitivity = sensitivity(small_plain).matrix
    monkeypatch.setattr(model_module, "available_memory_bytes", lambda: 1.0)
    with pytest.raises(ModelTooLargeError):
        structured.A  # noqa: B018 (the guard works)
    np.testing.assert_allclose(structured.predict(u), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(structured.solve(u).x, expected_x, rtol=1e-12, atol=1e-12)
    got_many = structured.astype(np.float32).predict(many)
    assert got_many.dtype == np.float32
    np.testing.assert_allclose(got_many, expected_many, rtol=0, atol=2e-5 * np.abs(expected_many).max())
    structured.save(path)
    loaded = ic.load(path)
    for name in "ABCD":
        saved, read = getattr(structured.structure, name), getattr(loaded.structure, name)
        assert [term.rows for term in saved.terms] == [term.rows for term in read.terms]
        for first, second in zip(saved.terms, read.terms):
            assert type(first.op) is type(second.op) and np.array_equal(first.op.weight, second.op.weight)
            fields = ("source", "in_shape", "out_shape", "kernel", "stride", "dilation", "pads", "groups")
            assert [getattr(first.op, f, None) for f in fields] == [getattr(second.op, f, None) for f in fields]
    np.testing.assert_array_equal(loaded.predict(u), structured.predict(u))
    np.testing.assert_array_equal(spy_pattern(structured, whole=True, resolution=300), spy)
    np.testing.assert_allclose(sensitivity(small).matrix, expected_sensitivity, rtol=1e-12)
    for loaded_model in (structured, loaded, small):
        assert not [key for key in loaded_model._cache if isinstance(key, tuple) and key[0] == "csr"]


# ----------------------------------------------------------------------------- grouped and depthwise
def _grouped_conv_model(channels: int, group: int, attributes: dict, seed: int = 0) -> onnx.ModelProto:
    """Relu -> Conv (3 x 3, ``group`` groups, 2 output channels per input channel, bias) -> Relu."""
    rng = np.random.default_rng(seed)
    weights = [_weight(rng, "W", [2 * channels, channels // group, 3, 3]), _weight(rng, "B", [2 * channels])]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Conv", ["r", "W", "B"], ["c"], group=group, **attributes),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    return make_model(nodes, [float_value("x", ["N", channels, 12, 11])], [_output("y")], weights)


GROUPED_CASES = {
    "groups 2": (8, 2, {"pads": [1, 1, 1, 1]}),
    "groups 4 stride": (8, 4, {"strides": [2, 2], "pads": [1, 0, 1, 2]}),
    "groups 4 dilation": (8, 4, {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    "depthwise": (16, 16, {"pads": [1, 1, 1, 1]}),
    "depthwise stride 2": (16, 16, {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "depthwise dilation stride 3": (16, 16, {"strides": [3, 2], "dilations": [2, 1]}),
}


@pytest.mark.parametrize("case", GROUPED_CASES.values(), ids=GROUPED_CASES.keys())
def test_grouped_and_depthwise_conv_is_one_term_equal_to_the_csr_lowering(case):
    channels, group, attributes = case
    model = _grouped_conv_model(channels, group, attributes)
    structured = _assert_auto_equals_csr(model)
    (op,) = _ops(structured, Convolution)
    assert op.groups == group and op.weight.shape == (2 * channels, channels // group * 9)
    assert not structured.structure.A.remainder.nnz
    assert_matches_onnxruntime(model, structure="kernels")  # (and onnx.reference in float64)
    plain = ic.from_onnx(model, structure="csr")
    A, rng = structured.structure.A, np.random.default_rng(3)
    X, Y = rng.standard_normal((A.shape[1], 2)), rng.standard_normal((A.shape[0], 2))
    np.testing.assert_allclose(A.matvec(X), plain.A @ X, rtol=0, atol=1e-12 * np.abs(plain.A @ X).max())
    np.testing.assert_allclose(A.rmatvec(Y), plain.A.T @ Y, rtol=0, atol=1e-12 * np.abs(plain.A.T @ Y).max())
    np.testing.assert_array_equal(A.row_nnz(), np.diff(plain.A.indptr))
    assert A.nnz == plain.A.nnz
    _assert_same_csr(A.abs().to_csr(), abs(plain.A))
    np.testing.assert_array_equal(spy_pattern(structured, resolution=97), spy_pattern(plain, resolution=97))


@pytest.mark.parametrize("transposed", [False, True], ids=["Conv", "ConvTranspose"])
def test_a_concat_ending_inside_a_group_gives_that_part_its_own_term(transposed):
    """Operands of 5 and 3 channels concatenated (in the other order than their states: two
    runs), then 4 groups of 2 channels: operand one is groups 0-1 whole and part of group 2,
    operand two the rest of group 2 and group 3 whole: terms of 2, 1, 1 and 1 groups, equal to
    the CSR lowering bitwise."""
    rng = np.random.default_rng(5)
    shape = [8, 4, 3, 3] if transposed else [8, 2, 3, 3]
    nodes = [
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Relu", ["b"], ["rb"]),
        helper.make_node("Concat", ["rb", "ra"], ["r"], axis=1),
        helper.make_node("ConvTranspose" if transposed else "Conv", ["r", "W"], ["c"], group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    inputs = [float_value("a", ["N", 3, 10, 10]), float_value("b", ["N", 5, 10, 10])]
    model = make_model(nodes, inputs, [_output("y")], [_weight(rng, "W", shape)])
    structured = _assert_auto_equals_csr(model)
    ops = _ops(structured, TransposedConvolution if transposed else Convolution)
    assert sorted(op.groups for op in ops) == [1, 1, 1, 2] and not structured.structure.A.remainder.nnz
    assert_matches_onnxruntime(model, structure="kernels", check_reference=not transposed)


def _mobilenet_block() -> onnx.ModelProto:
    """A MobileNet-v2 block and a ShuffleNet-style grouped 1 x 1 convolution: Conv 3x3 stride 2
    -> BN -> Relu, expand 1 x 1 -> BN -> Clip(0, 6), depthwise 3 x 3 -> BN -> Clip, project
    1 x 1 -> BN, + the block's input, grouped 1 x 1 (4 groups) -> Relu, global pool, Gemm."""
    rng = np.random.default_rng(11)
    weights, nodes = [], []

    def conv(x, out, shape, group=1, **attributes):
        name = f"w{len(weights)}"
        weights.append(numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(np.prod(shape[1:])), shape).astype(np.float32), name))  # fmt: skip
        nodes.append(helper.make_node("Conv", [x, name], [f"{out}.c"], group=group, **attributes))
        bn = [f"{out}.{s}" for s in "gbmv"]
        for name, values in zip(bn, (rng.uniform(0.5, 1.5, shape[0]), rng.normal(0, 0.1, shape[0]),
                                     rng.normal(0, 0.1, shape[0]), rng.uniform(0.5, 1.5, shape[0]))):  # fmt: skip
            weights.append(numpy_helper.from_array(values.astype(np.float32), name))
        nodes.append(helper.make_node("BatchNormalization", [f"{out}.c", *bn], [out]))

    six = [numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(np.float32(6), "six")]
    conv("x", "stem", [16, 3, 3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    nodes.append(helper.make_node("Relu", ["stem"], ["s"]))
    conv("s", "expand", [64, 16, 1, 1])
    nodes.append(helper.make_node("Clip", ["expand", "zero", "six"], ["e"]))
    conv("e", "depthwise", [64, 1, 3, 3], group=64, pads=[1, 1, 1, 1])
    nodes.append(helper.make_node("Clip", ["depthwise", "zero", "six"], ["d"]))
    conv("d", "project", [16, 64, 1, 1])
    nodes.append(helper.make_node("Add", ["project", "s"], ["sum"]))
    conv("sum", "shuffle", [32, 4, 1, 1], group=4)
    nodes.append(helper.make_node("Relu", ["shuffle"], ["h"]))
    nodes.append(helper.make_node("GlobalAveragePool", ["h"], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"]))
    weights.append(numpy_helper.from_array(rng.normal(0, 0.2, (32, 10)).astype(np.float32), "fc"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc"], ["y"]))
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], weights + six,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_mobilenet_block_compiles_to_kernels_and_round_trips(tmp_path, monkeypatch):
    """Every convolution terms (the depthwise one of 64 groups, the grouped 1 x 1 of 4), the
    predictions against onnxruntime and onnx.reference; saved and loaded without materializing,
    bitwise."""
    model = _mobilenet_block()
    structured = assert_matches_onnxruntime(model, structure="kernels", batch=3)
    groups = sorted(op.groups for op in _ops(structured, Convolution))
    assert groups == [1, 1, 1, 1, 4, 64, 64], groups  # (each Clip stores its convolution twice: two relus)
    path = tmp_path / "block.npz"
    monkeypatch.setattr(model_module, "available_memory_bytes", lambda: 1.0)
    structured.save(path)
    loaded = ic.load(path)
    u = np.random.default_rng(0).standard_normal((2, 3, 32, 32))
    np.testing.assert_array_equal(loaded.predict(u), structured.predict(u))
    assert sorted(op.groups for op in _ops(loaded, Convolution)) == groups


def _edited(source, path, edit):
    with np.load(source) as archive:
        arrays = dict(archive)
    metadata = json.loads(arrays.pop("metadata").tobytes())
    edit(metadata)
    arrays["metadata"] = np.frombuffer(json.dumps(metadata).encode("utf-8"), dtype=np.uint8)
    np.savez(path, **arrays)
    return path


def _grouped_term(metadata) -> dict:
    return next(term for term in metadata["terms"]["A"] if "groups" in term)


@pytest.mark.parametrize(
    "groups,message",
    [(0, "groups 0 must be >= 1"), (3, "groups 3 must be >= 1 and divide"), ("2", "groups must be an integer"),
     (True, "groups must be an integer"), (4, "needs"), (None, "needs")],
)  # fmt: skip
def test_bad_groups_in_a_file_are_refused(tmp_path, groups, message):
    """A grouped term's groups field edited (None: removed, so one group, as in older files):
    ModelFileError naming the fault; a term of one group writes no groups field."""
    model = ic.from_onnx(_grouped_conv_model(8, 2, {}), structure="kernels")
    saved = tmp_path / "grouped.npz"
    model.save(saved)
    with np.load(saved) as archive:
        metadata = json.loads(archive["metadata"].tobytes())
    assert [term.get("groups") for term in metadata["terms"]["A"]] == [2]
    assert all("groups" not in term for term in metadata["terms"]["B"])

    def edit(metadata):
        term = _grouped_term(metadata)
        if groups is None:
            del term["groups"]
        else:
            term["groups"] = groups

    with pytest.raises(ModelFileError, match=message):
        ic.load(_edited(saved, tmp_path / "edited.npz", edit))


@pytest.mark.parametrize("op_type", ["ConvTranspose", "Conv"])
def test_structured_estimate_counts_the_kernels_of_any_group_count(op_type):
    """A ConvTranspose, or a depthwise Conv, reading the input adds its weights (its terms),
    the states and outputs 1 each: the count the lowering stores."""
    rng = np.random.default_rng(6)
    shape = [8, 2, 4, 4] if op_type == "ConvTranspose" else [8, 1, 3, 3]
    attributes = {"strides": [2, 2], "pads": [1, 1, 1, 1]} if op_type == "ConvTranspose" else {"group": 8}
    nodes = [helper.make_node(op_type, ["x", "W"], ["c"], **attributes), helper.make_node("Relu", ["c"], ["y"])]
    model = make_model(nodes, [float_value("x", [1, 8, 32, 32])], [_output("y")], [_weight(rng, "W", shape)])
    compiled = ic.from_onnx(model, structure="kernels")
    states = compiled.n
    assert len(compiled.structure.B.terms) == 1 and compiled.structure.B.remainder.nnz == 0
    assert estimate.estimate_nonzeros(prepare(model), structured=True) == np.prod(shape) + states + states
