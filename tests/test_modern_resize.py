"""Resize and Upsample against onnxruntime (float32) and onnx.reference (float64, 1e-9).

Every mode (nearest with each nearest_mode, linear, cubic with cubic_coeff_a and
exclude_outside, antialias) and coordinate_transformation_mode, upsampling and downsampling
4-D (N, C, H, W) inputs, scales and sizes, axes and keep_aspect_ratio_policy; onnx's own node
tests for Resize and Upsample; torch exports of nn.Upsample and F.interpolate; and the typed
errors for what is out of scope (variable scales, integer inputs, ArgMax of a variable,
data-dependent shapes).
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import onnx
import onnx.parser
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper, version_converter
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops import op_resize
from onnx_helpers import assert_matches_onnxruntime, parse, random_inputs

import implicit_compiler as ic
from implicit_compiler.errors import GraphError, UnsupportedAttributeError, UnsupportedOpError
from implicit_compiler.frontend.estimate import estimate_nonzeros
from implicit_compiler.frontend.graph import prepare, to_float64, with_sorted_nodes

SHAPE = [2, 3, 4, 6]  # (C, H, W) per sample; N dynamic


def resize_model(
    opset: int = 19,
    scales=None,
    sizes=None,
    roi=None,
    shape=SHAPE,
    op: str = "Resize",
    scale_attribute=None,
    **attributes,
) -> onnx.ModelProto:
    """One Resize (or Upsample) node reading x: float[N, *shape[1:]], constants as initializers."""
    initializers, inputs = [], ["x"]

    def constant(name, values, dtype):
        if values is None:
            return ""
        initializers.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    if opset == 11 and roi is None:
        roi = np.zeros(0)  # an input Resize-11 requires
    if scale_attribute is not None:  # Upsample-7
        attributes["scales"] = scale_attribute
    elif op == "Upsample" or opset < 11:
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


class ResizeA64(op_resize.Resize):
    """onnx.reference's Resize with cubic_coeff_a read as a Python float: the reference reads the
    attribute as np.float32, and numpy then computes the cubic weights in float32 (errors of
    2e-7), which would hide any float64 error of ours."""

    op_domain = ""

    def _run(self, *args, cubic_coeff_a=None, **kwargs):
        return super()._run(*args, cubic_coeff_a=None if cubic_coeff_a is None else float(cubic_coeff_a), **kwargs)


ResizeA64.__name__ = "Resize"  # the reference's new_ops replace the op of the class's name


def assert_matches(model: onnx.ModelProto, reference: bool = True) -> ic.ImplicitModel:
    """assert_matches_onnxruntime, with the float64 check against the reference with float64 cubic
    weights where the node is cubic (``ResizeA64``); ``reference=False``: onnxruntime only."""
    cubic = any(a.name == "mode" and a.s == b"cubic" for node in model.graph.node for a in node.attribute)
    compiled = assert_matches_onnxruntime(model, check_reference=reference and not cubic)
    if reference and cubic:
        feeds = random_inputs(model)
        expected = ReferenceEvaluator(to_float64(with_sorted_nodes(model)), new_ops=[ResizeA64]).run(None, feeds)[0]
        ours = compiled.predict(feeds)
        error = float(np.abs(ours - expected).max()) / float(np.abs(expected).max())
        assert error <= 1e-9, f"float64 relative error {error:.2e} vs onnx.reference (float64 cubic weights)"
    return compiled


def reference_follows_the_specification(coordinates: str, scales, shape=SHAPE) -> bool:
    """False where onnx.reference departs from the specification (and onnxruntime): for
    align_corners and tf_crop_and_resize it divides by scale * n - 1 instead of the output length
    m - 1, which differ where the output width scale * n is not an integer."""
    widths = np.multiply(scales, shape)
    return coordinates not in ("align_corners", "tf_crop_and_resize") or np.array_equal(widths, np.floor(widths))


# Scales exact in binary (so that float32 and float64 coordinates agree on rounding ties); the
# output widths of UP (4 * 2, 6 * 2.5) and DOWN (4 * 0.75, 6 * 0.5) are integers, ODD's
# (4 * 1.75, 6 * 0.625 = 3.75) are not.
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
    assert_matches(model, reference=reference_follows_the_specification(coordinates, scales))


# exact in binary, as the scales (so that onnxruntime's float32 coordinates round ties alike)
ROI = [0, 0, 0.25, 0.125, 1, 1, 0.875, 0.75]  # inside the input on H and W
ROI_OUTSIDE = [0, 0, -0.25, 0.375, 1, 1, 1.25, 1.5]  # reaching past it: extrapolated outputs


@pytest.mark.parametrize("roi", [ROI, ROI_OUTSIDE], ids=["inside", "outside"])
@pytest.mark.parametrize("scales", [UP, DOWN, ODD], ids=["up", "down", "odd"])
@pytest.mark.parametrize("mode", MODES, ids=_label)
def test_tf_crop_and_resize_with_roi_and_extrapolation_value(mode, scales, roi):
    model = resize_model(
        scales=scales, roi=roi, coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=-1.5, **mode
    )
    assert_matches(model, reference=reference_follows_the_specification("tf_crop_and_resize", scales))


@pytest.mark.parametrize("scales", [UP, DOWN, [1, 1, 0.5, 0.25], [1, 1, 1.75, 0.625]], ids=["up", "down", "4x", "odd"])
@pytest.mark.parametrize("coordinates", ["half_pixel", "pytorch_half_pixel", "asymmetric"])
@pytest.mark.parametrize(
    "mode", [{"mode": "linear"}, {"mode": "cubic"}, {"mode": "cubic", "exclude_outside": 1}], ids=_label
)
def test_antialias(mode, coordinates, scales):
    model = resize_model(
        scales=scales, antialias=1, coordinate_transformation_mode=coordinates, shape=[2, 2, 9, 12], **mode
    )
    assert_matches(model)


@pytest.mark.parametrize("policy", ["stretch", "not_larger", "not_smaller"])
@pytest.mark.parametrize("mode", [{"mode": "nearest"}, {"mode": "linear"}, {"mode": "cubic"}], ids=_label)
def test_sizes_with_axes_and_keep_aspect_ratio_policy(mode, policy):
    model = resize_model(sizes=[7, 9], axes=[2, 3], keep_aspect_ratio_policy=policy, **mode)
    assert_matches(model)


@pytest.mark.parametrize("coordinates", COORDINATES)
@pytest.mark.parametrize("mode", [{"mode": "nearest"}, {"mode": "linear"}, {"mode": "cubic"}], ids=_label)
def test_sizes_up_and_down(mode, coordinates):
    # sizes 9 / 4 and 4 / 6: the scales are m / n, and every output width an integer
    assert_matches(resize_model(sizes=[9, 4], axes=[2, 3], coordinate_transformation_mode=coordinates, **mode))


def test_axes_scales_and_roi_on_a_subset_of_axes():
    model = resize_model(
        scales=[0.5, 1.5], roi=[0.125, 0.25, 0.75, 1.0], axes=[3, 2], mode="linear",
        coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=2.0,
    )  # fmt: skip
    assert_matches(model)


@pytest.mark.parametrize("opset", [11, 13, 18, 19, onnx.defs.onnx_opset_version()])
@pytest.mark.parametrize("mode", [{"mode": "nearest"}, {"mode": "linear"}, {"mode": "cubic"}], ids=_label)
def test_every_opset_of_resize(opset, mode):
    coordinates = "half_pixel" if opset < 19 else "half_pixel_symmetric"
    assert_matches(resize_model(opset=opset, scales=UP, coordinate_transformation_mode=coordinates, **mode))


def _asymmetric_resize_19(model: onnx.ModelProto, nearest_mode: str) -> onnx.ModelProto:
    """The Resize-19 node computing what onnxruntime computes for a Resize-10 or Upsample node:
    asymmetric coordinates, nearest index floor (upsampling) or ceil (downsampling)."""
    node = model.graph.node[0]
    mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
    scales = next((list(a.floats) for a in node.attribute if a.name == "scales"), None)
    initializer = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    scales = scales if scales is not None else initializer["scales"].tolist()
    return resize_model(
        19, scales=scales, mode=mode, coordinate_transformation_mode="asymmetric", nearest_mode=nearest_mode
    )


def _assert_legacy_matches(model: onnx.ModelProto, nearest_mode: str = "floor") -> None:
    """onnxruntime in float32; in float64 the reference on the equivalent Resize-19 (the reference
    implements neither Resize-10 nor Upsample other than nearest with integer scales)."""
    compiled = assert_matches_onnxruntime(model, check_reference=False)
    feeds = random_inputs(model)
    expected = ReferenceEvaluator(to_float64(_asymmetric_resize_19(model, nearest_mode))).run(None, feeds)[0]
    assert np.abs(compiled.predict(feeds) - expected).max() <= 1e-9 * np.abs(expected).max()


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [UP, [1, 1, 3, 1.5]], ids=["up", "up-odd"])
@pytest.mark.parametrize("version", [("Upsample", 7), ("Upsample", 9), ("Resize", 10)], ids=str)
def test_upsample_and_resize_10(version, scales, mode):
    op, opset = version
    if opset == 7:  # scales an attribute
        model = resize_model(opset=opset, op=op, scale_attribute=[float(s) for s in scales], mode=mode)
    else:
        model = resize_model(opset=opset, op=op, scales=scales, mode=mode)
    _assert_legacy_matches(model)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_10_downsampling_rounds_nearest_up(mode):
    _assert_legacy_matches(resize_model(opset=10, scales=[1, 1, 0.6, 0.5], mode=mode), nearest_mode="ceil")


@pytest.mark.parametrize("scales", [UP, DOWN], ids=["up", "down"])
def test_tf_half_pixel_for_nn_of_opset_11(scales):
    """Not implemented by the reference: onnxruntime only."""
    model = resize_model(opset=11, scales=scales, coordinate_transformation_mode="tf_half_pixel_for_nn")
    assert_matches(model, reference=False)


def test_negative_axes():
    """onnxruntime only: the reference does not normalize negative axes (numpy's 'axes don't
    match array')."""
    assert_matches(resize_model(sizes=[7, 9], axes=[-2, -1], mode="linear"), reference=False)


@pytest.mark.parametrize("coordinates", ["pytorch_half_pixel", "align_corners", "half_pixel"])
@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_an_output_length_of_one(mode, coordinates):
    """pytorch_half_pixel and align_corners read x = 0 for an output of length 1 (the
    specification, onnxruntime); the reference reads -0.5 (pytorch_half_pixel), so cubic
    differs from it: onnxruntime only."""
    model = resize_model(sizes=[1, 1], axes=[2, 3], mode=mode, coordinate_transformation_mode=coordinates)
    assert_matches(model, reference=mode == "linear" or coordinates == "half_pixel")


def test_the_reference_departs_from_the_specification_for_align_corners_at_a_fractional_width():
    """The premise of ``reference_follows_the_specification``: at an output width 6 * 0.625 = 3.75
    the reference and onnxruntime disagree (and we follow onnxruntime, in the tests above)."""
    model = resize_model(scales=ODD, mode="linear", coordinate_transformation_mode="align_corners")
    feeds = random_inputs(model)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected32 = session.run(None, {"x": feeds["x"].astype(np.float32)})[0]
    reference = ReferenceEvaluator(to_float64(model)).run(None, feeds)[0]
    assert np.abs(reference - expected32).max() > 0.01
    assert np.abs(ic.from_onnx(model).predict(feeds) - expected32).max() < 1e-5


# ------------------------------------------------------------------------------------- errors
def _graph(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 19]>\n' + text)


def test_scales_computed_from_the_input_are_refused_by_name():
    model = _graph(
        """g (float[1, 1, 4, 4] x) => (float[1, 1, 8, 8] y) {
            r = Constant <value = float[0] {}> ()
            m = ReduceMean <keepdims = 0> (x)
            a = Constant <value = int64[1] {0}> ()
            s = Unsqueeze(m, a)
            t = Concat <axis = 0> (s, s, s, s)
            y = Resize <mode = "linear"> (x, r, t)
        }"""
    )
    with pytest.raises(GraphError, match=r"node 'Resize_5' \(Resize, opset 19\): scales depends on the model input"):
        ic.from_onnx(model)


@pytest.mark.parametrize(
    "attribute, value",
    [("mode", "area"), ("coordinate_transformation_mode", "tf_half_pixel_for_nn"), ("nearest_mode", "nearest")],
)
def test_attribute_values_onnx_does_not_define_are_refused_by_name(attribute, value):
    model = resize_model(scales=UP, **{attribute: value})
    with pytest.raises(
        UnsupportedAttributeError, match=rf"node 'resize' \(Resize, opset 19\): attribute {attribute}='{value}'"
    ):
        ic.from_onnx(model)


def test_upsample_scales_below_one_are_refused():
    with pytest.raises(GraphError, match=r"node 'resize' \(Upsample, opset 9\): Upsample scales must be >= 1"):
        ic.from_onnx(resize_model(opset=9, op="Upsample", scales=[1, 1, 0.5, 1]))


def test_integer_inputs_say_to_feed_one_hot_or_embedded_inputs():
    model = _graph(
        """g (int64[N, 5] ids) => (float[N, 5, 3] y) <float[4, 3] E = {1,2,3,4,5,6,7,8,9,10,11,12}> {
            y = Gather(E, ids)
        }"""
    )
    with pytest.raises(
        GraphError,
        match=r"input 'ids' has element type INT64 \(read by node 'Gather_0' \(Gather, opset 19\)\).*"
        "feed one-hot or embedded inputs",
    ):
        ic.from_onnx(model)


@pytest.mark.parametrize(
    "body, op, says",
    [
        ("k = ArgMax <axis = 1> (x)\n y = Cast <to = 1> (k)", "ArgMax", "take ArgMax of the predictions"),
        ("k = ArgMin <axis = 1, keepdims = 0> (x)\n y = Cast <to = 1> (k)", "ArgMin", "take ArgMin of the predictions"),
        ("k = NonZero(x)\n y = Cast <to = 1> (k)", "NonZero", "a data-dependent shape"),
    ],
)  # fmt: skip
def test_indices_and_data_dependent_shapes_of_a_variable_are_refused_by_name(body, op, says):
    model = _graph(f"g (float[1, 4] x) => (float[1, 1] y) {{ {body} }}")
    with pytest.raises(UnsupportedOpError, match=rf"\({op}, opset 19\): {op} is only supported on constants.*{says}"):
        ic.from_onnx(model)


def test_top_k_is_refused_as_data_dependent():
    model = _graph(
        """g (float[N, 5] x) => (float[N, 2] y) {
            k = Constant <value = int64[1] {2}> ()
            y, i = TopK(x, k)
        }"""
    )
    with pytest.raises(UnsupportedOpError, match=r"\(TopK, opset 19\): TopK is not supported: its indices"):
        ic.from_onnx(model)


def test_a_shape_computed_from_the_input_values_is_refused_at_the_cast_to_integers():
    model = _graph(
        """g (float[1, 4] x) => (float[1, 4] y) {
            c = Cast <to = 7> (x)
            y = Reshape(x, c)
        }"""
    )
    with pytest.raises(UnsupportedOpError, match=r"\(Cast, opset 19\): casting a value computed from the model input"):
        ic.from_onnx(model)


# ------------------------------------------------------------------------------------- onnx node tests
# Their expected outputs were made by the reference, which departs from the specification (and
# onnxruntime) for align_corners at a fractional output width (4 * 0.6 = 2.4; 4 * 0.8 = 3.2).
REFERENCE_DEPARTS = {
    "test_resize_downsample_scales_linear_align_corners",
    "test_resize_downsample_scales_cubic_align_corners",
}


@functools.cache
def resize_node_tests() -> dict:
    """onnx's node tests of Resize and Upsample (generated: this onnx wheel ships no data), with
    the inputs after X (roi, scales, sizes) made initializers."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    tests = {}
    for case in cases:
        if case.model is None or not any(n.op_type in ("Resize", "Upsample") for n in case.model.graph.node):
            continue
        model = onnx.ModelProto()
        model.CopyFrom(case.model)
        inputs, outputs = case.data_sets[0]
        graph = model.graph
        for value_info, value in zip(graph.input[1:], inputs[1:]):
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), value_info.name))
        del graph.input[1:]
        tests[case.name] = (model, np.asarray(inputs[0]), np.asarray(outputs[0]))
    return tests


def test_onnx_node_tests_of_resize_and_upsample_compile_and_match():
    """All 40 compile; 38 match the shipped expected outputs, the 2 of ``REFERENCE_DEPARTS`` match
    onnxruntime instead (which the shipped outputs do not)."""
    tests = resize_node_tests()
    assert len(tests) >= 40
    matched, departs = [], []
    for name, (model, x, expected) in tests.items():
        compiled = ic.from_onnx(model)
        ours = np.asarray(compiled.predict(x.astype(np.float64))).reshape(expected.shape)
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        runtime = session.run(None, {model.graph.input[0].name: x})[0]
        np.testing.assert_allclose(ours, runtime, rtol=1e-5, atol=1e-5, err_msg=f"{name} vs onnxruntime")
        close = np.allclose(ours, expected, rtol=1e-6, atol=1e-6 * max(1.0, np.abs(expected).max()))
        (matched if close else departs).append(name)
    assert set(departs) == REFERENCE_DEPARTS, departs
    assert len(matched) == len(tests) - len(REFERENCE_DEPARTS)


# ------------------------------------------------------------------------------------- torch exports
class UpsamplingNet(torch.nn.Module if torch is not None else object):
    """Conv -> ReLU -> an upsampling layer -> Conv: the up layer between two linear maps."""

    def __init__(self, up) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.up, self.last = torch.nn.Conv2d(2, 3, 3, padding=1), up, torch.nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.last(self.up(torch.relu(self.first(x))))


class Interpolate(torch.nn.Module if torch is not None else object):
    def __init__(self, **options) -> None:
        super().__init__()
        self.options = options

    def forward(self, x):
        return torch.nn.functional.interpolate(x, **self.options)


TORCH_LAYERS = {
    "upsample-nearest": lambda: torch.nn.Upsample(scale_factor=2, mode="nearest"),
    "upsample-bilinear-align-corners": lambda: torch.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
    "upsample-bilinear": lambda: torch.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
    "interpolate-size-bicubic": lambda: Interpolate(size=(7, 5), mode="bicubic", align_corners=False),
    "interpolate-size-bilinear-align-corners": lambda: Interpolate(size=(9, 11), mode="bilinear", align_corners=True),
    "interpolate-nearest-down": lambda: Interpolate(scale_factor=0.5, mode="nearest"),
}
# Ops the legacy exporter cannot write (torch's own UnsupportedOperatorError).
DYNAMO_ONLY = {
    "interpolate-antialias": lambda: Interpolate(scale_factor=0.5, mode="bilinear", antialias=True),
    "interpolate-nearest-exact": lambda: Interpolate(scale_factor=1.5, mode="nearest-exact"),  # GatherND
}


def export(net, dynamo: bool) -> onnx.ModelProto:
    """``net`` exported with a dynamic batch axis by the legacy (TorchScript) or the dynamo exporter."""
    x = torch.randn(1, 2, 6, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(net.eval(), (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("N")},))
            return program.model_proto
        buffer = io.BytesIO()
        torch.onnx.export(
            net.eval(), (x,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        )  # fmt: skip
        return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize(
    "layer,dynamo",
    [
        *((layer, dynamo) for layer in TORCH_LAYERS for dynamo in (False, True)),
        *((layer, True) for layer in DYNAMO_ONLY),
    ],
)
def test_torch_exports_of_upsample_and_interpolate(layer, dynamo):
    net = UpsamplingNet({**TORCH_LAYERS, **DYNAMO_ONLY}[layer]())
    model = export(net, dynamo)
    assert any(node.op_type in ("Resize", "GatherND") for node in model.graph.node)
    compiled = assert_matches(model)
    x = np.random.default_rng(1).standard_normal((3, 2, 6, 8))
    with torch.no_grad():
        expected = net.double()(torch.from_numpy(x)).numpy()
    assert np.abs(compiled.predict(x) - expected).max() <= 1e-9 * np.abs(expected).max()


@pytest.mark.parametrize("layer", ["upsample-bilinear", "interpolate-size-bicubic"])
def test_a_cnn_with_resize_at_the_newest_opset_onnx_defines(layer):
    """The legacy export (opset 20) converted to the newest opset the installed onnx knows: its
    ops (Conv, Relu, Resize, Shape, Slice, Concat...) did not change after the versions lowered."""
    newest = onnx.defs.onnx_opset_version()
    model = version_converter.convert_version(export(UpsamplingNet(TORCH_LAYERS[layer]()), dynamo=False), newest)
    assert model.opset_import[0].version == newest
    assert_matches(model)


@pytest.mark.parametrize("mode, taps", [("nearest", 1), ("linear", 2), ("cubic", 4)])
def test_16_channels_of_64_x_64_upsampled_twice_stay_sparse(mode, taps):
    """The map is a Kronecker product of the axes' weights: at most taps^2 non-zeros per output
    (here in C, reading the ReLU's states), not a dense 262144 x 65536 matrix."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((0.1 * rng.standard_normal((16, 16, 3, 3))).astype(np.float32), "W")
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["h"]),
        helper.make_node("Resize", ["h", "", "s"], ["y"], mode=mode),
    ]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "s")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 128, 128])],
        [weight, scales],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    compiled = assert_matches(model, reference=False) if mode == "linear" else ic.from_onnx(model)
    assert compiled.C.shape == (16 * 128 * 128, 16 * 64 * 64)
    assert compiled.C.nnz <= taps**2 * 16 * 128 * 128


def test_gather_nd_with_constant_indices_is_a_data_movement():
    """What the dynamo exporter writes for F.interpolate(mode="nearest-exact")."""
    model = _graph(
        """g (float[N, 3, 4] x) => (float[N, 2] y) {
            t = Transpose <perm = [1, 2, 0]> (x)
            i = Constant <value = int64[2, 2] {0, 1, 2, 3}> ()
            g = GatherND(t, i)
            y = Transpose <perm = [1, 0]> (g)
        }"""
    )
    assert_matches_onnxruntime(model)


@pytest.mark.parametrize("version", [("Resize", 19), ("Resize", 10), ("Upsample", 9)], ids=str)
def test_resizing_the_batch_axis_is_refused(version):
    """The scales stay float32 in the prepared graph (their schema's only type), so shape inference
    sees the batch axis doubled: this compiled before, with two samples out per sample in."""
    op, opset = version
    with pytest.raises(
        GraphError, match=rf"\({op}, opset {opset}\): output 'y' has shape \(4, 3, 4, 6\) at batch size 2"
    ):
        ic.from_onnx(resize_model(opset=opset, op=op, scales=[2, 1, 1, 1]))


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
def test_the_size_estimate_counts_the_interpolation_taps(mode):
    model = parse(
        f"""<ir_version: 8, opset_import: ["" : 19]>
        g (float[N, 4, 16, 16] x) => (float[N, 4, 32, 32] y) <float[4] s = {{1, 1, 2, 2}}> {{
            r = Resize <mode = "{mode}"> (x, , s)
            y = Relu(r)
        }}"""
    )
    compiled = ic.from_onnx(model)
    actual = compiled.A.nnz + compiled.B.nnz + compiled.C.nnz + compiled.D.nnz
    assert actual <= estimate_nonzeros(prepare(model)) <= 1.2 * actual
