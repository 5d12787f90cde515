"""Softmax and LogSoftmax (opset 13+: along one axis; opsets 1 and 11: the input coerced to 2-D at
the axis), against onnxruntime (float32) and onnx.reference (float64): any axis of a batched
input, large logits, attention heads, torch exports and onnx's own node tests."""

from __future__ import annotations

import io
import time
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx_helpers import assert_matches_onnxruntime, parse, random_inputs

import implicit_compiler as ic
from implicit_compiler.frontend.graph import to_float64

OPS = ("Softmax", "LogSoftmax")
RNG = np.random.default_rng(17)


def _normalization(op: str, opset: int, axis: int | None, shape: str = "N, 4, 5") -> onnx.ModelProto:
    attribute = "" if axis is None else f" <axis = {axis}>"
    return parse(f"""
<ir_version: 7, opset_import: ["" : {opset}]>
g (float[{shape}] x) => (float[{shape}] y) {{
    y = {op}{attribute} (x)
}}""")


def _after_a_linear_layer(op: str, axis: int) -> onnx.ModelProto:
    """x (N, 3, 5) -> MatMul with a (5, 6) weight -> op: the logits are sums, not plain inputs."""
    weights = ", ".join(f"{value:.4f}" for value in RNG.standard_normal(30))
    return parse(f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 5] x) => (float[N, 3, 6] y)
<float[5, 6] W = {{{weights}}}> {{
    h = MatMul (x, W)
    y = {op} <axis = {axis}> (h)
}}""")


def _predict(compiled: ic.ImplicitModel, x: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(compiled.astype(dtype).predict(x.astype(dtype)), dtype=np.float64)


# ----------------------------------------------------------------------------- any axis
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("axis", [1, 2, -1, None], ids=["axis1", "axis2", "axis-1", "default"])
def test_along_one_axis_of_a_batched_input(op, axis):
    """(N, 4, 5): the batch axis is axis 0, so axes 1, 2 and -1 are the per-sample axes."""
    compiled = assert_matches_onnxruntime(_normalization(op, 13, axis))
    assert {block.activation.name for block in compiled.blocks} <= {"relu", "exp", "log", "identity"}, "no product"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("axis", [1, -1])
def test_after_a_linear_layer(op, axis):
    assert_matches_onnxruntime(_after_a_linear_layer(op, axis), batch=5)


@pytest.mark.parametrize("op", OPS)
def test_a_sequence_first_input_along_its_leading_axis(op):
    """(S, N, F) with the batch at axis 1: normalizing along axis 0 (the sequence) keeps samples apart."""
    assert_matches_onnxruntime(_normalization(op, 13, 0, shape="4, N, 5"))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("opset", [1, 11])
@pytest.mark.parametrize("axis", [1, 2, None], ids=["axis1", "axis2", "default"])
def test_coerced_to_two_dimensions_before_opset_13(op, opset, axis):
    """Before opset 13 a row is everything from ``axis`` on: with axis=1 on (N, 3, 4), all 12 values
    of a sample. The float64 oracle is onnx.reference on the model converted to opset 13 (Flatten,
    Softmax, Reshape; ``fold.for_reference``): its own Softmax-1/11 normalizes along the single axis."""
    model = _normalization(op, opset, axis, shape="N, 3, 4")
    compiled = assert_matches_onnxruntime(model)
    if op == "Softmax" and axis in (1, None):
        x = random_inputs(model, batch=4)["x"]
        np.testing.assert_allclose(_predict(compiled, x, np.float64).sum(axis=(1, 2)), 1.0, rtol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_a_constant_folded_before_opset_13_is_coerced_to_two_dimensions(op):
    """Folding runs onnx.reference on the node: converted to opset 13 first (``fold.for_reference``)."""
    values = ", ".join(f"{value:.3f}" for value in RNG.standard_normal(24))
    model = parse(f"""
<ir_version: 7, opset_import: ["" : 11]>
g (float[N, 2, 3, 4] x) => (float[N, 2, 3, 4] y)
<float[2, 3, 4] c = {{{values}}}> {{
    s = {op} <axis = 1> (c)
    y = Add (x, s)
}}""")
    compiled = assert_matches_onnxruntime(model)
    assert compiled.n == 0


def test_verify_checks_float64_of_a_model_before_opset_13():
    """verify's float64 reference is the converted model: it agrees, and the check counts."""
    report = ic.verify(_normalization("Softmax", 11, 1, shape="N, 3, 4"), samples=4)
    assert report.passed and report.reference_error is None
    assert all(output.passed_float64 for output in report.outputs)


@pytest.mark.parametrize("op", OPS)
def test_rows_of_one_element(op):
    """Softmax over an axis of length 1 is 1, LogSoftmax 0, with no state."""
    compiled = assert_matches_onnxruntime(_normalization(op, 13, -1, shape="N, 4, 1"))
    assert compiled.n == 0


def test_an_axis_out_of_range_is_a_graph_error():
    with pytest.raises(ic.GraphError, match=r"axis 3 is out of range for a tensor of rank 3"):
        ic.from_onnx(_normalization("Softmax", 13, 3))


# ----------------------------------------------------------------------------- the batch axis
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    ("opset", "axis", "shape", "message"),
    [
        (13, 0, "N, 4, 5", "normalizes along axis 0"),
        (11, 0, "N, 4, 5", r"normalizes along axes 0 to 2 \(coerced to 2-D at 0\)"),
        (13, 1, "4, N, 5", "normalizes along axis 1"),
        (11, 1, "4, N, 5", r"normalizes along axes 1 to 2 \(coerced to 2-D at 1\)"),
        (11, 0, "4, N, 5", r"normalizes along axes 0 to 2 \(coerced to 2-D at 0\)"),
    ],
)
def test_normalizing_along_the_batch_axis_is_refused(op, opset, axis, shape, message):
    """Samples would mix; at batch size 1 the row would be a single element and the compiled
    model silently constant."""
    with pytest.raises(ic.UnsupportedAttributeError, match=f"{op} {message}, so samples would mix"):
        ic.from_onnx(_normalization(op, opset, axis, shape=shape))


# ----------------------------------------------------------------------------- large logits
@pytest.mark.parametrize("op", OPS)
def test_logits_of_magnitude_1e3_in_float64(op):
    """exp(1e3) overflows float64: only the maximum keeps every exp argument <= 0. The float64
    oracle is onnxruntime on the float64 model (onnx.reference's LogSoftmax is log(Softmax),
    -inf where a probability underflows; its Softmax is checked too). float32 is checked for inf
    and NaN only (rounding logits of 1e3 costs float32 ~1e-4 relative)."""
    model = _after_a_linear_layer(op, -1)
    x = 1e3 * random_inputs(model, batch=6)["x"] / 2
    session = onnxruntime.InferenceSession(to_float64(model).SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]
    compiled = ic.from_onnx(model)
    assert np.abs(to_logits(model, x)).max() > 1e3, "the logits are large"
    error = np.abs(_predict(compiled, x, np.float64) - expected).max() / np.abs(expected).max()
    assert error <= 1e-9
    if op == "Softmax":
        assert_matches_onnxruntime(model, feeds={"x": x}, check_onnxruntime=False)
    for dtype in (np.float64, np.float32):
        assert np.isfinite(_predict(compiled, x, dtype)).all()


@pytest.mark.parametrize("op", OPS)
def test_logits_of_magnitude_80_in_float32(op):
    """exp(89) is inf in float32, where the exp states are stored: the maximum keeps them <= 1."""
    model = _normalization(op, 13, -1)
    x = random_inputs(model, batch=6)["x"]
    feeds = {"x": 80.0 * x / np.abs(x).max(axis=(1, 2), keepdims=True)}
    compiled = assert_matches_onnxruntime(model, feeds=feeds)
    assert np.isfinite(_predict(compiled, feeds["x"], np.float32)).all()


def to_logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The Softmax's input h, by onnx.reference."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(helper.make_tensor_value_info("h", TensorProto.DOUBLE, None))
    return ReferenceEvaluator(to_float64(copy)).run(["h"], {"x": x})[0]


# ----------------------------------------------------------------------------- attention
def _attention_head(tokens=6, width=5, head=4, weight_scale=1.0, opset=17) -> onnx.ModelProto:
    """softmax(Q K^T / sqrt(d)) V, Q, K, V = x W_q, x W_k, x W_v on x (N, S, width)."""
    nodes = [
        helper.make_node("MatMul", ["x", "Wq"], ["q"]),
        helper.make_node("MatMul", ["x", "Wk"], ["k"]),
        helper.make_node("MatMul", ["x", "Wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["raw"]),
        helper.make_node("Div", ["raw", "root"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["out"]),
    ]
    initializers = [
        numpy_helper.from_array((weight_scale * RNG.standard_normal((width, head))).astype(np.float32), f"W{name}")
        for name in "qkv"
    ]
    initializers.append(numpy_helper.from_array(np.float32(np.sqrt(head)), "root"))
    float_value = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    graph = helper.make_graph(
        nodes,
        "attention",
        [float_value("x", ["N", tokens, width])],
        [float_value("p", ["N", tokens, tokens]), float_value("out", ["N", tokens, head])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("weight_scale", [1.0, 3.0], ids=["unit-weights", "scores-up-to-~30"])
def test_attention_head(weight_scale):
    compiled = assert_matches_onnxruntime(_attention_head(weight_scale=weight_scale), batch=6)
    exp_states = sum(block.size for block in compiled.blocks if block.activation.name == "exp")
    assert exp_states == 2 * 6 * 6, "two exp blocks over the S x S scores"


def test_states_of_softmax_over_the_last_axis_of_four_heads_of_16_tokens():
    """(4, 16, 16) per sample, rows of K = 16: per row K - 1 relus (the maximum), K exp states,
    1 log state, K exp states for Softmax; the maximum (a leaf plus 4 relus, read by 2K exp
    rows) is kept as 1 identity state. LogSoftmax stops before the second exp block.
    Non-zeros per row: the tree's levels 8 x 2 + 4 x 4 + 2 x 6 + 1 x 8 = 52, the kept maximum 5,
    exp(z - m) 2 per state, the log K, exp(z - m - L) 3 per state."""
    rows, width = 4 * 16, 16
    tree, kept_maximum = 52, 5
    for op, states, nonzeros in (
        ("Softmax", (width - 1) + 1 + width + 1 + width, tree + kept_maximum + 2 * width + width + 3 * width),
        ("LogSoftmax", (width - 1) + 1 + width + 1, tree + kept_maximum + 2 * width + width),
    ):
        model = _normalization(op, 13, -1, shape="N, 4, 16, 16")
        start = time.perf_counter()
        compiled = ic.from_onnx(model)
        seconds = time.perf_counter() - start
        print(f"{op} over (4, 16, 16): n={compiled.n} nnz([B A])={compiled.A.nnz + compiled.B.nnz} {seconds:.2f}s")
        assert compiled.n == rows * states
        assert compiled.A.nnz + compiled.B.nnz == rows * nonzeros
        assert_matches_onnxruntime(model, batch=2)


# ----------------------------------------------------------------------------- torch exports
class _LogSoftmax(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.log_softmax(x, dim=1)


class _SelfAttention(torch.nn.Module):
    def __init__(self, width: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


def _export(module: torch.nn.Module, x: torch.Tensor, dynamo: bool, dynamic_batch: bool) -> onnx.ModelProto:
    module.eval()
    if dynamo:
        shapes = ({0: torch.export.Dim("N")},) if dynamic_batch else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=shapes, verbose=False)
        return program.model_proto
    buffer = io.BytesIO()
    axes = {"x": {0: "N"}} if dynamic_batch else None
    torch.onnx.export(module, (x,), buffer, input_names=["x"], dynamic_axes=axes, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


EXPORTERS = [False, True]
EXPORTER_IDS = ["torchscript", "dynamo"]


@pytest.mark.parametrize("dynamo", EXPORTERS, ids=EXPORTER_IDS)
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_torch_export_of_softmax_layers(name, dynamo):
    torch.manual_seed(0)
    last = torch.nn.Softmax(dim=-1) if name == "softmax" else _LogSoftmax()
    module = torch.nn.Sequential(torch.nn.Linear(5, 6), last)
    model = _export(module, torch.randn(2, 3, 5), dynamo, dynamic_batch=True)
    assert any(node.op_type in OPS for node in model.graph.node)
    assert_matches_onnxruntime(model, batch=5)


@pytest.mark.parametrize("dynamo", EXPORTERS, ids=EXPORTER_IDS)
def test_torch_export_of_multihead_attention(dynamo):
    """nn.MultiheadAttention(batch_first=True) in eval mode, exported for one sample (a static
    batch of 1); with a dynamic batch (the batch folded into the heads, (N * heads, S, d)) it is
    tested in test_modern_attention."""
    torch.manual_seed(0)
    model = _export(_SelfAttention(), torch.randn(1, 4, 8), dynamo, dynamic_batch=False)
    assert "Softmax" in {node.op_type for node in model.graph.node}
    assert_matches_onnxruntime(model, batch=3)


# ----------------------------------------------------------------------------- onnx's node tests
NODE_TESTS = [
    f"test_{op}_{case}"
    for op in ("softmax", "logsoftmax")
    for case in ("axis_0", "axis_1", "axis_2", "negative_axis", "default_axis", "large_number")
] + ["test_softmax_example", "test_logsoftmax_example_1"]
# ... and their expansions into ReduceMax/Sub/Exp/ReduceSum/Div (/Log): exp states of a shifted
# input, a division by their sum (a reciprocal block and a product: the product's balancing
# must see that exp(z - max z) is at most 1, not exp of the 1e4 logits of large_number)
NODE_TESTS += [f"{name}_expanded{suffix}" for name in NODE_TESTS for suffix in ("", "_ver18")]


@pytest.fixture(scope="module")
def node_tests() -> dict:
    """onnx's own node tests (this onnx ships the generators, not the data files)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {case.name: case for case in collect_testcases(None) if case.name in NODE_TESTS}


def test_every_listed_node_test_exists(node_tests):
    assert sorted(node_tests) == sorted(NODE_TESTS)


@pytest.mark.parametrize("name", NODE_TESTS)
def test_onnx_node_test_compiles_and_matches(node_tests, name):
    """Against the test's expected output (computed in float32 by numpy) in both dtypes, and on
    random inputs against onnxruntime and onnx.reference."""
    case = node_tests[name]
    inputs, outputs = case.data_sets[0]
    compiled = ic.from_onnx(case.model)
    expected = np.asarray(outputs[0], dtype=np.float64)
    for dtype in (np.float64, np.float32):
        x = np.asarray(inputs[0], dtype=np.float64).reshape(1, *compiled.inputs[0].shape)
        predicted = _predict(compiled, x, dtype).reshape(expected.shape)
        np.testing.assert_allclose(predicted, expected, rtol=0, atol=1e-5 * max(1.0, np.abs(expected).max()))
    assert_matches_onnxruntime(case.model)


# ----------------------------------------------------------------------------- the size estimate
@pytest.mark.parametrize(
    "model",
    [
        _normalization("Softmax", 13, -1, shape="N, 4, 16, 16"),
        _normalization("LogSoftmax", 11, 1, shape="N, 4, 16, 16"),
        _after_a_linear_layer("Softmax", 1),
        _attention_head(tokens=16, width=16, head=8),
    ],
    ids=["softmax", "log-softmax-coerced", "after-a-linear-layer", "attention-head"],
)
def test_size_estimate_is_within_twice_the_model(model):
    """The estimate checked against the memory limit before lowering counts the softmax's blocks."""
    from implicit_compiler.frontend.estimate import estimate_nonzeros
    from implicit_compiler.frontend.graph import prepare

    compiled = ic.from_onnx(model)
    actual = compiled.A.nnz + compiled.B.nnz + compiled.C.nnz + compiled.D.nnz
    assert actual / 2 <= estimate_nonzeros(prepare(model)) <= 2 * actual
