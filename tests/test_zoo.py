"""The zoo models in implicit form: LeNet-5 (trained), ResNet20 (random weights, real BN), the LSTM
classifier and the vision transformer (trained)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import scipy.sparse as sp

import implicit_compiler as ic

ZOO = Path(__file__).resolve().parents[1] / "zoo"


@pytest.fixture(scope="module")
def digits():
    sys.path.insert(0, str(ZOO))
    try:
        from data import load_digits_32x32

        return load_digits_32x32()
    finally:
        sys.path.remove(str(ZOO))


def test_lenet5_verifies_and_keeps_its_held_out_accuracy(digits):
    report = ic.verify(ZOO / "lenet5.onnx", samples=10)
    assert report.passed, report
    model = ic.from_onnx(ZOO / "lenet5.onnx")
    _, _, images, labels = digits
    session = onnxruntime.InferenceSession(str(ZOO / "lenet5.onnx"), providers=["CPUExecutionProvider"])
    onnx_predictions = session.run(None, {"input": images})[0].argmax(axis=1)
    implicit_logits = model.predict(images.astype(np.float64))
    implicit_predictions = implicit_logits.argmax(axis=1)
    onnx_accuracy = (onnx_predictions == labels).mean()
    assert (implicit_predictions == labels).mean() == onnx_accuracy
    assert (implicit_predictions == onnx_predictions).all()
    recorded = json.loads((ZOO / "zoo.json").read_text())["models"]["lenet5"]["heldout_accuracy"]["onnxruntime"]
    assert onnx_accuracy > 0.95 and math.isclose(onnx_accuracy, recorded, abs_tol=1e-12)
    float32 = model.astype(np.float32).predict(images).argmax(axis=1)
    assert (float32 == onnx_predictions).all()


def test_lstm_classifier_verifies_and_keeps_its_held_out_accuracy():
    report = ic.verify(ZOO / "lstm_classifier.onnx", samples=10)
    assert report.passed and report.float64_checked, report
    sys.path.insert(0, str(ZOO))
    try:
        from data import load_digits_8x8
    finally:
        sys.path.remove(str(ZOO))
    _, _, images, labels = load_digits_8x8()
    model = ic.from_onnx(ZOO / "lstm_classifier.onnx")
    assert [spec.shape for spec in model.inputs] == [(8, 8)]
    session = onnxruntime.InferenceSession(str(ZOO / "lstm_classifier.onnx"), providers=["CPUExecutionProvider"])
    onnx_predictions = session.run(None, {"input": images})[0].argmax(axis=1)
    implicit_predictions = model.predict(images.astype(np.float64)).argmax(axis=1)
    assert (implicit_predictions == onnx_predictions).all()
    recorded = json.loads((ZOO / "zoo.json").read_text())["models"]["lstm_classifier"]["heldout_accuracy"]
    assert math.isclose((implicit_predictions == labels).mean(), recorded["onnxruntime"], abs_tol=1e-12)
    assert sp.triu(model.A).nnz == 0, "unrolled over 8 steps: strictly lower triangular"


@pytest.mark.parametrize("name", ["vit", "vit_legacy"])
def test_vision_transformer_verifies_and_keeps_its_held_out_accuracy(digits, name):
    """Attention (Q K^T and P V as square blocks), softmax, LayerNorm (as the op, and as the
    legacy exporter's ReduceMean/Pow/Sqrt/Div) and GELU (Erf), exported by each torch exporter."""
    path = ZOO / f"{name}.onnx"
    report = ic.verify(path, samples=6)
    assert report.passed and report.float64_checked and report.batch_checked, report
    _, _, images, labels = digits
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_predictions = session.run(None, {"input": images})[0].argmax(axis=1)
    model = ic.from_onnx(path)
    assert any(block.activation.name == "square" for block in model.blocks)
    implicit_predictions = model.predict(images.astype(np.float64)).argmax(axis=1)
    assert (implicit_predictions == onnx_predictions).all()
    float32 = model.astype(np.float32).predict(images).argmax(axis=1)
    assert (float32 == onnx_predictions).all()
    recorded = json.loads((ZOO / "zoo.json").read_text())["models"][name]["heldout_accuracy"]["onnxruntime"]
    accuracy = (implicit_predictions == labels).mean()
    assert accuracy > 0.95 and math.isclose(accuracy, recorded, abs_tol=1e-12)


def _mac_count(path: Path) -> int:
    """Multiply-accumulates of the Conv and Gemm layers at batch 1, from ONNX shape inference."""
    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    shapes = {v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    shapes.update({v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim] for v in model.graph.output})
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            total += math.prod(shapes[node.output[0]]) * math.prod(weights[node.input[1]][1:])
        elif node.op_type == "Gemm":
            total += math.prod(weights[node.input[1]])
    return total


@pytest.mark.slow
def test_resnet20_verifies_with_the_expected_size():
    report = ic.verify(ZOO / "resnet20.onnx", samples=10)
    assert report.passed, report
    model = ic.from_onnx(ZOO / "resnet20.onnx")
    relu_states = 16 * 32 * 32 * 7 + 32 * 16 * 16 * 6 + 64 * 8 * 8 * 6
    assert relu_states <= model.n <= relu_states + 64 * 2, model.n  # at most the pooled features kept
    macs = _mac_count(ZOO / "resnet20.onnx")
    assert 0.85 * macs <= model.A.nnz <= macs, (model.A.nnz, macs)  # padding taps are not stored
    assert sp.triu(model.A).nnz == 0, "feedforward: strictly lower triangular, hence nilpotent"
    assert sum(block.activation.name == "relu" for block in model.blocks) == 19
