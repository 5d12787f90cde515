"""Graphs that mix samples along the batch axis must be refused, never compiled at batch 1.

The model is lowered at batch size 1 and applied to each sample, so an op reading across the
batch axis (or the batch size itself) compiles to something else than the graph computes on a
batch. Each pattern below must raise a typed error naming the node; graphs that keep samples
apart must still compile and match onnxruntime on a real batch; ``verify`` runs a real batch so
that a pattern slipping past the detection fails it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import assert_matches_onnxruntime

import implicit_compiler as ic
from implicit_compiler.errors import GraphError, ShapeError, UnsupportedAttributeError
from implicit_compiler.frontend import batch_axis, verification

FEATURES = 4


def _model(nodes, inputs=None, initializers=(), opset=17) -> onnx.ModelProto:
    """A float model of ``nodes`` reading x: (N, 4) and writing y (its type from shape inference)."""
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])]
    graph = helper.make_graph(nodes, "batch_mixing", inputs, [helper.make_value_info("y", onnx.TypeProto())])
    graph.initializer.extend(initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.output[0].CopyFrom(inferred.graph.output[0])
    onnx.checker.check_model(model)
    return model


def _constant(name: str, values, dtype=np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _weight(rows: int, columns: int, name: str = "W") -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(1).standard_normal((rows, columns)).astype(np.float32), name)


def reduce_mean_over_batch() -> onnx.ModelProto:
    return _model(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], name="batch_mean", axes=[0], keepdims=1),
            helper.make_node("Sub", ["x", "m"], ["y"], name="centre"),
        ]
    )


def reduce_sum_over_batch() -> onnx.ModelProto:
    return _model(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="batch_sum", keepdims=0)],
        initializers=[_constant("axes", [0])],
    )


def divide_by_batch_size() -> onnx.ModelProto:
    return _model(
        [
            helper.make_node("Shape", ["x"], ["shape"], name="shape_of_x"),
            helper.make_node("Gather", ["shape", "zero"], ["n"], name="batch_size", axis=0),
            helper.make_node("Cast", ["n"], ["n_float"], name="to_float", to=TensorProto.FLOAT),
            helper.make_node("Div", ["x", "n_float"], ["y"], name="divide_by_n"),
        ],
        initializers=[_constant("zero", 0)],
    )


def transpose_batch_then_reduce_last_axis() -> onnx.ModelProto:
    """(N, 4) -> (4, N), then a mean over the last axis: now the samples."""
    return _model(
        [
            helper.make_node("Transpose", ["x"], ["t"], name="swap_batch", perm=[1, 0]),
            helper.make_node("ReduceMean", ["t"], ["y"], name="mean_of_last_axis", axes=[-1], keepdims=1),
        ]
    )


def transpose_batch_then_matmul() -> onnx.ModelProto:
    """x^T x: the Gram matrix sums over the samples."""
    return _model(
        [
            helper.make_node("Transpose", ["x"], ["t"], name="swap_batch", perm=[1, 0]),
            helper.make_node("MatMul", ["t", "x"], ["y"], name="gram"),
        ]
    )


def flatten_batch_away() -> onnx.ModelProto:
    return _model([helper.make_node("Flatten", ["x"], ["y"], name="flatten_all", axis=0)])


def gather_first_sample() -> onnx.ModelProto:
    return _model(
        [helper.make_node("Gather", ["x", "first"], ["y"], name="first_sample", axis=0)],
        initializers=[_constant("first", [0])],
    )


def reverse_the_samples() -> onnx.ModelProto:
    return _model(
        [helper.make_node("Slice", ["x", "start", "end", "axis", "step"], ["y"], name="reverse")],
        initializers=[
            _constant("start", [-1]),
            _constant("end", [-1000]),
            _constant("axis", [0]),
            _constant("step", [-1]),
        ],
    )


def concat_along_batch() -> onnx.ModelProto:
    return _model([helper.make_node("Concat", ["x", "x"], ["y"], name="twice", axis=0)])


def divide_by_size() -> onnx.ModelProto:
    return _model(
        [
            helper.make_node("Size", ["x"], ["size"], name="size_of_x"),
            helper.make_node("Cast", ["size"], ["size_float"], name="to_float", to=TensorProto.FLOAT),
            helper.make_node("Div", ["x", "size_float"], ["y"], name="divide_by_size"),
        ]
    )


def pool_over_the_batch() -> onnx.ModelProto:
    """(N, C, H, W) -> (C, N, H, W): MaxPool then takes windows across samples."""
    return _model(
        [
            helper.make_node("Transpose", ["x"], ["t"], name="swap_batch", perm=[1, 0, 2, 3]),
            helper.make_node("MaxPool", ["t"], ["y"], name="pool", kernel_shape=[2, 2]),
        ],
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 3])],
    )


def reduce_sum_of_everything() -> onnx.ModelProto:
    return _model([helper.make_node("ReduceSum", ["x"], ["y"], name="total", keepdims=1)])


def output_the_batch_size() -> onnx.ModelProto:
    """y = x + 0 and the batch size as a second output."""
    model = _model(
        [
            helper.make_node("Relu", ["x"], ["y"], name="relu"),
            helper.make_node("Shape", ["x"], ["shape"], name="shape_of_x"),
            helper.make_node("Cast", ["shape"], ["n"], name="shape_as_float", to=TensorProto.FLOAT),
        ]
    )
    model.graph.output.append(helper.make_tensor_value_info("n", TensorProto.FLOAT, [2]))
    return model


def _reshape_by_batch_arithmetic(arithmetic: list[onnx.NodeProto], name: str) -> onnx.ModelProto:
    """Reshape(x, [f(Shape(x)[0]), -1]) with f made of ``arithmetic`` (reading n, writing f):
    shape arithmetic that onnx's data propagation does not follow."""
    return _model(
        [
            helper.make_node("Shape", ["x"], ["shape"], name="shape_of_x"),
            helper.make_node("Gather", ["shape", "zero"], ["n"], name="batch_size", axis=0),
            *arithmetic,
            helper.make_node("Unsqueeze", ["f", "zero1"], ["f1"], name="f1"),
            helper.make_node("Concat", ["f1", "minus_one"], ["target"], name="target", axis=0),
            helper.make_node("Reshape", ["x", "target"], ["y"], name=name),
        ],
        initializers=[_constant("zero", 0), _constant("two", 2), _constant("zero1", [0]), _constant("minus_one", [-1])],
    )


def reshape_to_half_the_batch() -> onnx.ModelProto:
    """x.view(x.size(0) // 2, -1): pairs of samples become one row."""
    return _reshape_by_batch_arithmetic([helper.make_node("Div", ["n", "two"], ["f"], name="half")], "pair_up")


PATTERNS = {
    "ReduceMean axis 0": (reduce_mean_over_batch, "batch_mean", UnsupportedAttributeError),
    "ReduceSum axis 0": (reduce_sum_over_batch, "batch_sum", UnsupportedAttributeError),
    "x / Shape(x)[0]": (divide_by_batch_size, "divide_by_n", GraphError),
    "Transpose batch/feature, ReduceMean": (
        transpose_batch_then_reduce_last_axis,
        "mean_of_last_axis",
        UnsupportedAttributeError,
    ),
    "Transpose batch/feature, MatMul": (transpose_batch_then_matmul, "gram", UnsupportedAttributeError),
    "Flatten axis 0": (flatten_batch_away, "flatten_all", GraphError),
    "Gather of sample 0": (gather_first_sample, "first_sample", GraphError),
    "Slice reversing the batch": (reverse_the_samples, "reverse", UnsupportedAttributeError),
    "Concat along the batch": (concat_along_batch, "twice", GraphError),
    "x / Size(x)": (divide_by_size, "divide_by_size", GraphError),
    "MaxPool with the batch as channels": (pool_over_the_batch, "pool", UnsupportedAttributeError),
    "ReduceSum over all axes": (reduce_sum_of_everything, "total", UnsupportedAttributeError),
    "the batch size as an output": (output_the_batch_size, "shape_as_float", GraphError),
    "Reshape to (Shape(x)[0] // 2, -1)": (reshape_to_half_the_batch, "pair_up", GraphError),
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_batch_mixing_graphs_are_refused(pattern):
    build, node_name, error_type = PATTERNS[pattern]
    model = build()
    with pytest.raises(error_type) as raised:
        ic.from_onnx(model)
    message = str(raised.value)
    assert f"'{node_name}'" in message and "opset 17" in message and "batch" in message
    # the refusal is right: onnxruntime on a batch differs from the same graph run sample by sample
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    shape = [d.dim_value or 3 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    batch = session.run(None, {"x": x})
    single = [session.run(None, {"x": x[i : i + 1]}) for i in range(3)]
    one_by_one = [np.concatenate([outputs[k] for outputs in single]) for k in range(len(batch))]
    assert any(b.shape != o.shape or not np.allclose(b, o) for b, o in zip(batch, one_by_one))


def test_reduce_mean_message_says_what_to_do():
    with pytest.raises(UnsupportedAttributeError, match="reduce over feature axes only"):
        ic.from_onnx(reduce_mean_over_batch())


SAMPLE_PRESERVING = {
    "elementwise and ReduceMean over features": _model(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], name="feature_mean", axes=[1], keepdims=1),
            helper.make_node("Sub", ["x", "m"], ["c"], name="centre"),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ]
    ),
    "MatMul with a weight, Gemm transA=0": _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="dense"),
            helper.make_node("Gemm", ["h", "V"], ["y"], name="gemm", transB=1),
        ],
        initializers=[_weight(FEATURES, 3), _weight(2, 3, "V")],
    ),
    "Reshape keeping axis 0 through Shape(x)[0]": _model(
        [
            helper.make_node("Shape", ["x"], ["shape"], name="shape_of_x"),
            helper.make_node("Gather", ["shape", "zero"], ["n"], name="batch_size", axis=0),
            helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"], name="n1"),
            helper.make_node("Concat", ["n1", "two_two"], ["target"], name="target", axis=0),
            helper.make_node("Reshape", ["x", "target"], ["r"], name="reshape"),
            helper.make_node("Transpose", ["r"], ["t"], name="swap_features", perm=[0, 2, 1]),
            helper.make_node("Flatten", ["t"], ["y"], name="flatten", axis=1),
        ],
        initializers=[_constant("zero", 0), _constant("zero1", [0]), _constant("two_two", [2, 2])],
    ),
    "Reshape to (Identity(Shape(x)[0]), -1)": _reshape_by_batch_arithmetic(
        [helper.make_node("Identity", ["n"], ["f"], name="same")], "keep_rows"
    ),
    "divide by a feature size Shape(x)[1]": _model(
        [
            helper.make_node("Shape", ["x"], ["shape"], name="shape_of_x"),
            helper.make_node("Gather", ["shape", "one"], ["f"], name="feature_count", axis=0),
            helper.make_node("Cast", ["f"], ["f_float"], name="to_float", to=TensorProto.FLOAT),
            helper.make_node("Div", ["x", "f_float"], ["y"], name="divide_by_f"),
        ],
        initializers=[_constant("one", 1)],
    ),
    "a constant shaped like the batch: x + ConstantOfShape(Shape(x))": _model(
        [
            helper.make_node("Shape", ["x"], ["shape"], name="shape_of_x"),
            helper.make_node(
                "ConstantOfShape",
                ["shape"],
                ["halves"],
                name="halves",
                value=numpy_helper.from_array(np.array([0.5], dtype=np.float32)),
            ),
            helper.make_node("Add", ["x", "halves"], ["y"], name="add_halves"),
        ]
    ),
    "Conv and pooling on (N, C, H, W)": _model(
        [
            helper.make_node("Reshape", ["x", "image"], ["i"], name="to_image"),
            helper.make_node("Conv", ["i", "K"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["c"], ["g"], name="pool"),
            helper.make_node("Flatten", ["g"], ["y"], name="flatten"),
        ],
        initializers=[
            _constant("image", [-1, 1, 2, 2]),
            numpy_helper.from_array(np.random.default_rng(2).standard_normal((2, 1, 3, 3)).astype(np.float32), "K"),
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(SAMPLE_PRESERVING))
def test_sample_preserving_graphs_compile_and_match_onnxruntime_at_batch_3(name):
    model = SAMPLE_PRESERVING[name]
    compiled = ic.from_onnx(model)
    x = np.random.default_rng(4).standard_normal((3, FEATURES))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x.astype(np.float32)})[0]  # one real batch of 3
    ours = compiled.predict(x)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
    assert_matches_onnxruntime(model, batch=3)
    assert ic.verify(model, samples=3).passed


def test_a_graph_that_runs_at_batch_one_only_still_compiles_per_sample():
    """Reshape to [1, -1] then a Gemm one sample wide (as some exporters write, with a dynamic N):
    onnxruntime cannot run it at batch 3, so it is defined per sample and is not refused; verify
    falls back to one sample at a time and says why."""
    model = _model(
        [
            helper.make_node("Reshape", ["x", "one_row"], ["r"], name="one_row"),
            helper.make_node("Gemm", ["r", "V"], ["y"], name="gemm", transB=1),
        ],
        initializers=[_constant("one_row", [1, -1]), _weight(2, FEATURES, "V")],
    )
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)gemm|dimension"):
        session.run(None, {"x": np.zeros((3, FEATURES), np.float32)})
    assert_matches_onnxruntime(model, batch=3)
    report = ic.verify(model, samples=3)
    assert report.passed and not report.batch_checked
    assert "onnxruntime cannot run a batch of 3" in report.batch_error


@pytest.mark.parametrize(
    "build", [reduce_mean_over_batch, divide_by_batch_size, flatten_batch_away, gather_first_sample]
)
def test_verify_fails_a_batch_mixing_graph_that_slips_past_detection(monkeypatch, build):
    """With the detection switched off the graph compiles; verify's real batch must catch it
    (whether the values differ or the batch no longer lines up with ours)."""
    monkeypatch.setattr(batch_axis, "check_batch_independence", lambda prepared: None)
    monkeypatch.setattr("implicit_compiler.frontend.lower.check_batch_independence", lambda prepared: None)
    report = ic.verify(build(), samples=3)
    assert not report.passed
    assert not report.outputs[0].passed_float32
    assert report.batch_checked


# ---------------------------------------------------------------------- zero-size dimensions
ZERO_SIZE_NODE_TESTS = (
    "test_reduce_sum_empty_set",  # data (2, 0, 4)
    "test_reduce_max_empty_set",  # data (2, 0, 4)
    "test_reshape_allowzero_reordered",  # data (0, 3, 4)
    "test_split_zero_size_splits_opset13",  # input (0,)
)


def _onnx_node_test_models(names) -> dict[str, onnx.ModelProto]:
    """onnx's own node tests by name (the models ``onnx.backend.test`` generates)."""
    import warnings

    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases("")
    return {case.name: case.model for case in cases if case.name in names}


def test_a_static_zero_size_dimension_is_a_shape_error():
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [0, 3])],
    )
    with pytest.raises(ShapeError, match=r"input 'x' has a zero-size dimension at axis 0"):
        ic.from_onnx(model)


def test_onnx_node_tests_with_zero_size_inputs_give_shape_errors():
    models = _onnx_node_test_models(ZERO_SIZE_NODE_TESTS)
    assert sorted(models) == sorted(ZERO_SIZE_NODE_TESTS)
    for model in models.values():
        with pytest.raises(ShapeError, match="has a zero-size dimension at axis"):
            ic.from_onnx(model)
        with pytest.raises(ShapeError, match="has a zero-size dimension at axis"):
            ic.verify(model)


# ---------------------------------------------------------------------- the reference disagreeing
def conv_transpose_groups_with_bias() -> onnx.ModelProto:
    """Depthwise ConvTranspose (group 3) with a bias: onnx.reference adds B[0] to every group
    (onnxruntime and torch add each group its own bias)."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((3, 1, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    return _model(
        [helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], name="up", group=3)],
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 3, 3])],
        initializers=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )


def test_verify_says_when_the_float64_reference_disagrees_with_onnxruntime():
    model = conv_transpose_groups_with_bias()
    # the premise: onnx.reference and onnxruntime disagree here, and we agree with onnxruntime
    x = np.random.default_rng(0).standard_normal((2, 3, 3, 3)).astype(np.float32)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]
    reference = onnx.reference.ReferenceEvaluator(model).run(None, {"x": x})[0]
    assert not np.allclose(reference, expected, rtol=1e-4, atol=1e-4)
    ours = ic.from_onnx(model).predict(x.astype(np.float64))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)

    report = ic.verify(model, samples=4)
    assert report.passed
    assert not report.float64_checked
    assert "float64 reference disagrees with onnxruntime" in report.reference_error
    assert report.outputs[0].passed_float64 is None and report.outputs[0].passed_float32


def test_verify_still_fails_when_we_disagree_with_both(monkeypatch):
    """The reference disagreeing does not excuse us: a wrong lowering still fails."""
    real_from_onnx = verification.from_onnx

    def broken_from_onnx(*args, **kwargs):
        model = real_from_onnx(*args, **kwargs)
        object.__setattr__(model, "bias_y", model.bias_y + 1e-2)
        return model

    monkeypatch.setattr(verification, "from_onnx", broken_from_onnx)
    report = ic.verify(conv_transpose_groups_with_bias(), samples=4)
    assert not report.passed
