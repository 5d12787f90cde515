"""sparse_attack: exact on linear models (brute force over sign patterns), better than random on an MLP."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp

from implicit_compiler import ImplicitModel, StateBlock, TensorSpec
from implicit_compiler.analysis import AttackResult, sensitivity, sparse_attack
from implicit_compiler.errors import AnalysisError


def build(A, activation, p, q, seed=0, input_shape=None, B=None, C=None, D=None) -> ImplicitModel:
    rng = np.random.default_rng(seed)
    n = A.shape[0]
    B = rng.normal(size=(n, p)) if B is None else B
    C = rng.normal(size=(q, n)) if C is None else C
    D = rng.normal(size=(q, p)) if D is None else D
    return ImplicitModel(
        sp.csr_array(A), B, C, D, rng.normal(size=n), rng.normal(size=q),
        (StateBlock("x", 0, n, activation, (n,)),), (TensorSpec("u", input_shape or (p,)),), (TensorSpec("y", (q,)),),
    )  # fmt: skip


def contractive(rng, n, radius):
    magnitude = rng.uniform(0.1, 1.0, size=(n, n))
    magnitude *= radius / np.abs(np.linalg.eigvals(magnitude)).max()
    return magnitude * rng.choice([-1.0, 1.0], size=(n, n))


def objective(target, reference, q):
    c = np.zeros(q)
    c[target] = 1.0
    if reference is not None:
        c[reference] = -1.0
    return c


def linear_reference(model: ImplicitModel):
    """For identity activation: the Jacobian J and S = |C| (I - |A|)^{-1} |B| + |D|, densely."""
    A, B, C, D = (m.toarray() for m in (model.A, model.B, model.C, model.D))
    J = C @ np.linalg.solve(np.eye(model.n) - A, B) + D
    S = np.abs(C) @ np.linalg.inv(np.eye(model.n) - np.abs(A)) @ np.abs(B) + np.abs(D)
    return J, S


def check_constraints(result: AttackResult, u0, k, sigma, bounds=None):
    delta = result.perturbation.reshape(-1)
    sigma = np.broadcast_to(sigma, delta.shape)
    assert result.support.size <= k
    outside = np.setdiff1d(np.arange(delta.size), result.support)
    assert (delta[outside] == 0).all()
    assert (np.abs(delta) <= sigma + 1e-12).all()
    np.testing.assert_array_equal(result.perturbed_input, u0 + result.perturbation)
    if bounds is not None:
        lo, hi = (np.broadcast_to(b, delta.shape) for b in bounds)
        moved = np.asarray(result.perturbed_input).reshape(-1)[result.support]
        assert (moved >= lo[result.support] - 1e-12).all() and (moved <= hi[result.support] + 1e-12).all()


@pytest.mark.parametrize("reference", [None, 0], ids=["target-only", "with-reference"])
@pytest.mark.parametrize("k", [1, 3, 6, 9], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("sigma_kind", ["scalar", "per-input"])
@pytest.mark.parametrize("with_bounds", [False, True], ids=["unbounded", "input-bounds"])
def test_linear_model_is_exact_and_optimal(rng, reference, k, sigma_kind, with_bounds):
    p, q = 6, 3
    model = build(contractive(rng, 5, 0.5), "identity", p, q)
    J, S = linear_reference(model)
    target = 2
    c = objective(target, reference, q)
    u0 = rng.uniform(-0.5, 0.5, p)
    sigma = 0.3 if sigma_kind == "scalar" else rng.uniform(0.1, 0.5, p)
    bounds = (-0.6, rng.uniform(0.4, 0.7, p)) if with_bounds else None
    result = sparse_attack(model, u0, target, k, sigma, reference=reference, input_bounds=bounds)
    check_constraints(result, u0, k, sigma, bounds)

    # the support: the top-k of |c| S, computed densely
    scores = np.abs(c) @ S
    assert sorted(result.support.tolist()) == sorted(np.argsort(-scores)[: min(k, p)].tolist())
    # the best over all sign patterns (corners of the allowed box) on that support
    g = J.T @ c
    radius = np.broadcast_to(sigma, (p,))
    lower, upper = -radius, radius.copy()
    if bounds is not None:
        lower, upper = np.maximum(lower, bounds[0] - u0), np.minimum(upper, bounds[1] - u0)
    best = max(
        sum(g[j] * (upper[j] if s > 0 else lower[j]) for j, s in zip(result.support, signs))
        for signs in itertools.product([-1, 1], repeat=result.support.size)
    )
    assert result.predicted_change == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert result.actual_change == pytest.approx(best, rel=1e-8, abs=1e-10)
    y0 = model.predict(u0, tol=1e-14)
    np.testing.assert_allclose(result.y_clean, y0, rtol=1e-9)
    np.testing.assert_allclose(result.y_perturbed, model.predict(u0 + result.perturbation, tol=1e-14), rtol=1e-9)
    assert "Optimal" in result.lp_status and result.support_rule == "sensitivity"


def mlp_gradient(mlp, u, c):
    """g = J^T c for the numpy MLP at u (chain rule with relu masks)."""
    h1 = u @ mlp.W1.T + mlp.b1
    h2 = np.maximum(h1, 0) @ mlp.W2.T + mlp.b2
    J = mlp.W3 @ np.diag(h2 > 0) @ mlp.W2 @ np.diag(h1 > 0) @ mlp.W1
    return J.T @ c


@pytest.mark.parametrize("seed", range(5), ids=lambda s: f"sample{s}")
def test_relu_mlp_beats_random_sparse_perturbations(mlp, seed):
    rng = np.random.default_rng(100 + seed)
    model = mlp.implicit()
    u0 = rng.normal(size=6)
    logits = mlp.forward(u0[None])[0]
    reference, target = np.argsort(-logits)[:2]  # true = top class, target = runner-up
    k, sigma = 2, 0.5
    result = sparse_attack(model, u0, int(target), k, sigma, reference=int(reference))
    check_constraints(result, u0, k, sigma)
    c = objective(target, reference, 3)
    f = lambda u: mlp.forward(u) @ c
    assert result.actual_change == pytest.approx(float(f(result.perturbed_input[None])[0] - f(u0[None])[0]))
    assert result.predicted_change == pytest.approx(mlp_gradient(mlp, u0, c) @ result.perturbation, rel=1e-9)
    random = []
    for _ in range(50):
        delta = np.zeros(6)
        support = rng.choice(6, k, replace=False)
        delta[support] = rng.choice([-sigma, sigma], size=k)
        random.append(float(f((u0 + delta)[None])[0] - f(u0[None])[0]))
    assert result.actual_change >= np.median(random)


def test_tanh_loop_prediction_matches_finite_differences(rng):
    """Cyclic tanh model: g . delta agrees with central differences of the model along delta."""
    model = build(contractive(rng, 6, 0.8), "tanh", 5, 3)
    u0 = rng.normal(size=5)
    result = sparse_attack(model, u0, 1, 3, 1e-4, reference=2)
    c = objective(1, 2, 3)
    delta = result.perturbation
    central = (model.predict(u0 + delta, tol=1e-14) - model.predict(u0 - delta, tol=1e-14)) @ c / 2
    assert result.predicted_change == pytest.approx(central, rel=1e-6)
    assert result.actual_change == pytest.approx(result.predicted_change, rel=1e-3)


def test_square_model_falls_back_to_gradient_scores(rng):
    """x = (B u + b)^2: no valid sensitivity, the support is the top-k of |g|, g computed by hand."""
    p, q, n = 6, 2, 4
    model = build(np.zeros((n, n)), "square", p, q, D=np.zeros((q, p)))
    assert not sensitivity(model).valid
    u0 = rng.normal(size=p)
    result = sparse_attack(model, u0, 0, 2, 0.01)
    z = model.B.toarray() @ u0 + model.bias_x
    g = model.B.toarray().T @ (2 * z * model.C.toarray()[0])
    assert result.support_rule == "gradient"
    assert sorted(result.support.tolist()) == sorted(np.argsort(-np.abs(g))[:2].tolist())
    assert result.predicted_change == pytest.approx(np.abs(g[result.support]).sum() * 0.01, rel=1e-10)


def test_precomputed_sensitivity_gives_the_same_attack(rng):
    model = build(contractive(rng, 5, 0.5), "relu", 6, 3)
    u0 = rng.normal(size=6)
    fresh = sparse_attack(model, u0, 0, 3, 0.2, reference=1)
    reused = sparse_attack(model, u0, 0, 3, 0.2, reference=1, sensitivity_report=sensitivity(model))
    np.testing.assert_array_equal(fresh.perturbation, reused.perturbation)


def test_sample_shaped_input(rng):
    model = build(contractive(rng, 4, 0.5), "relu", 6, 2, input_shape=(2, 3))
    u0 = rng.normal(size=(2, 3))
    result = sparse_attack(model, u0, 1, 2, 0.1, reference=0)
    assert result.perturbation.shape == result.perturbed_input.shape == (2, 3)
    assert result.y_clean.shape == result.y_perturbed.shape == (2,)
    flat = sparse_attack(model, u0.reshape(6), 1, 2, 0.1, reference=0)
    assert flat.perturbation.shape == (6,)
    np.testing.assert_array_equal(flat.perturbation, result.perturbation.reshape(6))


def test_output_that_no_input_reaches_gives_an_empty_support(rng):
    C = np.zeros((2, 4))
    C[1] = 1.0
    model = build(contractive(rng, 4, 0.5), "relu", 3, 2, C=C, D=np.zeros((2, 3)))
    result = sparse_attack(model, rng.normal(size=3), 0, 2, 0.5)
    assert result.support.size == 0 and (result.perturbation == 0).all()
    assert result.predicted_change == 0 and result.actual_change == 0
    assert "empty support" in result.lp_status


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": 3}, "target"),
        ({"target": -1}, "target"),
        ({"reference": 5}, "reference"),
        ({"target": 1, "reference": 1}, "differ"),
        ({"k": 0}, "k"),
        ({"k": 1.5}, "k"),
        ({"sigma": -0.1}, "nonnegative"),
        ({"sigma": np.ones(4)}, "shape"),
        ({"u0": np.zeros((2, 6))}, "one sample"),
        ({"input_bounds": (2.0, 3.0), "sigma": 0.1}, "input_bounds"),
        ({"input_bounds": (0.0, 1.0, 2.0)}, "pair"),
    ],
    ids=[
        "target-too-big",
        "target-negative",
        "reference-too-big",
        "same-indices",
        "k-zero",
        "k-fraction",
        "negative-sigma",
        "sigma-shape",
        "batch",
        "unreachable-bounds",
        "bounds-not-a-pair",
    ],
)
def test_bad_arguments(rng, kwargs, message):
    model = build(contractive(rng, 4, 0.5), "relu", 6, 3)
    arguments = {"u0": np.zeros(6), "target": 1, "k": 2, "sigma": 0.1, "reference": None} | kwargs
    with pytest.raises(AnalysisError, match=message):
        sparse_attack(model, **arguments)


def test_report_of_another_model_is_refused(rng):
    model = build(contractive(rng, 4, 0.5), "relu", 6, 3)
    other = build(contractive(rng, 4, 0.5), "relu", 5, 3)
    with pytest.raises(AnalysisError, match="sensitivity_report"):
        sparse_attack(model, np.zeros(6), 0, 2, 0.1, sensitivity_report=sensitivity(other))


def test_iterative_path_gives_the_same_gradient(rng, monkeypatch):
    """With loops solved by GMRES, the linear model's predicted change is still g . delta (dense g)."""
    from implicit_compiler.analysis import _block_solve

    monkeypatch.setattr(_block_solve, "DIRECT_LIMIT", 0)
    model = build(contractive(rng, 5, 0.7), "identity", 6, 3)
    J, _ = linear_reference(model)
    result = sparse_attack(model, rng.normal(size=6), 1, 4, 0.2, reference=2)
    g = J.T @ objective(1, 2, 3)
    assert result.predicted_change == pytest.approx(g @ result.perturbation, rel=1e-9)
    assert result.predicted_change == pytest.approx(0.2 * np.abs(g[result.support]).sum(), rel=1e-9)


# ----------------------------------------------------------------------------- the relaxed program
@pytest.mark.parametrize("seed", range(4), ids=lambda s: f"sample{s}")
def test_relaxed_program_bounds_every_perturbation_of_its_support(mlp, seed):
    """lp='relaxed': its upper_bound is above f's change at every corner and at random points
    of the support's box (numpy's forward pass, not ours); lp='auto' is at least as strong as
    the linearized attack."""
    rng = np.random.default_rng(200 + seed)
    model = mlp.implicit()
    u0 = rng.normal(size=6)
    logits = mlp.forward(u0[None])[0]
    reference, target = (int(i) for i in np.argsort(-logits)[:2])
    k, sigma = 3, 0.6
    relaxed = sparse_attack(model, u0, target, k, sigma, reference=reference, lp="relaxed")
    check_constraints(relaxed, u0, k, sigma)
    assert relaxed.lp == "relaxed"
    c = objective(target, reference, 3)
    f = lambda u: mlp.forward(np.atleast_2d(u)) @ c
    support = relaxed.support
    deltas = np.zeros((2**k + 500, 6))
    deltas[: 2**k, support] = np.array(list(itertools.product([-sigma, sigma], repeat=k)))
    deltas[2**k :, support] = rng.uniform(-sigma, sigma, size=(500, k))
    changes = f(u0 + deltas) - f(u0)
    assert changes.max() <= relaxed.upper_bound + 1e-6
    assert relaxed.actual_change == pytest.approx(float((f(relaxed.perturbed_input) - f(u0))[0]))
    linearized = sparse_attack(model, u0, target, k, sigma, reference=reference)
    best = sparse_attack(model, u0, target, k, sigma, reference=reference, lp="auto")
    assert linearized.upper_bound is None and linearized.lp == "linearized"
    assert best.actual_change >= linearized.actual_change - 1e-12
    assert best.actual_change <= best.upper_bound + 1e-6


def test_relaxed_program_is_exact_on_a_linear_model(rng):
    model = build(contractive(rng, 5, 0.5), "identity", 6, 3)
    u0 = rng.normal(size=6)
    result = sparse_attack(model, u0, 1, 3, 0.4, reference=0, lp="relaxed")
    assert result.upper_bound == pytest.approx(result.actual_change, rel=1e-6, abs=1e-9)
    linearized = sparse_attack(model, u0, 1, 3, 0.4, reference=0)
    assert result.actual_change == pytest.approx(linearized.actual_change, rel=1e-9)


def test_lp_argument_is_checked(rng):
    model = build(contractive(rng, 5, 0.5), "relu", 6, 3)
    from implicit_compiler.errors import ArgumentValueError

    with pytest.raises(ArgumentValueError, match="lp: expected one of linearized, relaxed, auto"):
        sparse_attack(model, np.zeros(6), 1, 2, 0.1, lp="exact")
