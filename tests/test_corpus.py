"""Conformance: every model of the ONNX corpus compiles and matches, or fails with a clear error.

tests/onnx-corpus is a copy of the project's shared corpus (see its README and MANIFEST):
VNN-COMP networks written by pytorch 1.3-1.11, tf2onnx, MATLAB and skl2onnx, and single-op
models from the Marabou verifier's parser tests.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx_helpers import assert_matches_onnxruntime

import implicit_compiler as ic

CORPUS = Path(__file__).parent / "onnx-corpus"
MODELS = sorted(CORPUS.glob("*/*.onnx"))
# The only models allowed to fail, and the error each must raise.
EXPECTED_FAILURES = {
    "dropout_training_mode_true.onnx": (ic.UnsupportedOpError, r"\(Dropout, opset 20\): Dropout in training mode"),
}


def test_corpus_is_present():
    assert len(MODELS) == 37, f"expected the 37 corpus models, found {len(MODELS)}"


@pytest.mark.parametrize("path", MODELS, ids=[p.name for p in MODELS])
def test_corpus_model(path):
    model = onnx.load(path)
    if path.name in EXPECTED_FAILURES:
        error, message = EXPECTED_FAILURES[path.name]
        with pytest.raises(error, match=message):
            ic.from_onnx(model)
        return
    compiled = assert_matches_onnxruntime(model, batch=6)
    assert compiled.n == 0 or compiled.A.nnz >= 0


@pytest.mark.parametrize(
    "name", ["vnncomp2021_cifar10_resnet_resnet_2b.onnx", "vnncomp2021_acasxu_ACASXU_run2a_1_1_batch_2000.onnx"]
)
def test_verify_reports_pass_on_corpus_models(name):
    path = next(p for p in MODELS if p.name == name)
    report = ic.verify(path, samples=4)
    assert report.passed, report
    assert report.samples == 4 and report.n > 0 and report.nnz > 0
    for output in report.outputs:
        assert output.max_rel_error_float64 <= 1e-9
