"""Opsets 26 to 28, the newest the installed onnx defines: the registered ops whose schemas changed
after opset 25, each at its newest version, against onnxruntime (float32) and onnx.reference
(float64); the registry walked against onnx's schema history; onnx's node tests of these ops at
opsets 26 to 28; a small CNN converted to opset 28 with onnx.version_converter.

What changed after opset 25, from the schemas' docs, attributes and type constraints:
- Cast-28: the float6 types (FLOAT6E2M3, FLOAT6E3M2) added. A cast of the model input to one
  rounds it (refused, as every rounding cast); casts of constants are folded by the reference.
- Celu-28: bfloat16, float16, double added, and a function body; same formula.
- DepthToSpace-28: a context-dependent function body; same attributes, types and semantics.
- SpaceToDepth-28: a ``mode`` attribute (DCR, the default and the older versions' order; CRD).
- Mod-28: fmod=0 defined for floats too (floor division, the sign of B); folded on constants.
- Range-27: ``stash_type``, the accumulation type of float16/bfloat16 ranges; folded on
  constants (in float64, where it has no effect).
- Einsum-28: bfloat16 added.
onnxruntime 1.32 runs opset 28 (no conversion needed), but not the float6 types: the float6
casts are compared with onnx.reference only.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import onnx
import onnx.defs
import pytest
from onnx import TensorProto, helper, numpy_helper, version_converter
from onnx_helpers import assert_matches_onnxruntime

import implicit_compiler as ic
from implicit_compiler.frontend.registry import REGISTRY, find_lowering

RNG = np.random.default_rng(28)
NEWEST = onnx.defs.onnx_opset_version()
# The registered ops whose schema changed after opset 25, and their newest version: each was
# read and is tested below. A newer onnx changing a registered op fails
# test_the_ops_changed_after_opset_25_are_the_ones_reviewed until it is reviewed and listed.
REVIEWED = {"Cast": 28, "Celu": 28, "DepthToSpace": 28, "SpaceToDepth": 28, "Mod": 28, "Range": 27, "Einsum": 28}


def _model(nodes, inputs, initializers=(), opset: int = 28) -> onnx.ModelProto:
    """A float model of ``nodes`` writing ``y``; ``inputs`` = [(name, shape)], batch axis first."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(value, dtype=np.float32), name) for name, value in initializers],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _lowered_version(op: str, opset: int) -> int:
    return find_lowering(op, "", opset, "test").since_version


# ----------------------------------------------------------------------------- the registry
def _schema_versions(op: str) -> list[int]:
    """The since_versions onnx defines for an op, deprecated and experimental schemas aside
    (Upsample-10, deprecated: a model of opset 10+ must use Resize; Upsample-1, experimental)."""
    return sorted(
        schema.since_version
        for schema in onnx.defs.get_all_schemas_with_history()
        if schema.name == op
        and schema.domain == ""
        and schema.since_version <= NEWEST
        and not schema.deprecated
        and schema.support_level == onnx.defs.OpSchema.SupportType.COMMON
    )


def test_every_registered_op_is_lowered_at_every_version_onnx_defines():
    """Every schema version of every registered op, up to the newest opset the installed onnx
    defines, has its lowering. A newer onnx that changes a registered op fails this until the
    change is read and lowered (without a lowering, that version is refused naming it)."""
    registered = {op for op, _ in REGISTRY}
    missing = [
        (op, version) for op in sorted(registered) for version in _schema_versions(op) if (op, version) not in REGISTRY
    ]
    assert missing == [], (
        f"no lowering for {missing}: read each schema's changes (docs, attributes, types), then lower "
        "it (raise LOWERED_THROUGH_OPSET, or list the version in the op's @lowers(since=...))"
    )


def test_the_ops_changed_after_opset_25_are_the_ones_reviewed():
    registered = {op for op, _ in REGISTRY}
    changed = {op: versions[-1] for op in registered if (versions := _schema_versions(op))[-1] > 25}
    assert changed == REVIEWED


@pytest.mark.parametrize(("op", "version"), sorted(REVIEWED.items()))
def test_the_newest_version_is_the_one_lowered_at_opset_28(op, version):
    assert _lowered_version(op, 28) == version
    assert _lowered_version(op, version - 1) < version


# ----------------------------------------------------------------------------- each op at its newest version
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.5])
def test_celu_28(alpha):
    model = _model([helper.make_node("Celu", ["x"], ["y"], alpha=alpha)], [("x", ["N", 3, 4])])
    assert_matches_onnxruntime(model)


@pytest.mark.parametrize("mode", [None, "DCR", "CRD"])
def test_depth_to_space_28(mode):
    """After a 1x1 Conv, so that the rows moved are sums of the input, not the input itself."""
    attributes = {} if mode is None else {"mode": mode}
    weights = RNG.standard_normal((8, 3, 1, 1))
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"]),
        helper.make_node("DepthToSpace", ["c"], ["y"], blocksize=2, **attributes),
    ]
    assert_matches_onnxruntime(_model(nodes, [("x", ["N", 3, 2, 3])], [("W", weights)]))


@pytest.mark.parametrize("mode", [None, "DCR", "CRD"])
@pytest.mark.parametrize("blocksize", [2, 3])
def test_space_to_depth_28(mode, blocksize):
    """The new mode attribute: CRD orders the output channels column, row, depth."""
    attributes = {} if mode is None else {"mode": mode}
    node = helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=blocksize, **attributes)
    assert_matches_onnxruntime(_model([node], [("x", ["N", 2, 2 * blocksize, 3 * blocksize])]))


def test_space_to_depth_crd_inverts_depth_to_space_crd():
    """A round trip through both ops, CRD, is the identity: checked against the input itself."""
    nodes = [
        helper.make_node("SpaceToDepth", ["x"], ["s"], blocksize=2, mode="CRD"),
        helper.make_node("DepthToSpace", ["s"], ["y"], blocksize=2, mode="CRD"),
    ]
    compiled = assert_matches_onnxruntime(_model(nodes, [("x", ["N", 3, 4, 6])]))
    x = RNG.standard_normal((2, 3, 4, 6))
    np.testing.assert_array_equal(compiled.predict(x), x)


@pytest.mark.parametrize("target", [TensorProto.FLOAT, TensorProto.DOUBLE])
def test_cast_28_to_a_float_type(target):
    """saturate and round_mode only apply to float8 targets: no effect here."""
    nodes = [
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("Cast", ["t"], ["c"], to=target, saturate=0, round_mode="down"),
        helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT),
    ]
    assert_matches_onnxruntime(_model(nodes, [("x", ["N", 5])]))


@pytest.mark.parametrize("target", ["FLOAT6E2M3", "FLOAT6E3M2"])
def test_cast_28_of_constants_to_float6_is_folded(target):
    """Constants rounded to float6 and back, added to the input: folded by the reference.
    onnxruntime 1.32 has no float6 kernels, so against onnx.reference only."""
    constants = np.array([0.3, -1.7, 2.2, 5.1, -0.05, 7.3], dtype=np.float32)
    nodes = [
        helper.make_node("Cast", ["k"], ["k6"], to=getattr(TensorProto, target)),
        helper.make_node("Cast", ["k6"], ["kf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "kf"], ["y"]),
    ]
    compiled = assert_matches_onnxruntime(_model(nodes, [("x", ["N", 6])], [("k", constants)]), check_onnxruntime=False)
    offset = compiled.predict(np.zeros((1, 6)))[0]
    assert not np.allclose(offset, constants), "the constants were rounded to float6"


@pytest.mark.parametrize("target", ["FLOAT6E2M3", "FLOAT6E3M2"])
def test_cast_28_of_the_input_to_float6_is_refused(target):
    node = helper.make_node("Cast", ["x"], ["y"], to=getattr(TensorProto, target))
    model = _model([node], [("x", ["N", 6])])
    with pytest.raises(ic.UnsupportedOpError, match=rf"\(Cast, opset 28\).*{target} rounds it"):
        ic.from_onnx(model)


@pytest.mark.parametrize("fmod", [0, 1])
def test_mod_28_of_float_constants_is_folded(fmod):
    """fmod=0 on floats is new in Mod-28: A - floor(A / B) B, the sign of B (fmod=1: of A)."""
    a = np.array([5.5, -5.5, 5.5, -5.5, 0.75, -7.0, 3.0, 2.25])
    b = np.array([2.0, 2.0, -2.0, -2.0, 0.5, 2.5, -1.5, 4.0])
    nodes = [helper.make_node("Mod", ["a", "b"], ["m"], fmod=fmod), helper.make_node("Add", ["x", "m"], ["y"])]
    compiled = assert_matches_onnxruntime(_model(nodes, [("x", ["N", 8])], [("a", a), ("b", b)]))
    expected = np.fmod(a, b) if fmod else a - np.floor(a / b) * b
    np.testing.assert_array_equal(compiled.predict(np.zeros((1, 8)))[0], expected)


@pytest.mark.parametrize(("opset", "stash_type"), [(27, None), (27, 1), (28, 11), (26, None)])
def test_range_27_of_constants_is_folded(opset, stash_type):
    """stash_type (Range-27) only changes float16/bfloat16 ranges; these are float32."""
    attributes = {} if stash_type is None else {"stash_type": stash_type}
    nodes = [
        helper.make_node("Range", ["start", "limit", "delta"], ["r"], **attributes),
        helper.make_node("Mul", ["x", "r"], ["y"]),
    ]
    initializers = [("start", -1.5), ("limit", 2.0), ("delta", 0.5)]
    assert_matches_onnxruntime(_model(nodes, [("x", ["N", 7])], initializers, opset=opset))


@pytest.mark.parametrize("equation", ["nij,njk->nik", "nij,nkj->nik", "ni,ni->n"])
def test_einsum_28_of_two_variables(equation):
    """The product of two values computed from the input: the square identity."""
    left, right = equation.split("->")[0].split(",")
    sizes = {"n": "N", "i": 2, "j": 3, "k": 4}
    node = helper.make_node("Einsum", ["a", "b"], ["y"], equation=equation)
    model = _model([node], [("a", [sizes[c] for c in left]), ("b", [sizes[c] for c in right])])
    assert_matches_onnxruntime(model)


# ----------------------------------------------------------------------------- attribute values refused
@pytest.mark.parametrize(
    ("op", "opset", "mode", "message"),
    [
        ("SpaceToDepth", 13, "CRD", r"version 13 of SpaceToDepth has no mode attribute"),
        ("SpaceToDepth", 28, "XYZ", r"orders blocks 'DCR' \(the default\) or 'CRD'"),
        ("DepthToSpace", 28, "XYZ", r"orders blocks 'DCR' \(the default\) or 'CRD'"),
        ("DepthToSpace", 13, "dcr", r"orders blocks 'DCR' \(the default\) or 'CRD'"),
    ],
)
def test_a_block_mode_the_schema_does_not_define_is_refused(op, opset, mode, message):
    """The reference runs any DepthToSpace mode other than DCR as CRD, and SpaceToDepth's mode
    even before opset 28, where the schema has none: refused, not run with another order."""
    channels = 8 if op == "DepthToSpace" else 2
    node = helper.make_node(op, ["x"], ["y"], blocksize=2, mode=mode)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    where = rf"\({op}, opset {opset}\): attribute mode={mode!r}"
    with pytest.raises(ic.UnsupportedAttributeError, match=rf"{where} is not supported; .*{message}"):
        ic.from_onnx(model)


def test_mod_fmod_other_than_0_or_1_is_refused():
    """The reference folds any fmod but 1 as 0: refused rather than folded as floor division."""
    nodes = [helper.make_node("Mod", ["a", "b"], ["m"], fmod=2), helper.make_node("Mul", ["x", "m"], ["y"])]
    model = _model(nodes, [("x", ["N", 2])], [("a", [0.5, -1.0]), ("b", [2.0, 3.0])])
    with pytest.raises(ic.UnsupportedAttributeError, match=r"\(Mod, opset 28\): attribute fmod=2 .*0 \(floor\)"):
        ic.from_onnx(model)


def test_range_stash_type_other_than_float_or_double_is_refused():
    nodes = [
        helper.make_node("Range", ["a", "b", "s"], ["m"], stash_type=TensorProto.INT64),
        helper.make_node("Mul", ["x", "m"], ["y"]),
    ]
    model = _model(nodes, [("x", ["N", 2])], [("a", 0.0), ("b", 2.0), ("s", 1.0)])
    message = r"\(Range, opset 28\): attribute stash_type=7 .*FLOAT \(1, the default\) or DOUBLE"
    with pytest.raises(ic.UnsupportedAttributeError, match=message):
        ic.from_onnx(model)


# ----------------------------------------------------------------------------- onnx node tests, opsets 26-28
PREFIXES = (
    "test_cast_",
    "test_celu",
    "test_depthtospace",
    "test_spacetodepth",
    "test_mod_",
    "test_range_",
    "test_einsum_",
)
FLOATS = ("FLOAT", "DOUBLE", "FLOAT16", "BFLOAT16")
# Those that compile and match the test's expected outputs. Mod and Range read their inputs as
# constants here (they are folded: the inputs become initializers, the output is cast to float
# and added to a new model input).
MATCH = (
    "test_cast_FLOAT_to_FLOAT16", "test_cast_FLOAT_to_DOUBLE", "test_cast_FLOAT16_to_FLOAT", "test_cast_FLOAT16_to_DOUBLE",
    "test_cast_DOUBLE_to_FLOAT", "test_cast_DOUBLE_to_FLOAT16", "test_cast_FLOAT_to_BFLOAT16",
    "test_cast_BFLOAT16_to_FLOAT", "test_celu", "test_celu_expanded", "test_celu_float16", "test_celu_float16_expanded",
    "test_celu_bfloat16", "test_celu_bfloat16_expanded", "test_depthtospace_example",
    "test_depthtospace_example_expanded", "test_depthtospace_crd_mode_example",
    "test_depthtospace_crd_mode_example_expanded", "test_einsum_transpose", "test_einsum_sum",
    "test_einsum_batch_diagonal", "test_einsum_inner_prod", "test_einsum_batch_matmul",
    "test_einsum_batch_matmul_bfloat16", "test_einsum_sum_bfloat16", "test_einsum_transpose_bfloat16",
    "test_einsum_scalar", "test_mod_mixed_sign_float64", "test_mod_mixed_sign_float32", "test_mod_mixed_sign_float16",
    "test_mod_float64_mixed_sign_fmod_0", "test_mod_float32_mixed_sign_fmod_0", "test_mod_float16_mixed_sign_fmod_0",
    "test_mod_mixed_sign_int64", "test_mod_mixed_sign_int32", "test_mod_mixed_sign_int16", "test_mod_mixed_sign_int8",
    "test_mod_uint8", "test_mod_uint16", "test_mod_uint32", "test_mod_uint64", "test_mod_int64_fmod",
    "test_mod_broadcast", "test_range_float_type_positive_delta", "test_range_float16_type_positive_delta",
    "test_range_bfloat16_type_positive_delta", "test_range_int32_type_negative_delta", "test_spacetodepth",
    "test_spacetodepth_expanded", "test_spacetodepth_example", "test_spacetodepth_example_expanded",
    "test_spacetodepth_dcr_mode_example", "test_spacetodepth_dcr_mode_example_expanded",
    "test_spacetodepth_crd_mode_example", "test_spacetodepth_crd_mode_example_expanded",
)  # fmt: skip


def _refusal(name: str) -> tuple[type, str]:
    """The typed error (and message) each other node test is refused with, and why."""
    cast = re.fullmatch(r"test_cast_(?:no_saturate_|e8m0_)?([A-Z0-9]+)_to_([A-Z0-9]+)", name)
    if cast and cast[1] not in FLOATS:  # a float8, float4, int4, int2 input: not real-valued
        return ic.GraphError, rf"has element type {cast[1]}"
    if cast:  # the input rounded to a float8, float4, int4 or int2 type
        return ic.UnsupportedOpError, rf"to {cast[2]} rounds it, which is not affine"
    if name.startswith("test_mod_float_edge_cases"):  # NaN and inf constants
        return ic.NonFiniteError, r"NaN or inf"
    if name.startswith("test_range_") and name.endswith("_expanded"):  # a Loop over the range
        return ic.UnsupportedOpError, r"\(Loop, opset 27\)"
    raise AssertionError(f"{name}: neither matched nor refused")


@pytest.fixture(scope="module")
def node_tests() -> dict:
    """onnx's node tests of these ops at opsets 26 to 28 (built by onnx's own generators)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators' own overflow warnings (casts to float8...)
        cases = collect_testcases(None)
    return {c.name: c for c in cases if c.name.startswith(PREFIXES) and c.model.opset_import[0].version >= 26}


def _array(value) -> np.ndarray:
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)


def _folded(case) -> tuple[onnx.ModelProto, list, np.ndarray]:
    """The test's inputs as initializers; its output cast to float and added to a new input z."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    inputs, outputs = case.data_sets[0]
    expected = _array(outputs[0]).astype(np.float64)
    graph = model.graph
    for value_info, value in zip(graph.input, inputs):
        graph.initializer.append(numpy_helper.from_array(_array(value), value_info.name))
    del graph.input[:]
    graph.node.extend(
        [
            helper.make_node("Cast", [graph.output[0].name], ["as_float"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["z_offset", "as_float"], ["folded"]),
        ]
    )
    graph.input.append(helper.make_tensor_value_info("z_offset", TensorProto.FLOAT, ["N", *expected.shape]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("folded", TensorProto.FLOAT, None))
    z = np.linspace(-1, 1, expected.size).reshape(expected.shape)
    return model, [z], z + expected


def _as_given(case) -> tuple[onnx.ModelProto, list, np.ndarray]:
    """The test as it is; the casts' NaN and inf inputs (refused: inputs must be finite) set to 0
    and their expected outputs with them."""
    inputs, outputs = case.data_sets[0]
    inputs = [_array(value).astype(np.float64) for value in inputs]
    expected = _array(outputs[0]).astype(np.float64)
    if len(inputs) == 1 and inputs[0].shape == expected.shape:
        finite = np.isfinite(inputs[0])
        inputs, expected = [np.where(finite, inputs[0], 0.0)], np.where(finite, expected, 0.0)
    return case.model, inputs, expected


def _output_precision(case) -> float:
    """Relative tolerance: the output type's unit roundoff for half-precision outputs (these are
    lowered in float64 and not rounded to half precision, as every float16 model), else 1e-9."""
    elem_type = case.model.graph.output[0].type.tensor_type.elem_type
    return {TensorProto.FLOAT16: 2.0**-11, TensorProto.BFLOAT16: 2.0**-8}.get(elem_type, 1e-9)


def test_every_node_test_of_opsets_26_to_28_is_matched_or_refused(node_tests):
    """The lists are onnx's tests as they are: 55 of the 114 compile and match; 59 are refused."""
    assert set(MATCH) <= set(node_tests)
    refused = sorted(set(node_tests) - set(MATCH))
    assert all(_refusal(name) for name in refused)
    assert (len(MATCH), len(refused)) == (55, 59)


@pytest.mark.parametrize("name", MATCH)
def test_onnx_node_test_compiles_and_matches(node_tests, name):
    """float64 against the test's expected output (float32 data: 1e-6 of its size), and float32
    (1e-4); half-precision outputs within their unit roundoff."""
    case = node_tests[name]
    fold = name.startswith(("test_mod_", "test_range_"))
    model, inputs, expected = _folded(case) if fold else _as_given(case)
    compiled = ic.from_onnx(model)
    scale = max(1.0, float(np.abs(expected).max()))
    for dtype, rtol in ((np.float64, max(1e-6, _output_precision(case))), (np.float32, 1e-4)):
        feeds = {spec.name: value.astype(dtype).reshape(1, *spec.shape) for spec, value in zip(compiled.inputs, inputs)}
        predicted = compiled.astype(dtype).predict(feeds)
        predicted = np.asarray(predicted, dtype=np.float64).reshape(expected.shape)
        atol = max(rtol, _output_precision(case)) * scale
        np.testing.assert_allclose(predicted, expected, rtol=0, atol=atol, err_msg=f"{name} in {dtype.__name__}")


def test_every_other_node_test_is_refused_saying_why(node_tests):
    """The Mod and Range tests folded as above (NaN and inf constants, and a Loop, refused), the
    others as they are."""
    for name in sorted(set(node_tests) - set(MATCH)):
        error, message = _refusal(name)
        fold = name.startswith(("test_mod_", "test_range_"))
        model = _folded(node_tests[name])[0] if fold else node_tests[name].model
        with pytest.raises(error, match=message):
            ic.from_onnx(model)


# ----------------------------------------------------------------------------- a CNN converted to opset 28
def _small_cnn(opset: int = 13) -> onnx.ModelProto:
    """Conv -> Relu -> MaxPool -> Flatten -> Gemm -> Softmax on (N, 1, 8, 8) images."""
    rng = np.random.default_rng(8)
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "G", "H"], ["g"], transB=1),
        helper.make_node("Softmax", ["g"], ["y"], axis=1),
    ]
    initializers = [
        ("W", rng.standard_normal((4, 1, 3, 3)) * 0.5),
        ("B", rng.standard_normal(4) * 0.1),
        ("G", rng.standard_normal((5, 64)) * 0.2),
        ("H", rng.standard_normal(5) * 0.1),
    ]
    return _model(nodes, [("x", ["N", 1, 8, 8])], initializers, opset=opset)


def test_a_small_cnn_converted_to_opset_28_compiles_and_matches():
    converted = version_converter.convert_version(_small_cnn(13), NEWEST)
    assert converted.opset_import[0].version == 28
    assert_matches_onnxruntime(converted, batch=5)
