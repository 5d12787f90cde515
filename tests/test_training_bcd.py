"""solver="bcd": the Fenchel divergence, its gradients, the Lipschitz steps, dual ascent, the estimators.

Every check compares with an independent computation: closed forms of the divergence, torch
autograd (gradients and Hessians of an objective written here in torch), numpy eigenvalues, the
runtime's equilibrium solver.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.estimator_checks import parametrize_with_checks

from implicit_compiler import ImplicitModel
from implicit_compiler.errors import ArgumentValueError, OverwriteError, ShapeError
from implicit_compiler.training import bcd
from implicit_compiler.training.bcd import BCDSettings, Data, Weights
from implicit_compiler.training.estimators import ImplicitClassifier, ImplicitRegressor
from implicit_compiler.training.plots import plot_bcd_history

LOSSES = ("squared", "binary", "multiclass")


# ------------------------------------------------------------------------------- helpers
SLOPES = {"relu": None, "leaky": 0.2, "mixed": "mixed"}


def random_weights(rng, n=4, p=2, q=2, kappa=0.6, bias_x=0.0, slopes=None) -> Weights:
    """Random weights; slopes None (relu), a number (every unit leaky) or "mixed" (alternate relu / 0.3)."""
    A = rng.normal(size=(n, n))
    A *= kappa / np.abs(A).sum(axis=1).max()
    if slopes == "mixed":
        slopes = np.where(np.arange(n) % 2 == 0, 0.0, 0.3)
    elif slopes is not None:
        slopes = np.full(n, float(slopes))
    return Weights(
        A, rng.normal(size=(n, p)), rng.normal(size=(q, n)), rng.normal(size=(q, p)),
        rng.normal(size=n) + bias_x, rng.normal(size=q), slopes,
    )  # fmt: skip


def random_states(rng, weights, m):
    """States for the weights' units: >= 0 on relu units, any sign on leaky ones."""
    X = rng.normal(size=(weights.A.shape[0], m))
    return np.where((weights.slopes == 0)[:, None], np.abs(X), X)


def random_data(rng, loss, p=2, q=2, m=6) -> Data:
    U = rng.normal(size=(p, m))
    if loss == "squared":
        Y = rng.normal(size=(q, m))
    elif loss == "binary":
        Y = rng.integers(0, 2, size=(1, m)).astype(float)
    else:
        Y = np.eye(q)[rng.integers(0, q, size=m)].T
    return Data(U, Y, loss)


def torch_objective(A, B, bx, C, D, by, X, U, Y, dual, loss, alpha, slopes=None):
    """J written independently in torch: loss + sum_i lambda_i mean_j F(X_ij, Z_ij) + alpha/2 ||W||^2.

    F(x, z) = f(x) + f*(z) - x z with f(x) = x^2/2 (x >= 0) or x^2/(2a) (x < 0, leaky units; relu
    units have x >= 0) and f*(z) = z^2/2 (z >= 0) or a z^2/2 (z < 0).
    """
    m = U.shape[1]
    Z = A @ X + B @ U + bx[:, None]
    Yhat = C @ X + D @ U + by[:, None]
    if loss == "squared":
        value = 0.5 * ((Yhat - Y) ** 2).sum() / m
    elif loss == "binary":
        value = torch.nn.functional.binary_cross_entropy_with_logits(Yhat, Y, reduction="sum") / m
    else:
        value = torch.nn.functional.cross_entropy(Yhat.T, Y.argmax(dim=0))
    a = torch.zeros(X.shape[0], dtype=X.dtype) if slopes is None else torch.as_tensor(slopes)
    a = a[:, None].expand_as(X)
    primal = torch.where(X >= 0, 0.5 * X**2, 0.5 * X**2 / torch.where(a > 0, a, 1.0))
    conjugate = torch.where(Z >= 0, 0.5 * Z**2, 0.5 * a * Z**2)
    divergence = primal + conjugate - X * Z
    value = value + (dual * divergence.mean(dim=1)).sum()
    return value + 0.5 * alpha * sum((W**2).sum() for W in (A, B, C, D))


def as_tensors(weights, X, data, dual):
    names = ("A", "B", "bias_x", "C", "D", "bias_y")
    tensors = {name: torch.tensor(getattr(weights, name), requires_grad=True) for name in names}
    return tensors, torch.tensor(X, requires_grad=True), torch.tensor(data.U), torch.tensor(data.Y), torch.tensor(dual)


def block_hessian_norm(weights, X, data, dual, block, alpha=0.0) -> float:
    """||Hessian of J in one block||_2 by autograd (numpy's eigvalsh of the symmetric matrix)."""
    tensors, X_t, U, Y, lam = as_tensors(weights, X, data, dual)
    names = {"states": ("X",), "output": ("C", "D", "bias_y"), "hidden": ("A", "B", "bias_x")}[block]
    values = {**{k: v.detach() for k, v in tensors.items()}, "X": X_t.detach()}
    shapes = [values[name].shape for name in names]
    sizes = [values[name].numel() for name in names]

    def as_function(flat):
        parts = dict(values)
        for name, piece, shape in zip(names, torch.split(flat, sizes), shapes):
            parts[name] = piece.reshape(shape)
        return torch_objective(
            parts["A"], parts["B"], parts["bias_x"], parts["C"], parts["D"], parts["bias_y"], parts["X"],
            U, Y, lam, data.loss, alpha, weights.slopes,
        )  # fmt: skip

    flat = torch.cat([values[name].reshape(-1) for name in names])
    hessian = torch.autograd.functional.hessian(as_function, flat).numpy()
    return float(np.abs(np.linalg.eigvalsh(0.5 * (hessian + hessian.T))).max())


# ------------------------------------------------------------------------------- the divergence
def test_divergence_matches_its_closed_forms():
    rng = np.random.default_rng(0)
    X = np.abs(rng.normal(size=(50, 40)))
    Z = rng.normal(size=(50, 40)) * 3
    F = bcd.fenchel_divergence(X, Z)
    # z > 0: (x - z)^2 / 2 ; z <= 0: x^2 / 2 + x |z|
    expected = np.where(Z > 0, 0.5 * (X - Z) ** 2, 0.5 * X**2 + X * np.abs(Z))
    np.testing.assert_allclose(F, expected, rtol=1e-12, atol=1e-14)
    assert F.min() >= 0
    np.testing.assert_allclose(bcd.unit_divergences(X, Z), expected.mean(axis=1), rtol=1e-12)


@pytest.mark.parametrize("a", [0.05, 0.3, 1.0])
def test_leaky_divergence_matches_its_closed_forms(a):
    rng = np.random.default_rng(12)
    X, Z = 2 * rng.normal(size=(30, 40)), 2 * rng.normal(size=(30, 40))
    F = bcd.fenchel_divergence(X, Z, np.full(30, a))
    expected = np.select(
        [(X >= 0) & (Z >= 0), (X >= 0) & (Z < 0), (X < 0) & (Z >= 0)],
        [0.5 * (X - Z) ** 2, 0.5 * X**2 + 0.5 * a * Z**2 - X * Z, X**2 / (2 * a) + 0.5 * Z**2 - X * Z],
        (X - a * Z) ** 2 / (2 * a),  # both negative: zero exactly at x = a z
    )
    np.testing.assert_allclose(F, expected, rtol=1e-12, atol=1e-13)
    assert F.min() >= -1e-15
    on_graph = np.where(Z >= 0, Z, a * Z)  # x = leaky_relu(z)
    assert np.abs(bcd.fenchel_divergence(on_graph, Z, np.full(30, a))).max() < 1e-13


def test_divergence_is_zero_exactly_on_leaky_relu_equilibria():
    rng = np.random.default_rng(13)
    weights = random_weights(rng, n=12, p=3, q=1, kappa=0.9, slopes=0.2)
    U = rng.normal(size=(3, 200))
    model = ImplicitModel.from_matrices(
        weights.A, weights.B, weights.C, weights.D, "leaky_relu(0.2)", weights.bias_x, weights.bias_y
    )
    states = model.solve(U.T, tol=1e-13).x.T
    assert (states < 0).any()  # the leaky part is used
    assert np.abs(bcd.fenchel_divergence(states, bcd.preactivation(weights, states, U), weights.slopes)).max() < 1e-12
    np.testing.assert_allclose(bcd.equilibrium_states(weights, U), states, atol=1e-10)


def test_divergence_is_zero_exactly_on_relu_equilibria():
    rng = np.random.default_rng(1)
    weights = random_weights(rng, n=12, p=3, q=1, kappa=0.9)
    U = rng.normal(size=(3, 200))
    model = ImplicitModel.from_matrices(
        weights.A, weights.B, weights.C, weights.D, "relu", weights.bias_x, weights.bias_y
    )
    states = model.solve(U.T, tol=1e-13).x.T  # the runtime's solver, not ours
    F = bcd.fenchel_divergence(states, bcd.preactivation(weights, states, U))
    assert F.max() < 1e-12
    # ours agrees with the runtime's
    np.testing.assert_allclose(bcd.equilibrium_states(weights, U), states, atol=1e-10)
    # and a state off the equilibrium has a positive divergence where it is off
    moved = states.copy()
    moved[0, 0] += 0.1
    assert bcd.fenchel_divergence(moved, bcd.preactivation(weights, moved, U))[0, 0] > 1e-4


@pytest.mark.parametrize("slopes", SLOPES.values(), ids=SLOPES.keys())
@pytest.mark.parametrize("loss", LOSSES)
def test_gradients_match_autograd(loss, slopes):
    rng = np.random.default_rng(2)
    q = 1 if loss == "binary" else 3
    weights = random_weights(rng, n=5, p=3, q=q, slopes=slopes)
    data = random_data(rng, loss, p=3, q=q, m=9)
    X = random_states(rng, weights, 9)
    dual = rng.uniform(0.5, 3.0, size=5)
    alpha = 0.3
    tensors, X_t, U, Y, lam = as_tensors(weights, X, data, dual)
    value = torch_objective(
        tensors["A"], tensors["B"], tensors["bias_x"], tensors["C"], tensors["D"], tensors["bias_y"],
        X_t, U, Y, lam, loss, alpha, weights.slopes,
    )  # fmt: skip
    value.backward()
    assert bcd.objective(weights, X, data, dual, alpha) == pytest.approx(value.item(), rel=1e-12)
    np.testing.assert_allclose(bcd.states_gradient(weights, X, data, dual), X_t.grad.numpy(), rtol=1e-10, atol=1e-12)
    for computed, name in zip(bcd.output_gradients(weights, X, data, alpha), ("C", "D", "bias_y")):
        np.testing.assert_allclose(computed, tensors[name].grad.numpy(), rtol=1e-10, atol=1e-12)
    for computed, name in zip(bcd.hidden_gradients(weights, X, data, dual, alpha), ("A", "B", "bias_x")):
        np.testing.assert_allclose(computed, tensors[name].grad.numpy(), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------- Lipschitz constants
def test_lipschitz_constants_equal_the_hessians_norms_where_they_are_exact():
    """Squared loss, every Z > 0, one lambda: the bounds are attained (the Hessians are constant)."""
    rng = np.random.default_rng(3)
    weights = random_weights(rng, n=4, p=2, q=2, kappa=0.3, bias_x=30.0)
    data = random_data(rng, "squared", p=2, q=2, m=7)
    X = np.abs(rng.normal(size=(4, 7)))
    dual = np.full(4, 2.5)
    assert (bcd.preactivation(weights, X, data.U) > 0).all()
    constants = bcd.lipschitz_constants(weights, X, data, dual)
    for block in ("states", "output", "hidden"):
        assert getattr(constants, block) == pytest.approx(block_hessian_norm(weights, X, data, dual, block), rel=1e-9)
    # the same in closed form from numpy's singular values
    design = np.vstack([X, data.U, np.ones((1, 7))])
    sigma = np.linalg.svd(design, compute_uv=False)[0]
    assert constants.output == pytest.approx(sigma**2 / 7, rel=1e-10)
    assert constants.hidden == pytest.approx(2.5 * sigma**2 / 7, rel=1e-10)


@pytest.mark.parametrize("slopes", SLOPES.values(), ids=SLOPES.keys())
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("seed", [4, 5, 6])
def test_lipschitz_constants_bound_the_hessians(loss, seed, slopes):
    """Any loss, mixed signs of Z (and X on leaky units), lambda per unit, alpha > 0: each bounds its Hessian."""
    rng = np.random.default_rng(seed)
    q = 1 if loss == "binary" else 3
    weights = random_weights(rng, n=4, p=2, q=q, kappa=0.9, slopes=slopes)
    data = random_data(rng, loss, p=2, q=q, m=8)
    X = random_states(rng, weights, 8)
    dual = rng.uniform(0.0, 4.0, size=4)
    constants = bcd.lipschitz_constants(weights, X, data, dual, alpha=0.2)
    for block in ("states", "output", "hidden"):
        assert getattr(constants, block) >= block_hessian_norm(weights, X, data, dual, block, alpha=0.2) * (1 - 1e-9)


# ------------------------------------------------------------------------------- descent and dual ascent
def teacher_problem(seed=7, n=6, p=3, m=150):
    rng = np.random.default_rng(seed)
    teacher = random_weights(rng, n=n, p=p, q=1, kappa=0.7)
    U = rng.normal(size=(p, m))
    Y = bcd.outputs(teacher, bcd.equilibrium_states(teacher, U), U)
    start = Weights(*(0.3 * rng.normal(size=getattr(teacher, name).shape) for name in "ABCD"), np.zeros(n), np.zeros(1))
    return start, Data(U, Y, "squared")


@pytest.mark.parametrize("column_linf", [0.0, 0.05])
@pytest.mark.parametrize("slopes", SLOPES.values(), ids=SLOPES.keys())
@pytest.mark.parametrize("loss", LOSSES)
def test_every_block_step_decreases_the_objective(loss, slopes, column_linf):
    rng = np.random.default_rng(8)
    q = 1 if loss == "binary" else 2
    weights = random_weights(rng, n=6, p=3, q=q, kappa=0.9, slopes=slopes)
    data = random_data(rng, loss, p=3, q=q, m=40)
    X = bcd.equilibrium_states(weights, data.U) + 0.1
    dual = rng.uniform(0.5, 5.0, size=6)
    settings = BCDSettings(kappa=0.9, alpha=0.01, column_linf=column_linf)
    patterns = bcd.Patterns.full(weights)
    values = [bcd.objective(weights, X, data, dual, settings.alpha, column_linf)]
    for _ in range(60):
        constants = bcd.lipschitz_constants(weights, X, data, dual, settings.alpha)
        X = bcd.states_step(weights, X, data, dual, constants.states)
        values.append(bcd.objective(weights, X, data, dual, settings.alpha, column_linf))
        constants = bcd.lipschitz_constants(weights, X, data, dual, settings.alpha)
        weights = bcd.output_step(weights, X, data, patterns, constants.output, settings)
        values.append(bcd.objective(weights, X, data, dual, settings.alpha, column_linf))
        weights = bcd.hidden_step(weights, X, data, dual, patterns, constants.hidden, settings)
        values.append(bcd.objective(weights, X, data, dual, settings.alpha, column_linf))
    # the sweeps of the inner loop (bcd_sweep, as train_bcd runs them) keep decreasing it
    for _ in range(30):
        weights, X = bcd.bcd_sweep(weights, X, data, dual, patterns, settings)
        values.append(bcd.objective(weights, X, data, dual, settings.alpha, column_linf))
    steps = np.diff(values)
    assert steps.max() <= 1e-12 * abs(values[0])
    assert values[-1] < 0.5 * values[0]  # and it does decrease
    assert np.abs(weights.A).sum(axis=1).max() <= 0.9 + 1e-12


def test_dual_step_grows_only_where_the_divergence_exceeds_the_tolerance():
    rng = np.random.default_rng(9)
    weights = random_weights(rng, n=5, p=2, q=1)
    weights.A[:, :2] = 0.0  # states 0 and 1 feed no unit: moving them leaves the other units at equilibrium
    data = random_data(rng, "squared", p=2, q=1, m=30)
    X = bcd.equilibrium_states(weights, data.U)
    X[:2] += np.abs(rng.normal(size=(2, 30)))  # units 0 and 1 off the equilibrium
    F = bcd.fenchel_divergence(X, bcd.preactivation(weights, X, data.U)).mean(axis=1)
    settings = BCDSettings(dual_learning_rate=3.0, tol_fenchel=1e-6)
    dual = bcd.dual_step(weights, X, data, np.ones(5), settings)
    np.testing.assert_allclose(dual[:2], 1.0 + 3.0 * F[:2], rtol=1e-12)
    np.testing.assert_array_equal(dual[2:], 1.0)


@pytest.mark.parametrize("type_of_training", ["two_loops", "one_loop"])
def test_teacher_problem_is_learnt_with_a_small_divergence(type_of_training):
    start, data = teacher_problem()
    rounds = 15 if type_of_training == "two_loops" else 400
    settings = BCDSettings(type_of_training=type_of_training, rounds=rounds, starting_lambda=10.0, max_inner_iter=100)
    result = bcd.train_bcd(start, data, settings)
    history = result.history
    assert history.rounds == rounds and history.type_of_training == type_of_training
    variance_loss = 0.5 * float(np.var(data.Y))
    assert history.equilibrium_loss[-1] < 0.05 * variance_loss  # R^2 > 0.95 at the real equilibrium
    assert history.equilibrium_loss[-1] < 0.1 * history.equilibrium_loss[0]
    assert history.fenchel[-1] < 1e-3
    assert np.all(np.diff(history.dual_norm) >= 0)  # dual ascent never lowers lambda
    if type_of_training == "one_loop":
        assert set(history.inner_iterations) == {1}
    assert np.abs(result.weights.A).sum(axis=1).max() <= settings.kappa + 1e-12
    # the recorded gap is the distance to the runtime's equilibrium of the trained weights
    w = result.weights
    model = ImplicitModel.from_matrices(w.A, w.B, w.C, w.D, "relu", w.bias_x, w.bias_y)
    states = model.solve(data.U.T, tol=1e-13).x.T
    gap = np.linalg.norm(result.states - states) / np.sqrt(data.m)
    assert history.equilibrium_gap[-1] == pytest.approx(gap, rel=1e-6, abs=1e-12)


# ------------------------------------------------------------------------------- the estimators
@pytest.fixture(scope="module")
def sine():
    rng = np.random.default_rng(10)
    X = rng.uniform(-np.pi, np.pi, size=(200, 1))
    X_val = rng.uniform(-np.pi, np.pi, size=(100, 1))
    return X, np.sin(X[:, 0]) + 0.05 * rng.normal(size=200), X_val, np.sin(X_val[:, 0])


@pytest.mark.parametrize("type_of_training", ["two_loops", "one_loop"])
@pytest.mark.parametrize("structure", ["dense", "triangular"])
def test_regressor_bcd_fits_a_sine_and_keeps_the_constraints(sine, type_of_training, structure):
    X, y, X_val, y_val = sine
    rounds = 10 if type_of_training == "two_loops" else 1000
    reg = ImplicitRegressor(
        n_states=15, solver="bcd", type_of_training=type_of_training, rounds=rounds, kappa=0.9,
        structure=structure, random_state=0,
    ).fit(X, y, eval_set=(X_val, y_val))  # fmt: skip
    assert reg.score(X_val, y_val) > 0.9
    A = reg.model_.A.toarray()
    assert np.abs(A).sum(axis=1).max() <= 0.9 + 1e-12
    if structure == "triangular":
        assert not np.triu(A).any()
    history = reg.history_
    assert history.rounds == rounds == reg.n_iter_ and len(history.eval_loss) == rounds
    assert reg.relaxation_gap_ == history.equilibrium_gap[-1] < 0.2
    # the eval loss recorded is the fitted model's, recomputed here from its predictions
    residual = (reg.predict(X_val) - y_val) / reg.target_scale_[0]
    assert history.eval_loss[-1] == pytest.approx(0.5 * np.mean(residual**2), rel=1e-6)


def test_classifier_bcd_learns_two_and_three_classes():
    from sklearn.datasets import make_blobs
    from sklearn.linear_model import LogisticRegression

    X, labels = make_blobs(n_samples=150, centers=3, cluster_std=1.0, random_state=0)
    three = ImplicitClassifier(n_states=8, solver="bcd", rounds=5, random_state=0).fit(X, labels)
    assert three.score(X, labels) > 0.9
    assert three.score(X, labels) >= LogisticRegression().fit(X, labels).score(X, labels)  # 0.913 here
    two = ImplicitClassifier(n_states=8, solver="bcd", rounds=5, random_state=0).fit(X, labels == 1)
    assert two.score(X, labels == 1) > 0.9
    np.testing.assert_allclose(two.decision_function(X), two.model_.predict(X)[:, 0])


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_gradient_is_adams_other_name(sine):
    X, y, _, _ = sine
    options = dict(n_states=6, max_epochs=5, random_state=0)
    adam = ImplicitRegressor(solver="adam", **options).fit(X, y)
    gradient = ImplicitRegressor(solver="gradient", **options).fit(X, y)
    np.testing.assert_array_equal(adam.model_.A.toarray(), gradient.model_.A.toarray())
    np.testing.assert_array_equal(adam.predict(X), gradient.predict(X))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_gradient_solvers_watch_the_eval_set(sine):
    X, y, X_val, y_val = sine
    reg = ImplicitRegressor(n_states=6, max_epochs=8, random_state=0).fit(X, y, eval_set=(X_val, y_val))
    assert len(reg.validation_loss_curve_) == reg.n_iter_
    # the best epoch's weights are restored: its validation loss is the eval set's MSE (standardized units)
    mse = np.mean(((reg.predict(X_val) - y_val) / reg.target_scale_[0]) ** 2)
    assert reg.best_loss_ == pytest.approx(mse, rel=1e-4)
    assert min(reg.validation_loss_curve_) == reg.best_loss_


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (dict(type_of_training="three_loops"), "type_of_training"),
        (dict(rounds=0), "rounds"),
        (dict(dual_learning_rate=-1.0), "dual_learning_rate"),
        (dict(tol_fenchel=float("nan")), "tol_fenchel"),
        (dict(starting_lambda=-0.5), "starting_lambda"),
        (dict(activation="tanh"), "tanh"),
        (dict(activation="leaky_relu(1.5)"), "leaky_relu"),
        (dict(group_lasso=0.1), "group_lasso"),
        (dict(robustness=0.1), "robustness"),
    ],
)
def test_bad_bcd_parameters_are_refused(sine, options, words):
    X, y, _, _ = sine
    with pytest.raises(ArgumentValueError, match=words):
        ImplicitRegressor(solver="bcd", **options).fit(X, y)


def test_malformed_eval_set_is_refused(sine):
    X, y, X_val, y_val = sine
    with pytest.raises(ShapeError, match="eval_set"):
        ImplicitRegressor(solver="bcd", rounds=1).fit(X, y, eval_set=(X_val, y_val[:5]))
    with pytest.raises(ShapeError, match="eval_set"):
        ImplicitRegressor(solver="bcd", rounds=1).fit(X, y, eval_set=X_val)


def test_plot_draws_the_history_and_never_overwrites(tmp_path, sine):
    X, y, X_val, y_val = sine
    reg = ImplicitRegressor(n_states=5, solver="bcd", rounds=3, random_state=0).fit(X, y, eval_set=(X_val, y_val))
    path = plot_bcd_history(reg.history_, tmp_path / "history.png")
    with Image.open(path) as image:
        assert image.size == (1500, 600)
    before = path.read_bytes()
    with pytest.raises(OverwriteError):
        plot_bcd_history(reg.history_, path)
    assert path.read_bytes() == before
    plot_bcd_history(reg.history_, path, overwrite=True, title="again")
    with pytest.raises(ArgumentValueError):
        plot_bcd_history(bcd.BCDHistory("one_loop"), tmp_path / "empty.png")


# scikit-learn's suite with solver="bcd" (as tests/test_training_estimators.py does for Adam; the one
# check left out there, check_array_api_input, is left out here for the same reason).
BCD_QUICK = dict(n_states=8, solver="bcd", rounds=3, max_epochs=30, random_state=0)
_ALL_CHECKS = parametrize_with_checks([ImplicitRegressor(**BCD_QUICK), ImplicitClassifier(**BCD_QUICK)])
_CHECKS = [
    (estimator, check) for estimator, check in _ALL_CHECKS.args[1] if check.func.__name__ != "check_array_api_input"
]


@pytest.mark.parametrize(_ALL_CHECKS.args[0], _CHECKS, ids=_ALL_CHECKS.kwargs["ids"])
def test_sklearn_compatible_with_bcd(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


def test_bcd_fine_tunes_an_init_model_on_its_pattern(sine):
    """init_model's sparsity pattern is kept: entries outside it stay zero, the fit improves."""
    X, y, X_val, y_val = sine
    rng = np.random.default_rng(11)
    A = np.where(rng.random((10, 10)) < 0.3, rng.normal(size=(10, 10)), 0.0)
    A *= 0.5 / np.abs(A).sum(axis=1).max()
    B = np.where(rng.random((10, 1)) < 0.7, rng.normal(size=(10, 1)), 0.0)
    start = ImplicitModel.from_matrices(A, B, rng.normal(size=(1, 10)), np.zeros((1, 1)), "relu", rng.normal(size=10))
    before = ImplicitRegressor.from_model(start).score(X_val, y_val)
    reg = ImplicitRegressor(solver="bcd", rounds=5, init_model=start, random_state=0).fit(X, y)
    for name in "AB":
        trained, initial = getattr(reg.model_, name).toarray(), getattr(start, name).toarray()
        assert not trained[initial == 0].any()
    assert reg.score(X_val, y_val) > max(before, 0.5)
    # the weights trained are the model's: the history's last training loss is model_'s own
    residual = (reg.predict(X) - y) / reg.target_scale_[0]
    assert reg.history_.equilibrium_loss[-1] == pytest.approx(0.5 * np.mean(residual**2), rel=1e-6)


def test_regressor_bcd_trains_leaky_relu_models(sine):
    X, y, X_val, y_val = sine
    reg = ImplicitRegressor(n_states=15, solver="bcd", activation="leaky_relu(0.1)", rounds=10, random_state=0)
    reg.fit(X, y, eval_set=(X_val, y_val))
    assert reg.model_.blocks[0].activation.alpha == pytest.approx(0.1)
    assert reg.score(X_val, y_val) > 0.9
    assert reg.relaxation_gap_ < 0.2
    residual = (reg.predict(X_val) - y_val) / reg.target_scale_[0]
    assert reg.history_.eval_loss[-1] == pytest.approx(0.5 * np.mean(residual**2), rel=1e-6)


def test_bcd_without_feedthrough_keeps_d_at_zero(sine):
    X, y, X_val, y_val = sine
    reg = ImplicitRegressor(n_states=10, solver="bcd", feedthrough=False, rounds=3, random_state=0).fit(X, y)
    assert not reg.model_.D.toarray().any()
    assert reg.score(X_val, y_val) > 0.5


def test_bcd_selects_features_with_exact_zero_columns():
    """y depends on 2 of 8 inputs; with column_linf the hidden step's prox (a proximal gradient
    step of step 1 / L_hid) leaves most other columns of B exactly zero (5 of 6 here), keeps the
    two that matter, and without it no column is zero."""
    rng = np.random.default_rng(19)
    X = rng.normal(size=(300, 8))
    y = np.sin(X[:, 0]) + 0.5 * X[:, 3]
    options = dict(n_states=8, solver="bcd", rounds=6, feedthrough=False, random_state=0)
    plain = ImplicitRegressor(**options).fit(X, y)
    selected = ImplicitRegressor(column_linf=0.05, **options).fit(X, y)
    zero = ~selected.model_.B.toarray().any(axis=0)
    assert zero[[1, 2, 4, 5, 6, 7]].sum() >= 4 and not zero[[0, 3]].any()
    assert plain.model_.B.toarray().any(axis=0).all()
