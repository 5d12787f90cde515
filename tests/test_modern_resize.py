"""Resize and Upsample against onnxruntime (float32) and onnx.reference (float64, 1e-9).

Every mode (nearest with each nearest_mode, linear, cubic with cubic_coeff_a and
exclude_outside, antialias) and coordinate_transformation_mode, upsampling and downsampling
4-D (N, C, H, W) inputs, scales and sizes, axes and keep_aspect_ratio_policy; onnx's own node
tests for Resize and Upsample; torch exports of nn.Upsample and F.interpolate; and the typed
errors for what is out of scope (variable scales, integer inputs, ArgMax of a variable,
data-dependent shapes).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops import op_resize
from onnx_helpers import assert_matches_onnxruntime, random_inputs

import implicit_compiler as ic
from implicit_compiler.frontend.graph import to_float64
from implicit_compiler.errors import GraphError, UnsupportedAttributeError, UnsupportedOpError

SHAPE = [2, 3, 5, 6]  # (C, H, W) per sample; N dynamic


def resize_model(
    opset: int = 19,
    scales=None,
    sizes=None,
    roi=None,
    shape=SHAPE,
    op: str = "Resize",
    **attributes,
) -> onnx.ModelProto:
    """One Resize (or Upsample) node reading x: float[N, *shape[1:]], constants as initializers."""
    initializers, inputs = [], ["x"]

    def constant(name, values, dtype):
        if values is None:
            return ""
        initializers.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    if op == "Upsample" or opset < 11:
        inputs.append(constant("scales", scales, np.float32))
    else:
        inputs += [constant("roi", roi, np.float32), constant("scales", scales, np.float32)]
        if sizes is not None:
            inputs.append(constant("sizes", sizes, np.int64))
    node = helper.make_node(op, inputs, ["y"], name="resize", **attributes)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", None, None, None][: len(shape)])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model


class Resize(op_resize.Resize):  # new_ops match ops by class name
    """onnx.reference's Resize with cubic_coeff_a read as a Python float: the reference reads the
    attribute as np.float32, and numpy then computes the cubic weights in float32 (errors of
    2e-7), which would hide any float64 error of ours."""

    op_domain = ""

    def _run(self, *args, cubic_coeff_a=None, **kwargs):
        return super()._run(*args, cubic_coeff_a=None if cubic_coeff_a is None else float(cubic_coeff_a), **kwargs)


ResizeA64 = Resize


def assert_matches(model: onnx.ModelProto, reference: bool = True) -> ic.ImplicitModel:
    """assert_matches_onnxruntime, with the float64 check against the reference with float64 cubic
    weights where the node is cubic (``ResizeA64``); ``reference=False``: onnxruntime only."""
    cubic = any(a.name == "mode" and a.s == b"cubic" for a in model.graph.node[0].attribute)
    compiled = assert_matches_onnxruntime(model, check_reference=reference and not cubic)
    if reference and cubic:
        feeds = random_inputs(model)
        expected = ReferenceEvaluator(to_float64(model), new_ops=[ResizeA64]).run(None, feeds)[0]
        ours = compiled.predict(feeds)
        error = float(np.abs(ours - expected).max()) / float(np.abs(expected).max())
        assert error <= 1e-9, f"float64 relative error {error:.2e} vs onnx.reference (float64 cubic weights)"
    return compiled


# Scales exact in binary (so that float32 and float64 coordinates agree on rounding ties); the
# last axis's output widths 5 * 2.5, 6 * 0.5 are integers, ODD's 5 * 1.75, 6 * 0.625 are not.
UP, DOWN, ODD = [1, 1, 2, 2.5], [1, 1, 0.75, 0.5], [1, 1, 1.75, 0.625]
COORDINATES = ["half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric"]
MODES = [
    {"mode": "nearest", "nearest_mode": rule} for rule in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
] + [
    {"mode": "linear"},
    {"mode": "cubic"},
    {"mode": "cubic", "cubic_coeff_a": -0.5},
    {"mode": "cubic", "exclude_outside": 1},
]


def _label(mode: dict) -> str:
    return "-".join(str(v) for v in mode.values())


@pytest.mark.parametrize("scales", [UP, DOWN, ODD], ids=["up", "down", "odd"])
@pytest.mark.parametrize("coordinates", COORDINATES)
@pytest.mark.parametrize("mode", MODES, ids=_label)
def test_every_mode_and_coordinate_mode(mode, coordinates, scales):
    model = resize_model(scales=scales, coordinate_transformation_mode=coordinates, **mode)
    # align_corners: the reference divides by scale * n - 1, not by the output length m - 1 as
    # the specification and onnxruntime do; they differ where scale * n is not an integer
    widths = np.multiply(scales, SHAPE)
    assert_matches(model, reference=coordinates != "align_corners" or np.array_equal(widths, np.floor(widths)))
