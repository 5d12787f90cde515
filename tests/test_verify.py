"""``verify`` itself: it must pass a correct lowering and fail a wrong one."""

from __future__ import annotations

import numpy as np
from onnx_helpers import parse

import implicit_compiler as ic
from implicit_compiler.frontend import verification

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 2] y)
<float[2, 4] W = {1, -2, 3, 0.5, -1, 2, 0.25, 4}> {
    h = Gemm <transB = 1> (x, W)
    y = Tanh(h)
}
"""


def test_verify_passes_a_correct_model():
    report = ic.verify(parse(MODEL), samples=6, seed=3)
    assert report.passed
    assert report.model_name == "g" and report.samples == 6 and report.n == 2 and report.blocks == 1
    (output,) = report.outputs
    assert output.name == "y" and output.max_rel_error_float64 < 1e-12 and output.max_abs_error_float32 < 1e-5


def test_verify_fails_when_the_lowering_is_wrong(monkeypatch):
    """Corrupt the compiled model: both comparisons must notice."""
    real_from_onnx = verification.from_onnx

    def broken_from_onnx(*args, **kwargs):
        model = real_from_onnx(*args, **kwargs)
        object.__setattr__(model, "bias_x", model.bias_x + np.array([1e-3, 0.0]))
        return model

    monkeypatch.setattr(verification, "from_onnx", broken_from_onnx)
    report = ic.verify(parse(MODEL))
    assert not report.passed
    assert not report.outputs[0].passed_float64 and not report.outputs[0].passed_float32


def test_readme_ops_table_is_the_generated_one():
    from pathlib import Path

    from implicit_compiler.frontend import supported_ops_table
    from implicit_compiler.frontend.optable import BEGIN, END

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == supported_ops_table(), "run: python -m implicit_compiler.frontend.optable --update README.md"
