"""Products of two variable tensors (attention's Q K^T and P V): MatMul, Gemm and Einsum of two
inputs through square blocks, against onnxruntime (float32) and onnx.reference (float64)."""

from __future__ import annotations

import time
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import assert_matches_onnxruntime, float_value, make_model

import implicit_compiler as ic

RNG = np.random.default_rng(17)


def _weight(name, shape, scale=1.0):
    return numpy_helper.from_array((scale * RNG.standard_normal(shape)).astype(np.float32), name)


def _constant(name, values):
    return numpy_helper.from_array(np.asarray(values), name)


# ----------------------------------------------------------------------------- attention heads
def _attention_head(tokens=6, width=5, head=4, scales=(1.0, 1.0, 1.0), opset=17) -> onnx.ModelProto:
    """One head on x (N, S, width): Q, K, V = x W_q, x W_k, x W_v, scores Q K^T / sqrt(d),
    P = sigmoid(scores) (softmax is another lowering; any activation between the products does),
    out = P V. Outputs the scores and out."""
    q_scale, k_scale, v_scale = scales
    nodes = [
        helper.make_node("MatMul", ["x", "Wq"], ["q"]),
        helper.make_node("MatMul", ["x", "Wk"], ["k"]),
        helper.make_node("MatMul", ["x", "Wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["raw"]),
        helper.make_node("Mul", ["raw", "scale"], ["scores"]),
        helper.make_node("Sigmoid", ["scores"], ["p"]),
        helper.make_node("MatMul", ["p", "v"], ["out"]),
    ]
    initializers = [
        _weight("Wq", (width, head), q_scale),
        _weight("Wk", (width, head), k_scale),
        _weight("Wv", (width, head), v_scale),
        _constant("scale", np.float32(1 / np.sqrt(head))),
    ]
    outputs = [float_value("scores", ["N", tokens, tokens]), float_value("out", ["N", tokens, head])]
    return make_model(nodes, [float_value("x", ["N", tokens, width])], outputs, initializers, opset)


def test_attention_head_q_kt_and_p_v():
    compiled = assert_matches_onnxruntime(_attention_head())
    squares = [block for block in compiled.blocks if block.activation.name == "square"]
    assert sum(block.size for block in squares) == 2 * 2 * 6 * 6 * 4, "2 squares per product, 2 products"


@pytest.mark.parametrize(
    "scales",
    [(100.0, 0.01, 1.0), (1e-3, 1e3, 1e3), (1.0, 1.0, 1e4)],
    ids=["q-large-k-small", "q-small-k-large", "v-large"],
)
def test_attention_with_operands_of_very_different_scales(scales):
    """The products balance their operands by exact powers of two: without it, a ratio of 1e4
    between |q| and |k| costs about 4 digits, past float32's tolerance."""
    assert_matches_onnxruntime(_attention_head(scales=scales), batch=6)


def _multi_head_attention(tokens, width, heads, head, einsum=False) -> onnx.ModelProto:
    """Heads as a batched 4-D product: (N, H, S, D) @ (N, H, D, S) and (N, H, S, S) @ (N, H, S, D),
    by MatMul or by the Einsum forms 'bhqd,bhkd->bhqk' and 'bhqk,bhkd->bhqd'."""
    split = [0, tokens, heads, head]
    nodes = []
    for name in "qkv":
        nodes += [
            helper.make_node("MatMul", ["x", f"W{name}"], [f"{name}_flat"]),
            helper.make_node("Reshape", [f"{name}_flat", "split"], [f"{name}_split"]),
            helper.make_node("Transpose", [f"{name}_split"], [f"{name}h"], perm=[0, 2, 1, 3]),
        ]
    if einsum:
        nodes.append(helper.make_node("Einsum", ["qh", "kh"], ["raw"], equation="bhqd,bhkd->bhqk"))
    else:
        nodes += [
            helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["qh", "kt"], ["raw"]),
        ]
    nodes += [
        helper.make_node("Mul", ["raw", "scale"], ["scores"]),
        helper.make_node("Sigmoid", ["scores"], ["p"]),
        helper.make_node("Einsum", ["p", "vh"], ["o"], equation="bhqk,bhkd->bhqd")
        if einsum
        else helper.make_node("MatMul", ["p", "vh"], ["o"]),
        helper.make_node("Transpose", ["o"], ["merged"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["merged", "join"], ["out"]),
    ]
    initializers = [_weight(f"W{name}", (width, heads * head), 1 / np.sqrt(width)) for name in "qkv"]
    initializers += [
        _constant("split", np.array(split, dtype=np.int64)),
        _constant("join", np.array([0, tokens, heads * head], dtype=np.int64)),
        _constant("scale", np.float32(1 / np.sqrt(head))),
    ]
    outputs = [float_value("out", ["N", tokens, heads * head])]
    return make_model(nodes, [float_value("x", ["N", tokens, width])], outputs, initializers, opset=13)


@pytest.mark.parametrize("einsum", [False, True], ids=["matmul", "einsum"])
def test_batched_four_dimensional_heads(einsum):
    assert_matches_onnxruntime(_multi_head_attention(tokens=5, width=6, heads=3, head=2, einsum=einsum))


def test_size_of_one_attention_head_at_16_tokens():
    """Q K^T and P V at S = 16, D = 8: 2 S^2 D square states each, Q, K and V kept as identity
    blocks (each read by S rows), the sigmoid's S^2. Measured numbers are in the report."""
    tokens, head = 16, 8
    model = _attention_head(tokens=tokens, width=16, head=head)
    start = time.perf_counter()
    compiled = ic.from_onnx(model)
    seconds = time.perf_counter() - start
    squares = sum(block.size for block in compiled.blocks if block.activation.name == "square")
    assert squares == 2 * 2 * tokens * tokens * head
    assert compiled.n == squares + 3 * tokens * head + tokens * tokens
    print(f"attention head S={tokens} D={head}: n={compiled.n} nnz(A)={compiled.A.nnz} compile={seconds:.2f}s")
    assert_matches_onnxruntime(model, batch=2)


def test_size_estimate_of_attention_is_within_twice_the_model():
    """The estimate checked against the memory limit before lowering counts the square blocks."""
    from implicit_compiler.frontend.estimate import estimate_nonzeros
    from implicit_compiler.frontend.graph import prepare

    model = _multi_head_attention(tokens=16, width=32, heads=4, head=8)
    compiled = ic.from_onnx(model)
    actual = compiled.A.nnz + compiled.B.nnz + compiled.C.nnz + compiled.D.nnz
    assert actual / 2 <= estimate_nonzeros(prepare(model)) <= 2 * actual


@pytest.mark.parametrize("einsum", [False, True], ids=["matmul", "einsum"])
def test_attention_too_large_for_the_memory_limit_is_refused_before_allocating(einsum):
    """512 tokens, 4 heads of 64: 2 * 4 * 512^2 * 64 products, refused by the estimate (MatMul)
    or by the running count before the products' indices are made (Einsum, not estimated)."""
    model = _multi_head_attention(tokens=512, width=8, heads=4, head=64, einsum=einsum)
    with pytest.raises(ic.ModelTooLargeError, match="non-zeros"):
        ic.from_onnx(model, memory_limit_bytes=2**30)


# ----------------------------------------------------------------------------- Gemm
GEMM_CASES = {
    "plain": (dict(), (3, 5), (5, 4), None),
    "transA": (dict(transA=1), (5, 3), (5, 4), None),
    "transB": (dict(transB=1), (3, 5), (4, 5), None),
    "both-transposed-alpha": (dict(transA=1, transB=1, alpha=0.3), (5, 3), (4, 5), None),
    "constant-C-beta": (dict(alpha=2.0, beta=-0.5), (3, 5), (5, 4), "constant"),
    "variable-C-beta": (dict(transB=1, beta=0.35), (3, 5), (4, 5), "variable"),
}


@pytest.mark.parametrize("attributes,a_shape,b_shape,c", list(GEMM_CASES.values()), ids=list(GEMM_CASES))
def test_gemm_of_two_variables(attributes, a_shape, b_shape, c):
    """A and B (and C) graph inputs of static shape: each a whole sample."""
    inputs = [float_value("a", a_shape), float_value("b", b_shape)]
    initializers = []
    if c == "variable":
        inputs.append(float_value("c", [1, 4]))
    elif c == "constant":
        initializers.append(_weight("c", (3, 4)))
    names = ["a", "b"] + (["c"] if c else [])
    node = helper.make_node("Gemm", names, ["y"], **attributes)
    assert_matches_onnxruntime(make_model([node], inputs, [float_value("y", [3, 4])], initializers))


def test_gemm_of_a_batched_input_and_a_weight_fed_as_input():
    """A weight fed as a runtime input (not an initializer) is now a per-sample input, and the
    product goes through square blocks (it used to be refused)."""
    model = make_model(
        [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)],
        [float_value("x", ["N", 4]), float_value("W", [3, 4])],
        [float_value("y", ["N", 3])],
    )
    compiled = assert_matches_onnxruntime(model)
    assert [spec.name for spec in compiled.inputs] == ["x", "W"]


# ----------------------------------------------------------------------------- MatMul shapes
MATMUL_CASES = {
    "2d": ((3, 4), (4, 2), (3, 2)),
    "vector-matrix": ((4,), (4, 3), (3,)),
    "matrix-vector": ((3, 4), (4,), (3,)),
    "vector-vector": ((4,), (4,), ()),
    "vector-stacked": ((4,), (2, 4, 3), (2, 3)),
    "stacked-vector": ((2, 3, 4), (4,), (2, 3)),
    "broadcast-stacks": ((3, 1, 2, 4), (1, 2, 4, 3), (3, 2, 2, 3)),
    "stacked-2d": ((2, 3, 4), (4, 5), (2, 3, 5)),
}


@pytest.mark.parametrize("a_shape,b_shape,y_shape", list(MATMUL_CASES.values()), ids=list(MATMUL_CASES))
def test_matmul_of_two_variables_broadcasts_like_numpy(a_shape, b_shape, y_shape):
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    model = make_model([node], [float_value("a", a_shape), float_value("b", b_shape)], [float_value("y", y_shape)])
    assert_matches_onnxruntime(model)


def test_matmul_of_two_batched_values():
    """(N, 2, 3) @ (N, 3, 2), both computed from the input: one product per sample."""
    nodes = [
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "xt"], ["y"]),
    ]
    model = make_model(nodes, [float_value("x", ["N", 2, 3])], [float_value("y", ["N", 2, 2])])
    assert_matches_onnxruntime(model)


def test_a_product_over_the_batch_axis_is_refused():
    node = helper.make_node("Einsum", ["x", "z"], ["y"], equation="bi,cj->bj", name="mixes")
    model = make_model(
        [node], [float_value("x", ["N", 3]), float_value("z", ["N", 2])], [float_value("y", ["N", 2])], opset=13
    )
    with pytest.raises(ic.UnsupportedAttributeError, match=r"'mixes' \(Einsum.*sums over axis 0 of operand 1"):
        ic.from_onnx(model)


# ----------------------------------------------------------------------------- Einsum
EINSUM_CASES = {
    "matmul": ("ij,jk->ik", [(3, 4), (4, 2)], (3, 2)),
    "transposed-right": ("ij,kj->ik", [(3, 4), (2, 4)], (3, 2)),
    "transposed-left": ("ji,jk->ik", [(4, 3), (4, 2)], (3, 2)),
    "batched": ("bij,bjk->bik", [(2, 3, 4), (2, 4, 2)], (2, 3, 2)),
    "scores": ("bhqd,bhkd->bhqk", [(1, 2, 3, 4), (1, 2, 5, 4)], (1, 2, 3, 5)),
    "values": ("bhqk,bhkd->bhqd", [(1, 2, 3, 5), (1, 2, 5, 4)], (1, 2, 3, 4)),
    "ellipsis-broadcast": ("...ij,...jk->...ik", [(2, 1, 3, 4), (1, 3, 4, 2)], (2, 3, 3, 2)),
    "implicit-output": ("ij,jk", [(3, 4), (4, 2)], (3, 2)),
    "inner": ("i,i", [(5,), (5,)], ()),
    "outer": ("i,j->ij", [(3,), (2,)], (3, 2)),
    "diagonal-product": ("ii,i->i", [(3, 3), (3,)], (3,)),
    "summed-letter-of-one-operand": ("ijl,jk->ik", [(3, 4, 2), (4, 2)], (3, 2)),
    "three-operands": ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 2)], (2, 2)),
    "transpose": ("ij->ji", [(3, 4)], (4, 3)),
    "trace": ("ii", [(3, 3)], ()),
    "batch-diagonal": ("...ii->...i", [(2, 3, 3)], (2, 3)),
}


@pytest.mark.parametrize("equation,shapes,y_shape", list(EINSUM_CASES.values()), ids=list(EINSUM_CASES))
def test_einsum_of_variables(equation, shapes, y_shape):
    names = [f"x{index}" for index in range(len(shapes))]
    node = helper.make_node("Einsum", names, ["y"], equation=equation)
    inputs = [float_value(name, shape) for name, shape in zip(names, shapes)]
    assert_matches_onnxruntime(make_model([node], inputs, [float_value("y", y_shape)], opset=13))


@pytest.mark.parametrize(
    "equation,constant_first",
    [("bsd,de->bse", False), ("de,bsd->bse", True), ("bsd,ed->bes", False), ("bsd,d->bs", False)],
)
def test_einsum_with_a_constant_operand_is_a_linear_map(equation, constant_first):
    weight_shape = (4, 3) if "de" in equation else (3, 4) if "ed" in equation else (4,)
    y_shape = {"bse": ["N", 5, 3], "bes": ["N", 3, 5], "bs": ["N", 5]}[equation.split("->")[1]]
    names = ["W", "x"] if constant_first else ["x", "W"]
    node = helper.make_node("Einsum", names, ["y"], equation=equation)
    model = make_model(
        [node], [float_value("x", ["N", 5, 4])], [float_value("y", y_shape)], [_weight("W", weight_shape)], 13
    )
    compiled = assert_matches_onnxruntime(model)
    assert compiled.n == 0, "a linear map makes no states"


def test_einsum_of_three_operands_with_a_constant_between_two_variables():
    """Contracted left to right: x W is a linear map, (x W) z a product of two variables."""
    node = helper.make_node("Einsum", ["x", "W", "z"], ["y"], equation="ij,jk,kl->il")
    inputs = [float_value("x", [2, 3]), float_value("z", [4, 2])]
    model = make_model([node], inputs, [float_value("y", [2, 2])], [_weight("W", (3, 4))], opset=13)
    compiled = assert_matches_onnxruntime(model)
    assert sum(block.size for block in compiled.blocks) == 2 * 2 * 4 * 2, "squares of the one product"


@pytest.mark.parametrize(
    "equation,message",
    [("ij,jk->iq", "must name each letter"), ("i.j->i", "cannot parse"), ("...i...->i", "cannot parse|more than one")],
)
def test_malformed_einsum_equations_are_graph_errors(equation, message):
    node = helper.make_node("Einsum", ["x", "z"] if "," in equation else ["x"], ["y"], equation=equation)
    inputs = [float_value("x", [3, 3])] + ([float_value("z", [3, 3])] if "," in equation else [])
    graph = helper.make_graph([node], "g", inputs, [float_value("y", None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(ic.GraphError, match=message):
        ic.from_onnx(model)


# ----------------------------------------------------------------------------- onnx's node tests
NODE_TESTS = (
    [f"test_matmul_{name}" for name in ("2d", "3d", "4d", "bcast", "1d_3d", "4d_1d", "1d_1d")]
    + [f"test_gemm_{name}" for name in ("transposeA", "transposeB", "alpha", "beta", "all_attributes")]
    + [f"test_gemm_default_{name}" for name in ("zero_bias", "no_bias", "scalar_bias", "single_elem_vector_bias")]
    + ["test_gemm_default_vector_bias", "test_gemm_default_matrix_bias"]
    + [f"test_einsum_{name}" for name in ("transpose", "sum", "batch_diagonal", "inner_prod", "batch_matmul", "scalar")]
    + [f"test_einsum_{name}_bfloat16" for name in ("transpose", "sum", "batch_matmul")]
)


@pytest.fixture(scope="module")
def node_tests() -> dict:
    """onnx's own node tests (this onnx ships the generators, not the data files)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators' own overflow warnings
        return {case.name: case for case in collect_testcases(None) if case.name in NODE_TESTS}


def test_every_listed_node_test_exists(node_tests):
    assert sorted(node_tests) == sorted(NODE_TESTS)
    for case in node_tests.values():
        ops = {node.op_type for node in case.model.graph.node}
        assert ops <= {"MatMul", "Gemm", "Einsum"} and not case.model.graph.initializer, "every input a variable"


def _as_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with float32 inputs and outputs (double and bfloat16 Einsum tests), for onnxruntime;
    Einsum-28 differs from Einsum-12 only by allowing bfloat16, so opset 13 serves onnxruntime."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in [*copy.graph.input, *copy.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT
    if copy.opset_import[0].version > 25:
        copy.opset_import[0].version = 13
    return copy


# rank-0 graph inputs: no batch axis, the whole tensor is one sample (``graph.prepare``)
SCALAR_INPUT_TESTS = ("test_gemm_default_scalar_bias", "test_einsum_scalar")


def _tolerance(expected: np.ndarray, dtype) -> float:
    """Relative to max(1, |expected|): the expected outputs were computed in the test's own type
    (float32 for MatMul and Gemm, bfloat16 rounding for the bfloat16 ones); the float64 accuracy
    itself is checked against onnx.reference on random inputs."""
    if expected.dtype == np.float64 and dtype == np.float64:
        return 1e-9
    return 1e-2 if expected.dtype.itemsize == 2 else 1e-5


@pytest.mark.parametrize("name", NODE_TESTS)
def test_onnx_node_test_compiles_and_matches(node_tests, name):
    case = node_tests[name]
    inputs, outputs = case.data_sets[0]
    compiled = ic.from_onnx(case.model)
    expected = np.asarray(outputs[0])
    scale = max(1.0, float(np.abs(expected.astype(np.float64)).max(initial=0)))
    for dtype in (np.float64, np.float32):
        feed = [np.asarray(value, dtype=np.float64).astype(dtype) for value in inputs]
        feed = [value.reshape(1, *spec.shape) for value, spec in zip(feed, compiled.inputs)]  # a batch of 1
        predicted = compiled.astype(dtype).predict(feed[0] if len(feed) == 1 else feed)
        atol = _tolerance(expected, dtype) * scale
        np.testing.assert_allclose(
            np.asarray(predicted).reshape(expected.shape), expected.astype(np.float64), rtol=0, atol=atol
        )
    assert_matches_onnxruntime(_as_float32(case.model))


@pytest.mark.parametrize("name", SCALAR_INPUT_TESTS)
def test_onnx_node_tests_with_scalar_inputs_have_no_batch_axis(node_tests, name):
    """A rank-0 input is one sample, as a static leading dimension N > 1 is: a batch of them is
    an array of shape (batch,)."""
    compiled = ic.from_onnx(node_tests[name].model)
    assert [spec.shape for spec in compiled.inputs if not spec.shape] == [()]
