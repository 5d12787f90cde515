"""Checking a compiled model against the ONNX runtimes it must agree with.

- float32: onnxruntime on the original model vs the implicit model cast to float32, passing
  when |ours - ort| <= rtol |ort| + atol elementwise, rtol = 1e-4, atol = 1e-5 max(1, |ort|_inf).
- float64: ``onnx.reference.ReferenceEvaluator`` on a float64 copy (onnxruntime has no float64
  convolution or pooling kernels) vs the implicit model in float64, passing when
  max |ours - ref| <= 1e-9 max(1e-300, |ref|_inf) (norm-wise relative error). Models older
  than opset 14 with BatchNormalization are upgraded first (the reference mishandles old BN).

Inputs are drawn half uniform on [-1, 1] and half standard normal, from ``seed``.

onnxruntime runs all samples as one real batch (stacked along each input's batch axis) when
every input's batch axis is dynamic in the model: a graph that mixes samples along the batch
axis then gives onnxruntime something else than our per-sample model, and fails
(``batch_checked`` True). A model with a static batch of 1 is defined per sample and run one
sample at a time, as is the float64 reference (it is only a per-sample oracle).

Where the float64 reference disagrees with onnxruntime beyond the float32 tolerance while we
agree with onnxruntime (onnx.reference has bugs too, e.g. ConvTranspose with group > 1 and a
bias), the float64 comparison is reported as not trustworthy (``float64_checked`` False, with
"float64 reference disagrees with onnxruntime" in ``reference_error``) rather than failed.

Where onnx.reference computes in float32 (Erf; the float32 constants of Gelu and HardSwish) it
is given float64 implementations (``reference_ops``).

The reference evaluator does not implement everything onnxruntime does (e.g. RNN activations
other than Tanh): when it raises, the float64 comparison is reported as not done
(``float64_checked`` False, with the reason) and ``passed`` rests on the float32 comparison.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime
from onnx.reference import ReferenceEvaluator

from .. import arguments
from ..model import ImplicitModel
from .fold import for_reference
from .graph import GraphInput, PreparedModel, load_onnx, prepare, with_sorted_nodes
from .lower import from_onnx
from .reference_ops import REFERENCE_OPS

FLOAT32_RTOL = 1e-4
FLOAT32_ATOL = 1e-5
FLOAT64_RTOL = 1e-9


@dataclass(frozen=True)
class OutputComparison:
    """Errors of one output against onnxruntime (float32) and the reference (float64)."""

    name: str
    max_abs_error_float32: float
    max_rel_error_float32: float
    passed_float32: bool
    max_abs_error_float64: float  # NaN when the reference could not run
    max_rel_error_float64: float
    passed_float64: bool | None  # None: not checked

    @property
    def passed(self) -> bool:
        return self.passed_float32 and self.passed_float64 is not False


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of ``verify``: per-output errors, the model's size and a verdict."""

    model_name: str
    samples: int
    outputs: tuple[OutputComparison, ...]
    n: int
    nnz: int
    blocks: int
    compile_seconds: float
    reference_error: str | None = None  # why the float64 reference could not run or is not trusted
    batch_checked: bool = False  # onnxruntime ran the samples as one batch
    batch_error: str | None = None  # why it could not (then it ran one sample at a time)

    @property
    def float64_checked(self) -> bool:
        return self.reference_error is None

    @property
    def passed(self) -> bool:
        return all(output.passed for output in self.outputs)


def sample_inputs(inputs: Sequence[GraphInput], samples: int, seed: int) -> dict[str, np.ndarray]:
    """``samples`` inputs per graph input, (samples, *sample_shape), half uniform, half normal."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for graph_input in inputs:
        uniform = rng.uniform(-1.0, 1.0, size=((samples + 1) // 2, *graph_input.sample_shape))
        normal = rng.standard_normal(size=(samples // 2, *graph_input.sample_shape))
        feeds[graph_input.name] = np.concatenate([uniform, normal]).astype(np.float64)
    return feeds


def run_onnxruntime(
    model: onnx.ModelProto, inputs: Sequence[GraphInput], feeds: Mapping[str, np.ndarray]
) -> list[np.ndarray]:
    """onnxruntime in float32 on samples stacked on axis 0, one sample per run."""
    session = _session(model)
    return _per_sample(lambda sample: session.run(None, sample), inputs, feeds, np.float32)


def run_reference(prepared: PreparedModel, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The ONNX reference evaluator in float64 on the prepared (float64, sorted) copy."""
    # Erf, Gelu, HardSwish in float64 (onnx.reference computes them in float32)
    evaluator = ReferenceEvaluator(for_reference(prepared.model, prepared.opset), new_ops=REFERENCE_OPS)
    return _per_sample(lambda sample: evaluator.run(None, sample), prepared.inputs, feeds, np.float64)


def run_onnxruntime_batch(
    model: onnx.ModelProto, inputs: Sequence[GraphInput], feeds: Mapping[str, np.ndarray]
) -> list[np.ndarray | None]:
    """onnxruntime in float32 on all samples at once, each input's samples stacked along its batch
    axis; each output with its batch axis moved first, (samples, *sample_shape), or None where the
    output has no axis of that length (the graph does not keep one sample per position)."""
    session = _session(model)
    count = len(next(iter(feeds.values())))
    batch = {i.name: np.moveaxis(feeds[i.name], 0, i.batch_axis).astype(np.float32) for i in inputs}
    names = _batch_names(model, inputs)
    results = []
    for output, value in zip(model.graph.output, session.run(None, batch)):
        results.append(_samples_first(np.asarray(value, dtype=np.float64), count, output, names))
    return results


def _batch_names(model: onnx.ModelProto, inputs: Sequence[GraphInput]) -> set[str]:
    names = set()
    for value in model.graph.input:
        for graph_input in inputs:
            dims = value.type.tensor_type.shape.dim
            if (
                value.name == graph_input.name
                and graph_input.batch_axis is not None
                and len(dims) > graph_input.batch_axis
            ):
                names.add(dims[graph_input.batch_axis].dim_param)
    return names - {""}


def _samples_first(value: np.ndarray, count: int, output: onnx.ValueInfoProto, names: set[str]) -> np.ndarray | None:
    """The output with its batch axis first: the axis the model names like an input's batch
    dimension, else the first of length ``count``; None when no axis has that length."""
    dims = output.type.tensor_type.shape.dim
    named = [axis for axis, dim in enumerate(dims) if dim.dim_param and dim.dim_param in names]
    candidates = [axis for axis in range(value.ndim) if value.shape[axis] == count]
    chosen = [axis for axis in named if axis in candidates] or candidates
    return np.moveaxis(value, chosen[0], 0) if chosen else None


def _session(model: onnx.ModelProto) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(
        with_sorted_nodes(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _per_sample(run, inputs: Sequence[GraphInput], feeds: Mapping[str, np.ndarray], dtype) -> list[np.ndarray]:
    count = len(next(iter(feeds.values())))
    results: list[list[np.ndarray]] = []
    for index in range(count):
        sample = {i.name: feeds[i.name][index].reshape(i.shape).astype(dtype) for i in inputs}
        outputs = run(sample)
        results.append([np.asarray(o, dtype=np.float64) for o in outputs])
    return [np.stack([r[k] for r in results]) for k in range(len(results[0]))]


def compare_outputs(
    model: ImplicitModel,
    feeds: Mapping[str, np.ndarray],
    ort: list[np.ndarray | None],
    reference: list[np.ndarray] | None,
) -> tuple[OutputComparison, ...]:
    """Our float32 and float64 predictions against the two oracles, output by output (an
    onnxruntime output of None, one whose batch could not be lined up with ours, fails)."""
    ours64 = _as_list(model.predict(dict(feeds)), model)
    ours32 = _as_list(model.astype(np.float32).predict({k: v.astype(np.float32) for k, v in feeds.items()}), model)
    comparisons = []
    for index, (spec, y64, y32, expected32) in enumerate(zip(model.outputs, ours64, ours32, ort)):
        if expected32 is None or expected32.size != y32.size:  # not even the same number of values
            abs32, rel32, passed32 = math.inf, math.inf, False
        else:
            expected32 = expected32.reshape(y32.shape)
            diff32 = np.abs(y32.astype(np.float64) - expected32)
            atol = FLOAT32_ATOL * max(1.0, float(np.max(np.abs(expected32), initial=0.0)))
            abs32 = float(np.max(diff32, initial=0.0))
            rel32 = float(np.max(diff32 / np.maximum(np.abs(expected32), atol), initial=0.0))
            passed32 = _within_float32_tolerance(y32, expected32)
        abs64, rel64, passed64 = float("nan"), float("nan"), None
        if reference is not None:
            diff64 = np.abs(y64 - reference[index].reshape(y64.shape))
            scale64 = max(float(np.max(np.abs(reference[index]), initial=0.0)), 1e-300)
            abs64 = float(np.max(diff64, initial=0.0))
            rel64 = abs64 / scale64
            passed64 = rel64 <= FLOAT64_RTOL and bool(np.isfinite(y64).all())
        comparisons.append(
            OutputComparison(
                spec.name,
                abs32,
                rel32,
                passed32,
                abs64,
                rel64,
                passed64,
            )
        )
    return tuple(comparisons)


def _within_float32_tolerance(values: np.ndarray, expected: np.ndarray) -> bool:
    """|values - expected| <= rtol |expected| + atol elementwise (the float32 criterion)."""
    atol = FLOAT32_ATOL * max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    difference = np.abs(np.asarray(values, dtype=np.float64) - expected)
    return bool(np.all(difference <= FLOAT32_RTOL * np.abs(expected) + atol))


def distrust_disagreeing_reference(
    comparisons: tuple[OutputComparison, ...], ort: list[np.ndarray | None], reference: list[np.ndarray]
) -> tuple[tuple[OutputComparison, ...], str | None]:
    """Where we fail the float64 check but pass onnxruntime's, and the reference itself is off
    onnxruntime beyond the float32 tolerance, the reference is what is wrong: mark that float64
    comparison not done (None) and say why."""
    kept, reasons = [], []
    for comparison, expected32, expected64 in zip(comparisons, ort, reference):
        if comparison.passed_float32 and comparison.passed_float64 is False and expected32 is not None:
            expected32 = expected32.reshape(-1)
            if expected32.size == np.size(expected64) and not _within_float32_tolerance(
                np.ravel(expected64), expected32
            ):
                gap = float(np.max(np.abs(np.ravel(expected64) - expected32), initial=0.0))
                reasons.append(
                    f"float64 reference disagrees with onnxruntime on output {comparison.name!r} (by up to "
                    f"{gap:.3g}) where the compiled model agrees with onnxruntime; the float64 comparison is not "
                    "trustworthy for it (onnx.reference is likely wrong here)"
                )
                comparison = dataclasses.replace(comparison, passed_float64=None)
        kept.append(comparison)
    return tuple(kept), ("; ".join(reasons) or None)


def _as_list(prediction, model: ImplicitModel) -> list[np.ndarray]:
    if isinstance(prediction, dict):
        return [prediction[spec.name] for spec in model.outputs]
    return [prediction]


def verify(
    model: str | os.PathLike | onnx.ModelProto,
    samples: int = 10,
    seed: int = 0,
    input_shapes: Mapping[str, Sequence[int | None]] | None = None,
) -> VerifyReport:
    """Compile ``model`` and compare it with onnxruntime (float32) and the reference (float64)."""
    samples = arguments.integer(samples, "samples", 1)  # (0 compared nothing, and crashed)
    proto = load_onnx(model)
    start = time.perf_counter()
    compiled = from_onnx(proto, input_shapes=input_shapes)
    compile_seconds = time.perf_counter() - start
    prepared = prepare(proto, input_shapes)
    feeds = sample_inputs(prepared.inputs, samples, seed)
    ort, batch_error = _run_onnxruntime_as_batch_if_possible(proto, prepared, feeds)
    reference, reference_error = None, None
    try:
        reference = run_reference(prepared, feeds)
    except Exception as error:  # the reference lacks some ops and attributes; say so, do not crash
        reference_error = f"onnx.reference could not run the model: {type(error).__name__}: {error}"
    outputs = compare_outputs(compiled, feeds, ort, reference)
    if reference is not None:
        outputs, reference_error = distrust_disagreeing_reference(outputs, ort, reference)
    name = os.fspath(model) if not isinstance(model, onnx.ModelProto) else (proto.graph.name or "model")
    return VerifyReport(
        model_name=os.path.basename(name),
        samples=samples,
        outputs=outputs,
        n=compiled.n,
        nnz=compiled.structure.A.nnz,
        blocks=len(compiled.blocks),
        compile_seconds=compile_seconds,
        reference_error=reference_error,
        batch_checked=batch_error is None,
        batch_error=batch_error,
    )


def _run_onnxruntime_as_batch_if_possible(
    proto: onnx.ModelProto, prepared: PreparedModel, feeds: Mapping[str, np.ndarray]
) -> tuple[list[np.ndarray | None], str | None]:
    """onnxruntime on one real batch where the model allows any batch size, else per sample
    (and the reason)."""
    if not prepared.inputs or not all(i.batch_dynamic for i in prepared.inputs):
        return run_onnxruntime(
            proto, prepared.inputs, feeds
        ), "the model does not leave every input's batch axis dynamic"
    try:
        return run_onnxruntime_batch(proto, prepared.inputs, feeds), None
    except Exception as error:  # onnxruntime refuses this batch: the model does not run at this batch size
        reason = f"onnxruntime cannot run a batch of {len(next(iter(feeds.values())))}: {type(error).__name__}: {error}"
        return run_onnxruntime(proto, prepared.inputs, feeds), reason
