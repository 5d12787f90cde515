"""LayerNormalization, InstanceNormalization and GroupNormalization (``ops.standardize``): exact
lowerings through square, log, log_positive and exp blocks, against onnxruntime (float32) and onnx.reference
(float64), on hand-built models, torch exports and onnx's own node tests."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx_helpers import assert_matches_onnxruntime, float_value

import implicit_compiler as ic
from implicit_compiler.frontend.graph import to_float64

RNG = np.random.default_rng(17)
FLOAT32_RTOL, FLOAT32_ATOL = 1e-4, 1e-5  # verify's float32 criterion


def _weight(name, shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _norm_model(op, shape, attributes, weights, opset, outputs=("y",)):
    """One normalization node on x of shape (N, *shape), N dynamic; weights: initializers."""
    node = helper.make_node(op, ["x", *(w.name for w in weights)], list(outputs), **attributes)
    graph = helper.make_graph(
        [node], "g", [float_value("x", ["N", *shape])], [float_value(name, None) for name in outputs], list(weights)
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _with_attribute(model, **attributes):
    """A copy of a one-node model with attributes added (stash_type=11: the reference's float64)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.node[0].attribute.extend(helper.make_attribute(k, v) for k, v in attributes.items())
    return copy


def _states(compiled, activation):
    return sum(block.size for block in compiled.blocks if block.activation.name == activation)


# ----------------------------------------------------------------------------- LayerNormalization
LAYER_NORM_CASES = {
    "last-axis": ((5, 8), -1, (8,)),
    "last-two-axes": ((3, 4, 5), -2, (4, 5)),
    "chw": ((3, 4, 4), 1, (3, 4, 4)),  # axis 1 of (N, C, H, W)
    "broadcast-scale": ((3, 4, 5), 2, (1, 5)),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape,axis,weight_shape", list(LAYER_NORM_CASES.values()), ids=list(LAYER_NORM_CASES))
def test_layer_normalization(shape, axis, weight_shape, bias):
    weights = [_weight("scale", weight_shape)] + ([_weight("bias", weight_shape)] if bias else [])
    model = _norm_model("LayerNormalization", shape, dict(axis=axis, epsilon=1e-5), weights, 17)
    compiled = assert_matches_onnxruntime(model)
    full = (1, *shape)  # one sample
    assert _states(compiled, "log") == np.prod(full[: axis % len(full)], dtype=int)


def test_layer_normalization_mean_and_inv_std_dev_outputs():
    """The optional outputs are per sample: the mean (kept as a state) and rsqrt(var + eps), an
    rsqrt state per group made only for that output."""
    model = _norm_model(
        "LayerNormalization", (4, 6), dict(axis=-1), [_weight("scale", (6,))], 17, outputs=("y", "mean", "inv_std")
    )
    compiled = assert_matches_onnxruntime(model)
    assert [spec.shape for spec in compiled.outputs] == [(4, 6), (4, 1), (4, 1)]
    assert _states(compiled, "rsqrt") == 4
    without = _norm_model("LayerNormalization", (4, 6), dict(axis=-1), [_weight("scale", (6,))], 17, ("y", "mean"))
    assert _states(assert_matches_onnxruntime(without), "rsqrt") == 0


def test_size_of_layer_normalization():
    """Per group of k entries: k centred squares, one log of the variance, 2k log_positive and
    2k exp states (the product in the log domain), and the mean state: 5k + 2 states (k = 32
    here: 162; the square identity's product took 2k + 3, 67). Measured numbers in the report."""
    for shape, axis, groups, k in (((16, 32), -1, 16, 32), ((8, 8, 8), 1, 1, 512)):
        model = _norm_model("LayerNormalization", shape, dict(axis=axis), [_weight("s", shape[axis:])], 17)
        compiled = ic.from_onnx(model)
        assert _states(compiled, "square") == groups * k
        assert _states(compiled, "log") == groups
        assert _states(compiled, "log_positive") == _states(compiled, "exp") == groups * 2 * k
        assert _states(compiled, "rsqrt") == 0  # (only for the InvStdDev output)
        assert compiled.n == groups * (5 * k + 2)
        print(f"LayerNorm {shape} axis {axis}: n={compiled.n} nnz(A)={compiled.A.nnz} nnz(B)={compiled.B.nnz}")


def test_long_centred_rows_are_kept_as_states():
    """LayerNorm of a dense MatMul's output (rows of 32 non-zeros): three blocks read the centred
    values, so they are kept as identity states (one copy of the long rows) and the squares and
    log_positive rows read one state each; a short input (x itself) stays folded."""
    w = numpy_helper.from_array(RNG.standard_normal((32, 32)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("LayerNormalization", ["h", "s"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [float_value("x", ["N", 4, 32])], [float_value("y", None)], [w, _weight("s", (32,))]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    compiled = assert_matches_onnxruntime(model)
    blocks = {block.name: block for block in compiled.blocks}
    assert blocks["y/centred"].activation.name == "identity" and blocks["y/centred"].size == 4 * 32
    A = compiled.A.tocsr()
    for name in ("y/centred_squared", "y/log_positive", "y/log_negative"):
        assert np.all(np.diff(A.indptr[blocks[name].start : blocks[name].stop + 1]) == 1), name
    short = _norm_model("LayerNormalization", (4, 32), dict(axis=-1), [_weight("s", (32,))], 17)
    assert "y/centred" not in {block.name for block in ic.from_onnx(short).blocks}


def test_size_estimate_of_layer_normalization_is_within_twice_the_model():
    from implicit_compiler.frontend.estimate import estimate_nonzeros
    from implicit_compiler.frontend.graph import prepare

    model = _norm_model("LayerNormalization", (16, 32), dict(axis=-1), [_weight("s", (32,))], 17)
    compiled = ic.from_onnx(model)
    actual = compiled.A.nnz + compiled.B.nnz + compiled.C.nnz + compiled.D.nnz
    assert actual / 2 <= estimate_nonzeros(prepare(model)) <= 2 * actual


# ----------------------------------------------------------------------------- Instance and GroupNormalization
@pytest.mark.parametrize("opset", [1, 6, 17, 22])
def test_instance_normalization(opset):
    weights = [_weight("scale", (3,)), _weight("bias", (3,))]
    model = _norm_model("InstanceNormalization", (3, 4, 5), dict(epsilon=1e-3), weights, opset)
    compiled = assert_matches_onnxruntime(model, check_onnxruntime=opset > 1)  # onnxruntime has no version 1
    assert _states(compiled, "log") == 3


@pytest.mark.parametrize("opset", [18, 21])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_group_normalization(groups, opset):
    """Scale and bias per group at opset 18, per channel from 21. At 21 (stash_type 1 by default)
    onnx.reference computes in float32, so the float64 check runs on a stash_type=11 copy."""
    count = groups if opset == 18 else 4
    weights = [_weight("scale", (count,)), _weight("bias", (count,))]
    model = _norm_model("GroupNormalization", (4, 3, 3), dict(num_groups=groups), weights, opset)
    if opset == 18:
        compiled = assert_matches_onnxruntime(model)
    else:
        compiled = assert_matches_onnxruntime(model, check_reference=False)
        assert_matches_onnxruntime(_with_attribute(model, stash_type=11), check_onnxruntime=False)
    assert _states(compiled, "log") == groups


def test_group_normalization_at_opset_18_reads_scale_per_group():
    """At 18 a per-channel scale (4 values for 2 groups) is an error, not silently misread."""
    weights = [_weight("scale", (4,)), _weight("bias", (4,))]
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"], num_groups=2)],
            "g",
            [float_value("x", ["N", 4, 3])],
            [float_value("y", None)],
            weights,
        ),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    with pytest.raises(ic.GraphError, match=r"scale \(input 1, per group\) has 4 values, expected 2"):
        ic.from_onnx(model)


def test_group_count_that_does_not_divide_the_channels_is_refused():
    weights = [_weight("scale", (4,)), _weight("bias", (4,))]
    model = _norm_model("GroupNormalization", (4, 3), dict(num_groups=3), weights, 21)
    with pytest.raises(ic.UnsupportedAttributeError, match="num_groups=3 .* divide the 4 channels"):
        ic.from_onnx(model)


def test_scale_fed_as_a_runtime_input_is_refused():
    node = helper.make_node("LayerNormalization", ["x", "scale"], ["y"])
    graph = helper.make_graph(
        [node], "g", [float_value("x", ["N", 4]), float_value("scale", [4])], [float_value("y", None)]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ic.GraphError, match=r"Scale \(input 1\) depends on the model input"):
        ic.from_onnx(model)


@pytest.mark.parametrize("axis", [0, -3])
def test_layer_normalization_over_the_batch_axis_is_refused(axis):
    model = _norm_model("LayerNormalization", (3, 4), dict(axis=axis), [_weight("scale", (1, 3, 4))], 17)
    with pytest.raises(ic.UnsupportedAttributeError, match="LayerNormalization normalizes over axes 0"):
        ic.from_onnx(model)


# ----------------------------------------------------------------------------- precision
def _exact(model, x):
    """The float64 reference per sample. GroupNormalization's reference (its onnx function body)
    loses about 1e-8 at mean 100 and std 0.01: it is taken, as the spec defines it, as
    LayerNormalization of each group (onnx.reference's, centred) then the per-channel scale and
    bias."""
    node = model.graph.node[0]
    if node.op_type != "GroupNormalization":
        evaluator = ReferenceEvaluator(to_float64(model))
        return np.stack([evaluator.run(None, {"x": sample[None]})[0][0] for sample in x])
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    groups, channels = attributes["num_groups"], x.shape[1]
    scale, bias = (numpy_helper.to_array(w).astype(np.float64) for w in model.graph.initializer)
    if model.opset_import[0].version < 21:
        scale, bias = np.repeat(scale, channels // groups), np.repeat(bias, channels // groups)
    per_group = x.reshape(len(x), groups, -1)
    layer_norm = helper.make_node("LayerNormalization", ["x", "one"], ["y"], axis=2, epsilon=attributes["epsilon"])
    graph = helper.make_graph(
        [layer_norm],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, per_group.shape)],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)],
        [numpy_helper.from_array(np.ones(per_group.shape[2]), "one")],
    )
    reference = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    normalized = reference.run(None, {"x": per_group})[0].reshape(x.shape)
    spread = (1, channels) + (1,) * (x.ndim - 2)
    return normalized * scale.reshape(spread) + bias.reshape(spread)


PRECISION_MODELS = {
    "layer": lambda eps: _norm_model("LayerNormalization", (16, 32), dict(epsilon=eps), [_weight("s", (32,))], 17),
    "instance": lambda eps: _norm_model(
        "InstanceNormalization", (4, 8, 8), dict(epsilon=eps), [_weight("s", (4,)), _weight("b", (4,))], 17
    ),
    "group": lambda eps: _norm_model(
        "GroupNormalization", (4, 8, 8), dict(epsilon=eps, num_groups=2), [_weight("s", (2,)), _weight("b", (2,))], 18
    ),
}


@pytest.mark.parametrize("epsilon", [1e-5, 1e-12])
@pytest.mark.parametrize("op", list(PRECISION_MODELS))
def test_large_mean_small_spread_in_float64(op, epsilon):
    """Mean 100, std 0.01: E[x^2] - E[x]^2 would lose 8 of float64's 16 digits; the centred
    variance keeps the result within 1e-9 of onnx.reference."""
    model = PRECISION_MODELS[op](epsilon)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = (100 + 0.01 * RNG.standard_normal((3, *shape))).astype(np.float32).astype(np.float64)
    expected = _exact(model, x)
    ours = ic.from_onnx(model).predict(x)
    assert np.abs(ours - expected).max() <= 1e-9 * np.abs(expected).max()


@pytest.mark.parametrize("op", list(PRECISION_MODELS))
def test_large_mean_in_float32(op):
    """Mean 100, std 1 in float32: within verify's float32 tolerance of the exact (float64)
    result. (onnxruntime's own GroupNormalization misses it here: it is compared to the exact.)"""
    model = PRECISION_MODELS[op](1e-5)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = (100 + RNG.standard_normal((3, *shape))).astype(np.float32)
    expected = _exact(model, x.astype(np.float64))
    ours = ic.from_onnx(model).astype(np.float32).predict(x)
    atol = FLOAT32_ATOL * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(ours, expected, rtol=FLOAT32_RTOL, atol=atol)


@pytest.mark.parametrize("epsilon", ["1e-5", "1e-5-std^2"])
@pytest.mark.parametrize("std", [0.01, 100.0])
@pytest.mark.parametrize("op", list(PRECISION_MODELS))
def test_any_spread_in_float32(op, std, epsilon):
    """In float32 within verify's tolerance of the exact (float64) result however far the data's
    spread is from the compile-time size estimate (about 1): the product (x - mu) rsqrt(var + eps)
    is formed in the log domain, whose relative error does not depend on the spread. (Through the
    square identity balanced for sizes 1 and 1, std 0.01 or 100 lost four digits: 10x over.)
    Epsilon 1e-5, and 1e-5 std^2 (as small next to the variance as at std 1: rsqrt ~ 1 / std).
    (Mean 100, std 1: ``test_large_mean_in_float32``; there the float32 mean's own rounding
    dominates, the same before and after.)"""
    model = PRECISION_MODELS[op](1e-5 if epsilon == "1e-5" else 1e-5 * std**2)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = (std * RNG.standard_normal((3, *shape))).astype(np.float32)
    expected = _exact(model, x.astype(np.float64))
    ours = ic.from_onnx(model).astype(np.float32).predict(x)
    atol = FLOAT32_ATOL * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(ours, expected, rtol=FLOAT32_RTOL, atol=atol)


@pytest.mark.parametrize("std", [1e-15, 1e-3, 1e3, 1e15])
@pytest.mark.parametrize("op", list(PRECISION_MODELS))
def test_any_spread_in_float64(op, std):
    """float64 within 1e-9 of onnx.reference at spreads from 1e-15 to 1e15 (eps 1e-5 std^2, a
    float32 attribute)."""
    model = PRECISION_MODELS[op](1e-5 * std**2)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = std * RNG.standard_normal((3, *shape))
    expected = _exact(model, x)
    ours = ic.from_onnx(model).predict(x)
    assert np.abs(ours - expected).max() <= 1e-9 * np.abs(expected).max()


def test_constant_groups_give_the_bias():
    """A constant group (c_j = 0: both logs at the floor) standardizes to 0 exactly enough: y is
    the bias, in float32 and float64, as onnx.reference gives."""
    model = PRECISION_MODELS["instance"](1e-5)
    x = np.full((2, 4, 8, 8), 3.0)
    expected = _exact(model, x)
    for dtype in (np.float64, np.float32):
        ours = ic.from_onnx(model).astype(dtype).predict(x.astype(dtype))
        assert np.isfinite(ours).all()
        np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-30)


def test_sensitivity_says_the_blocks_void_the_bound():
    """square, log, log_positive and exp are not Lipschitz: the sensitivity report is not valid,
    naming them."""
    from implicit_compiler.analysis.bounds import sensitivity

    model = _norm_model("LayerNormalization", (4,), dict(axis=-1), [_weight("scale", (4,))], 17)
    report = sensitivity(ic.from_onnx(model))
    assert not report.valid and "not Lipschitz" in report.reason
    assert all(f"({name})" in report.reason for name in ("square", "log", "log_positive", "exp"))


# ----------------------------------------------------------------------------- torch exports
def _torch_export(module, shape, dynamo, opset):
    module.eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter))
    example = (torch.randn(shape),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(
                module, example, dynamo=True, dynamic_shapes=({0: torch.export.Dim("N")},), input_names=["x"]
            )
            return program.model_proto
        buffer = io.BytesIO()
        torch.onnx.export(
            module, example, buffer, dynamo=False, opset_version=opset, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        )  # fmt: skip
        return onnx.load_from_string(buffer.getvalue())


def _torch_modules():
    torch.manual_seed(0)
    return {
        "layer-norm-last-axis": (torch.nn.LayerNorm(8), (2, 5, 8)),
        "layer-norm-chw": (torch.nn.LayerNorm([3, 4, 4]), (2, 3, 4, 4)),
        "group-norm": (torch.nn.GroupNorm(2, 4), (2, 4, 3, 3)),
        "instance-norm-affine": (torch.nn.InstanceNorm2d(3, affine=True), (2, 3, 4, 4)),
        "instance-norm": (torch.nn.InstanceNorm2d(3), (2, 3, 4, 4)),
    }


TORCH_MODULES = ("layer-norm-last-axis", "layer-norm-chw", "group-norm", "instance-norm-affine", "instance-norm")


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", TORCH_MODULES)
def test_torch_exports(name, exporter):
    """Both exporters; the legacy one at opset 17 writes LayerNormalization itself (GroupNorm as
    InstanceNormalization of (N, groups, -1) then Mul and Add), the dynamo one at 18."""
    module, shape = _torch_modules()[name]
    model = _torch_export(module, shape, exporter == "dynamo", 17)
    ops = {node.op_type for node in model.graph.node}
    assert ops & {"LayerNormalization", "InstanceNormalization"}
    assert_matches_onnxruntime(model)


# ----------------------------------------------------------------------------- onnx's node tests
NODE_TEST_OPS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization")


@pytest.fixture(scope="module")
def node_tests() -> dict:
    """onnx's own node tests of the three ops (this onnx ships the generators, not the data)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators' own overflow warnings
        cases = collect_testcases(None)
    return {case.name: case for case in cases if case.model.graph.node[0].op_type in NODE_TEST_OPS}


def _weights_as_initializers(case) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """The node test's model with every graph input but the first (scale, bias) stored as an
    initializer from its data set; returns it and the remaining (data) inputs."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    inputs, _ = case.data_sets[0]
    kept = model.graph.input[0]
    for value_info, value in zip(list(model.graph.input[1:]), inputs[1:]):
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), value_info.name))
    del model.graph.input[1:]
    assert kept.name == model.graph.input[0].name
    return model, inputs[:1]


def test_every_node_test_of_the_ops_is_covered(node_tests):
    assert len(node_tests) == 23
    assert sorted(node_tests) == sorted(NODE_TESTS)


NODE_TESTS = (
    [f"test_group_normalization_{name}" for name in ("example", "epsilon")]
    + [f"test_instancenorm_{name}" for name in ("example", "epsilon")]
    + [f"test_layer_normalization_4d_axis{a}" for a in ("0", "1", "2", "3", "_negative_1", "_negative_2")]
    + [f"test_layer_normalization_4d_axis_negative_{a}" for a in ("3", "4")]
    + [f"test_layer_normalization_2d_axis{a}" for a in ("0", "1", "_negative_1", "_negative_2")]
    + [f"test_layer_normalization_3d_axis{a}_epsilon" for a in ("0", "1", "2", "_negative_1", "_negative_2")]
    + ["test_layer_normalization_3d_axis_negative_3_epsilon", "test_layer_normalization_default_axis"]
)


@pytest.mark.parametrize("name", NODE_TESTS)
def test_onnx_node_test_compiles_and_matches(node_tests, name):
    """Each compiles (static shapes: the input is one sample) and matches the test's outputs in
    float32 (they were computed in float32) and float64, and onnxruntime and the reference."""
    case = node_tests[name]
    model, (x,) = _weights_as_initializers(case)
    _, expected_outputs = case.data_sets[0]
    compiled = ic.from_onnx(model)
    for dtype in (np.float64, np.float32):
        sample = np.asarray(x, dtype=dtype).reshape(1, *compiled.inputs[0].shape)  # a batch of one
        predicted = compiled.astype(dtype).predict(sample)
        predicted = predicted if isinstance(predicted, dict) else {compiled.outputs[0].name: predicted}
        for spec, expected in zip(compiled.outputs, expected_outputs):
            expected = np.asarray(expected, dtype=np.float64)
            atol = 1e-5 * max(1.0, float(np.abs(expected).max()))
            np.testing.assert_allclose(predicted[spec.name].reshape(expected.shape), expected, rtol=1e-4, atol=atol)
    if model.graph.node[0].op_type == "GroupNormalization":  # stash_type 1: a float32 reference
        assert_matches_onnxruntime(model, check_reference=False)
        assert_matches_onnxruntime(_with_attribute(model, stash_type=11), check_onnxruntime=False)
    else:
        assert_matches_onnxruntime(model)
