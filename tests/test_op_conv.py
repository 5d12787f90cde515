"""Conv and ConvTranspose lowerings against onnxruntime, the float64 reference and a naive scatter.

onnx.reference's ConvTranspose is wrong for group > 1 (it slices W by output channels and adds
B[0] to every group) and fails for output_shape without auto_pad; those cases are checked in
float64 against ``naive_conv_transpose`` below instead (every ConvTranspose case is, anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx_helpers import assert_matches_onnxruntime, random_inputs

import implicit_compiler as ic
from implicit_compiler.frontend.context import LoweringContext, NodeView
from implicit_compiler.frontend.expression import Affine
from implicit_compiler.frontend.graph import to_float64
from implicit_compiler.frontend.ops.conv import lower_conv, lower_conv_transpose


@dataclass(frozen=True)
class Case:
    """One Conv / ConvTranspose node: X's per-sample shape (with a leading 1), W's shape, attributes."""

    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    attributes: dict = field(default_factory=dict)
    bias: bool = True
    zeros: bool = False  # set some weights to exact zeros (dropped from T)


def conv_model(
    op: str, case: Case, opset: int = 17, seed: int = 0, static_leading: int | None = None, check: bool = True
) -> onnx.ModelProto:
    """A one-node model with random float32 initializers; the leading axis is the batch N.

    ``check=False`` skips the ONNX checker, for the invalid attribute values of the error tests.
    """
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal(case.w_shape) / math.sqrt(math.prod(case.w_shape[1:]))
    if case.zeros:
        weights[rng.random(case.w_shape) < 0.4] = 0.0
    group = case.attributes.get("group", 1)
    out_channels = case.w_shape[0] if op == "Conv" else case.w_shape[1] * group
    initializers = [numpy_helper.from_array(weights.astype(np.float32), "W")]
    names = ["x", "W"]
    if case.bias:
        initializers.append(numpy_helper.from_array(rng.standard_normal(out_channels).astype(np.float32), "B"))
        names.append("B")
    node = helper.make_node(op, names, ["y"], name="conv1", **case.attributes)
    leading = static_leading if static_leading is not None else "N"
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [leading, *case.x_shape[1:]])],
        [_output("y", len(case.x_shape))],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 17 else 10
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def _output(name: str, rank: int) -> onnx.ValueInfoProto:
    """A float output of the given rank with symbolic dimensions (shape inference fills them)."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"{name}_{axis}" for axis in range(rank)])


CONV = {
    "1d": Case((1, 3, 10), (4, 3, 3)),
    "1d-stride-asymmetric-pads": Case((1, 3, 11), (4, 3, 4), {"strides": [2], "pads": [1, 2]}),
    "2d": Case((1, 3, 7, 6), (5, 3, 3, 3)),
    "2d-kernel-shape-given": Case((1, 3, 7, 6), (5, 3, 3, 3), {"kernel_shape": [3, 3]}),
    "stride-2": Case((1, 3, 8, 7), (4, 3, 3, 3), {"strides": [2, 2]}),
    "stride-3x2-pads": Case((1, 2, 9, 8), (3, 2, 3, 3), {"strides": [3, 2], "pads": [1, 1, 1, 1]}),
    "pads-symmetric": Case((1, 3, 6, 6), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    "pads-asymmetric": Case((1, 3, 6, 5), (4, 3, 3, 3), {"pads": [0, 2, 1, 0]}),
    "pads-wider-than-kernel": Case((1, 2, 4, 4), (3, 2, 2, 2), {"pads": [3, 0, 2, 4]}),
    "auto-pad-notset": Case((1, 3, 6, 6), (4, 3, 3, 3), {"auto_pad": "NOTSET", "pads": [1, 0, 1, 0]}),
    "auto-pad-valid-stride-2": Case((1, 3, 8, 7), (4, 3, 3, 3), {"auto_pad": "VALID", "strides": [2, 2]}),
    "same-upper-odd": Case((1, 3, 6, 6), (4, 3, 2, 2), {"auto_pad": "SAME_UPPER"}),
    "same-lower-odd": Case((1, 3, 6, 6), (4, 3, 2, 2), {"auto_pad": "SAME_LOWER"}),
    "same-upper-stride-2": Case((1, 3, 7, 6), (4, 3, 4, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    "same-lower-stride-2": Case((1, 3, 7, 6), (4, 3, 4, 3), {"auto_pad": "SAME_LOWER", "strides": [2, 2]}),
    "dilations": Case((1, 3, 9, 8), (4, 3, 3, 3), {"dilations": [2, 2]}),
    "dilations-stride-pads": Case(
        (1, 2, 9, 10), (3, 2, 3, 2), {"dilations": [2, 3], "strides": [2, 1], "pads": [2, 1, 0, 3]}
    ),
    "group-2": Case((1, 4, 6, 6), (6, 2, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
    "group-3-stride": Case((1, 6, 7, 7), (3, 2, 3, 3), {"group": 3, "strides": [2, 2]}),
    "depthwise": Case((1, 4, 6, 6), (4, 1, 3, 3), {"group": 4, "pads": [1, 1, 1, 1]}),
    "depthwise-multiplier-2": Case((1, 3, 6, 6), (6, 1, 3, 3), {"group": 3, "strides": [2, 2]}),
    "no-bias": Case((1, 3, 6, 6), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}, bias=False),
    "kernel-2x3": Case((1, 3, 6, 7), (4, 3, 2, 3), {"pads": [0, 1, 1, 1]}),
    "kernel-1x5": Case((1, 2, 5, 9), (3, 2, 1, 5), {"strides": [1, 2]}),
    "kernel-1x1": Case((1, 5, 4, 4), (3, 5, 1, 1)),
    "zero-weights": Case((1, 3, 6, 6), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}, zeros=True),
    "3d": Case((1, 2, 4, 5, 4), (3, 2, 2, 3, 2), {"strides": [1, 2, 1], "pads": [1, 0, 1, 0, 1, 1]}),
}


@pytest.mark.parametrize("case", list(CONV.values()), ids=list(CONV))
def test_conv_matches_onnxruntime(case):
    assert_matches_onnxruntime(conv_model("Conv", case), batch=3)


# onnxruntime refuses these ("Dilation not supported for AutoPadType::SAME_UPPER or SAME_LOWER"):
# checked against onnx.reference only, whose SAME padding uses the dilated kernel extent.
SAME_DILATED = {
    "same-upper-dilated": Case((1, 2, 7, 7), (3, 2, 2, 3), {"auto_pad": "SAME_UPPER", "dilations": [3, 2]}),
    "same-lower-dilated-stride": Case(
        (1, 2, 8, 7), (3, 2, 3, 2), {"auto_pad": "SAME_LOWER", "dilations": [2, 3], "strides": [2, 1]}
    ),
}


@pytest.mark.parametrize("case", list(SAME_DILATED.values()), ids=list(SAME_DILATED))
def test_conv_same_dilated_matches_reference(case):
    model = conv_model("Conv", case)
    compiled = ic.from_onnx(model)
    feeds = random_inputs(model, batch=3)
    evaluator = ReferenceEvaluator(to_float64(model))
    expected = np.concatenate([evaluator.run(None, {"x": sample[None]})[0] for sample in feeds["x"]])
    ours = compiled.predict(feeds)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("opset", [1, 11, 22])
def test_conv_every_version(opset):
    case = Case((1, 3, 6, 6), (4, 3, 3, 3), {"strides": [2, 1], "pads": [1, 0, 0, 1]})
    assert_matches_onnxruntime(conv_model("Conv", case, opset=opset), batch=2)


def test_conv_without_batch_axis_is_block_diagonal():
    """A static leading dimension 2 is not a batch axis: both entries are convolved independently."""
    case = Case((2, 3, 5, 5), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]})
    compiled = assert_matches_onnxruntime(conv_model("Conv", case, static_leading=2), batch=2)
    assert compiled.outputs[0].shape == (2, 4, 5, 5)


# ----------------------------------------------------------------------------------- ConvTranspose
@dataclass(frozen=True)
class TransposeCase:
    """A ConvTranspose case with the pads and output size the spec gives (worked out by hand)."""

    case: Case
    begins: tuple[int, ...]
    out_sizes: tuple[int, ...]
    reference_ok: bool = True  # onnx.reference gets it right


CONV_TRANSPOSE = {
    # out = stride * (in - 1) + output_padding + (k - 1) * dilation + 1 - pad_begin - pad_end
    "1d-stride-2": TransposeCase(Case((1, 2, 5), (2, 3, 3), {"strides": [2]}), (0,), (11,)),
    "2d": TransposeCase(Case((1, 3, 4, 5), (3, 2, 3, 3)), (0, 0), (6, 7)),
    "strides-2x3": TransposeCase(Case((1, 2, 3, 4), (2, 3, 3, 2), {"strides": [2, 3]}), (0, 0), (7, 11)),
    "pads": TransposeCase(Case((1, 2, 4, 4), (2, 3, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}), (1, 1), (7, 7)),
    "pads-asymmetric": TransposeCase(
        Case((1, 2, 4, 4), (2, 3, 3, 3), {"strides": [2, 2], "pads": [1, 0, 0, 2]}), (1, 0), (8, 7)
    ),
    "output-padding": TransposeCase(
        Case((1, 2, 3, 3), (2, 3, 3, 3), {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 1]}),
        (1, 0),
        (7, 7),
    ),
    # totals 2 * 2 + 3 - (6, 5) = (1, 2): without auto_pad the odd pixel goes to the beginning
    "output-shape": TransposeCase(
        Case((1, 2, 3, 3), (2, 3, 3, 3), {"strides": [2, 2], "output_shape": [6, 5]}), (1, 1), (6, 5), False
    ),
    "output-shape-ignores-pads": TransposeCase(
        Case((1, 2, 3, 3), (2, 3, 3, 3), {"strides": [2, 2], "output_shape": [6, 5], "pads": [0, 2, 0, 2]}),
        (1, 1),
        (6, 5),
        False,
    ),
    "output-shape-same-upper": TransposeCase(
        Case((1, 2, 3, 3), (2, 3, 3, 3), {"strides": [2, 2], "output_shape": [6, 5], "auto_pad": "SAME_UPPER"}),
        (0, 1),
        (6, 5),
    ),
    # out = in * stride = 6, total = 2 * 2 + 3 - 6 = 1
    "same-upper-stride-2": TransposeCase(
        Case((1, 2, 3, 3), (2, 3, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}), (0, 0), (6, 6)
    ),
    "same-lower-stride-2": TransposeCase(
        Case((1, 2, 3, 3), (2, 3, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_LOWER"}), (1, 1), (6, 6)
    ),
    "same-lower-1d-total-3": TransposeCase(
        Case((1, 2, 4), (2, 2, 4), {"strides": [1], "auto_pad": "SAME_LOWER"}), (2,), (4,)
    ),
    "valid": TransposeCase(Case((1, 2, 3, 3), (2, 3, 2, 2), {"strides": [2, 2], "auto_pad": "VALID"}), (0, 0), (6, 6)),
    "dilations": TransposeCase(
        Case((1, 2, 4, 3), (2, 3, 3, 2), {"dilations": [2, 3], "strides": [1, 2]}), (0, 0), (8, 8)
    ),
    "group-2": TransposeCase(Case((1, 4, 3, 4), (4, 3, 2, 2), {"group": 2, "strides": [2, 1]}), (0, 0), (6, 5), False),
    "depthwise": TransposeCase(
        Case((1, 3, 3, 3), (3, 1, 3, 3), {"group": 3, "strides": [2, 2], "pads": [1, 1, 1, 1]}), (1, 1), (5, 5), False
    ),
    "no-bias-kernel-2x3": TransposeCase(
        Case((1, 2, 4, 3), (2, 3, 2, 3), {"strides": [2, 2]}, bias=False), (0, 0), (8, 7)
    ),
    "zero-weights": TransposeCase(Case((1, 3, 4, 4), (3, 2, 3, 3), {"strides": [2, 2]}, zeros=True), (0, 0), (9, 9)),
    "3d": TransposeCase(Case((1, 2, 3, 2, 3), (2, 2, 2, 3, 2), {"strides": [2, 1, 2]}), (0, 0, 0), (6, 4, 6)),
}


def naive_conv_transpose(x, weights, bias, strides, dilations, begins, out_sizes, group):
    """The spec's scatter, one input pixel and kernel offset at a time: y[o] += x[i] W[k] at o = i s - p + k d."""
    batch, channels = x.shape[:2]
    in_per_group, out_per_group = channels // group, weights.shape[1]
    y = np.zeros((batch, out_per_group * group, *out_sizes))
    for i in np.ndindex(*x.shape[2:]):
        for k in np.ndindex(*weights.shape[2:]):
            o = tuple(a * s - p + b * d for a, s, p, b, d in zip(i, strides, begins, k, dilations))
            if not all(0 <= v < n for v, n in zip(o, out_sizes)):
                continue
            for g in range(group):
                inputs = x[(slice(None), slice(g * in_per_group, (g + 1) * in_per_group), *i)]
                kernel = weights[(slice(g * in_per_group, (g + 1) * in_per_group), slice(None), *k)]
                y[(slice(None), slice(g * out_per_group, (g + 1) * out_per_group), *o)] += inputs @ kernel
    if bias is not None:
        y += bias.reshape(1, -1, *[1] * len(out_sizes))
    return y


@pytest.mark.parametrize("spec", list(CONV_TRANSPOSE.values()), ids=list(CONV_TRANSPOSE))
def test_conv_transpose_matches_onnxruntime(spec):
    model = conv_model("ConvTranspose", spec.case)
    compiled = assert_matches_onnxruntime(model, batch=3, check_reference=spec.reference_ok)
    # float64 against the naive scatter, with the pads and sizes worked out from the spec
    initializers = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    feeds = random_inputs(model, batch=3)
    spatial = len(spec.case.x_shape) - 2
    expected = naive_conv_transpose(
        feeds["x"],
        initializers["W"],
        initializers.get("B"),
        spec.case.attributes.get("strides", [1] * spatial),
        spec.case.attributes.get("dilations", [1] * spatial),
        spec.begins,
        spec.out_sizes,
        spec.case.attributes.get("group", 1),
    )
    ours = compiled.predict(feeds)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("opset", [1, 11, 22])
def test_conv_transpose_every_version(opset):
    case = Case((1, 2, 3, 3), (2, 3, 3, 3), {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 1]})
    assert_matches_onnxruntime(conv_model("ConvTranspose", case, opset=opset), batch=2)


# ----------------------------------------------------------------------------------- structure
class RecordingContext(LoweringContext):
    """A lowering context that keeps the matrices T given to apply_map."""

    def apply_map(self, expression, matrix, shape, offset=None):
        self.matrices = [*getattr(self, "matrices", []), matrix]
        return super().apply_map(expression, matrix, shape, offset)


def _toeplitz_of(op: str, case: Case):
    """T as built by the lowering (on the input itself), and the output expression."""
    x_size = math.prod(case.x_shape)
    ctx = RecordingContext(p=x_size, batched=True)
    model = conv_model(op, case)
    node = NodeView(model.graph.node[0], 17, 0)
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    x = Affine.variables(case.x_shape, 0, x_size)
    lowering = lower_conv if op == "Conv" else lower_conv_transpose
    (y,) = lowering(ctx, node, [x, weights["W"], weights.get("B")])
    (matrix,) = ctx.matrices
    return matrix, y


@pytest.mark.parametrize(
    ("op", "case"),
    [
        ("Conv", Case((1, 4, 7, 6), (6, 2, 3, 2), {"group": 2, "pads": [2, 1, 0, 3]})),
        ("ConvTranspose", CONV_TRANSPOSE["group-2"].case),
        ("ConvTranspose", CONV_TRANSPOSE["3d"].case),
    ],
    ids=["conv-group", "transpose-group", "transpose-3d"],
)
def test_toeplitz_rows_are_canonical(op, case):
    """Columns sorted within each row, no duplicates: T is built directly in canonical CSR."""
    matrix, _ = _toeplitz_of(op, case)
    assert matrix.has_sorted_indices
    copy = matrix.copy()
    copy.has_sorted_indices = False
    copy.sum_duplicates()
    assert copy.nnz == matrix.nnz
    np.testing.assert_array_equal(copy.indices, matrix.indices)


def test_padding_taps_and_zero_weights_are_dropped():
    # 64 -> 64 channels, 3x3, pads 1 on 8x8: 22 valid taps per axis (8 * 3 - 2), so 64 * 64 * 22^2
    matrix, y = _toeplitz_of("Conv", Case((1, 64, 8, 8), (64, 64, 3, 3), {"pads": [1, 1, 1, 1]}))
    assert y.shape == (1, 64, 8, 8)
    assert matrix.nnz == 64 * 64 * 22 * 22
    matrix, _ = _toeplitz_of("Conv", Case((1, 3, 6, 6), (4, 3, 3, 3), zeros=True))
    assert np.all(matrix.data != 0)


def test_conv_relu_is_one_block():
    case = Case((1, 3, 6, 6), (4, 3, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]})
    model = conv_model("Conv", case)
    model.graph.node.append(helper.make_node("Relu", ["y"], ["z"], name="relu1"))
    model.graph.output[0].name = "z"
    compiled = assert_matches_onnxruntime(model)
    assert len(compiled.blocks) == 1
    block = compiled.blocks[0]
    assert block.activation.name == "relu"
    assert block.shape == (4, 3, 3)
    assert block.stop - block.start == 4 * 3 * 3 == compiled.A.shape[0]
    assert compiled.A.nnz == 0


def test_two_conv_network_is_nilpotent():
    rng = np.random.default_rng(3)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((3, 4, 3, 3)).astype(np.float32) / 6, "W2")
    b2 = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "B2")
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2", strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["y"], name="relu2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 7, 7])],
        [_output("y", 4)],
        [w1, w2, b2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    compiled = assert_matches_onnxruntime(model)
    assert [b.stop - b.start for b in compiled.blocks] == [4 * 7 * 7, 3 * 3 * 3]
    A = compiled.A.toarray()
    assert np.count_nonzero(np.triu(A)) == 0  # strictly lower triangular
    assert np.count_nonzero(A) > 0
    assert not np.any(np.linalg.matrix_power(A, 2))


# ----------------------------------------------------------------------------------- errors
def _runtime_weight_model(op: str, runtime: str) -> onnx.ModelProto:
    """A Conv whose weight (or bias) is a graph input instead of an initializer."""
    rng = np.random.default_rng(0)
    shapes = {"W": [4, 3, 3, 3] if op == "Conv" else [3, 4, 3, 3], "B": [4]}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])]
    inputs.append(helper.make_tensor_value_info(runtime, TensorProto.FLOAT, shapes[runtime]))
    initializers = [
        numpy_helper.from_array(rng.standard_normal(shapes[name]).astype(np.float32), name)
        for name in ("W", "B")
        if name != runtime
    ]
    node = helper.make_node(op, ["x", "W", "B"], ["y"], name="conv_runtime")
    graph = helper.make_graph([node], "g", inputs, [_output("y", 4)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("runtime", ["W", "B"])
@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_runtime_weight_is_refused(op, runtime):
    with pytest.raises(ic.GraphError, match=rf"conv_runtime.*{op}.*must be a constant"):
        ic.from_onnx(_runtime_weight_model(op, runtime))


UNSUPPORTED = {
    "auto-pad-unknown": ("Conv", Case((1, 3, 6, 6), (4, 3, 3, 3), {"auto_pad": "SAME"}), "auto_pad"),
    "negative-pads": ("Conv", Case((1, 3, 6, 6), (4, 3, 3, 3), {"pads": [-1, 0, 0, 0]}), "pads"),
    "unknown-attribute": ("Conv", Case((1, 3, 6, 6), (4, 3, 3, 3), {"padding_mode": "reflect"}), "padding_mode"),
    "transpose-same-negative-padding": (
        "ConvTranspose",
        Case((1, 2, 3, 3), (2, 3, 1, 1), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
        "auto_pad",
    ),
}


@pytest.mark.parametrize(("op", "case", "attribute"), list(UNSUPPORTED.values()), ids=list(UNSUPPORTED))
def test_unsupported_attribute_value(op, case, attribute):
    model = conv_model(op, case, check=False)
    with pytest.raises(ic.UnsupportedAttributeError, match=rf"conv1.*{attribute}="):
        ic.from_onnx(model)


GRAPH_ERRORS = {
    "kernel-shape-mismatch": ("Conv", Case((1, 3, 6, 6), (4, 3, 3, 3), {"kernel_shape": [3, 2]}), "kernel_shape"),
    "channels-mismatch": ("Conv", Case((1, 3, 6, 6), (4, 2, 3, 3)), "does not fit"),
    "kernel-larger-than-input": ("Conv", Case((1, 3, 2, 2), (4, 3, 3, 3)), "does not fit"),
    "output-shape-too-large": (
        "ConvTranspose",
        Case((1, 2, 3, 3), (2, 3, 3, 3), {"strides": [2, 2], "output_shape": [9, 9]}),
        "output_shape",
    ),
}


@pytest.mark.parametrize(("op", "case", "pattern"), list(GRAPH_ERRORS.values()), ids=list(GRAPH_ERRORS))
def test_malformed_node_is_refused(op, case, pattern):
    with pytest.raises(ic.GraphError, match=rf"conv1.*{pattern}"):
        ic.from_onnx(conv_model(op, case, check=False))


def test_too_large_is_refused_before_building():
    case = Case((1, 64, 8, 8), (64, 64, 3, 3), {"pads": [1, 1, 1, 1]})
    x_size = math.prod(case.x_shape)
    ctx = LoweringContext(p=x_size, batched=True, memory_limit_bytes=1e6)
    model = conv_model("Conv", case)
    node = NodeView(model.graph.node[0], 17, 0)
    weights = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    with pytest.raises(ic.ModelTooLargeError, match="Conv matrix"):
        lower_conv(ctx, node, [Affine.variables(case.x_shape, 0, x_size), weights, None])
