"""Pooling and reduction lowerings against onnxruntime (float32) and the float64 reference.

Every case is checked against onnxruntime; a few are not checked against ``onnx.reference``,
whose pooling disagrees with onnxruntime (and the ONNX spec) on them: REFERENCE_DISAGREES
says why, case by case. The random inputs mix signs, so maxima land at every window position.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx_helpers import assert_matches_onnxruntime, parse

import implicit_compiler as ic
from implicit_compiler.errors import GraphError, UnsupportedAttributeError

# Cases not checked against onnx.reference (1.23), where its pooling disagrees with onnxruntime
# and the ONNX spec; onnxruntime is followed. (AveragePool opset 1 is not tested at all:
# onnxruntime implements AveragePool from opset 7.)
REFERENCE_DISAGREES = {
    "max-pool/2d-same-lower": "MaxPool SAME_LOWER with stride > 1 gives floor(size / stride) outputs, not ceil",
    "max-pool/1d-k3-s1-pads": "MaxPool with stride 1, dilation 1 and 1-D (or 3-D) pads does not pad",
    "average-pool/2d-ceil-extra-pad-include": "ceil_mode: the extra end padding is split over both ends, "
    "which shifts every window by half of it once it is >= 2",
    "average-pool/2d-ceil-extra-pad-exclude": "the same shift, without count_include_pad",
    "average-pool/2d-same-upper-ceil": "AveragePool asserts 'ceil_mode is not supported with auto_pad'",
    "average-pool/2d-dilations-same-upper": "SAME_* with dilations: onnxruntime pads for the undilated kernel but "
    "sizes the output for the dilated one (fewer outputs than the spec's ceil(size / stride), which the "
    "reference keeps)",
    "reduce/global-max-1d": "GlobalMaxPool on other than 2 spatial axes reduces the wrong axes (channels in 1-D)",
    "reduce/global-max-3d": "the same, in 3-D",
}


def _model(opset: int, shape: tuple[int, ...], body: str, out_rank: int | None = None) -> onnx.ModelProto:
    """A one-input model; a leading dimension of 1 is the batch axis N, any other is fixed."""
    rank = len(shape) if out_rank is None else out_rank
    lead = "N" if shape[0] == 1 else str(shape[0])
    dims = ", ".join([lead, *(str(d) for d in shape[1:])])
    out_dims = ", ".join([lead, *["?"] * (rank - 1)])
    return parse(
        f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (float[{dims}] x) => (float[{out_dims}] y) {{
            {body}
        }}
        """
    )


def _pool_body(op: str, attributes: str, relu_first: bool) -> str:
    if relu_first:
        return f"r = Relu(x)\n y = {op} <{attributes}> (r)"
    return f"y = {op} <{attributes}> (x)"


# id: (opset, input shape, attributes); an after-relu case pools Relu(x)
MAX_POOL = {
    "2d-k2-s2": (13, (1, 3, 6, 8), "kernel_shape = [2, 2], strides = [2, 2]"),
    "2d-k2-s2-odd-input": (13, (1, 2, 7, 5), "kernel_shape = [2, 2], strides = [2, 2]"),
    "2d-k3-s1": (13, (1, 2, 6, 7), "kernel_shape = [3, 3]"),
    "2d-k3-s2": (13, (1, 2, 7, 7), "kernel_shape = [3, 3], strides = [2, 2]"),
    "2d-k3-s2-pads1": (13, (1, 2, 8, 8), "kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]"),
    "2d-k3-s1-pads1": (13, (1, 2, 5, 6), "kernel_shape = [3, 3], pads = [1, 1, 1, 1]"),
    "2d-asymmetric-pads": (13, (1, 2, 6, 7), "kernel_shape = [3, 2], strides = [2, 1], pads = [0, 1, 2, 0]"),
    "2d-k5x1": (13, (1, 2, 9, 4), "kernel_shape = [5, 1], strides = [2, 1]"),
    "2d-ceil": (13, (1, 2, 7, 6), "kernel_shape = [3, 3], strides = [2, 2], ceil_mode = 1"),
    "2d-ceil-pads": (13, (1, 2, 8, 7), "kernel_shape = [3, 2], strides = [3, 2], pads = [1, 0, 0, 1], ceil_mode = 1"),
    "2d-same-upper": (13, (1, 2, 7, 6), 'kernel_shape = [3, 2], strides = [2, 2], auto_pad = "SAME_UPPER"'),
    "2d-same-lower": (13, (1, 2, 7, 6), 'kernel_shape = [3, 2], strides = [2, 2], auto_pad = "SAME_LOWER"'),
    "2d-valid": (13, (1, 2, 7, 6), 'kernel_shape = [3, 2], strides = [2, 1], auto_pad = "VALID"'),
    "2d-notset": (13, (1, 2, 5, 5), 'kernel_shape = [2, 2], auto_pad = "NOTSET"'),
    "2d-same-upper-ceil": (
        13,
        (1, 2, 7, 6),
        'kernel_shape = [3, 3], strides = [2, 2], auto_pad = "SAME_UPPER", ceil_mode = 1',
    ),
    "2d-dilations-opset10": (10, (1, 2, 8, 7), "kernel_shape = [2, 3], dilations = [2, 1], pads = [1, 0, 1, 1]"),
    "2d-dilations-strides": (12, (1, 2, 9, 8), "kernel_shape = [3, 2], strides = [2, 2], dilations = [2, 3]"),
    "2d-dilations-ceil": (
        22,
        (1, 2, 9, 8),
        "kernel_shape = [2, 2], strides = [2, 3], dilations = [2, 2], pads = [1, 1, 0, 0], ceil_mode = 1",
    ),
    "2d-storage-order": (8, (1, 2, 6, 6), "kernel_shape = [2, 2], strides = [2, 2], storage_order = 1"),
    "2d-opset1": (1, (1, 2, 6, 6), "kernel_shape = [3, 3], strides = [1, 1], pads = [1, 1, 1, 1]"),
    "1d-k3-s2": (13, (1, 3, 11), "kernel_shape = [3], strides = [2]"),
    "1d-k3-s1-pads": (13, (1, 3, 9), "kernel_shape = [3], pads = [2, 1]"),
    "1d-k4-s3-pads-ceil": (13, (1, 3, 10), "kernel_shape = [4], strides = [3], pads = [1, 2], ceil_mode = 1"),
    "1d-dilation": (12, (1, 3, 12), "kernel_shape = [3], dilations = [3], strides = [2]"),
    "3d-k2": (13, (1, 2, 4, 5, 4), "kernel_shape = [2, 3, 2], strides = [2, 1, 2]"),
    "after-relu": (13, (1, 3, 6, 6), "kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]"),
    "after-relu-k2": (13, (1, 3, 6, 8), "kernel_shape = [2, 2], strides = [2, 2]"),
    "leading-dim-2": (13, (2, 3, 6, 6), "kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]"),
}

# id: (opset, input shape, attributes); an after-relu case pools Relu(x)
AVERAGE_POOL = {
    "2d-k2-s2": (11, (1, 3, 6, 8), "kernel_shape = [2, 2], strides = [2, 2]"),
    "2d-k3-s1": (11, (1, 2, 6, 7), "kernel_shape = [3, 3]"),
    "2d-k3-s2": (11, (1, 2, 7, 7), "kernel_shape = [3, 3], strides = [2, 2]"),
    "2d-pads1-exclude": (11, (1, 2, 6, 5), "kernel_shape = [3, 3], pads = [1, 1, 1, 1]"),
    "2d-pads1-include": (11, (1, 2, 6, 5), "kernel_shape = [3, 3], pads = [1, 1, 1, 1], count_include_pad = 1"),
    "2d-asymmetric-pads-exclude": (11, (1, 2, 7, 6), "kernel_shape = [3, 2], strides = [2, 1], pads = [0, 1, 2, 0]"),
    "2d-asymmetric-pads-include": (
        11,
        (1, 2, 7, 6),
        "kernel_shape = [3, 2], strides = [2, 1], pads = [0, 1, 2, 0], count_include_pad = 1",
    ),
    "2d-ceil-exclude": (11, (1, 2, 7, 6), "kernel_shape = [3, 3], strides = [2, 2], ceil_mode = 1"),
    "2d-ceil-include": (
        11,
        (1, 2, 7, 6),
        "kernel_shape = [3, 3], strides = [2, 2], ceil_mode = 1, count_include_pad = 1",
    ),
    "2d-ceil-pads-include": (
        11,
        (1, 2, 8, 7),
        "kernel_shape = [3, 2], strides = [3, 2], pads = [1, 0, 0, 1], ceil_mode = 1, count_include_pad = 1",
    ),
    "2d-ceil-extra-pad-include": (
        11,
        (1, 2, 9, 4),
        "kernel_shape = [2, 4], strides = [2, 3], pads = [0, 1, 0, 0], ceil_mode = 1, count_include_pad = 1",
    ),
    "2d-ceil-extra-pad-exclude": (
        11,
        (1, 2, 9, 4),
        "kernel_shape = [2, 4], strides = [2, 3], pads = [0, 1, 0, 0], ceil_mode = 1",
    ),
    "2d-ceil-last-window-dropped": (
        11,
        (1, 2, 9, 6),
        "kernel_shape = [4, 2], strides = [4, 4], pads = [2, 1, 1, 0], ceil_mode = 1, count_include_pad = 1",
    ),
    "2d-same-upper-exclude": (11, (1, 2, 7, 6), 'kernel_shape = [3, 2], strides = [2, 2], auto_pad = "SAME_UPPER"'),
    "2d-same-upper-include": (
        11,
        (1, 2, 7, 6),
        'kernel_shape = [3, 2], strides = [2, 2], auto_pad = "SAME_UPPER", count_include_pad = 1',
    ),
    "2d-same-lower-exclude": (11, (1, 2, 7, 6), 'kernel_shape = [3, 2], strides = [2, 2], auto_pad = "SAME_LOWER"'),
    "2d-same-lower-include": (
        11,
        (1, 2, 7, 6),
        'kernel_shape = [3, 2], strides = [2, 2], auto_pad = "SAME_LOWER", count_include_pad = 1',
    ),
    "2d-same-upper-ceil": (
        11,
        (1, 2, 7, 6),
        'kernel_shape = [3, 3], strides = [2, 2], auto_pad = "SAME_UPPER", ceil_mode = 1, count_include_pad = 1',
    ),
    "2d-valid": (11, (1, 2, 7, 6), 'kernel_shape = [3, 2], strides = [2, 1], auto_pad = "VALID"'),
    "2d-dilations-exclude": (19, (1, 2, 8, 7), "kernel_shape = [2, 3], dilations = [2, 1], pads = [1, 0, 1, 1]"),
    "2d-dilations-include": (
        19,
        (1, 2, 8, 7),
        "kernel_shape = [2, 3], dilations = [2, 1], pads = [1, 0, 1, 1], count_include_pad = 1",
    ),
    "2d-dilations-ceil-include": (
        19,
        (1, 2, 9, 8),
        "kernel_shape = [2, 2], strides = [2, 3], dilations = [2, 2], pads = [1, 1, 0, 0], ceil_mode = 1, count_include_pad = 1",
    ),
    "2d-dilations-same-upper": (
        19,
        (1, 2, 8, 7),
        'kernel_shape = [2, 3], dilations = [2, 2], auto_pad = "SAME_UPPER", count_include_pad = 1',
    ),
    "2d-opset7-include": (7, (1, 2, 6, 6), "kernel_shape = [3, 3], pads = [1, 1, 1, 1], count_include_pad = 1"),
    "2d-opset22": (22, (1, 2, 6, 6), "kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]"),
    "1d-k3-s2-pads": (11, (1, 3, 10), "kernel_shape = [3], strides = [2], pads = [1, 2]"),
    "1d-ceil-include": (
        11,
        (1, 3, 10),
        "kernel_shape = [4], strides = [3], pads = [1, 2], ceil_mode = 1, count_include_pad = 1",
    ),
    "3d-pads": (11, (1, 2, 4, 5, 4), "kernel_shape = [2, 3, 2], pads = [1, 1, 0, 0, 1, 1]"),
    "after-relu": (11, (1, 3, 6, 6), "kernel_shape = [2, 2], strides = [2, 2]"),
    "leading-dim-2": (11, (2, 3, 6, 5), "kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]"),
}

# id: (opset, input shape, nodes, output rank if not the input's)
GLOBAL_AND_REDUCE = {
    "global-average-2d": (13, (1, 3, 5, 6), "y = GlobalAveragePool(x)", None),
    "global-average-1d": (13, (1, 3, 7), "y = GlobalAveragePool(x)", None),
    "global-average-opset22": (22, (1, 3, 4, 4), "y = GlobalAveragePool(x)", None),
    "global-average-leading-dim-2": (13, (2, 3, 4, 5), "y = GlobalAveragePool(x)", None),
    "global-max-2d-25": (13, (1, 3, 5, 5), "y = GlobalMaxPool(x)", None),
    "global-max-1d": (13, (1, 3, 6), "y = GlobalMaxPool(x)", None),
    "global-max-3d": (13, (1, 2, 3, 4, 2), "y = GlobalMaxPool(x)", None),
    "global-max-after-relu": (13, (1, 3, 4, 4), "r = Relu(x)\n y = GlobalMaxPool(r)", None),
    "global-max-leading-dim-2": (13, (2, 3, 3, 3), "y = GlobalMaxPool(x)", None),
    "reduce-mean-attr-keepdims": (13, (1, 3, 4, 5), "y = ReduceMean <axes = [2, 3]> (x)", None),
    "reduce-mean-attr-nokeep": (13, (1, 3, 4, 5), "y = ReduceMean <axes = [2, 3], keepdims = 0> (x)", 2),
    "reduce-mean-attr-negative": (11, (1, 3, 4, 5), "y = ReduceMean <axes = [-1], keepdims = 0> (x)", 3),
    "reduce-mean-input-keepdims": (
        18,
        (1, 3, 4, 5),
        "a = Constant <value = int64[2] {2, 3}> ()\n y = ReduceMean(x, a)",
        None,
    ),
    "reduce-mean-input-nokeep": (
        18,
        (1, 3, 4, 5),
        "a = Constant <value = int64[2] {-2, -1}> ()\n y = ReduceMean <keepdims = 0> (x, a)",
        2,
    ),
    "reduce-mean-channels": (18, (1, 3, 4, 5), "a = Constant <value = int64[1] {1}> ()\n y = ReduceMean(x, a)", None),
    "reduce-sum-attr": (11, (1, 3, 4, 5), "y = ReduceSum <axes = [2, 3], keepdims = 0> (x)", 2),
    "reduce-sum-input-keepdims": (
        13,
        (1, 3, 4, 5),
        "a = Constant <value = int64[2] {2, 3}> ()\n y = ReduceSum(x, a)",
        None,
    ),
    "reduce-sum-input-nokeep": (
        13,
        (1, 3, 4, 5),
        "a = Constant <value = int64[1] {3}> ()\n y = ReduceSum <keepdims = 0> (x, a)",
        3,
    ),
    "reduce-sum-noop-empty-axes": (13, (1, 3, 4, 5), "y = ReduceSum <noop_with_empty_axes = 1> (x)", None),
    "reduce-max-attr-keepdims": (13, (1, 3, 4, 5), "y = ReduceMax <axes = [2, 3]> (x)", None),
    "reduce-max-attr-nokeep": (13, (1, 3, 4, 5), "y = ReduceMax <axes = [3], keepdims = 0> (x)", 3),
    "reduce-max-input-keepdims": (
        18,
        (1, 3, 4, 5),
        "a = Constant <value = int64[2] {2, 3}> ()\n y = ReduceMax(x, a)",
        None,
    ),
    "reduce-max-input-nokeep": (
        18,
        (1, 3, 4, 5),
        "a = Constant <value = int64[2] {1, 3}> ()\n y = ReduceMax <keepdims = 0> (x, a)",
        2,
    ),
    "reduce-max-opset20-after-relu": (
        20,
        (1, 3, 4, 5),
        "r = Relu(x)\n a = Constant <value = int64[2] {2, 3}> ()\n y = ReduceMax <keepdims = 0> (r, a)",
        2,
    ),
}


@pytest.mark.parametrize("name", list(MAX_POOL))
def test_max_pool_matches_onnxruntime(name):
    opset, shape, attributes = MAX_POOL[name]
    body = _pool_body("MaxPool", attributes, relu_first=name.startswith("after-relu"))
    check_reference = f"max-pool/{name}" not in REFERENCE_DISAGREES
    assert_matches_onnxruntime(_model(opset, shape, body), batch=6, check_reference=check_reference)


@pytest.mark.parametrize("name", list(AVERAGE_POOL))
def test_average_pool_matches_onnxruntime(name):
    opset, shape, attributes = AVERAGE_POOL[name]
    body = _pool_body("AveragePool", attributes, relu_first=name.startswith("after-relu"))
    check_reference = f"average-pool/{name}" not in REFERENCE_DISAGREES
    compiled = assert_matches_onnxruntime(_model(opset, shape, body), batch=6, check_reference=check_reference)
    if "Relu" not in body:
        assert not compiled.blocks  # a linear map: no state


@pytest.mark.parametrize("name", list(GLOBAL_AND_REDUCE))
def test_global_pool_and_reduction_match_onnxruntime(name):
    opset, shape, body, out_rank = GLOBAL_AND_REDUCE[name]
    check_reference = f"reduce/{name}" not in REFERENCE_DISAGREES
    assert_matches_onnxruntime(_model(opset, shape, body, out_rank), batch=6, check_reference=check_reference)


def _max_level_sizes(compiled, output: str = "y") -> list[int]:
    prefix = f"{output}/max_level"
    return [b.stop - b.start for b in compiled.blocks if b.name.startswith(prefix)]


def test_max_pool_2x2_is_a_tree_of_two_levels():
    model = _model(13, (1, 3, 6, 8), "y = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (x)")
    compiled = assert_matches_onnxruntime(model)
    assert [b.name for b in compiled.blocks] == ["y/max_level1", "y/max_level2"]
    assert [b.activation.name for b in compiled.blocks] == ["relu", "relu"]
    windows = 3 * 3 * 4
    assert _max_level_sizes(compiled) == [2 * windows, windows]


@pytest.mark.parametrize(
    ("body", "levels"),
    [
        ("y = MaxPool <kernel_shape = [3, 3], strides = [3, 3]> (x)", 4),  # 9 elements
        ("y = MaxPool <kernel_shape = [3, 1], strides = [3, 1]> (x)", 2),  # 3 elements
        ("y = GlobalMaxPool(x)", 6),  # 6 * 6 = 36 elements
    ],
    ids=["k3x3", "k3x1", "global-36"],
)
def test_max_tree_depth_is_ceil_log2_of_the_window(body, levels):
    compiled = assert_matches_onnxruntime(_model(13, (1, 2, 6, 6), body))
    assert len(compiled.blocks) == levels
    assert all(b.name.startswith("y/max_level") for b in compiled.blocks)


def test_overlapping_windows_share_their_pair_states():
    model = _model(13, (1, 1, 6, 6), "y = MaxPool <kernel_shape = [3, 3]> (x)")
    compiled = assert_matches_onnxruntime(model)
    first = _max_level_sizes(compiled)[0]
    assert first < 16 * 4  # 16 windows of 4 pairs each, some pairs shared


def test_max_pool_on_a_mixed_linear_value_keeps_it_when_windows_overlap():
    weights = "w = Constant <value = float[6, 6] {" + ", ".join(str((i * 7 % 11) / 5 - 1) for i in range(36)) + "}> ()"
    overlapping = _model(13, (1, 2, 6, 6), f"{weights}\n h = MatMul(x, w)\n y = MaxPool <kernel_shape = [3, 3]> (h)")
    compiled = assert_matches_onnxruntime(overlapping)
    assert compiled.blocks[0].name == "y/input" and compiled.blocks[0].activation.name == "identity"
    disjoint = _model(
        13, (1, 2, 6, 6), f"{weights}\n h = MatMul(x, w)\n y = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (h)"
    )
    compiled = assert_matches_onnxruntime(disjoint)
    assert [b.name for b in compiled.blocks] == ["y/max_level1", "y/max_level2"]


def test_max_pool_indices_output_is_refused():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 2, 4, 4] x) => (float[N, 2, 2, 2] y, int64[N, 2, 2, 2] i) {
            y, i = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (x)
        }
        """
    )
    with pytest.raises(UnsupportedAttributeError, match="Indices output 'i'"):
        ic.from_onnx(model)


def test_max_pool_window_of_only_padding_is_refused():
    model = _model(13, (1, 1, 5, 1), "y = MaxPool <kernel_shape = [1, 2], dilations = [1, 2], pads = [0, 1, 0, 1]> (x)")
    with pytest.raises(GraphError, match="only padding"):
        ic.from_onnx(model)


def test_reduction_of_constants_is_folded():
    model = _model(
        13,
        (1, 3),
        "c = Constant <value = float[2, 3] {1, -2, 3, -4, 5, -6}> ()\n m = ReduceMax <axes = [0]> (c)\n y = Add(x, m)",
    )
    compiled = assert_matches_onnxruntime(model)
    assert not compiled.blocks
    np.testing.assert_allclose(compiled.bias_y, [1, 5, 3])
