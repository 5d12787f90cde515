"""Issue 16, precision and conformance: products of operands of different scales, output bounds
under rounding, and onnx node tests that were refused or wrong."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import assert_matches_onnxruntime

import implicit_compiler as ic
from implicit_compiler.analysis.bounds import output_bounds, sensitivity

ZOO = Path(__file__).resolve().parents[1] / "zoo"


# ----------------------------------------------------------------------------- products (A)
def _product_of_two_matmuls(W1: np.ndarray, W2: np.ndarray, activations: tuple[str, str] = ()) -> onnx.ModelProto:
    """y = phi_1(x W1) * phi_2(x W2): a product of two variable tensors (no phi by default)."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("MatMul", ["x", "W2"], ["b"])]
    for operand, op_type in zip("ab", activations):
        nodes.append(helper.make_node(op_type, [operand], [f"{operand}_activated"]))
    operands = [f"{operand}_activated" if activations else operand for operand in "ab"]
    graph = helper.make_graph(
        [*nodes, helper.make_node("Mul", operands, ["y"])],
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


@pytest.mark.parametrize("activations", [("Relu", "Tanh"), ("Relu", "Identity")], ids=["relu*tanh", "relu*linear"])
def test_product_of_activations_of_operands_of_different_scales_matches_onnxruntime(activations):
    """relu(x W1) * tanh(x W2), weights ~100 and ~0.01: the operands' sizes are carried through
    the activations (a state's coefficient 1 says nothing of its size; was 6e-4 of |y|_inf)."""
    rng = np.random.default_rng(5)
    W1, W2 = rng.standard_normal((2, 8, 6))
    assert_matches_onnxruntime(_product_of_two_matmuls(W1 * 100, W2 * 0.01, activations), batch=64)


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
    """multiply(1e8 u, 1e-8 u) = u^2: was 16 for u = 3 in float64; float32 operands give a
    float32 product (was float64)."""
    product = ic.multiply(_feedthrough(1e8).astype(dtype), _feedthrough(1e-8).astype(dtype))
    assert product.dtype == dtype
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


# ----------------------------------------------------------------------------- onnx node tests (C)
PYTORCH_CONVERTED = Path(onnx.__file__).parent / "backend" / "test" / "data" / "pytorch-converted"


@pytest.fixture(scope="module")
def node_tests() -> dict:
    """onnx's node test cases by name (the models and data of onnx/backend/test/data/node,
    built by onnx's own generators: this onnx wheel ships the generators, not the files)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators' own overflow warnings (casts to float8...)
        return {case.name: case for case in collect_testcases(None) if case.model is not None}


def _node_test(node_tests: dict, name: str, constant_inputs: int = 0):
    """(model, first data set's inputs, expected outputs); the last ``constant_inputs`` graph
    inputs (weights fed as inputs by the test) become initializers with the test's values."""
    case = node_tests[name]
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    inputs, outputs = case.data_sets[0]
    inputs = [np.asarray(value) for value in inputs]
    if constant_inputs:
        graph = model.graph
        for value_info, value in zip(graph.input[-constant_inputs:], inputs[-constant_inputs:]):
            graph.initializer.append(numpy_helper.from_array(value, value_info.name))
        del graph.input[len(graph.input) - constant_inputs :]
        inputs = inputs[:-constant_inputs]
    return model, inputs, [np.asarray(value) for value in outputs]


def _assert_node_test_passes(model: onnx.ModelProto, inputs: list, outputs: list) -> None:
    """Our float64 and float32 predictions against the test's expected outputs, and the model
    against onnxruntime and onnx.reference on random inputs."""
    compiled = ic.from_onnx(model)
    for dtype, rtol in ((np.float64, 1e-6), (np.float32, 1e-4)):
        feed = inputs[0].astype(dtype) if len(inputs) == 1 else [value.astype(dtype) for value in inputs]
        predicted = compiled.astype(dtype).predict(feed)
        predicted = list(predicted.values()) if isinstance(predicted, dict) else [predicted]
        for ours, expected in zip(predicted, outputs):
            np.testing.assert_allclose(ours, expected, rtol=rtol, atol=1e-6 * max(1.0, np.abs(expected).max()))
    assert_matches_onnxruntime(model)


@pytest.mark.parametrize(
    "name",
    ["test_spacetodepth_expanded", "test_depthtospace_example_expanded", "test_depthtospace_crd_mode_example_expanded"],
)
def test_opset_28_models_of_ops_unchanged_since_25_compile(node_tests, name):
    """Opset 28 node tests whose ops (Reshape, Transpose, Shape, Slice...) did not change after
    opset 25: were refused as "opset 28 is newer than the newest supported (25)"."""
    model, inputs, outputs = _node_test(node_tests, name)
    assert model.opset_import[0].version == 28
    _assert_node_test_passes(model, inputs, outputs)


@pytest.mark.parametrize("opset", [26, 27, 28])
def test_models_of_opsets_26_to_28_compile(opset):
    text = f"""
        <ir_version: 10, opset_import: ["" : {opset}]>
        g (float[N, 6] x) => (float[N, 3] y)
        <float[6, 4] W = {{{", ".join(str(0.1 * v - 1) for v in range(24))}}}, float[4, 3] V = {{{", ".join(str(0.2 * v - 1) for v in range(12))}}}>
        {{ h = MatMul(x, W)
           r = Relu(h)
           t = Tanh(r)
           y = MatMul(t, V) }}
    """
    assert_matches_onnxruntime(onnx.parser.parse_model(text), batch=5)


def test_op_changed_after_the_newest_lowered_version_is_refused_by_name(node_tests, monkeypatch):
    """An op whose schema changed after the newest version lowered is refused, naming the op, the
    opset and the newest version lowered. Every op is lowered through the newest opset onnx
    defines today, so the future change is simulated: DepthToSpace's version 28 (a real schema)
    taken out of the registry, as if its lowerings stopped at version 13."""
    from implicit_compiler.frontend import registry

    monkeypatch.delitem(registry.REGISTRY, ("DepthToSpace", 28))
    model, _, _ = _node_test(node_tests, "test_depthtospace_example")
    with pytest.raises(
        ic.UnsupportedOpError, match=r"DepthToSpace, opset 28\).*DepthToSpace changed in opset 28.*\(13\)"
    ):
        ic.from_onnx(model)


@pytest.mark.parametrize("name", ["test_size", "test_size_example"])
def test_size_of_a_value_of_static_shape_is_a_constant(node_tests, name):
    _assert_node_test_passes(*_node_test(node_tests, name))


def test_size_of_a_sample_of_static_shape_is_a_constant():
    """A declared batch of 1 (the model is defined for one sample): Size is that sample's."""
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 3, 4] x) => (float[1, 3, 4] y) {
            s = Size(x)
            f = Cast <to = 1> (s)
            y = Div(x, f)
        }
    """
    assert_matches_onnxruntime(onnx.parser.parse_model(text), batch=3)


def test_conv_transpose_output_shape_larger_than_the_full_size(node_tests):
    """output_shape [10, 8] of a full [9, 7]: the extra row and column are output padding."""
    _assert_node_test_passes(*_node_test(node_tests, "test_convtranspose_output_shape", constant_inputs=1))


def _conv_transpose(output_shape: str, auto_pad: str = "NOTSET") -> onnx.ModelProto:
    weights = ", ".join(str(0.1 * v - 0.7) for v in range(18))
    return onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 1, 3, 3] x) => (float[N, 2, {output_shape}] y)
        <float[1, 2, 3, 3] W = {{{weights}}}, float[2] B = {{0.5, -1.0}}>
        {{ y = ConvTranspose <strides = [3, 2], output_shape = [{output_shape}], auto_pad = "{auto_pad}"> (x, W, B) }}
    """)  # fmt: skip


@pytest.mark.parametrize("output_shape", ["10, 8", "11, 7", "9, 8"])
def test_conv_transpose_output_shape_excess_with_bias_matches_onnxruntime(output_shape):
    assert_matches_onnxruntime(_conv_transpose(output_shape), batch=3)


def test_conv_transpose_output_shape_excess_of_a_stride_is_refused():
    with pytest.raises(ic.GraphError, match=r"output_shape \[12, 9\] exceeds the full transposed convolution \[9, 7\]"):
        ic.from_onnx(_conv_transpose("12, 9"))


def test_conv_transpose_output_shape_excess_with_same_padding_is_refused():
    """onnxruntime and onnx.reference place the extra rows differently there."""
    with pytest.raises(ic.UnsupportedAttributeError, match="auto_pad='SAME_UPPER'"):
        ic.from_onnx(_conv_transpose("10, 8", "SAME_UPPER"))


@pytest.mark.parametrize("name", ["test_PReLU_1d_multiparam", "test_PReLU_2d_multiparam", "test_PReLU_3d_multiparam"])
def test_prelu_opset_6_slope_per_channel(name):
    """pytorch's PReLU(num_parameters=3) at opset 6: a slope of shape (3,) for input (2, 3, ...)
    is per channel (was refused as not broadcasting). Against the test's expected outputs, and
    onnxruntime (which has no PRelu-6) on the same model at opset 7 with the slope (3, 1, ...)."""
    folder = PYTORCH_CONVERTED / name
    model = onnx.load(folder / "model.onnx")
    assert model.opset_import[0].version == 6
    x = numpy_helper.to_array(onnx.load_tensor(folder / "test_data_set_0" / "input_0.pb"))
    expected = numpy_helper.to_array(onnx.load_tensor(folder / "test_data_set_0" / "output_0.pb"))
    compiled = ic.from_onnx(model)
    np.testing.assert_allclose(compiled.predict(x.astype(np.float64)), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(compiled.astype(np.float32).predict(x), expected, rtol=1e-5, atol=1e-6)
    slope = numpy_helper.to_array(model.graph.initializer[0]).reshape(-1, *[1] * (x.ndim - 2))
    graph = helper.make_graph(
        [helper.make_node("PRelu", ["x", "slope"], ["y"])],
        "prelu7",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)],
        [numpy_helper.from_array(slope, "slope")],
    )
    opset_7 = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=8)
    session = onnxruntime.InferenceSession(opset_7.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-6, atol=1e-7)


def test_multiply_weighs_the_states_by_their_sizes_float32():
    """y_1 = C relu(1e4 B u) (C ~ 1, states ~1e4) times y_2 = 1e-4 D u: the rows of C alone say
    y_1 ~ 1; the states' sizes say ~1e4. Float32 against the exact float64 product."""
    rng = np.random.default_rng(6)
    B, C, D = rng.normal(size=(6, 4)), rng.normal(size=(3, 6)), rng.normal(size=(3, 4))
    first = ic.ImplicitModel.from_matrices(np.zeros((6, 6)), 1e4 * B, C, np.zeros((3, 4)), activation="relu")
    second = ic.ImplicitModel.from_matrices(np.zeros((0, 0)), np.zeros((0, 4)), np.zeros((3, 0)), 1e-4 * D)
    u = rng.normal(size=(200, 4))
    expected = (np.maximum(1e4 * u @ B.T, 0) @ C.T) * (1e-4 * u @ D.T)
    product = ic.multiply(first.astype(np.float32), second.astype(np.float32))
    ours = product.predict(u.astype(np.float32))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
