"""Activation lowerings against onnxruntime and the float64 reference."""

from __future__ import annotations

import pytest
from onnx_helpers import assert_matches_onnxruntime, parse

UNARY = {
    "relu": "y = Relu(x)",
    "sigmoid": "y = Sigmoid(x)",
    "tanh": "y = Tanh(x)",
    "leaky-relu-default": "y = LeakyRelu(x)",
    "leaky-relu-0.2": "y = LeakyRelu <alpha = 0.2> (x)",
    "leaky-relu-negative": "y = LeakyRelu <alpha = -0.5> (x)",
    "clip-both": "lo = Constant <value = float {-0.5}> ()\n hi = Constant <value = float {0.7}> ()\n y = Clip(x, lo, hi)",
    "clip-min-only": "lo = Constant <value = float {0.25}> ()\n y = Clip(x, lo)",
    "clip-max-only": "hi = Constant <value = float {0.25}> ()\n y = Clip(x, , hi)",
    "clip-relu6": "lo = Constant <value = float {0}> ()\n hi = Constant <value = float {6}> ()\n y = Clip(x, lo, hi)",
    "clip-none": "y = Clip(x)",
    "prelu-scalar": "s = Constant <value = float[1] {0.3}> ()\n y = PRelu(x, s)",
    "prelu-per-channel": "s = Constant <value = float[3, 1, 1] {0.1, -0.2, 0.5}> ()\n y = PRelu(x, s)",
}


@pytest.mark.parametrize("body", list(UNARY.values()), ids=list(UNARY))
def test_activation_matches_onnxruntime(body):
    model = parse(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 4, 5] x) => (float[N, 3, 4, 5] y) {{
            {body}
        }}
        """
    )
    assert_matches_onnxruntime(model, batch=6)


def test_clip_opset6_attributes():
    model = parse(
        """
        <ir_version: 7, opset_import: ["" : 6]>
        g (float[N, 8] x) => (float[N, 8] y) { y = Clip <min = -0.3, max = 0.4> (x) }
        """
    )
    compiled = assert_matches_onnxruntime(model)
    assert [b.activation.name for b in compiled.blocks] == ["relu", "relu"]
