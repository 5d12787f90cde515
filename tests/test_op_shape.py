"""Data movement and shape ops against onnxruntime and the float64 reference."""

from __future__ import annotations

import pytest
from onnx_helpers import assert_matches_onnxruntime, parse

import implicit_compiler as ic

# Each body reads x: float[N, 2, 3, 4] and writes y; the output shape is given for the signature.
CASES = {
    "reshape": ("s = Constant <value = int64[2] {0, -1}> ()\n y = Reshape(x, s)", "[N, 24]"),
    "reshape-4d": ("s = Constant <value = int64[4] {1, 6, 2, 2}> ()\n y = Reshape(x, s)", "[N, 6, 2, 2]"),
    "flatten": ("y = Flatten(x)", "[N, 24]"),
    "flatten-axis2": ("y = Flatten <axis = 2> (x)", "[2, 12]"),  # merges the batch axis: batch 1 only
    "transpose": ("y = Transpose <perm = [0, 3, 1, 2]> (x)", "[N, 4, 2, 3]"),
    "transpose-nhwc": ("y = Transpose <perm = [0, 2, 3, 1]> (x)", "[N, 3, 4, 2]"),
    "slice": (
        "a = Constant <value = int64[2] {0, 1}> ()\n b = Constant <value = int64[2] {2, 4}> ()\n"
        " ax = Constant <value = int64[2] {2, 3}> ()\n y = Slice(x, a, b, ax)",
        "[N, 2, 2, 3]",
    ),
    "slice-steps-negative": (
        "a = Constant <value = int64[2] {-1, 3}> ()\n b = Constant <value = int64[2] {-100, 0}> ()\n"
        " ax = Constant <value = int64[2] {2, 3}> ()\n st = Constant <value = int64[2] {-2, -1}> ()\n"
        " y = Slice(x, a, b, ax, st)",
        "[N, 2, 2, 3]",
    ),
    "slice-strided-subsample": (
        "a = Constant <value = int64[2] {0, 0}> ()\n b = Constant <value = int64[2] {3, 4}> ()\n"
        " ax = Constant <value = int64[2] {2, 3}> ()\n st = Constant <value = int64[2] {2, 2}> ()\n"
        " y = Slice(x, a, b, ax, st)",
        "[N, 2, 2, 2]",
    ),
    "squeeze-unsqueeze": (
        "a = Constant <value = int64[1] {1}> ()\n u = Unsqueeze(x, a)\n y = Squeeze(u, a)",
        "[N, 2, 3, 4]",
    ),
    "unsqueeze-last": ("a = Constant <value = int64[1] {-1}> ()\n y = Unsqueeze(x, a)", "[N, 2, 3, 4, 1]"),
    "concat-self": ("r = Relu(x)\n y = Concat <axis = 1> (x, r)", "[N, 4, 3, 4]"),
    "concat-constant": (
        "c = Constant <value = float[1, 1, 3, 4] {1,2,3,4,5,6,7,8,9,10,11,12}> ()\n y = Concat <axis = 1> (c, x)",
        "[N, 3, 3, 4]",
    ),
    "split-then-add": ("a, b = Split <axis = 1> (x)\n y = Sub(a, b)", "[N, 1, 3, 4]"),
    "gather": ("i = Constant <value = int64[3] {3, 0, -1}> ()\n y = Gather <axis = 3> (x, i)", "[N, 2, 3, 3]"),
    "gather-scalar": ("i = Constant <value = int64 {1}> ()\n y = Gather <axis = 2> (x, i)", "[N, 2, 4]"),
    "gather-elements": (
        "i = Constant <value = int64[1, 2, 3, 1] {0, 1, 2, 3, 0, 1}> ()\n y = GatherElements <axis = 3> (x, i)",
        "[1, 2, 3, 1]",  # constant indices of one sample's shape: batch 1 only
    ),
    "expand": (
        "a = Constant <value = int64[1] {1}> ()\n u = Unsqueeze(x, a)\n"
        " s = Constant <value = int64[5] {1, 3, 2, 3, 4}> ()\n y = Expand(u, s)",
        "[N, 3, 2, 3, 4]",
    ),
    "tile": ("r = Constant <value = int64[4] {1, 2, 1, 2}> ()\n y = Tile(x, r)", "[N, 4, 3, 8]"),
    "pad-constant": (
        "p = Constant <value = int64[8] {0, 1, 0, 2, 0, 0, 1, 1}> ()\n v = Constant <value = float {0.5}> ()\n"
        " y = Pad(x, p, v)",
        "[N, 3, 4, 7]",
    ),
    "pad-channels-zero": (
        "p = Constant <value = int64[8] {0, 2, 0, 0, 0, 2, 0, 0}> ()\n y = Pad(x, p)",
        "[N, 6, 3, 4]",
    ),
    "pad-reflect": (
        'p = Constant <value = int64[8] {0, 0, 1, 2, 0, 0, 1, 2}> ()\n y = Pad <mode = "reflect"> (x, p)',
        "[N, 2, 5, 8]",
    ),
    "pad-edge": (
        'p = Constant <value = int64[8] {0, 0, 2, 1, 0, 0, 0, 1}> ()\n y = Pad <mode = "edge"> (x, p)',
        "[N, 2, 5, 6]",
    ),
    "depth-to-space": (
        "r = Reshape(x, s)\n s = Constant <value = int64[4] {1, 8, 1, 3}> ()\n y = DepthToSpace <blocksize = 2> (r)",
        "[N, 2, 2, 6]",
    ),
    "where-constant-condition": (
        "c = Constant <value = bool[4] {1, 0, 0, 1}> ()\n r = Relu(x)\n y = Where(c, x, r)",
        "[N, 2, 3, 4]",
    ),
    "dropout-inference": ("y = Dropout(x)", "[N, 2, 3, 4]"),
    "identity-cast": ("i = Identity(x)\n y = Cast <to = 1> (i)", "[N, 2, 3, 4]"),
    "exporter-shape-subgraph": (
        "s = Shape(x)\n i = Constant <value = int64 {0}> ()\n n = Gather <axis = 0> (s, i)\n"
        " a = Constant <value = int64[1] {0}> ()\n nu = Unsqueeze(n, a)\n m = Constant <value = int64[1] {-1}> ()\n"
        " t = Concat <axis = 0> (nu, m)\n y = Reshape(x, t)",
        "[N, 24]",
    ),
    "constant-of-shape-add": (
        "s = Shape(x)\n z = ConstantOfShape <value = float[1] {0.25}> (s)\n y = Add(x, z)",
        "[N, 2, 3, 4]",
    ),
}


def _topological(body: str) -> str:
    """onnx.parser needs producers first; the 'depth-to-space' case lists them out of order on purpose."""
    return body


@pytest.mark.parametrize("body,output", list(CASES.values()), ids=list(CASES))
def test_movement_op_matches_onnxruntime(body, output):
    """An output without the batch axis N comes from a graph defined for one sample (it would mix
    samples at a dynamic batch size, which is refused): its input is given a static batch of 1."""
    batch = "N" if output.startswith("[N") else "1"
    if "r = Reshape(x, s)\n s =" in body:  # put the shape constant first for the parser
        body = body.replace(
            "r = Reshape(x, s)\n s = Constant <value = int64[4] {1, 8, 1, 3}> ()",
            "s = Constant <value = int64[4] {1, 8, 1, 3}> ()\n r = Reshape(x, s)",
        )
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[{batch}, 2, 3, 4] x) => (float{output} y) {{
            {body}
        }}
        """
    )
    assert_matches_onnxruntime(model, batch=5)


def test_negative_pads_crop():
    """onnx.reference pads with numpy, which has no negative pads: onnxruntime is the only oracle."""
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 2, 3, 4] x) => (float[N, 2, 3, 3] y) {
            p = Constant <value = int64[8] {0, 0, -1, 1, 0, 0, 1, -2}> ()
            y = Pad(x, p)
        }
        """
    )
    assert_matches_onnxruntime(model, check_reference=False)


LEGACY = {
    "squeeze-axes-attribute-opset11": ("11", "[N, 1, 3]", "[N, 3]", "y = Squeeze <axes = [1]> (x)"),
    "unsqueeze-axes-attribute-opset11": ("11", "[N, 1, 3]", "[N, 1, 1, 3]", "y = Unsqueeze <axes = [2]> (x)"),
    "pad-attribute-opset2": ("2", "[N, 1, 3]", "[N, 1, 6]", "y = Pad <pads = [0, 0, 1, 0, 0, 2], value = 1.5> (x)"),
    "slice-attributes-opset1": ("9", "[N, 1, 3]", "[N, 1, 2]", "y = Slice <starts = [1], ends = [3], axes = [2]> (x)"),
    "split-attribute-opset11": (
        "11",
        "[N, 1, 3]",
        "[N, 1, 1]",
        "a, b = Split <axis = 2, split = [1, 2]> (x)\n y = Identity(a)",
    ),
    "reshape-opset5": ("9", "[N, 1, 3]", "[N, 3]", "s = Constant <value = int64[2] {-1, 3}> ()\n y = Reshape(x, s)"),
}


@pytest.mark.parametrize("opset,in_shape,out_shape,body", list(LEGACY.values()), ids=list(LEGACY))
def test_older_opsets_with_attributes(opset, in_shape, out_shape, body):
    model = parse(
        f"""
        <ir_version: 7, opset_import: ["" : {opset}]>
        g (float{in_shape} x) => (float{out_shape} y) {{
            {body}
        }}
        """
    )
    assert_matches_onnxruntime(model)


def test_dropout_in_training_mode_is_refused():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) {
            r = Constant <value = float {0.5}> ()
            t = Constant <value = bool {1}> ()
            y = Dropout(x, r, t)
        }
        """
    )
    with pytest.raises(ic.UnsupportedOpError, match=r"\(Dropout, opset 17\): Dropout in training mode"):
        ic.from_onnx(model)


def test_cast_of_a_variable_to_integers_is_refused():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (int64[N, 4] y) { y = Cast <to = 7> (x) }
        """
    )
    with pytest.raises(ic.UnsupportedOpError, match="rounds it, which is not affine"):
        ic.from_onnx(model)


def test_indices_that_depend_on_the_input_are_refused():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 1] y) {
            k = ArgMax <axis = 1> (x)
            y = GatherElements <axis = 1> (x, k)
        }
        """
    )
    with pytest.raises(ic.UnsupportedOpError, match=r"\(ArgMax, opset 17\): ArgMax is only supported on constants"):
        ic.from_onnx(model)
