"""The README's round trip (issue 21): torch -> implicit -> feedback -> ONNX -> onnxruntime, run
as written in an empty folder; onnxruntime's answer against our solve and the loop's residual
against the tolerance stored in the file."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from conftest import run_readme_block  # noqa: E402

from implicit_compiler.frontend.verification import FLOAT32_ATOL, FLOAT32_RTOL  # noqa: E402


def test_the_readme_round_trip_runs_as_written(tmp_path, monkeypatch):
    namespace = run_readme_block("## Round trip: torch in, ONNX out", tmp_path, monkeypatch)
    closed, v, y, residual = namespace["closed"], namespace["v"], namespace["y"], namespace["residual"]
    assert os.listdir(tmp_path) == ["closed.onnx"]
    proto = onnx.load(tmp_path / "closed.onnx")
    onnx.checker.check_model(proto, full_check=True)
    assert "Loop" in {node.op_type for node in proto.graph.node}
    tolerance = next(t for t in proto.graph.initializer if t.name == "fixed_point_tolerance")
    assert residual.shape == (4,) and np.all(residual <= onnx.numpy_helper.to_array(tolerance))
    expected = closed.solve(v, tol=1e-6).y
    assert closed.solve(v).iterations > 1  # truly implicit
    scale = np.abs(expected).max()
    np.testing.assert_allclose(y, expected, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL * max(1.0, scale))
