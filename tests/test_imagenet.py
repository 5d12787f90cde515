"""ImageNet-size networks (issue 20): ResNet-18 and ResNet-50 at 224 x 224 compile with their
convolutions kept as kernels, within the memory the issue sets, and predict like onnxruntime; a ResNet-18 at 64 x
64 matches onnx.reference in float64 and its materialized CSR."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import implicit_compiler as ic
from implicit_compiler.bench_models import resnet
from implicit_compiler.frontend.verification import FLOAT32_ATOL, FLOAT32_RTOL

ROOT = Path(__file__).resolve().parents[1]
PEAK_LIMIT = 8 * 2**30  # the bound on compiling ResNet-18 at 224

_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])

def peak():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

import numpy as np, onnx, onnxruntime
import implicit_compiler as ic
from implicit_compiler.bench_models import resnet
proto = resnet(int(sys.argv[4]), 224)
before = peak()
start = time.perf_counter()
model = ic.from_onnx(proto, dtype=np.float32)
seconds = time.perf_counter() - start
compiled_peak = peak()
u = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
ours = model.predict(u)
session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
expected = session.run(None, {"image": u})[0]
model.save(sys.argv[2])
weights = sum(np.prod(tensor.dims) * 4 for tensor in proto.graph.initializer)
np.save(sys.argv[3], np.stack([ours, expected]))
print(json.dumps({"seconds": seconds, "peak": compiled_peak - before, "structured": model.is_structured,
                  "memory_bytes": model.memory_bytes, "weights": int(weights), "nnz": model.nnz}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_at_224_compiles_within_the_memory_bound_and_predicts_like_onnxruntime(tmp_path, depth):
    file, outputs = tmp_path / f"resnet{depth}.npz", tmp_path / "outputs.npy"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ROOT), str(file), str(outputs), str(depth)],
        capture_output=True, text=True, timeout=1200, env=env,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    print(figures)
    assert figures["structured"]
    assert figures["nnz"] > 1.5e9  # as CSR: ResNet-18 1.7G non-zeros (20 GB as float64), ResNet-50 4.0G
    assert figures["peak"] < PEAK_LIMIT, figures
    # kernels, not multiply-accumulates: ResNet-18's weights (47 MB), the states' biases and row
    # pointers (16 MB each) and the max pool's relu trees (6M non-zeros); as CSR 13.5 GB
    assert figures["memory_bytes"] < 4 * figures["weights"], figures
    assert file.stat().st_size < 4 * figures["weights"]
    ours, expected = np.load(outputs)
    atol = FLOAT32_ATOL * max(1.0, float(np.abs(expected).max()))
    assert np.all(np.abs(ours - expected) <= FLOAT32_RTOL * np.abs(expected) + atol)
    loaded = ic.load(file)
    assert loaded.is_structured and loaded.nnz == figures["nnz"]


@pytest.mark.slow
def test_resnet18_at_64_matches_the_float64_reference_and_its_csr():
    proto = resnet(18, 64, classes=10)
    report = ic.verify(proto, samples=2)
    assert report.passed, report
    assert report.outputs[0].passed_float64, report
    model = ic.from_onnx(proto, dtype=np.float64)
    assert model.is_structured
    u = np.random.default_rng(2).standard_normal((3, 3, 64, 64))
    plain = model.materialized()
    np.testing.assert_allclose(model.predict(u), plain.predict(u), rtol=1e-10, atol=1e-12)
    csr = ic.from_onnx(proto, dtype=np.float64, structure="csr")
    assert not csr.is_structured
    np.testing.assert_allclose(model.predict(u), csr.predict(u), rtol=1e-10, atol=1e-12)


def test_the_generated_resnets_run_in_onnxruntime():
    """The benchmark's networks are valid ONNX with outputs of order one that depend on the image."""
    for depth in (18, 50):
        proto = resnet(depth, 32, classes=10)
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        u = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
        y = session.run(None, {"image": u})[0]
        assert y.shape == (2, 10) and 0.01 < np.abs(y).max() < 100
        assert np.abs(y[0] - y[1]).max() > 1e-3 * np.abs(y).max()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["inception_v2", "densenet121"])
def test_onnx_light_models_compile_structured_and_predict_like_onnxruntime(name):
    """onnx's own 'light' networks (weights made by nodes from their shapes; once refused as too
    large): Inception's branches and DenseNet's concatenations read as kernels per run."""
    import onnx

    proto = onnx.load(str(Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"))
    softmax = [node for node in proto.graph.node if node.op_type == "Softmax"]
    if softmax:  # the logits too: a softmax of equal logits (these weights) would hide errors
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(softmax[-1].input[0]))
    model = ic.from_onnx(proto, dtype=np.float32)
    assert model.is_structured and model.nnz > 1e9
    weights = {tensor.name for tensor in proto.graph.initializer}
    image = next(value for value in proto.graph.input if value.name not in weights)
    shape = [dim.dim_value or 1 for dim in image.type.tensor_type.shape.dim]
    u = np.random.default_rng(3).uniform(0, 1, size=shape).astype(np.float32)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    predicted = model.predict(u)
    predicted = predicted if isinstance(predicted, dict) else {proto.graph.output[0].name: predicted}
    assert len(predicted) == len(proto.graph.output)
    for output, expected in zip(proto.graph.output, session.run(None, {image.name: u})):
        ours = np.asarray(predicted[output.name]).reshape(expected.shape)
        atol = FLOAT32_ATOL * max(1.0, float(np.abs(expected).max()))
        assert np.all(np.abs(ours - expected) <= FLOAT32_RTOL * np.abs(expected) + atol), output.name
