"""Add/Sub/Mul/Div/Sum/Neg/Max/Min lowerings against onnxruntime and the float64 reference."""

from __future__ import annotations

import pytest
from onnx_helpers import assert_matches_onnxruntime, parse

CASES = {
    "add-constant-broadcast": "c = Constant <value = float[3, 1] {1, -2, 3}> ()\n y = Add(x, c)",
    "add-constant-first": "c = Constant <value = float[4] {1, -2, 3, 0.5}> ()\n y = Add(c, x)",
    "sub-constant": "c = Constant <value = float {0.25}> ()\n y = Sub(x, c)",
    "sub-from-constant": "c = Constant <value = float[4] {1, 2, 3, 4}> ()\n y = Sub(c, x)",
    "mul-constant": "c = Constant <value = float[3, 1] {2, -1, 0.5}> ()\n y = Mul(x, c)",
    "div-constant": "c = Constant <value = float[4] {2, -4, 8, 0.5}> ()\n y = Div(x, c)",
    "neg": "y = Neg(x)",
    "residual-add": "r = Relu(x)\n y = Add(r, x)",
    "residual-sub": "r = Relu(x)\n y = Sub(x, r)",
    "broadcast-two-values": "r = ReduceMean <axes = [2], keepdims = 1> (x)\n y = Add(x, r)",
    "sum-three": "r = Relu(x)\n c = Constant <value = float {1.5}> ()\n y = Sum(x, r, c)",
    "mul-two-values": "r = Relu(x)\n t = Tanh(x)\n y = Mul(r, t)",
    "square": "y = Mul(x, x)",
    "max-two": "r = Tanh(x)\n y = Max(x, r)",
    "max-with-constant": "c = Constant <value = float {0.1}> ()\n y = Max(x, c)",
    "min-three": "r = Tanh(x)\n c = Constant <value = float[4] {0, 1, -1, 0.5}> ()\n y = Min(x, r, c)",
}


@pytest.mark.parametrize("body", list(CASES.values()), ids=list(CASES))
def test_elementwise_matches_onnxruntime(body):
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 4] x) => (float[N, 3, 4] y) {{
            {body}
        }}
        """
    )
    assert_matches_onnxruntime(model, batch=6)


def test_product_uses_two_square_blocks():
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 5] x) => (float[N, 5] y) { r = Relu(x)
            y = Mul(r, x) }
        """
    )
    compiled = assert_matches_onnxruntime(model)
    assert [b.activation.name for b in compiled.blocks] == ["relu", "square", "square"]


def test_division_by_a_variable_is_a_reciprocal_and_a_product():
    """Issue 17: x / (relu(x) + 1) as x * reciprocal(relu(x) + 1) (was refused before)."""
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 5] x) => (float[N, 5] y) { r = Relu(x)
            one = Constant <value = float {1}> ()
            s = Add(r, one)
            y = Div(x, s) }
        """
    )
    compiled = assert_matches_onnxruntime(model)
    assert [b.activation.name for b in compiled.blocks] == ["relu", "reciprocal", "square", "square"]
