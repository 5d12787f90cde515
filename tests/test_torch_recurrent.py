"""Recurrent networks exported by torch.onnx (tests/recurrent-models, made by zoo/export_recurrent.py).

The legacy TorchScript exporter writes RNN/GRU/LSTM nodes with Shape -> Gather -> Unsqueeze ->
Concat -> ConstantOfShape initial-state subgraphs, Slices per layer, Squeeze/Transpose/Reshape
of Y; the dynamo exporter writes Expand/Slice chains, and unrolls nn.RNN itself.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx_helpers import assert_matches_onnxruntime

import implicit_compiler as ic

MODELS = sorted((Path(__file__).parent / "recurrent-models").glob("*.onnx"))
# onnx.reference's RNN knows only Tanh (and Affine): no float64 oracle for a Relu RNN here (the
# Relu family is checked in float64 against the numpy spec in test_op_recurrent.py).
REFERENCE_LACKS = {"rnn_relu_2layer.onnx"}


def test_fixtures_are_present():
    assert len(MODELS) == 12


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_torch_exported_recurrent_model(path):
    model = onnx.load(path)
    assert any(node.op_type in ("RNN", "GRU", "LSTM", "Tanh") for node in model.graph.node)
    compiled = assert_matches_onnxruntime(model, batch=5, check_reference=path.name not in REFERENCE_LACKS)
    assert compiled.n > 0


def test_verify_reports_the_reference_gap_instead_of_crashing():
    report = ic.verify(next(p for p in MODELS if p.name == "rnn_relu_2layer.onnx"), samples=4)
    assert report.passed and not report.float64_checked
    assert "Unknown activation function 'Relu'" in report.reference_error
    assert all(output.passed_float64 is None and output.passed_float32 for output in report.outputs)
