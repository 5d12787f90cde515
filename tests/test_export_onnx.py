"""``to_onnx`` and ``implicit-compiler export``: the exported graph, run by onnxruntime (float32)
and onnx.reference (float64), predicts as the runtime does; from_onnx reads it back."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import scipy.sparse as sp
from onnx.reference import ReferenceEvaluator

import implicit_compiler as ic
from implicit_compiler import ImplicitModel, StateBlock, TensorSpec
from implicit_compiler.activations import ACTIVATION_NAMES, activation
from implicit_compiler.cli import main
from implicit_compiler.errors import ArgumentValueError, GraphError, OverwriteError, UnsupportedOpError
from implicit_compiler.export import DEFAULT_OPSET
from implicit_compiler.frontend.reference_ops import REFERENCE_OPS
from implicit_compiler.frontend.verification import FLOAT32_ATOL, FLOAT32_RTOL, FLOAT64_RTOL
from implicit_compiler.structure import Convolution, Dense, StructuredMatrix, Term, TransposedConvolution

ZOO = Path(__file__).resolve().parents[1] / "zoo"


# --------------------------------------------------------------------------------- helpers
def run_onnxruntime(proto: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def run_reference(proto: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """onnx.reference, with float64 Erf / Gelu / HardSwish (it computes those in float32)."""
    evaluator = ReferenceEvaluator(proto, new_ops=REFERENCE_OPS)
    return dict(zip(evaluator.output_names, evaluator.run(None, feeds)))


def outputs_of(model: ImplicitModel, u) -> dict[str, np.ndarray]:
    y = model.predict(u)
    return y if isinstance(y, dict) else {model.outputs[0].name: y}


def assert_float32_close(got: np.ndarray, expected: np.ndarray) -> None:
    """verify's float32 test: |got - expected| <= rtol |expected| + atol max(1, |expected|_inf)."""
    assert got.shape == expected.shape and got.dtype == np.float32
    atol = FLOAT32_ATOL * max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(got, expected, rtol=FLOAT32_RTOL, atol=atol)


def assert_float64_close(got: np.ndarray, expected: np.ndarray) -> None:
    """verify's float64 test: max |got - expected| <= 1e-9 |expected|_inf."""
    assert got.shape == expected.shape and got.dtype == np.float64
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-300)
    assert np.abs(got - expected).max(initial=0.0) <= FLOAT64_RTOL * scale


def check_export(model: ImplicitModel, u: np.ndarray | dict, opset: int | None = None, **options) -> onnx.ModelProto:
    """Export the float32 and float64 models: onnx.checker passes on both, onnxruntime runs the
    float32 graph like predict, onnx.reference the float64 graph like predict to 1e-9. The
    float32 graph is returned."""
    feeds = u if isinstance(u, dict) else {model.inputs[0].name: u}
    for dtype in (np.float64, np.float32):
        typed = model.astype(dtype)
        proto = typed.to_onnx(opset=opset, **options)
        onnx.checker.check_model(proto, full_check=True)
        typed_feeds = {name: np.asarray(value, dtype=dtype) for name, value in feeds.items()}
        expected = outputs_of(typed, typed_feeds if isinstance(u, dict) else typed_feeds[model.inputs[0].name])
        run = run_onnxruntime if dtype == np.float32 else run_reference
        got = run(proto, typed_feeds)
        for name, value in expected.items():
            (assert_float32_close if dtype == np.float32 else assert_float64_close)(got[name], value)
    return proto


def graph_ops(proto: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in proto.graph.node}


# --------------------------------------------------------------------------------- zoo models
@pytest.fixture(scope="module")
def lenet():
    return ic.from_onnx(ZOO / "lenet5.onnx")


@pytest.fixture(scope="module")
def lenet_kernels():
    return ic.from_onnx(ZOO / "lenet5.onnx", structure="kernels")


@pytest.fixture(scope="module")
def digits_batch():
    return np.random.default_rng(0).standard_normal((5, 1, 32, 32))


@pytest.mark.parametrize("form", ["csr", "kernels"])
def test_lenet5_exports_as_its_kernels_and_predicts_alike(form, lenet, lenet_kernels, digits_batch, tmp_path):
    model = lenet if form == "csr" else lenet_kernels
    assert model.is_structured == (form == "kernels")
    proto = check_export(model, digits_batch)
    ops = graph_ops(proto)
    assert {"Conv", "Gemm", "Slice", "Relu"} <= ops and not {"Loop", "Gather"} & ops  # pooling: strided Slices
    assert all(opset.domain in ("", "ai.onnx") for opset in proto.opset_import)
    path = tmp_path / "lenet.onnx"
    onnx.save(proto, path)
    assert path.stat().st_size <= 1.2 * (ZOO / "lenet5.onnx").stat().st_size  # kernels, not Toeplitz copies
    # read back by from_onnx: the same predictions
    back = ic.from_onnx(proto, dtype=np.float32)
    expected = model.astype(np.float32).predict(digits_batch.astype(np.float32))
    assert_float32_close(back.predict(digits_batch.astype(np.float32)), expected)


def small_conv_net() -> onnx.ModelProto:
    """Conv (stride 2, asymmetric pads) + BatchNormalization + Relu, a 2 x 2 MaxPool, a
    depthwise dilated Conv (kept sparse), Flatten, Gemm: x (N, 2, 17, 17) -> y (N, 5)."""
    rng = np.random.default_rng(11)
    weights = {
        "W1": rng.normal(size=(4, 2, 3, 3)), "b1": rng.normal(size=4), "scale": rng.uniform(0.5, 2, 4),
        "shift": rng.normal(size=4), "mean": rng.normal(size=4), "var": rng.uniform(0.5, 2, 4),
        "W2": rng.normal(size=(4, 1, 2, 2)), "W3": rng.normal(size=(5, 4)) / 4, "b3": rng.normal(size=5),
    }  # fmt: skip
    nodes = [
        onnx.helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], strides=[2, 2], pads=[1, 0, 0, 1]),
        onnx.helper.make_node("BatchNormalization", ["c1", "scale", "shift", "mean", "var"], ["bn"]),
        onnx.helper.make_node("Relu", ["bn"], ["r1"]),
        onnx.helper.make_node("MaxPool", ["r1"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
        onnx.helper.make_node("Conv", ["mp", "W2"], ["c2"], group=4, dilations=[2, 2], pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Tanh", ["c2"], ["t2"]),
        onnx.helper.make_node("ReduceMean", ["t2"], ["pooled"], axes=[2, 3], keepdims=0),
        onnx.helper.make_node("Gemm", ["pooled", "W3", "b3"], ["y"], transB=1),
    ]
    initializers = [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    graph = onnx.helper.make_graph(
        nodes, "small", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2, 17, 17])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5])], initializers,
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("structure", ["csr", "kernels"])
def test_small_conv_net_against_onnxruntime_on_its_own_file(structure):
    """The exported graph against onnxruntime on the network itself (independent of ours),
    and against predict; read back by from_onnx."""
    network = small_conv_net()
    model = ic.from_onnx(network, structure=structure)
    u = np.random.default_rng(12).standard_normal((6, 2, 17, 17))
    proto = check_export(model, u)
    original = run_onnxruntime(network, {"x": u.astype(np.float32)})["y"]
    assert_float32_close(run_onnxruntime(proto, {"x": u.astype(np.float32)})["y"], original)
    assert "Conv" in graph_ops(proto)
    assert_float32_close(ic.from_onnx(proto, dtype=np.float32).predict(u.astype(np.float32)), original)


def test_exporting_a_structured_model_never_materializes_it(lenet_kernels, digits_batch, monkeypatch):
    from implicit_compiler import model as model_module

    monkeypatch.setattr(model_module, "available_memory_bytes", lambda: 1.0)  # a CSR read would raise
    model = ic.from_onnx(ZOO / "lenet5.onnx", structure="kernels", dtype=np.float32)
    proto = model.to_onnx()
    assert not [key for key in model._cache if isinstance(key, tuple) and key[0] == "csr"]
    got = run_onnxruntime(proto, {"input": digits_batch.astype(np.float32)})["logits"]
    assert_float32_close(got, model.predict(digits_batch.astype(np.float32)))


@pytest.mark.slow
def test_resnet20_round_trip():
    model = ic.from_onnx(ZOO / "resnet20.onnx", structure="kernels", dtype=np.float32)
    u = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    proto = model.to_onnx()
    assert_float32_close(run_onnxruntime(proto, {"input": u})["logits"], model.predict(u))
    assert proto.ByteSize() <= (ZOO / "resnet20.onnx").stat().st_size  # 1.09 MB against 1.21
    assert_float32_close(ic.from_onnx(proto, dtype=np.float32).predict(u), model.predict(u))


@pytest.mark.parametrize("name", ["lstm_classifier", "vit"])
def test_recurrent_and_transformer_zoo_models(name):
    """An unrolled LSTM (64 blocks: sigmoid, tanh, square) and a small ViT (exp, log,
    log_positive, gelu, square blocks of attention and LayerNorm)."""
    model = ic.from_onnx(ZOO / f"{name}.onnx")
    spec = model.inputs[0]
    check_export(model, np.random.default_rng(14).standard_normal((3, *spec.shape)))


# --------------------------------------------------------------------------------- small models
def test_convolution_geometry_strides_dilations_pads_and_a_cropped_output():
    """Convolution terms written directly (independent of the lowering): stride 2 with
    asymmetric pads, dilation 2, and an output smaller than the natural one (Conv then Slice);
    the reference is the materialized CSR model's prediction."""
    rng = np.random.default_rng(3)
    C, H, W = 2, 7, 6
    p = C * H * W
    strided = Convolution(
        slice(0, p), (C, H, W), (3, 4, 3), (3, 3), (2, 2), (1, 1), (1, 0), rng.normal(size=(3, C * 9))
    )
    dilated = Convolution(slice(0, 36), (3, 4, 3), (2, 2, 1), (2, 2), (1, 1), (2, 2), (0, 0), rng.normal(size=(2, 12)))
    cropped = Convolution(
        slice(0, p), (C, H, W), (1, 2, 2), (3, 3), (1, 1), (1, 1), (0, 0), rng.normal(size=(1, C * 9))
    )
    n = 36 + 4 + 4
    B = StructuredMatrix((n, p), (Term(slice(0, 36), strided), Term(slice(40, 44), cropped)), sp.csr_array((n, p)))
    A = StructuredMatrix((n, n), (Term(slice(36, 40), dilated),), sp.csr_array((n, n)))
    C_out = sp.csr_array(rng.normal(size=(3, n)))
    blocks = (
        StateBlock("strided", 0, 36, "relu", (3, 4, 3)),
        StateBlock("dilated", 36, 40, "tanh", (2, 2, 1)),
        StateBlock("cropped", 40, 44, "identity", (1, 2, 2)),
    )
    model = ImplicitModel(
        A, B, C_out, sp.csr_array((3, p)), rng.normal(size=n), rng.normal(size=3), blocks,
        (TensorSpec("image", (C, H, W)),), (TensorSpec("y", (3,)),),
    )  # fmt: skip
    plain = model.materialized()
    u = rng.standard_normal((4, C, H, W))
    proto = model.astype(np.float32).to_onnx()
    assert {"Conv", "Slice"} <= graph_ops(proto)
    assert_float32_close(
        run_onnxruntime(proto, {"image": u.astype(np.float32)})["y"],
        plain.astype(np.float32).predict(u.astype(np.float32)),
    )
    got = run_reference(model.to_onnx(), {"image": u})["y"]
    assert_float64_close(got, plain.predict(u))


def test_terms_across_blocks_and_blocks_that_read_nothing():
    """A dense term of B writing the rows of two blocks (computed once, its rows sliced per
    block), a dense term of A reading the columns of two blocks (a Concat), a block with only
    a bias (an Expand), per-channel and constant biases, and an output reading nothing (zeros);
    against the materialized CSR model."""
    rng = np.random.default_rng(13)
    p, sizes = 5, (4, 6, 8, 3)
    starts = np.cumsum([0, *sizes])
    n = int(starts[-1])
    B = StructuredMatrix(
        (n, p), (Term(slice(0, 10), Dense(slice(0, p), rng.normal(size=(10, p)))),), sp.csr_array((n, p))
    )
    A = StructuredMatrix(
        (n, n), (Term(slice(10, 18), Dense(slice(0, 10), rng.normal(size=(8, 10)))),), sp.csr_array((n, n))
    )
    blocks = (
        StateBlock("first", 0, 4, "relu", (4,)),
        StateBlock("second", 4, 10, "tanh", (2, 3)),
        StateBlock("third", 10, 18, "relu", (2, 4)),
        StateBlock("constant", 18, 21, "sigmoid", (3,)),
    )
    bias = np.concatenate(
        [np.full(4, 0.3), np.repeat(rng.normal(size=2), 3), np.repeat(rng.normal(size=2), 4), rng.normal(size=3)]
    )
    C = sp.csr_array(np.vstack([rng.normal(size=(2, n)), np.zeros((2, n))]))
    model = ImplicitModel(
        A, B, C, sp.csr_array((4, p)), bias, np.zeros(4), blocks, (TensorSpec("u", (p,)),),
        (TensorSpec("y", (2,)), TensorSpec("nothing", (2,))),
    )  # fmt: skip
    u = rng.standard_normal((4, p))
    plain = model.materialized()
    proto = model.astype(np.float32).to_onnx()
    assert {"Concat", "Expand", "ConstantOfShape"} <= graph_ops(proto)
    got = run_onnxruntime(proto, {"u": u.astype(np.float32)})
    expected = plain.astype(np.float32).predict(u.astype(np.float32))
    for name in ("y", "nothing"):
        assert_float32_close(got[name], expected[name])
    got = run_reference(model.to_onnx(), {"u": u})
    for name, value in plain.predict(u).items():
        assert_float64_close(got[name], value)


def test_sparse_rows_of_unequal_lengths_empty_rows_and_several_inputs_and_outputs():
    """A CSR model (find_kernels=False) whose rows hold 0 to 60 entries (the grouped gathers),
    with a dense small part, a residual identity (a Slice), two shaped inputs and outputs."""
    rng = np.random.default_rng(4)
    p1, p2, n1, n2, n3 = 12, 90, 70, 70, 40
    p, n = p1 + p2, n1 + n2 + n3
    lengths = np.where(rng.random(n1) < 0.2, 60, rng.integers(0, 3, n1))
    rows = np.repeat(np.arange(n1), lengths)
    B1 = sp.csr_array((rng.normal(size=rows.size), (rows, rng.integers(0, p, rows.size))), shape=(n1, p))
    A = sp.lil_array((n, n))
    A[n1 : n1 + n2, :n1] = sp.eye_array(n2, n1)  # an identity (a residual connection): a Slice
    A[n1 + n2 :, n1 : n1 + n2] = sp.random_array((n3, n2), density=0.3, random_state=5)
    A[n1 + n2 :, :n1] = sp.random_array((n3, n1), density=0.05, random_state=6)
    B = sp.vstack([B1, sp.csr_array((n - n1, p))])
    C = sp.random_array((7, n), density=0.2, random_state=7)
    D = sp.random_array((7, p), density=0.1, random_state=8)
    blocks = (
        StateBlock("first", 0, n1, "relu", (n1,)),
        StateBlock("second", n1, n1 + n2, "leaky_relu(0.1)", (n2,)),
        StateBlock("third", n1 + n2, n, "tanh", (n3,)),
    )
    model = ImplicitModel(
        sp.csr_array(A), sp.csr_array(B), sp.csr_array(C), sp.csr_array(D), rng.normal(size=n),
        rng.normal(size=7), blocks, (TensorSpec("a", (3, 4)), TensorSpec("b", (90,))),
        (TensorSpec("out", (2, 2)), TensorSpec("rest", (3,))),
    )  # fmt: skip
    feeds = {"a": rng.standard_normal((6, 3, 4)), "b": rng.standard_normal((6, 90))}
    proto = check_export(model, feeds, find_kernels=False)
    assert {"Gather", "ReduceSum", "Concat", "Slice"} <= graph_ops(proto)
    assert [i.name for i in proto.graph.input] == ["a", "b"] and [o.name for o in proto.graph.output] == ["out", "rest"]
    dims = [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["N", 2, 2]
    back = ic.from_onnx(proto)
    expected = model.predict(feeds)
    for name, value in back.predict(feeds).items():
        assert_float32_close(value.astype(np.float32), expected[name].astype(np.float32))


def test_pooling_windows_are_read_by_strided_slices():
    """A 2 x 2 average pool (one weight per window entry) and a strided subsampling with a
    channel offset (a ResNet shortcut), as CSR: each window entry's indices form a strided box
    of the image, so the graph slices instead of gathering; predictions as the CSR model's."""
    rng = np.random.default_rng(9)
    C, H, W = 3, 6, 8
    image = np.arange(C * H * W).reshape(C, H, W)
    rows, columns, values = [], [], []
    weights = rng.normal(size=(2, 2))
    for di in range(2):
        for dj in range(2):
            rows.append(np.arange(C * 3 * 4)), columns.append(image[:, di::2, dj::2].ravel())
            values.append(np.full(C * 3 * 4, weights[di, dj]))
    pool = sp.csr_array((np.concatenate(values), (np.concatenate(rows), np.concatenate(columns))), shape=(36, 144))
    shortcut = sp.csr_array((np.ones(24), (np.arange(24) + 12, image[1:, ::2, ::2].ravel())), shape=(48, 144))
    n = 36 + 48
    model = ImplicitModel(
        sp.csr_array((n, n)), sp.vstack([pool, shortcut], format="csr"), sp.csr_array(rng.normal(size=(2, n))),
        sp.csr_array((2, 144)), rng.normal(size=n), np.zeros(2),
        (StateBlock("pool", 0, 36, "relu", (3, 3, 4)), StateBlock("shortcut", 36, n, "identity", (4, 3, 4))),
        (TensorSpec("image", (C, H, W)),), (TensorSpec("y", (2,)),),
    )  # fmt: skip
    proto = check_export(model, rng.standard_normal((5, C, H, W)), find_kernels=False)
    assert "Slice" in graph_ops(proto) and "Gather" not in graph_ops(proto)


def test_strided_boxes_against_numpy_slicing():
    """``strided_box`` on the indices of random strided slices of random shapes (and on
    shuffled ones): the view and slice it returns pick exactly those indices, in order."""
    from implicit_compiler.export.onnx_products import strided_box

    rng = np.random.default_rng(10)
    found = 0
    for _ in range(500):
        shape = tuple(int(d) for d in rng.integers(1, 7, rng.integers(1, 4)))
        array = np.arange(int(np.prod(shape))).reshape(shape)
        picked = array[tuple(slice(int(rng.integers(0, d)), None, int(rng.integers(1, 4))) for d in shape)].ravel()
        for index in (picked, rng.permutation(picked)):
            box = strided_box(index, array.size)
            if box is None:
                continue
            view, starts, stops, steps = box
            found += 1
            sliced = np.arange(array.size).reshape(view)[tuple(map(slice, starts, stops, steps))]
            np.testing.assert_array_equal(sliced.ravel(), index)
    assert found > 500  # (every unshuffled slice is a box)


def test_edge_shapes_no_states_an_empty_block_scalar_inputs_and_an_empty_batch():
    rng = np.random.default_rng(15)
    no_states = ImplicitModel(
        sp.csr_array((0, 0)), sp.csr_array((0, 3)), sp.csr_array((2, 0)), sp.csr_array(rng.normal(size=(2, 3))),
        None, rng.normal(size=2), (), (TensorSpec("u", (3,)),), (TensorSpec("y", (2,)),),
    )  # fmt: skip
    check_export(no_states, rng.normal(size=(4, 3)))
    blocks = (
        StateBlock("a", 0, 2, "relu", (2,)),
        StateBlock("empty", 2, 2, "relu", (0,)),
        StateBlock("b", 2, 4, "tanh", (2,)),
    )
    empty_block = ImplicitModel(
        sp.csr_array(np.tril(rng.normal(size=(4, 4)), -1)), sp.csr_array(rng.normal(size=(4, 3))),
        sp.csr_array(rng.normal(size=(2, 4))), sp.csr_array((2, 3)), None, None, blocks,
        (TensorSpec("u", (3,)),), (TensorSpec("y", (2,)),),
    )  # fmt: skip
    check_export(empty_block, rng.normal(size=(4, 3)))
    scalars = ImplicitModel(
        sp.csr_array((2, 2)), sp.csr_array(np.ones((2, 1))), sp.csr_array(np.ones((1, 2))), sp.csr_array((1, 1)),
        None, None, (StateBlock("x", 0, 2, "relu", (2,)),), (TensorSpec("s", ()),), (TensorSpec("t", ()),),
    )  # fmt: skip
    check_export(scalars, np.array([1.0, -2.0, 3.0]))
    proto = empty_block.astype(np.float32).to_onnx()
    assert run_onnxruntime(proto, {"u": np.zeros((0, 3), np.float32)})["y"].shape == (0, 2)


ACTIVATION_SPECS = [
    name for name in ACTIVATION_NAMES if name not in ("leaky_relu", "elu", "celu", "selu", "hard_sigmoid",
                                                     "thresholded_relu", "power", "heaviside")
] + [
    "leaky_relu(0.01)", "leaky_relu(0.25)", "elu(0.7)", "elu(0.5)", "celu(1.3)", "selu", "selu(1.5, 0.75)",
    "hard_sigmoid", "hard_sigmoid(0.25, 0.5)", "thresholded_relu(0.3)", "thresholded_relu(0.5)", "power(3)",
    "power(0.5)", "heaviside(0)", "heaviside(1)", "heaviside(0.3)",
]  # fmt: skip
POSITIVE = ("log", "sqrt", "rsqrt", "reciprocal", "power(0.5)")


@pytest.mark.parametrize("opset", [13, 17, 20])
@pytest.mark.parametrize("spec", ACTIVATION_SPECS)
def test_every_activation(spec, opset):
    """Two blocks (the second reading the first through A), each activation exactly as the
    runtime's: float parameters that float32 cannot hold (0.01, 0.7, 1.3, 0.3, selu's) go in
    formulas in float64; opset 13 writes HardSwish, Mish, Gelu as formulas, 20 as ops."""
    rng = np.random.default_rng(5)
    phi = activation(spec)
    n, p = 6, 6
    A = sp.csr_array(
        np.block([[np.zeros((n, n)), np.zeros((n, n))], [0.3 * rng.uniform(0, 1, (n, n)), np.zeros((n, n))]])
    )
    B = sp.csr_array(np.vstack([np.eye(p), np.zeros((n, p))]))
    C = sp.csr_array(rng.normal(size=(3, 2 * n)))
    positive = spec in POSITIVE
    bias = np.concatenate([np.zeros(n), np.full(n, 0.5 if positive else 0.0)])
    blocks = (StateBlock("first", 0, n, phi, (n,)), StateBlock("second", n, 2 * n, phi, (n,)))
    model = ImplicitModel(
        A, B, C, sp.csr_array((3, p)), bias, np.zeros(3), blocks, (TensorSpec("u", (p,)),), (TensorSpec("y", (3,)),)
    )
    u = rng.uniform(0.2, 3.0, (5, p)) if positive else 2.5 * rng.standard_normal((5, p))
    u[0, :3] = 0.0 if not positive else 1.0  # z = 0 exactly (heaviside's value there, the kinks)
    if spec == "log_positive":
        u[1] = -np.abs(u[1])
    check_export(model, u, opset=opset)


def test_heaviside_and_log_positive_keep_nan_as_the_runtime_does():
    """phi(NaN): heaviside gives 0, log_positive NaN, as ``activations`` defines them (states,
    not inputs, can be NaN: here through log of a negative pre-activation)."""
    for spec, expected in (("heaviside(0.5)", 0.0), ("log_positive", np.nan)):
        blocks = (StateBlock("log", 0, 1, "log", (1,)), StateBlock("phi", 1, 2, spec, (1,)))
        A = sp.csr_array(np.array([[0.0, 0.0], [1.0, 0.0]]))
        model = ImplicitModel(
            A, sp.csr_array(np.array([[1.0], [0.0]])), sp.csr_array(np.array([[0.0, 1.0]])), sp.csr_array((1, 1)),
            None, None, blocks, (TensorSpec("u", (1,)),), (TensorSpec("y", (1,)),),
        )  # fmt: skip
        u = np.array([[-1.0], [0.0], [2.0]])
        ours = model.predict(u)
        np.testing.assert_array_equal(ours[0], [expected])
        np.testing.assert_array_equal(run_reference(model.to_onnx(), {"u": u})["y"], ours)
        np.testing.assert_array_equal(
            run_onnxruntime(model.astype(np.float32).to_onnx(), {"u": u.astype(np.float32)})["y"],
            model.astype(np.float32).predict(u.astype(np.float32)),
        )


# --------------------------------------------------------------------------------- cyclic models
ROUND_TRIP_TOL = {np.float64: 1e-13, np.float32: 1e-6}  # predict's tol on both sides (tight)


def check_round_trip(model: ImplicitModel, u: np.ndarray) -> ImplicitModel:
    """from_onnx(to_onnx(m)) predicts like m, both solved to a tight tol: float64 to 1e-9
    (relative to the largest output), float32 within verify's tolerances. Returns the float64
    model read back (its outputs are m's: the residual outputs are dropped)."""
    back = {}
    for dtype, close in ((np.float64, assert_float64_close), (np.float32, assert_float32_close)):
        typed, typed_u = model.astype(dtype), np.asarray(u, dtype=dtype)
        back[dtype] = ic.from_onnx(typed.to_onnx(), dtype=dtype)
        assert [spec.name for spec in back[dtype].outputs] == [spec.name for spec in model.outputs]
        tol = ROUND_TRIP_TOL[dtype]
        close(back[dtype].predict(typed_u, tol=tol), typed.predict(typed_u, tol=tol))
    return back[np.float64]


def random_cyclic(rng, n=30, p=8, q=4, norm=0.5, activation="relu"):
    A = rng.uniform(-1, 1, (n, n)) * (rng.random((n, n)) < 0.5)
    A *= norm / np.abs(A).sum(axis=1).max()  # ||A||_inf = norm < 1: one equilibrium
    return ImplicitModel.from_matrices(
        A, rng.normal(size=(n, p)), rng.normal(size=(q, n)), rng.normal(size=(q, p)), activation,
        rng.normal(size=n), rng.normal(size=q),
    )  # fmt: skip


@pytest.mark.parametrize("seed, opset", [(0, 13), (1, 17), (2, 18)])
def test_random_cyclic_models_iterate_in_a_loop(seed, opset):
    rng = np.random.default_rng(seed)
    model = random_cyclic(rng, activation=["relu", "tanh", "leaky_relu(0.1)"][seed])
    u = rng.standard_normal((7, 8))
    proto = check_export(model, u, opset=opset)
    assert "Loop" in graph_ops(proto)
    residual = run_onnxruntime(proto, {"u": u.astype(np.float32)})["fixed_point_residual"]
    assert residual.shape == (7,) and np.all(residual <= 1e-5)
    tolerance = [p for p in proto.graph.initializer if p.name == "fixed_point_tolerance"]
    assert onnx.numpy_helper.to_array(tolerance[0]) == np.float32(1e-5)
    back = check_round_trip(model, u)
    if seed < 2:  # relu, tanh: Relu, Tanh ops, read back as the model's own block and matrices
        assert [(b.name, b.start, b.stop, b.activation) for b in back.blocks] == [
            ("x", 0, 30, model.blocks[0].activation)
        ]
        for name in ("A", "B", "C", "D"):
            np.testing.assert_allclose(getattr(back, name).toarray(), getattr(model, name).toarray(), rtol=1e-15)


def test_the_loop_is_accelerated():
    """A slow contraction (dense nonnegative A, ||A||_inf = 0.99): plain sweeps need 35 to
    reach the tolerance (counted here in numpy); the exported loop, accelerated, is within it
    in 15, and predicts as the runtime does."""
    rng = np.random.default_rng(3)
    n = 60
    A = rng.uniform(size=(n, n))
    A *= 0.99 / np.abs(A).sum(axis=1).max()
    B, bias = rng.normal(size=(n, 8)), 0.1 * rng.normal(size=n)
    model = ImplicitModel.from_matrices(A, B, rng.normal(size=(3, n)), np.zeros((3, 8)), bias_x=bias)
    u = rng.normal(size=(5, 8))
    x, Z, picard_sweeps, residual = np.zeros((5, n)), u @ B.T + bias, 0, np.inf
    while residual > 1e-5:
        new = np.maximum(x @ A.T + Z, 0)
        residual = np.max(np.abs(new - x).max(axis=1) / np.abs(new).max(axis=1))
        x, picard_sweeps = new, picard_sweeps + 1
    assert picard_sweeps > 30
    typed = model.astype(np.float32)
    got = run_onnxruntime(typed.to_onnx(max_iter=15), {"u": u.astype(np.float32)})
    assert np.all(got["fixed_point_residual"] <= 1e-5)
    assert_float32_close(got["y"], typed.predict(u.astype(np.float32)))


def test_cyclic_component_between_acyclic_blocks_and_two_components():
    """Blocks: input layer -> {a <-> b} (a cycle of two blocks: the sweep reads b's last value,
    a's new one) -> c (reads a and b) -> {d, a self-loop}; two residual outputs. Read back:
    the same blocks and matrices."""
    model, u = two_components()
    proto = check_export(model, u)
    assert sum(node.op_type == "Loop" for node in proto.graph.node) == 2
    outputs = run_reference(model.to_onnx(), {"u": u})
    assert set(outputs) == {"y", "fixed_point_residual_0", "fixed_point_residual_1"}
    assert all(np.all(outputs[name] <= 1e-10) for name in ("fixed_point_residual_0", "fixed_point_residual_1"))
    back = check_round_trip(model, u)
    assert [(b.name, b.start, b.stop, b.activation) for b in back.blocks] == [
        (b.name, b.start, b.stop, b.activation) for b in model.blocks
    ]
    for name in ("A", "B", "C", "D"):
        np.testing.assert_allclose(getattr(back, name).toarray(), getattr(model, name).toarray(), rtol=1e-15)


def two_components() -> tuple[ImplicitModel, np.ndarray]:
    """The model of ``test_cyclic_component_between_acyclic_blocks_and_two_components`` and inputs."""
    rng = np.random.default_rng(6)
    sizes = {"input": 5, "a": 6, "b": 4, "c": 5, "d": 3}
    starts = np.cumsum([0, *sizes.values()])
    block = {name: slice(starts[k], starts[k + 1]) for k, name in enumerate(sizes)}
    n, p = starts[-1], 4
    A = np.zeros((n, n))

    def link(target, source, scale):
        A[block[target], block[source]] = scale * rng.uniform(-1, 1, (sizes[target], sizes[source]))

    link("a", "input", 0.3), link("a", "b", 0.25), link("b", "a", 0.25), link("c", "a", 1.0), link("c", "b", 1.0)
    link("d", "c", 1.0), link("d", "d", 0.2)
    B = np.zeros((n, p))
    B[block["input"]] = rng.normal(size=(5, p))
    B[block["b"]] = rng.normal(size=(4, p))
    blocks = tuple(
        StateBlock(name, int(starts[k]), int(starts[k + 1]), "tanh" if name in "ab" else "relu", (sizes[name],))
        for k, name in enumerate(sizes)
    )
    model = ImplicitModel(
        sp.csr_array(A), sp.csr_array(B), sp.csr_array(rng.normal(size=(2, n))), sp.csr_array((2, p)),
        rng.normal(size=n), np.zeros(2), blocks, (TensorSpec("u", (p,)),), (TensorSpec("y", (2,)),),
    )  # fmt: skip
    return model, rng.standard_normal((6, p))


def exported_loop(proto: onnx.ModelProto) -> tuple[onnx.NodeProto, dict]:
    """The first Loop of an exported graph and its fixed-point marks (a JSON doc_string)."""
    loop = next(node for node in proto.graph.node if node.op_type == "Loop")
    return loop, json.loads(loop.doc_string)["implicit_compiler.fixed_point"]


def test_other_loops_are_refused_naming_the_node():
    """A Loop that to_onnx did not write (no marks, or marks removed) is no fixed point we know:
    UnsupportedOpError naming the node, its op and opset, and what is read."""
    body = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["v", "w"], ["v_next"]), onnx.helper.make_node("Identity", ["cond"], ["again"])],
        "body",
        [onnx.helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
         onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
         onnx.helper.make_tensor_value_info("v", onnx.TensorProto.FLOAT, ["N", 3])],
        [onnx.helper.make_tensor_value_info("again", onnx.TensorProto.BOOL, []),
         onnx.helper.make_tensor_value_info("v_next", onnx.TensorProto.FLOAT, ["N", 3])],
    )  # fmt: skip
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Loop", ["trips", "go", "x"], ["y"], name="three_steps", body=body)],
        "plain_loop",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])],
        [onnx.numpy_helper.from_array(np.array(3, np.int64), "trips"), onnx.numpy_helper.from_array(np.array(True), "go"),
         onnx.numpy_helper.from_array(np.ones(3, np.float32), "w")],
    )  # fmt: skip
    plain = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.checker.check_model(plain, full_check=True)
    np.testing.assert_allclose(run_onnxruntime(plain, {"x": np.zeros((2, 3), np.float32)})["y"], 3.0)  # it runs
    with pytest.raises(UnsupportedOpError, match=r"node 'three_steps' \(Loop, opset 17\): only the fixed-point Loops"):
        ic.from_onnx(plain)
    proto = random_cyclic(np.random.default_rng(0), n=10).to_onnx()
    loop, _ = exported_loop(proto)
    loop.doc_string = "a loop"
    with pytest.raises(
        UnsupportedOpError,
        match=rf"node '{loop.name}' \(Loop, opset 17\).*written by implicit_compiler's to_onnx are read",
    ):
        ic.from_onnx(proto)


@pytest.mark.parametrize(
    "edit, message",
    [
        ("sweep_reads_acceleration", "reads the body input .*, which is no state"),
        ("sweep_computed_nowhere", "no body node computes the sweep tensor 'nowhere'"),
        ("carried_renamed", "is not body input 2"),
        ("output_renamed", "is not the Loop's output 0"),
        ("shape", r"of shape \(31,\) starts from a value of shape \(1, 30\)"),
        ("version", "marks in its doc_string are malformed"),
        ("sweep_elsewhere", "the body's next value .* is not its sweep's step"),
    ],
)
def test_a_marked_loop_whose_body_does_not_match_its_marks_is_refused(edit, message):
    """A file edited after to_onnx wrote it: GraphError naming the Loop, never another model."""
    model = random_cyclic(np.random.default_rng(0))
    proto = model.to_onnx()
    loop, marks = exported_loop(proto)
    state = marks["states"][0]
    body = loop.attribute[0].g
    if edit == "sweep_reads_acceleration":  # the accelerated next iterate: it reads the last sweep's
        state["sweep"] = body.output[1].name
    elif edit == "sweep_computed_nowhere":
        state["sweep"] = "nowhere"
    elif edit == "carried_renamed":
        state["carried"] = "nowhere"
    elif edit == "output_renamed":
        state["output"] = marks["residual"]
    elif edit == "shape":
        state["shape"] = [31]
    elif edit == "sweep_elsewhere":  # a tensor of the sweep (its pre-activation), not its result
        state["sweep"] = next(node.input[0] for node in body.node if node.op_type == "Relu")
    else:
        marks["version"] = 2
    loop.doc_string = json.dumps({"implicit_compiler.fixed_point": marks})
    with pytest.raises(GraphError, match=rf"node '{loop.name}' \(Loop, opset 17\).*{message}"):
        ic.from_onnx(proto)


def test_a_run_that_does_not_converge_shows_its_residual():
    """x = relu(1.2 x + 1) (||A||_inf = 1.2 > 1) has no fixed point: predict raises, and the
    exported graph, stopped by max_iter, reports a residual above tol for every sample."""
    rng = np.random.default_rng(7)
    model = ImplicitModel.from_matrices(
        1.2 * np.eye(3), rng.normal(size=(3, 2)), np.eye(3), np.zeros((3, 2)), "relu", bias_x=np.full(3, 10.0)
    ).astype(np.float32)
    u = rng.uniform(-1, 1, (4, 2)).astype(np.float32)
    with pytest.raises(ic.ConvergenceError):
        model.predict(u, max_iter=20)
    proto = model.to_onnx(max_iter=20, tol=1e-5)
    residual = run_onnxruntime(proto, {"u": u})["fixed_point_residual"]
    assert residual.shape == (4,) and np.all(np.isfinite(residual)) and np.all(residual > 1e-5)
    assert "converged when <= fixed_point_tolerance" in proto.graph.output[1].doc_string


def test_lenet5_feedback_loop(lenet, digits_batch):
    """The README's closed loop u = v + K y: a cyclic component solved by a Loop of sweeps."""
    K = 3e-7 * np.random.default_rng(0).normal(size=(lenet.p, lenet.q))
    closed = ic.feedback(lenet, K)
    proto = check_export(closed, digits_batch[:3])
    assert "Loop" in graph_ops(proto)
    back = check_round_trip(closed, digits_batch[:3])  # every block in the loop: read back as they are
    assert [(b.name, b.start, b.stop, b.activation) for b in back.blocks] == [
        (b.name, b.start, b.stop, b.activation) for b in closed.blocks
    ]
    kernels = ic.from_onnx(proto, structure="kernels")  # the sweep's Conv and Gemm kept as kernels in A
    assert {type(term.op) for term in kernels.structure.A.terms} == {Convolution, Dense}
    u = digits_batch[:3].astype(np.float32)
    expected = closed.astype(np.float32).predict(u, tol=1e-6)
    assert_float32_close(kernels.astype(np.float32).predict(u, tol=1e-6), expected)
    report = ic.verify(proto, samples=3)  # compiled from the file, against onnxruntime and onnx.reference on it
    assert all(output.passed_float32 and output.passed_float64 for output in report.outputs)


def test_trained_implicit_classifier():
    """A classifier trained here (a dense cyclic layer, two quick epochs on 300 digits)."""
    sklearn = pytest.importorskip("sklearn.datasets")
    pytest.importorskip("torch")
    from implicit_compiler.training import ImplicitClassifier

    X, y = sklearn.load_digits(return_X_y=True)
    with warnings.catch_warnings():  # (stopped at max_epochs while still improving: on purpose)
        warnings.simplefilter("ignore")
        classifier = ImplicitClassifier(n_states=16, max_epochs=2, random_state=0).fit(X[:300], y[:300])
    model = classifier.model_
    proto = check_export(model, X[300:340])
    logits = run_onnxruntime(proto, {model.inputs[0].name: X[300:340].astype(np.float32)})[model.outputs[0].name]
    assert np.mean(classifier.classes_[np.argmax(logits, axis=1)] == classifier.predict(X[300:340])) >= 0.95
    check_round_trip(model, X[300:340])


# --------------------------------------------------------------------------------- arguments, files
def test_opset_default_and_choice(lenet_kernels):
    model = lenet_kernels.astype(np.float32)
    assert model.to_onnx().opset_import[0].version == DEFAULT_OPSET == 17
    assert model.to_onnx(opset=21).opset_import[0].version == 21
    for bad in (12, onnx.defs.onnx_opset_version() + 1):
        with pytest.raises(ArgumentValueError, match="opset"):
            model.to_onnx(opset=bad)


def test_tolerance_and_sweep_cap_are_checked_as_predict_checks_them(mlp):
    model = mlp.implicit().astype(np.float32)
    with pytest.raises(ic.ToleranceError, match="float32"):
        model.to_onnx(tol=1e-9)
    with pytest.raises(ArgumentValueError, match="max_iter"):
        model.to_onnx(max_iter=0)
    with pytest.raises(ic.ArgumentTypeError, match="tol"):
        model.to_onnx(tol="small")


def test_float64_models_export_double_tensors(lenet_kernels):
    proto = lenet_kernels.to_onnx()
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    assert (
        lenet_kernels.astype(np.float32).to_onnx().graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    )


def test_to_onnx_writes_the_file_and_never_replaces_one_unasked(tmp_path, mlp):
    model = mlp.implicit()
    path = tmp_path / "mlp.onnx"
    proto = model.to_onnx(path)
    assert onnx.load(path) == proto
    path.write_bytes(b"mine")
    with pytest.raises(OverwriteError, match="overwrite"):
        model.to_onnx(path)
    assert path.read_bytes() == b"mine"
    model.to_onnx(path, overwrite=True)
    assert onnx.load(path) == proto
    u = np.random.default_rng(0).standard_normal((3, 6))
    assert_float64_close(run_reference(onnx.load(path), {"u": u})["y"], mlp.forward(u))


def test_cli_export(tmp_path, lenet_kernels, capsys):
    saved = tmp_path / "lenet.npz"
    lenet_kernels.save(saved)
    out = tmp_path / "lenet.onnx"
    assert main(["export", str(saved), "-o", str(out), "--dtype", "float32"]) == 0
    assert "wrote" in capsys.readouterr().out
    u = np.random.default_rng(0).standard_normal((2, 1, 32, 32)).astype(np.float32)
    got = run_onnxruntime(onnx.load(out), {"input": u})["logits"]
    assert_float32_close(got, lenet_kernels.astype(np.float32).predict(u))
    before = out.read_bytes()
    assert main(["export", str(saved), "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["export", str(saved), "-o", str(out), "--overwrite", "--opset", "20"]) == 0
    assert onnx.load(out).opset_import[0].version == 20
    assert "float64" in capsys.readouterr().out  # the note on double tensors
    assert main(["export", str(saved), "-o", str(tmp_path / "no" / "x.onnx")]) == 2
    assert not os.path.exists(tmp_path / "no")


def transposed_net(groups: int) -> onnx.ModelProto:
    """ConvTranspose (stride 2, pads, output_padding, ``groups`` groups) + Relu, a depthwise Conv (4
    groups, stride 2) + Tanh, a grouped 1 x 1 Conv (2 groups), Flatten: x (N, 4, 12, 10) -> y."""
    rng = np.random.default_rng(13)
    weights = {
        "T": rng.normal(size=(4, 6 // groups, 3, 3)) / 3, "bT": rng.normal(size=6), "D": rng.normal(size=(6, 1, 3, 3)) / 3,
        "G": rng.normal(size=(8, 3, 1, 1)),
    }  # fmt: skip
    nodes = [
        onnx.helper.make_node(
            "ConvTranspose",
            ["x", "T", "bT"],
            ["t"],
            strides=[2, 2],
            pads=[1, 0, 0, 1],
            output_padding=[1, 0],
            group=groups,
        ),
        onnx.helper.make_node("Relu", ["t"], ["r"]),
        onnx.helper.make_node("Conv", ["r", "D"], ["d"], group=6, strides=[2, 2], pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Tanh", ["d"], ["h"]),
        onnx.helper.make_node("Conv", ["h", "G"], ["g"], group=2),
        onnx.helper.make_node("Flatten", ["g"], ["y"]),
    ]
    initializers = [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    graph = onnx.helper.make_graph(
        nodes, "transposed", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 12, 10])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", None])], initializers,
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("groups", [1, 2])
def test_transposed_and_grouped_convolutions_export_as_their_ops(groups):
    """ConvTranspose and grouped (depthwise) Conv kept as terms are written back as ConvTranspose
    and Conv with ``group``: against onnxruntime on the network itself and against predict
    (float64 by onnx.reference too, whose ConvTranspose fails on groups: float32 only there)."""
    network = transposed_net(groups)
    model = ic.from_onnx(network, structure="kernels")
    kinds = {type(term.op).__name__ for matrix in (model.structure.A, model.structure.B) for term in matrix.terms}
    assert kinds == {"Convolution", "TransposedConvolution"}
    assert [term.op.groups for term in model.structure.B.terms] == [groups]
    u = np.random.default_rng(14).standard_normal((5, 4, 12, 10))
    if groups == 1:
        proto = check_export(model, u)
    else:
        proto = model.astype(np.float32).to_onnx()
        onnx.checker.check_model(proto, full_check=True)
        expected = model.astype(np.float32).predict(u.astype(np.float32))
        assert_float32_close(run_onnxruntime(proto, {"x": u.astype(np.float32)})["y"], expected)
    assert {"ConvTranspose", "Conv"} <= graph_ops(proto)
    attributes = [(node.op_type, a.i) for node in proto.graph.node for a in node.attribute if a.name == "group"]
    assert ("Conv", 6) in attributes and ("Conv", 2) in attributes and ("ConvTranspose", groups) in attributes
    original = run_onnxruntime(network, {"x": u.astype(np.float32)})["y"]
    assert_float32_close(run_onnxruntime(proto, {"x": u.astype(np.float32)})["y"], original)


@pytest.mark.parametrize("out_size", [(9, 8), (12, 11), (5, 4)], ids=["natural", "longer", "cut"])
def test_transposed_convolution_terms_longer_or_shorter_than_their_reach(out_size):
    """A TransposedConvolution term written directly whose output runs past the pixels its
    input reaches (zeros there: ConvTranspose then Pad) or stops before them (the trailing pads
    cut them): the materialized CSR model's prediction is the reference."""
    rng = np.random.default_rng(15)
    C, H, W, Co = 4, 4, 3, 2
    Ho, Wo = out_size
    op = TransposedConvolution(
        slice(0, C * H * W), (C, H, W), (Co, Ho, Wo), (3, 3), (2, 2), (1, 2), (1, 0), rng.normal(size=(C, Co * 9))
    )
    n, p = Co * Ho * Wo, C * H * W
    B = StructuredMatrix((n, p), (Term(slice(0, n), op),), sp.csr_array((n, p)))
    model = ImplicitModel(
        StructuredMatrix((n, n), (), sp.csr_array((n, n))), B, sp.csr_array(rng.normal(size=(3, n))),
        sp.csr_array((3, p)), rng.normal(size=n), rng.normal(size=3), (StateBlock("t", 0, n, "relu", (Co, Ho, Wo)),),
        (TensorSpec("image", (C, H, W)),), (TensorSpec("y", (3,)),),
    )  # fmt: skip
    plain = model.materialized()
    u = rng.standard_normal((4, C, H, W))
    proto = model.astype(np.float32).to_onnx()
    assert "ConvTranspose" in graph_ops(proto)
    assert_float32_close(
        run_onnxruntime(proto, {"image": u.astype(np.float32)})["y"],
        plain.astype(np.float32).predict(u.astype(np.float32)),
    )
    assert_float64_close(run_reference(model.to_onnx(), {"image": u})["y"], plain.predict(u))
