"""Bad input to the frontend gets a typed error naming the node, op, opset and a remedy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import MLP_TEXT, assert_matches_onnxruntime, parse

import implicit_compiler as ic
from implicit_compiler.frontend.estimate import estimate_nonzeros
from implicit_compiler.frontend.graph import prepare


def test_truncated_file_raises_model_file_error(tmp_path):
    path = tmp_path / "model.onnx"
    data = parse(MLP_TEXT).SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ic.ModelFileError, match="truncated, corrupted or not an ONNX model"):
        ic.from_onnx(path)


def test_foreign_file_raises_model_file_error(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a protobuf at all, just words " * 20)
    with pytest.raises(ic.ModelFileError):
        ic.from_onnx(path)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        ic.from_onnx(tmp_path / "missing.onnx")


def test_unsupported_op_names_node_op_opset_and_alternatives():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) { y = Hardmax <axis = 1> (x) }
        """
    )
    with pytest.raises(
        ic.UnsupportedOpError, match=r"node 'Hardmax_0' \(Hardmax, opset 17\).*no lowering.*supported ops: "
    ):
        ic.from_onnx(model)


def test_unsupported_attribute_is_refused_not_ignored():
    model = onnx.parser.parse_model(  # not checked: the checker would refuse the attribute itself
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) { y = Relu <bogus = 3> (x) }
        """
    )
    with pytest.raises(ic.UnsupportedAttributeError, match=r"\(Relu, opset 17\): attribute bogus=3 is not supported"):
        ic.from_onnx(model)


def test_custom_domain_is_refused():
    node = helper.make_node("FancyOp", ["x"], ["y"], domain="com.example", name="fancy")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    with pytest.raises(ic.UnsupportedOpError, match="domain 'com.example' are not supported"):
        ic.from_onnx(model)


def test_dynamic_spatial_dimension_needs_input_shapes():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, H, W] x) => (float[N, 3, H, W] y) { y = Relu(x) }
        """
    )
    with pytest.raises(
        ic.GraphError, match=r"dynamic dimension 'H' at axis 2.*input_shapes=\{'x': \(None, 3, 8, 8\)\}"
    ):
        ic.from_onnx(model)
    compiled = assert_matches_onnxruntime(model, input_shapes={"x": (None, 3, 5, 6)})
    assert compiled.inputs[0].shape == (3, 5, 6)
    with pytest.raises(ic.ShapeError, match="axis 1 to 4, but the model fixes it at 3"):
        ic.from_onnx(model, input_shapes={"x": (None, 4, 5, 6)})
    with pytest.raises(ic.GraphError, match="not runtime inputs"):
        ic.from_onnx(model, input_shapes={"z": (1, 2)})


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_weights_are_refused(bad):
    model = parse(MLP_TEXT)
    weights = numpy_helper.to_array(model.graph.initializer[0]).copy()
    weights[1, 2] = bad
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weights, "W"))
    with pytest.raises(ic.NonFiniteError, match=r"constant 'W' holds 1 NaN or inf .*read by node 'Gemm_0' \(Gemm"):
        ic.from_onnx(model)


def test_non_finite_constant_node_is_refused():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 2] x) => (float[N, 2] y) {
            c = Constant <value = float[2] {1, inf}> ()
            y = Mul(x, c)
        }
        """
    )
    with pytest.raises(ic.NonFiniteError, match=r"constant 'c' holds 1 NaN or inf .*\(Mul, opset 17\)"):
        ic.from_onnx(model)


def test_weights_fed_as_runtime_inputs():
    """A Gemm's weight fed as a runtime input is a product of two inputs (square blocks), with the
    weight a per-sample input (it used to be refused); a Conv's weight must still be a constant."""
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x, float[3, 4] W) => (float[N, 3] y) { y = Gemm <transB = 1> (x, W) }
        """
    )
    compiled = assert_matches_onnxruntime(model)
    assert [spec.name for spec in compiled.inputs] == ["x", "W"]
    conv = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 1, 4, 4] x, float[2, 1, 3, 3] W) => (float[N, 2, 2, 2] y) { y = Conv(x, W) }
        """
    )
    with pytest.raises(ic.GraphError, match=r"\(Conv, opset 17\).*store it as an initializer"):
        ic.from_onnx(conv)


def test_initializers_listed_as_inputs_are_constants():
    """IR < 4 exporters (MATLAB) list every initializer as a graph input too."""
    model = parse(MLP_TEXT)
    for tensor in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    compiled = assert_matches_onnxruntime(model)
    assert [spec.name for spec in compiled.inputs] == ["x"]


def test_unsorted_nodes_are_sorted():
    model = parse(MLP_TEXT)
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    compiled = ic.from_onnx(model)
    x = np.ones((2, 4))
    expected = np.maximum(x @ np.arange(1, 13).reshape(3, 4).T + [0.5, -0.5, 1], 0)
    np.testing.assert_allclose(compiled.predict(x), expected)


def test_too_big_model_is_refused_before_allocating():
    """A 512 -> 512 3x3 convolution at 224 x 224 is ~118G non-zeros as CSR (structure="csr"):
    refused from the estimate. (Structured, the default, it is its 2.4M weights.)"""
    weights = numpy_helper.from_array(np.zeros((512, 512, 3, 3), dtype=np.float32), "W")
    node = helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1], name="huge")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 512, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 512, 224, 224])], [weights],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ic.ModelTooLargeError, match=r"about 118\.\d+G non-zeros.*more than the"):
        ic.from_onnx(model, structure="csr")
    with pytest.raises(MemoryError):  # the builtin a caller may already catch
        ic.from_onnx(model, memory_limit_bytes=1e9, structure="csr")
    prepared = prepare(model)
    assert estimate_nonzeros(prepared, structured=True) < 1e-3 * estimate_nonzeros(prepared)


def test_running_memory_check_refuses_during_lowering(monkeypatch):
    """Where the up-front estimate misses (here made 0: it now counts activations too), the
    running count still refuses."""
    monkeypatch.setattr("implicit_compiler.frontend.lower.check_model_fits", lambda prepared, limit, structured: 0)
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) { h = Relu(x)
            y = Tanh(h) }
        """
    )
    with pytest.raises(ic.ModelTooLargeError, match=r"state block 'h' at node 'Relu_0' \(Relu, opset 17\)"):
        ic.from_onnx(model, memory_limit_bytes=100)


def test_opset_newer_than_supported_is_refused():
    model = parse(MLP_TEXT)
    model.opset_import[0].version = 99
    with pytest.raises(ic.UnsupportedOpError, match="opset 99 is newer than the newest supported"):
        ic.from_onnx(model)


def test_float32_compile_keeps_dtype():
    compiled = ic.from_onnx(parse(MLP_TEXT), dtype=np.float32)
    assert compiled.dtype == np.float32
    assert isinstance(onnx.load_model_from_string(parse(MLP_TEXT).SerializeToString()), onnx.ModelProto)


def test_batch_axis_of_a_sequence_first_input_is_the_dynamic_one():
    """(seq, batch, features) with only the batch dynamic: the batch axis is axis 1."""
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[5, N, 3] x) => (float[5, N, 3] y) { y = Relu(x) }
        """
    )
    compiled = assert_matches_onnxruntime(model)
    assert compiled.inputs[0].shape == (5, 3)


def test_two_dynamic_dimensions_need_input_shapes_marking_the_batch_axis():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[5, N, S] x) => (float[5, N, S] y) { y = Relu(x) }
        """
    )
    with pytest.raises(ic.GraphError, match=r"dynamic dimension 'S' at axis 2.*\{'x': \(5, None, 8\)\}"):
        ic.from_onnx(model)
    compiled = assert_matches_onnxruntime(model, input_shapes={"x": (5, None, 4)})
    assert compiled.inputs[0].shape == (5, 4)
    with pytest.raises(ic.ShapeError, match="marks axis 0 as the batch axis"):
        ic.from_onnx(model, input_shapes={"x": (None, 2, 4)})
