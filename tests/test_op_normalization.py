"""BatchNormalization (inference) against onnxruntime and the float64 reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import assert_matches_onnxruntime

import implicit_compiler as ic


def _bn_model(opset: int, epsilon: float, rank: int = 4, **attributes):
    rng = np.random.default_rng(3)
    channels = 3
    stats = {
        "scale": rng.uniform(0.5, 1.5, channels),
        "bias": rng.normal(size=channels),
        "mean": rng.normal(size=channels),
        "var": rng.uniform(0.2, 2.0, channels),
    }
    initializers = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in stats.items()]
    shape = ["N", channels, 4, 5][:rank]
    node = helper.make_node("BatchNormalization", ["x", *stats], ["y"], epsilon=epsilon, **attributes)
    graph = helper.make_graph(
        [node],
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(
    "opset,epsilon,rank",
    [(9, 1e-5, 4), (9, 0.8, 4), (15, 1e-3, 4), (15, 1e-5, 3), (15, 1e-5, 2)],
    ids=["opset9", "opset9-eps0.8", "opset15", "opset15-1d", "opset15-flat"],
)
def test_batch_normalization_inference(opset, epsilon, rank):
    compiled = assert_matches_onnxruntime(_bn_model(opset, epsilon, rank))
    assert compiled.n == 0, "BatchNormalization is linear: no states"


def test_training_mode_is_refused():
    with pytest.raises(ic.UnsupportedAttributeError, match="training_mode=1 is not supported"):
        ic.from_onnx(_bn_model(15, 1e-5, training_mode=1))
