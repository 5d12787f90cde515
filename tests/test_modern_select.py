"""Comparisons, logic and Where on variables (ops/select.py), the Elu / Selu / ThresholdedRelu
function bodies folded (frontend/patterns/select.py), rank-0 graph inputs, and LRN (ops/lrn.py):
against onnxruntime (float32) and onnx.reference (float64, 1e-9), and onnx's own node tests."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx_helpers import assert_matches_onnxruntime, parse

import implicit_compiler as ic
from implicit_compiler.errors import UnsupportedAttributeError

HEADER = '<ir_version: 8, opset_import: ["" : {opset}]>'


def _model(body, inputs="float[N, 6] x, float[N, 6] z", output="float[N, 6] y", opset=17, constants=""):
    """A checked model from onnx.parser text; ``constants``: its initializers, e.g. 'float c = {0}'."""
    constants = f"<{constants}>" if constants else ""
    return parse(f"{HEADER.format(opset=opset)}\ng ({inputs}) => ({output}) {constants} {{\n{body}\n}}")


def _tied_feeds(rng, batch: int = 6, width: int = 6) -> dict[str, np.ndarray]:
    """x and z with ties (z = x at about a third of the entries), values on a coarse grid so that
    float32 and float64 tie at the same entries; zeros included."""
    x = rng.integers(-4, 5, size=(batch, width)) / 2
    z = np.where(rng.random((batch, width)) < 0.35, x, rng.integers(-4, 5, size=(batch, width)) / 2)
    return {"x": x, "z": z}


def _blocks(compiled: ic.ImplicitModel) -> list[str]:
    return [block.activation.to_spec() for block in compiled.blocks]


# ------------------------------------------------------------------------------ comparisons, Where
@pytest.mark.parametrize("op", ["Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal"])
def test_comparison_of_two_variables_selects_like_onnx(op, rng):
    """Where(op(x, z), x, z) and the condition cast to float, on inputs with ties (where strict
    and non-strict comparisons differ)."""
    model = _model(f"c = {op}(x, z)\nw = Where(c, x, z)\nf = Cast<to = 1>(c)\ny = Add(w, f)")
    compiled = assert_matches_onnxruntime(model, feeds=_tied_feeds(rng))
    assert "heaviside(0.0)" in _blocks(compiled) or "heaviside(1.0)" in _blocks(compiled)


@pytest.mark.parametrize("op", ["Less", "LessOrEqual", "Greater", "GreaterOrEqual"])
def test_comparison_with_a_constant_threshold_per_element(op, rng):
    """op(x, t), t a constant broadcast over the batch, selecting a constant or a variable."""
    constants = "float[6] t = {0.5, -1, 0, 1, -0.5, 2}, float[6] k = {3, 2, 1, 0, -1, -2}, float two = {2}"
    model = _model(f"c = {op}(x, t)\nw = Where(c, z, k)\ny = Mul(w, two)", constants=constants)
    feeds = _tied_feeds(rng)
    feeds["x"][:, :3] = [0.5, -1, 0]  # ties with the threshold
    assert_matches_onnxruntime(model, feeds=feeds)


def test_not_and_or_of_conditions(rng):
    model = _model(
        "a = Less(x, z)\nb = Greater(x, zero)\nn = Not(a)\nboth = And(n, b)\neither = Or(a, both)\n"
        "y = Cast<to = 1>(either)",
        constants="float zero = {0}",
    )
    compiled = assert_matches_onnxruntime(model, feeds=_tied_feeds(rng))
    # Less, Greater, And, Or: one heaviside block each; Not is affine
    assert _blocks(compiled).count("heaviside(0.0)") == 4


def test_where_broadcasts_condition_and_branches(rng):
    """A (N, 1, 6) condition, a (N, 3, 1) branch and a (6,) constant branch: (N, 3, 6)."""
    model = _model(
        "c = Less(x, zero)\nw = Where(c, v, k)\ny = Add(w, zero)",
        inputs="float[N, 1, 6] x, float[N, 3, 1] v",
        output="float[N, 3, 6] y",
        constants="float zero = {0}, float[6] k = {-2, -1, 0, 1, 2, 3}",
    )
    assert_matches_onnxruntime(model, batch=5)


def test_where_of_an_infinite_branch_gives_nan_as_documented():
    """The stated IEEE caveat of Where on a variable condition: q + c (p - q) with q = 1 / 0 = inf
    is NaN where ONNX selects the finite branch p, and where it selects the infinite q too."""
    model = _model("c = Less(x, zero)\nq = Reciprocal(z)\ny = Where(c, x, q)", constants="float zero = {0}")
    x, z = np.array([[-1.0, 1, -1, 1, -2, 2]]), np.array([[0.0, 0, 4, 4, 2, 2]])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_says = session.run(None, {"x": x.astype(np.float32), "z": z.astype(np.float32)})[0][0]
    ours = ic.from_onnx(model).predict({"x": x, "z": z})[0]
    np.testing.assert_array_equal(onnx_says, [-1, np.inf, -1, 0.25, -2, 0.5])
    assert np.isnan(ours[:2]).all()
    np.testing.assert_allclose(ours[2:], onnx_says[2:], rtol=1e-12)


# ------------------------------------------------------------------------------ the folds
ELU = """
zero = Constant <value = float {0.0}> ()
one = Constant <value = float {ONE}> ()
alpha = Constant <value_float = 0.5> ()
a = CastLike(alpha, x)
o = CastLike(one, x)
n = CastLike(zero, x)
c = Less(x, n)
e = Exp(x)
d = Sub(e, o)
m = Mul(a, d)
y = Where(c, m, x)
"""
SELU = """
zero = Constant <value = float {0.0}> ()
alpha = Constant <value_float = 1.5> ()
gamma = Constant <value_float = 2.5> ()
a = CastLike(alpha, x)
g = CastLike(gamma, x)
n = CastLike(zero, x)
e = Exp(x)
ae = Mul(e, a)
d = Sub(ae, A2)
neg = Mul(g, d)
pos = Mul(x, g)
c = Less(x, n)
y = Where(c, neg, pos)
"""
THRESHOLDED = """
zero = Constant <value = float {0.0}> ()
alpha = Constant <value = float {ALPHA}> ()
c = Less(alpha, x)
y = Where(c, x, zero)
"""


def _one_input(body: str) -> onnx.ModelProto:
    return _model(body, inputs="float[N, 6] x", output="float[N, 6] y", opset=18)


@pytest.mark.parametrize(
    "body,block",
    [
        (ELU.replace("ONE", "1.0"), "elu(0.5)"),
        (SELU.replace("A2", "a"), "selu(1.5, 2.5)"),
        (THRESHOLDED.replace("ALPHA", "0.25"), "thresholded_relu(0.25)"),
    ],
    ids=["elu", "selu", "thresholded_relu"],
)
def test_function_bodies_fold_into_one_activation_block(body, block):
    """The bodies of onnx's function definitions (operands of Mul in another order than onnx
    writes them, to check either order): one block, matching both references."""
    compiled = assert_matches_onnxruntime(_one_input(body), batch=8)
    assert _blocks(compiled) == [block]


@pytest.mark.parametrize(
    "body",
    [
        ELU.replace("ONE", "1.0000001"),  # exp(x) - 1.0000001: not elu
        SELU.replace("A2", "g"),  # gamma (alpha e^x - gamma): not selu
    ],
    ids=["elu-other-constant", "selu-other-constant"],
)
def test_a_body_with_other_constants_is_lowered_as_written(body):
    """Not folded (a fold would be off by far more than 1e-9), and still exact: heaviside and
    product blocks (Where on a variable condition)."""
    compiled = assert_matches_onnxruntime(_one_input(body), batch=8)
    assert "heaviside(0.0)" in _blocks(compiled) and "elu(0.5)" not in _blocks(compiled)
    assert not any(spec.startswith("selu") for spec in _blocks(compiled))


def test_a_condition_read_elsewhere_keeps_the_chain():
    """The Less is also a graph output (cast): nothing is folded, both outputs match."""
    body = THRESHOLDED.replace("ALPHA", "0.25") + "f = Cast<to = 1>(c)\n"
    model = _model(body, inputs="float[N, 6] x", output="float[N, 6] y, float[N, 6] f", opset=18)
    compiled = assert_matches_onnxruntime(model, batch=8)
    assert "thresholded_relu(0.25)" not in _blocks(compiled)


def test_folded_constants_are_kept_in_float64():
    """A double model's alpha that no float32 holds (0.1): the fold keeps it to the last bit."""
    model = _one_input(ELU.replace("ONE", "1.0").replace("value_float = 0.5", "value = double {0.1}"))
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    compiled = ic.from_onnx(model)
    assert compiled.blocks[0].activation.alpha == 0.1


# ------------------------------------------------------------------------------ rank-0 inputs
def test_a_rank_0_input_is_one_sample_and_a_batch_of_them_is_a_vector():
    """x * s + x, s a scalar input: no batch axis (like a static leading N > 1), so it is given
    per sample; against both references per sample."""
    model = _model("p = Mul(x, s)\ny = Add(p, x)", inputs="float[N, 3] x, float s", output="float[N, 3] y")
    compiled = assert_matches_onnxruntime(model, batch=5)
    assert [spec.shape for spec in compiled.inputs] == [(3,), ()]


def test_a_model_of_one_scalar(rng):
    """Exp of a scalar: one value per sample; one sample as a 0-d array, a batch as (batch,)."""
    model = _model("y = Exp(s)", inputs="float s", output="float y")
    compiled = assert_matches_onnxruntime(model, batch=4)
    values = rng.uniform(-2, 2, size=7)
    np.testing.assert_allclose(compiled.predict(values), np.exp(values), rtol=1e-14)
    np.testing.assert_allclose(compiled.predict(np.array(0.5)), np.exp(0.5), rtol=1e-14)


# ------------------------------------------------------------------------------ LRN
def _lrn(shape, opset: int = 13, **attributes) -> onnx.ModelProto:
    text = ", ".join(f"{k} = {v}" for k, v in attributes.items())
    dims = ", ".join(["N", *map(str, shape)])
    return _model(f"y = LRN <{text}> (x)", inputs=f"float[{dims}] x", output=f"float[{dims}] y", opset=opset)


@pytest.mark.parametrize(
    "attributes",
    [
        dict(size=3),
        dict(size=5, alpha=0.001, beta=0.75, bias=2.0),
        dict(size=3, alpha=0.5, beta=0.5, bias=1.0),  # rsqrt
        dict(size=5, alpha=0.3, beta=1.0, bias=0.5),  # reciprocal
        dict(size=1, alpha=2.0, beta=1.5, bias=1.0),
        dict(size=9, alpha=0.1, beta=0.25, bias=1.0),  # larger than C
    ],
    ids=["default", "alexnet", "beta-half", "beta-one", "size-1", "size-9"],
)
@pytest.mark.parametrize("opset", [12, 13])
def test_lrn_matches_both_references(attributes, opset):
    assert_matches_onnxruntime(_lrn((6, 3, 4), opset, **attributes), batch=3)


@pytest.mark.parametrize("size,beta", [(2, 0.75), (4, 0.3), (3, 0.0)])
def test_lrn_of_an_even_size_or_beta_0_matches_the_reference(size, beta):
    """Windows of floor((size - 1) / 2) channels before, ceil((size - 1) / 2) after; beta = 0
    gives x (onnxruntime refuses even sizes and beta 0)."""
    model = _lrn((6, 3, 4), size=size, alpha=0.4, beta=beta, bias=0.7)
    assert_matches_onnxruntime(model, batch=3, check_onnxruntime=False)


def test_lrn_of_other_ranks_matches_the_reference():
    """(N, C, L) and (N, C, D, H, W) inputs (onnxruntime computes LRN of rank 4 only)."""
    for shape in ((5, 7), (4, 2, 3, 2)):
        assert_matches_onnxruntime(_lrn(shape, size=3, alpha=0.2), batch=2, check_onnxruntime=False)


def test_the_reference_lrn_replacement_agrees_with_onnxruntime(rng):
    """``reference_ops.LRN`` (onnx.reference's own sums over the wrong axis) against onnxruntime,
    independently of the lowering: the float64 checks above rest on it."""
    from onnx.reference import ReferenceEvaluator

    from implicit_compiler.frontend.reference_ops import REFERENCE_OPS

    model = _lrn((7, 2, 3), size=5, alpha=0.5, beta=0.75, bias=1.5)
    x = rng.uniform(-2, 2, size=(2, 7, 2, 3)).astype(np.float32)
    ours = ReferenceEvaluator(model, new_ops=REFERENCE_OPS).run(None, {"x": x})[0]
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(ours, session.run(None, {"x": x})[0], rtol=1e-5)


def test_lrn_without_a_size_is_refused():
    model = _model("y = LRN <size = 3> (x)", inputs="float[N, 4, 2, 2] x", output="float[N, 4, 2, 2] y")
    model.graph.node[0].ClearField("attribute")
    with pytest.raises(UnsupportedAttributeError, match="window size"):
        ic.from_onnx(model)


# ------------------------------------------------------------------------------ onnx node tests
NODE_TESTS = (
    "test_elu_example_expanded_ver18", "test_elu_expanded_ver18", "test_elu_default_expanded_ver18",
    "test_selu_example_expanded_ver18", "test_selu_expanded_ver18", "test_selu_default_expanded_ver18",
    "test_thresholdedrelu_example_expanded_ver18", "test_thresholdedrelu_expanded_ver18",
    "test_thresholdedrelu_default_expanded_ver18", "test_lrn", "test_lrn_default", "test_einsum_scalar",
)  # fmt: skip


@pytest.fixture(scope="module")
def node_tests() -> dict:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators' own overflow warnings
        return {case.name: case for case in collect_testcases(None) if case.name in NODE_TESTS}


@pytest.mark.parametrize("name", NODE_TESTS)
def test_onnx_node_tests_compile_and_match(node_tests, name):
    """float64 (rtol 1e-6: the expected data are float32) and float32 (1e-4) against the test's
    own outputs; the expanded bodies fold into one block each."""
    case = node_tests[name]
    inputs, outputs = case.data_sets[0]
    compiled = ic.from_onnx(case.model)
    expected = np.asarray(outputs[0], dtype=np.float64)
    scale = max(1.0, float(np.abs(expected).max()))
    for dtype, rtol in ((np.float64, 1e-6), (np.float32, 1e-4)):
        predicted = compiled.astype(dtype).predict(np.asarray(inputs[0]).astype(dtype))
        np.testing.assert_allclose(
            np.asarray(predicted).reshape(expected.shape), expected, rtol=rtol, atol=1e-6 * scale
        )
    if "expanded" in name:
        assert len(compiled.blocks) == 1
    if name != "test_einsum_scalar":  # (a double model): on random inputs, against both references
        assert_matches_onnxruntime(case.model, batch=3)


def test_heaviside_blocks_survive_save_and_load(tmp_path, rng):
    """The comparison's activation (with its value at 0) is written and read back."""
    compiled = ic.from_onnx(_model("c = LessOrEqual(x, z)\ny = Where(c, x, z)"))
    compiled.save(str(tmp_path / "select.npz"))
    loaded = ic.load(tmp_path / "select.npz")
    assert _blocks(loaded) == _blocks(compiled) and "heaviside(1.0)" in _blocks(loaded)
    feeds = _tied_feeds(rng)
    np.testing.assert_array_equal(loaded.predict(feeds), compiled.predict(feeds))
