"""Composition: algebraic identities, and composed predictions equal composing the predictions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse as sp
from conftest import contractive_matrix

import implicit_compiler as ic
from implicit_compiler import ImplicitModel, compose


def _identity_model(p: int, with_states: bool) -> ImplicitModel:
    """y = u: either D = I with no state, or x = u (identity activation), y = x."""
    if with_states:
        return ImplicitModel.from_matrices(
            np.zeros((p, p)), np.eye(p), np.eye(p), np.zeros((p, p)), activation="identity"
        )
    return ImplicitModel.from_matrices(np.zeros((0, 0)), np.zeros((0, p)), np.zeros((p, 0)), np.eye(p))


def _random_model(rng, p=5, q=4, n=7, activation="tanh", cyclic=False, feedthrough=True) -> ImplicitModel:
    A = contractive_matrix(rng, n, 0.6) if cyclic else np.tril(rng.normal(size=(n, n)) * 0.5, k=-1)
    D = rng.normal(size=(q, p)) * 0.3 if feedthrough else np.zeros((q, p))
    return ImplicitModel.from_matrices(
        A, rng.normal(size=(n, p)), rng.normal(size=(q, n)), D, activation=activation,
        bias_x=rng.normal(size=n), bias_y=rng.normal(size=q),
    )  # fmt: skip


@pytest.fixture
def models(rng, mlp):
    """The 6 -> 3 ReLU MLP, a cyclic tanh model 3 -> 3 and a feedforward model 6 -> 3."""
    return mlp.implicit(), _random_model(rng, p=3, q=3, cyclic=True), _random_model(rng, p=6, q=3)


@pytest.mark.parametrize("with_states", [False, True], ids=["feedthrough", "identity-states"])
def test_cascade_with_an_identity_model_changes_nothing(models, rng, with_states):
    mlp, loop, _ = models
    u = rng.normal(size=(9, 6))
    expected = mlp.predict(u)
    np.testing.assert_allclose(
        ic.cascade(_identity_model(6, with_states), mlp).predict(u), expected, rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(
        ic.cascade(mlp, _identity_model(3, with_states)).predict(u), expected, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("link", [False, True], ids=["folded", "link-block"])
def test_cascade_equals_composing_predictions(models, rng, monkeypatch, link):
    mlp, loop, _ = models
    monkeypatch.setattr(compose, "LINK_GROWTH_LIMIT", -1.0 if link else np.inf)
    composed = ic.cascade(mlp, loop)
    u = rng.normal(size=(9, 6))
    np.testing.assert_allclose(composed.predict(u), loop.predict(mlp.predict(u)), rtol=1e-10, atol=1e-10)
    assert [b.name for b in composed.blocks][:2] == ["m1/h1", "m1/h2"]
    assert any(b.name == "m1/output" for b in composed.blocks) == link
    assert composed.inputs == mlp.inputs and composed.outputs == loop.outputs


def test_parallel_then_selecting_one_output_is_the_operand(models, rng):
    mlp, _, other = models
    composed = ic.parallel(mlp, other)
    u = rng.normal(size=(9, 6))
    outputs = composed.predict(u)
    assert set(outputs) == {"m1/y", "m2/y"}
    np.testing.assert_allclose(outputs["m1/y"], mlp.predict(u), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(outputs["m2/y"], other.predict(u), rtol=1e-12, atol=1e-12)


def test_add_and_multiply_equal_the_sum_and_product_of_predictions(models, rng):
    mlp, _, other = models
    u = rng.normal(size=(9, 6))
    y1, y2 = mlp.predict(u), other.predict(u)
    np.testing.assert_allclose(ic.add(mlp, other).predict(u), y1 + y2, rtol=1e-12, atol=1e-12)
    product = ic.multiply(mlp, other)
    np.testing.assert_allclose(product.predict(u), y1 * y2, rtol=1e-10, atol=1e-10)
    assert [b.activation.name for b in product.blocks[-2:]] == ["square", "square"]


def test_zero_feedback_changes_nothing(models, rng):
    for model in models:
        u = rng.normal(size=(5, model.p))
        closed = ic.feedback(model, np.zeros((model.p, model.q)))
        np.testing.assert_allclose(closed.predict(u), model.predict(u), rtol=1e-12, atol=1e-12)


def _loop_by_root_finding(model: ImplicitModel, K: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Solve u = v + K m(u) for u with scipy's root finder, using only the open-loop model."""
    outputs = []
    for sample in v:
        result = scipy.optimize.root(lambda u, v=sample: u - v - K @ model.predict(u), sample, tol=1e-13)
        assert result.success
        outputs.append(model.predict(result.x))
    return np.array(outputs)


@pytest.mark.parametrize("feedthrough", [False, True], ids=["D=0", "D!=0"])
def test_feedback_matches_solving_the_loop_directly(rng, feedthrough):
    model = _random_model(rng, p=4, q=3, feedthrough=feedthrough)  # feedforward, tanh
    K = rng.normal(size=(4, 3)) * 0.1
    closed = ic.feedback(model, K)
    v = rng.normal(size=(6, 4))
    solution = closed.solve(v)
    np.testing.assert_allclose(solution.y, _loop_by_root_finding(model, K, v), rtol=1e-9, atol=1e-9)
    assert solution.iterations > 0, "the loop makes A cyclic"
    assert [names for names, _ in solution.component_histories] == [("x",)]


def test_feedback_around_a_network_iterates_only_on_the_loop(rng, mlp):
    """MLP 6 -> 3 with a gain from y back to the first two inputs: cyclic component {h1, h2}."""
    model = ic.cascade(
        mlp.implicit(),
        ImplicitModel.from_matrices(np.zeros((2, 2)), rng.normal(size=(2, 3)), np.eye(2), np.zeros((2, 3))),
    )
    K = np.zeros((6, 2))
    K[:2, :] = 0.01 * rng.normal(size=(2, 2))
    closed = ic.feedback(model, K)
    v = rng.normal(size=(4, 6))
    solution = closed.solve(v)
    assert [names for names, _ in solution.component_histories] == [("m1/h1", "m1/h2", "m2/x")]
    np.testing.assert_allclose(solution.y, _loop_by_root_finding(model, K, v), rtol=1e-9, atol=1e-9)


def test_scalar_feedback_gain(rng):
    model = _random_model(rng, p=3, q=3)
    closed = ic.feedback(model, 0.2)
    v = rng.normal(size=(3, 3))
    np.testing.assert_allclose(
        closed.predict(v), _loop_by_root_finding(model, 0.2 * np.eye(3), v), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("feedthrough", [False, True], ids=["D=0", "D!=0"])
def test_feedback_keeps_the_models_dtype(rng, feedthrough):
    """A float32 model's closed loop is float32 (the loop is solved in float64, then rounded):
    its prediction is the float64 loop's within float32's rounding."""
    model = _random_model(rng, p=3, q=3, feedthrough=feedthrough)
    closed = ic.feedback(model.astype(np.float32), 0.2)
    assert closed.dtype == np.float32 and closed.bias_x.dtype == np.float32
    v = rng.normal(size=(5, 3))
    expected = _loop_by_root_finding(model, 0.2 * np.eye(3), v)
    got = closed.predict(v.astype(np.float32))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_singular_loop_is_refused():
    model = ImplicitModel.from_matrices(np.zeros((1, 1)), np.ones((1, 2)), np.ones((2, 1)), np.eye(2))
    with pytest.raises(ic.NotWellPosedError, match="I - D K is singular"):
        ic.feedback(model, np.eye(2))


@pytest.mark.parametrize(
    "operation,message",
    [
        (
            lambda a, b: ic.cascade(a, a),
            r"cannot cascade: the first model gives q = 3 outputs but the second takes p = 6",
        ),
        (lambda a, b: ic.parallel(a, b), r"cannot put in parallel: .* p = 6 values and the second p = 3"),
        (lambda a, b: ic.add(a, b), r"cannot add: "),
        (lambda a, b: ic.multiply(a, b), r"cannot multiply: "),
        (lambda a, b: ic.feedback(a, np.zeros((3, 3))), r"K must be p x q = 6 x 3"),
        (lambda a, b: ic.feedback(a, 0.5), r"scalar loop gain needs p = q"),
    ],
    ids=["cascade", "parallel", "add", "multiply", "feedback-shape", "feedback-scalar"],
)
def test_shape_mismatches_are_refused(models, operation, message):
    mlp, loop, _ = models
    with pytest.raises(ic.ShapeError, match=message):
        operation(mlp, loop)


def test_operands_are_not_changed(models, rng):
    mlp, loop, _ = models
    before = [m.A.copy() for m in (mlp, loop)]
    ic.cascade(mlp, loop)
    ic.feedback(loop, 0.1)
    for model, A in zip((mlp, loop), before):
        assert (model.A != A).nnz == 0


def test_float32_operands_stay_float32(models):
    mlp, loop, _ = models
    composed = ic.cascade(mlp.astype(np.float32), loop.astype(np.float32))
    assert composed.dtype == np.float32
    assert ic.cascade(mlp.astype(np.float32), loop).dtype == np.float64
    assert isinstance(composed.A, sp.csr_array)
