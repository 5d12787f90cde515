"""Max pools predicted as their windows' maxima (``runtime.max_pool``): the relu tree's output,
and the level states read elsewhere, without the levels, checked against onnxruntime,
onnx.reference and ``solve`` (which runs the levels)."""

from __future__ import annotations

import importlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import scipy.sparse as sp
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import implicit_compiler as ic
from implicit_compiler.runtime import kernels
from implicit_compiler.runtime.max_pool import (
    BAD,
    MaxPoolStep,
    _read_outputs,
    _windows,
    window_max,
    window_max_serial,
)
from implicit_compiler.runtime.structured import StructuredBlock

solve_module = importlib.import_module("implicit_compiler.runtime.solve")
pytestmark = pytest.mark.skipif(not kernels.available(), reason="the max pool step is a compiled kernel")


def _tensor(rng, name: str, shape) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT, shape, rng.normal(size=shape).astype(np.float32).ravel())


def residual_pool_net(channels: int = 4, size: int = 12, pool_output: bool = False) -> onnx.ModelProto:
    """Conv, Relu, MaxPool 3x3 stride 2 (as ResNet's stem), then a residual block reading the pool
    (its shortcut reads the pool's value, its leaf and last level states, not only the
    convolution's input block), a global max pool and a Gemm: a pool read outside it, and one
    (the global pool) whose output is read by the Gemm's term. With ``pool_output``, a second
    output twice the stem's pool: C reads its levels' states too."""
    rng = np.random.default_rng(0)
    half = (size + 1) // 2
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["pool", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "pool"], ["sum"]),
        helper.make_node("Relu", ["sum"], ["r2"]),
        helper.make_node("GlobalMaxPool", ["r2"], ["global"]),
        helper.make_node("Flatten", ["global"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], transB=1),
    ] + [helper.make_node("Add", ["pool", "pool"], ["twice"])] * pool_output
    initializers = [
        _tensor(rng, "w1", [channels, 3, 3, 3]), _tensor(rng, "b1", [channels]),
        _tensor(rng, "w2", [channels, channels, 3, 3]), _tensor(rng, "b2", [channels]),
        _tensor(rng, "w3", [5, channels]), _tensor(rng, "b3", [5]),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "residual_pool",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 5])]
        + [helper.make_tensor_value_info("twice", TensorProto.FLOAT, [None, channels, half, half])] * pool_output,
        initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    assert half == 6
    return model


@pytest.fixture
def pools_as_remainder_blocks(monkeypatch):
    """Every block without terms as a remainder block (from 65,536 rows otherwise): the small
    model's pools then run as ResNet's do."""
    monkeypatch.setattr(solve_module, "REMAINDER_BLOCK_ROWS", 1)


@pytest.mark.parametrize("pool_output", [False, True], ids=["shortcut", "shortcut-and-output"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_pools_predict_as_window_maxima_like_the_references(dtype, pool_output, pools_as_remainder_blocks):
    """The shortcut's rows read the pool's output rows instead of its levels (``_read_outputs``):
    without a second reader no level state is computed; C's rows (``pool_output``) still read
    the levels, whose states read there are then computed from the windows."""
    proto = residual_pool_net(pool_output=pool_output)
    model = ic.from_onnx(proto, dtype=dtype, structure="kernels").astype(dtype)
    assert model.is_structured
    steps = solve_module._with_max_pools(model, solve_module._execution_steps(model, structured=True))
    pools = [step for step in steps if isinstance(step, MaxPoolStep)]
    assert len(pools) == 2  # the stem's pool and the global one
    stem = max(pools, key=lambda step: step.outputs.targets.size)
    assert stem.outputs.targets.size == 4 * 6 * 6 and np.all(stem.outputs.first_counts <= 9)
    assert (stem.states.targets.size > 0) == pool_output  # the levels' states C reads
    after = steps[steps.index(stem) + 1 :]
    levels = slice(stem.blocks[0].rows.start, stem.blocks[-2].rows.stop)
    read = np.concatenate(
        [step._remainder_rows[1].view(np.int64) for step in after if isinstance(step, StructuredBlock)]
    )
    assert not np.any((read >= levels.start) & (read < levels.stop))  # no step reads a level
    assert np.isin(stem.outputs.targets, read).sum() > 4 * 5 * 5  # the shortcut reads the output rows
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = ReferenceEvaluator(proto)
    rng = np.random.default_rng(1)
    for batch in (1, 2, 5):
        image = rng.normal(size=(batch, 3, 12, 12))
        got = model.predict(image.astype(dtype))
        got = list(got.values()) if pool_output else [got]  # (a dict for two outputs)
        assert all(value.dtype == dtype for value in got)
        states = model.solve(image.astype(dtype).reshape(batch, -1)).y  # (by the levels)
        if dtype == np.float64:
            expected = reference.run(None, {"image": image})
        else:
            expected = session.run(None, {"image": image.astype(np.float32)})
        tolerance = 1e-9 if dtype == np.float64 else 1e-4
        for value, want in zip(got, expected, strict=True):
            scale = np.abs(want).max()
            np.testing.assert_allclose(value, want, rtol=0, atol=tolerance * scale)
        np.testing.assert_allclose(states[:, :5], expected[0], rtol=0, atol=tolerance * np.abs(expected[0]).max())


def test_resnet_stem_pool_is_fused_at_its_real_size():
    """Without lowering the threshold: ResNet-18 at 160 x 160 (its pool's levels are past
    ``REMAINDER_BLOCK_ROWS``) predicts by the pool step like onnxruntime."""
    from implicit_compiler.bench_models import resnet

    proto = resnet(18, 160)
    model = ic.from_onnx(proto, dtype=np.float32).astype(np.float32)
    steps = solve_module._with_max_pools(model, solve_module._execution_steps(model, structured=True))
    assert sum(isinstance(step, MaxPoolStep) for step in steps) == 1
    image = np.random.default_rng(2).normal(size=(2, 3, 160, 160)).astype(np.float32)
    expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"image": image}
    )[0]
    np.testing.assert_allclose(model.predict(image), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("kernel", [window_max, window_max_serial], ids=["threads", "serial"])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_window_max_is_the_maximum_and_keeps_nan(kernel, batch):
    rng = np.random.default_rng(3)
    V = rng.normal(size=(40, batch))
    V[5, 0] = np.nan
    targets = np.array([30, 31, 32, 33])
    first = np.array([[0, 1, 2], [3, 4, 0], [5, 6, 7], [8, 9, 10]])
    first_counts = np.array([3, 2, 3, 1])
    second = np.array([[11, 12], [0, 0], [13, 0], [14, 15]])
    second_counts = np.array([2, 0, 1, 2])
    kernel(V, targets, first, first_counts, second, second_counts)
    for i, target in enumerate(targets):
        high = V[first[i, : first_counts[i]]].max(axis=0)  # numpy's max keeps NaN
        if second_counts[i]:
            high = high - V[second[i, : second_counts[i]]].max(axis=0)
            high = np.where(high <= 0, 0.0, high)  # relu keeping NaN
        np.testing.assert_array_equal(V[target], high)
    assert np.isnan(V[32, 0]) and (batch == 1 or not np.isnan(V[32, 1:]).any())


def _csr(rows: list[dict[int, float]]):
    indptr = np.cumsum([0] + [len(row) for row in rows]).astype(np.int64)
    sources = np.array([column for row in rows for column in row], dtype=np.int64)
    data = np.array([value for row in rows for value in row.values()], dtype=np.float64)
    return indptr, sources, data


def test_windows_follow_the_tree_and_refuse_what_is_not_a_maximum():
    # leaves at V rows 0-3, the levels' states at rows 10-12, one output row after them
    levels = [{0: 1.0, 1: -1.0}, {2: 1.0, 3: -1.0}, {10: 1.0, 1: 1.0, 11: -1.0, 3: -1.0}]
    output = [{12: 1.0, 11: 1.0, 3: 1.0}]
    first, second, offsets, leaves = _windows(*_csr(levels + output), 10, 3, 1, 64)
    assert first[0] != BAD and sorted(leaves[offsets[3] : offsets[4]]) == [0, 1, 2, 3]
    assert second[2] == 1 and first[3] == 2  # M2 of the top level: the second pair's maximum
    refused = {
        "a part of a maximum": levels[:2] + [{10: 1.0, 11: -1.0, 3: -1.0}] + output,
        "a made state as a leaf": levels[:2] + [{10: 1.0, 11: -1.0}] + [{12: 1.0, 11: 1.0}],
        "two leaves added": [{0: 1.0, 1: 1.0, 2: -1.0}] + levels[1:] + output,
    }
    for name, rows in refused.items():
        assert _windows(*_csr(rows), 10, 3, 1, 64)[0][0] == BAD, name
    assert _windows(*_csr(levels + output), 10, 3, 1, 3)[0][0] == BAD  # a window wider than allowed


def _block(name: str, first: int, rows: list[dict[int, float]]) -> StructuredBlock:
    """A remainder block over V rows first:first + len(rows), with these rows (V row: weight)."""
    indptr, sources, data = _csr(rows)
    columns, column_of = np.unique(sources, return_inverse=True)
    remainder = sp.csr_array((data, column_of, indptr), shape=(len(rows), columns.size))
    bias = np.zeros((len(rows), 1))
    return StructuredBlock(
        name, slice(first, first + len(rows)), bias, (), remainder, columns, ic.activation("relu"), 0
    )


def test_a_reader_of_a_whole_maximum_reads_its_output_row():
    """``_read_outputs``: a row holding the output row's entries (leaf and chain), each with one
    coefficient, reads the output row with it; a part of the chain, or mixed coefficients, stay."""
    output = _block("pool", 13, [{12: 1.0, 11: 1.0, 3: 1.0}])  # the maximum of leaves 0-3 (levels 10-12)
    made_by = np.array([-1, -1, 13])  # level state 12 makes output row 13
    reader = _block("reader", 20, [
        {12: 0.5, 11: 0.5, 3: 0.5, 7: 2.0},  # half the maximum, and another row
        {12: 1.0, 11: 1.0},  # a part of it
        {12: 1.0, 11: 2.0, 3: 1.0},  # not one coefficient
        {5: 1.0},
    ])  # fmt: skip
    rewritten = _read_outputs(reader, output, made_by, 10, 13)
    dense = np.zeros((4, 20))
    dense[:, rewritten.remainder_columns] = rewritten.remainder.toarray()
    expected = np.zeros((4, 20))
    expected[0, [13, 7]] = 0.5, 2.0
    expected[1, [12, 11]] = 1.0
    expected[2, [12, 11, 3]] = 1.0, 2.0, 1.0
    expected[3, 5] = 1.0
    np.testing.assert_array_equal(dense, expected)
    assert _read_outputs(_block("other", 20, [{5: 1.0}]), output, made_by, 10, 13).remainder_columns.tolist() == [5]
