"""The one golden check of the frontend tests: our lowering against onnxruntime and the reference.

Models are written as ``onnx.parser`` text (or built with onnx.helper) and compared on random
inputs, independently of the library's own ``verify``: float32 against onnxruntime
(rtol 1e-4, atol 1e-5 * max(1, |y|_inf)) and float64 against ``onnx.reference`` on the
float64 copy (1e-9 relative to |y|_inf). The first sample is also predicted alone, which takes
the one-sample path (``runtime/one_sample.py``), and the batch also goes by tiles of samples
(``runtime/sample_tiles.py``, what ``predict`` takes for large batches), against the same
expected outputs.
"""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import onnx.parser
import onnxruntime
from onnx.reference import ReferenceEvaluator

import implicit_compiler as ic
from implicit_compiler.frontend.fold import for_reference
from implicit_compiler.frontend.graph import prepare, to_float64, with_sorted_nodes
from implicit_compiler.frontend.reference_ops import REFERENCE_OPS
from implicit_compiler.runtime.batching import flatten_inputs, shape_outputs

solve_module = importlib.import_module("implicit_compiler.runtime.solve")


# a two-layer network of 4 inputs and 3 outputs, batch axis N: the frontend tests' smallest model
MLP_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 3] y)
<float[3, 4] W = {1,2,3,4,5,6,7,8,9,10,11,12}, float[3] b = {0.5, -0.5, 1}> {
    h = Gemm <transB = 1> (x, W, b)
    y = Relu(h)
}
"""


def parse(text: str) -> onnx.ModelProto:
    """A model from onnx.parser text, checked."""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    """A checked model of ``nodes`` (onnx.helper), IR version 8, default domain at ``opset``."""
    graph = onnx.helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def float_value(name: str, shape) -> onnx.ValueInfoProto:
    """A float32 graph input or output."""
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)


def random_inputs(model: onnx.ModelProto, batch: int = 4, seed: int = 0, input_shapes=None) -> dict[str, np.ndarray]:
    """Per input (batch, *sample_shape) float64 values, half uniform [-2, 2], half normal."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for graph_input in prepare(model, input_shapes).inputs:
        shape = graph_input.sample_shape
        half = (batch + 1) // 2
        feeds[graph_input.name] = np.concatenate(
            [rng.uniform(-2, 2, size=(half, *shape)), rng.standard_normal(size=(batch - half, *shape))]
        )
    return feeds


def _run_per_sample(run, model, feeds, input_shapes, dtype):
    inputs = prepare(model, input_shapes).inputs
    count = len(next(iter(feeds.values())))
    outputs = []
    for index in range(count):
        sample = {i.name: np.asarray(feeds[i.name][index]).reshape(i.shape).astype(dtype) for i in inputs}  # (0-d too)
        outputs.append(run(sample))
    return [np.stack([np.asarray(o[k], dtype=np.float64) for o in outputs]) for k in range(len(outputs[0]))]


def assert_matches_onnxruntime(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray] | None = None,
    input_shapes=None,
    batch: int = 4,
    seed: int = 0,
    check_reference: bool = True,
    check_onnxruntime: bool = True,
    structure: str = "auto",
) -> ic.ImplicitModel:
    """Compile ``model`` and assert it matches onnxruntime (float32) and the reference (float64)."""
    compiled = ic.from_onnx(model, input_shapes=input_shapes, structure=structure)
    feeds = feeds if feeds is not None else random_inputs(model, batch, seed, input_shapes)
    if check_onnxruntime:
        _assert_float32_matches(compiled, model, feeds, input_shapes)
    if check_reference:
        evaluator = ReferenceEvaluator(_reference_model(model), new_ops=REFERENCE_OPS)
        expected64 = _run_per_sample(lambda s: evaluator.run(None, s), model, feeds, input_shapes, np.float64)
        for ours64 in _predictions(compiled, feeds, np.float64):
            for spec, ours, expected in zip(compiled.outputs, ours64, expected64):
                expected = expected[: len(ours)].reshape(ours.shape)
                scale = max(float(np.abs(expected).max(initial=0)), 1e-300)
                error = float(np.abs(ours - expected).max(initial=0)) / scale
                assert error <= 1e-9, f"float64 output {spec.name!r}: relative error {error:.2e} vs onnx.reference"
    return compiled


def _predictions(compiled: ic.ImplicitModel, feeds: dict[str, np.ndarray], dtype) -> list[list[np.ndarray]]:
    """The outputs for the batch, for its first sample alone (as a batch of one), and for the
    batch by tiles of samples when the model runs as a program (it is acyclic)."""
    typed = compiled.astype(dtype)
    feeds = {name: value.astype(dtype) for name, value in feeds.items()}
    first = {name: value[:1] for name, value in feeds.items()}
    predictions = [_outputs(typed.predict(feeds), compiled), _outputs(typed.predict(first), compiled)]
    program = solve_module._one_sample_program(typed)
    if program is not None:
        U, _ = flatten_inputs(typed.inputs, feeds)
        tiled = solve_module._predict_by_tiles(typed, program, U, feeds)
        predictions.append(_outputs(shape_outputs(typed.outputs, tiled), compiled))
    return predictions


def _assert_float32_matches(compiled, model, feeds, input_shapes) -> None:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected32 = _run_per_sample(lambda s: session.run(None, s), model, feeds, input_shapes, np.float32)
    for ours32 in _predictions(compiled, feeds, np.float32):
        for spec, ours, expected in zip(compiled.outputs, ours32, expected32):
            expected = expected[: len(ours)].reshape(ours.shape)
            atol = 1e-5 * max(1.0, float(np.abs(expected).max(initial=0)))
            np.testing.assert_allclose(
                ours, expected, rtol=1e-4, atol=atol, err_msg=f"float32 output {spec.name!r} vs onnxruntime"
            )


def _reference_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float64 copy, converted where the reference mishandles an op's older versions
    (BatchNormalization before opset 14, Softmax before 13: ``fold.for_reference``)."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    model = for_reference(model, opset)
    return to_float64(with_sorted_nodes(model))  # the reference needs producers before consumers


def _outputs(prediction, compiled: ic.ImplicitModel) -> list[np.ndarray]:
    if isinstance(prediction, dict):
        return [prediction[spec.name] for spec in compiled.outputs]
    return [prediction]


def gemm_tanh_chain(layers: list[tuple[int, int]], seed: int = 0) -> onnx.ModelProto:
    """Gemm -> Tanh repeated, ``layers`` = [(outputs, inputs)], random weights and biases."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, initializers, value = [], [], "x"
    for index, (rows, columns) in enumerate(layers):
        initializers += [
            numpy_helper.from_array(rng.standard_normal((columns, rows)).astype(np.float32), f"W{index}"),
            numpy_helper.from_array(rng.standard_normal(rows).astype(np.float32), f"B{index}"),
        ]
        nodes += [
            helper.make_node("Gemm", [value, f"W{index}", f"B{index}"], [f"g{index}"]),
            helper.make_node("Tanh", [f"g{index}"], [f"t{index}"]),
        ]
        value = f"t{index}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", layers[0][1]])],
        [helper.make_tensor_value_info(value, TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
