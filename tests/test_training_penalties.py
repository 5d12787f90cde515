"""The feature-selection penalty sum_j ||B e_j||_inf with its prox, and the robustness penalty
(||B||_inf^2 + ||C||_inf^2) / (2 (1 - ||A||_inf)) + ||D||_inf: each against a brute-force solve or
a numpy closed form, gradients against finite differences; and their use by the estimators."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import contractive_matrix
from scipy.optimize import minimize_scalar

from implicit_compiler import ImplicitModel, NotWellPosedError
from implicit_compiler.errors import ArgumentTypeError, ArgumentValueError
from implicit_compiler.training import (
    ImplicitModule,
    column_linf_norms,
    column_linf_penalty,
    norm_sensitivity_bound,
    prox_column_linf,
    prox_column_linf_,
    robustness_penalty,
)
from implicit_compiler.training.estimators import ImplicitRegressor

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # short trainings


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brute_force_prox_linf(v: np.ndarray, t: float) -> np.ndarray:
    """argmin_x 1/2 ||x - v||^2 + t ||x||_inf by a 1-D search over the level s = ||x||_inf: for a
    fixed s the best x is v clipped to [-s, s], so minimise 1/2 sum (|v_i| - s)_+^2 + t s."""

    def objective(level: float) -> float:
        return 0.5 * np.sum(np.maximum(np.abs(v) - level, 0.0) ** 2) + t * level

    top = float(np.abs(v).max())
    level = minimize_scalar(objective, bounds=(0.0, top), method="bounded", options={"xatol": 1e-13}).x
    level = 0.0 if objective(0.0) <= objective(level) else level
    return np.clip(v, -level, level)


def sparse_module(rng, n=7, p=5, q=3, density=0.6) -> ImplicitModule:
    B = sp.random_array((n, p), density=density, rng=rng, format="csr")
    B.data = rng.normal(size=B.nnz)
    model = ImplicitModel.from_matrices(
        contractive_matrix(rng, n, 0.6), B, rng.normal(size=(q, n)), rng.normal(size=(q, p)), "relu"
    )
    return model.to_torch()


# ---------------------------------------------------------------------------- column l_inf
@pytest.mark.parametrize("seed", range(5))
def test_prox_column_linf_matches_a_brute_force_solve(seed):
    rng = np.random.default_rng(seed)
    V = rng.normal(size=(6, 9)) * rng.uniform(0.05, 2.0, size=9)  # columns of every size
    t = 1.3
    X = prox_column_linf(V, t)
    for j in range(V.shape[1]):
        np.testing.assert_allclose(X[:, j], brute_force_prox_linf(V[:, j], t), atol=1e-9)
        # optimality: v - x lies in t * (subdifferential of ||.||_inf at x)
        residual = V[:, j] - X[:, j]
        assert np.abs(residual).sum() == pytest.approx(min(t, np.abs(V[:, j]).sum()), rel=1e-12)
        if X[:, j].any():
            level = np.abs(X[:, j]).max()
            off_top = np.abs(X[:, j]) < level * (1 - 1e-12)
            assert np.all(residual[off_top] == 0)
            assert np.all(residual[~off_top] * X[~off_top, j] >= 0)  # same signs
    torch_result = prox_column_linf(torch.tensor(V), t)
    np.testing.assert_array_equal(torch_result.numpy(), X)


def test_prox_column_linf_gives_exact_zeros_inside_the_l1_ball():
    rng = np.random.default_rng(3)
    V = rng.normal(size=(5, 6))
    V[:, 1] *= 0.1 / np.abs(V[:, 1]).sum()  # ||v||_1 = 0.1 < t
    V[:, 4] = [0.25, -0.5, 0.125, 0.0, -0.125]  # ||v||_1 = 1.0 = t exactly (binary fractions)
    X = prox_column_linf(V, 1.0)
    assert np.all(X[:, [1, 4]] == 0.0)  # exact, not small
    outside = np.abs(V).sum(axis=0) > 1.0
    assert np.all(X[:, outside].any(axis=0))
    np.testing.assert_array_equal(prox_column_linf(V, 0.0), V)  # step 0: the identity


def test_prox_column_linf_in_place_on_a_sparse_pattern():
    rng = np.random.default_rng(4)
    module = sparse_module(rng)
    before = module.to_model().B
    dense = before.toarray()
    t = float(np.median(np.abs(dense).sum(axis=0)))  # some columns inside the ball, some outside
    kept = prox_column_linf_(module, t)
    after = module.to_model().B
    assert np.array_equal(after.indices, before.indices) and np.array_equal(after.indptr, before.indptr)
    for j in range(dense.shape[1]):
        np.testing.assert_allclose(after.toarray()[:, j], brute_force_prox_linf(dense[:, j], t), atol=1e-9)
    l1 = np.abs(dense).sum(axis=0)
    assert kept.tolist() == (l1 > t).tolist() and 0 < int(kept.sum()) < len(kept)
    assert np.all(after.toarray()[:, ~kept.numpy()] == 0.0)


def test_column_linf_penalty_and_its_gradient_against_numpy():
    rng = np.random.default_rng(5)
    module = sparse_module(rng)
    B = module.to_model().B
    expected_norms = np.abs(B.toarray()).max(axis=0)
    for form in (module, module.B, module.dense("B"), B, B.toarray()):
        norms = column_linf_norms(form)
        norms = norms.detach().numpy() if torch.is_tensor(norms) else norms
        np.testing.assert_array_equal(norms, expected_norms)
        value = column_linf_penalty(form)
        assert float(value.detach() if torch.is_tensor(value) else value) == pytest.approx(
            expected_norms.sum(), rel=1e-14
        )
    column_linf_penalty(module).backward()
    dense = B.toarray()
    rows, columns = B.nonzero()
    top = np.abs(dense).argmax(axis=0)
    expected_grad = np.where(top[columns] == rows, np.sign(dense[rows, columns]), 0.0)
    np.testing.assert_array_equal(module.B_values.grad.numpy(), expected_grad)  # CSR order = nonzero() order


def test_prox_steps_are_checked():
    module = sparse_module(np.random.default_rng(0))
    with pytest.raises(ArgumentValueError, match="step"):
        prox_column_linf_(module, -0.1)
    with pytest.raises(ArgumentTypeError, match="step"):
        prox_column_linf(np.eye(3), "0.1")
    with pytest.raises(ArgumentValueError, match="step"):
        prox_column_linf(np.eye(3), float("inf"))


# ---------------------------------------------------------------------------- robustness
def numpy_robustness(A, B, C, D) -> float:
    norm = {name: np.linalg.norm(M, np.inf) for name, M in zip("ABCD", (A, B, C, D))}  # max row l1 sum
    return (norm["B"] ** 2 + norm["C"] ** 2) / (2 * (1 - norm["A"])) + norm["D"]


def test_robustness_penalty_matches_the_closed_form():
    rng = np.random.default_rng(6)
    module = sparse_module(rng)
    model = module.to_model()
    matrices = [getattr(model, name).toarray() for name in "ABCD"]
    expected = numpy_robustness(*matrices)
    assert float(robustness_penalty(module).detach()) == pytest.approx(expected, rel=1e-14)
    assert robustness_penalty(*matrices) == pytest.approx(expected, rel=1e-14)
    assert float(robustness_penalty(*map(torch.tensor, matrices))) == pytest.approx(expected, rel=1e-14)
    # for relu (1-Lipschitz) it bounds the norm bound on the Lipschitz constant (AM-GM on ||B|| ||C||)
    assert expected >= float(norm_sensitivity_bound(module).detach())


def test_robustness_penalty_gradient_matches_finite_differences():
    rng = np.random.default_rng(7)
    matrices = (
        contractive_matrix(rng, 5, 0.7),
        rng.normal(size=(5, 4)),
        rng.normal(size=(3, 5)),
        rng.normal(size=(3, 4)),
    )
    tensors = tuple(torch.tensor(M, requires_grad=True) for M in matrices)
    assert torch.autograd.gradcheck(robustness_penalty, tensors, eps=1e-7, atol=1e-7, rtol=1e-6)
    # the module form differentiates in the stored values: central differences, entry by entry
    module = sparse_module(rng)
    robustness_penalty(module).backward()
    for name in ("A_values", "B_values", "C_values", "D_values"):
        values = getattr(module, name)
        numeric = np.empty(values.numel())
        for k in range(values.numel()):
            with torch.no_grad():
                values[k] += 1e-6
                plus = float(robustness_penalty(module))
                values[k] -= 2e-6
                minus = float(robustness_penalty(module))
                values[k] += 1e-6
            numeric[k] = (plus - minus) / 2e-6
        np.testing.assert_allclose(values.grad.numpy(), numeric, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("norm", [1.0, 1.5])
def test_robustness_penalty_refuses_an_ill_posed_a(norm):
    rng = np.random.default_rng(8)
    A = contractive_matrix(rng, 4, norm)
    A *= norm / np.abs(A).sum(axis=1).max()
    B, C, D = rng.normal(size=(4, 2)), rng.normal(size=(2, 4)), np.zeros((2, 2))
    with pytest.raises(NotWellPosedError, match="project"):
        robustness_penalty(A, B, C, D)
    with pytest.raises(NotWellPosedError, match=r"\|\|A\|\|_inf < 1"):
        robustness_penalty(ImplicitModel.from_matrices(A, B, C, D, "relu").to_torch())
    with pytest.raises(ArgumentValueError, match="robustness_penalty"):
        robustness_penalty(A, B)


# ---------------------------------------------------------------------------- estimators
def test_column_linf_selects_features_with_exact_zeros():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 8))
    y = np.maximum(X[:, 0] + X[:, 1], 0) - X[:, 2]  # only the first three features matter
    common = dict(n_states=6, feedthrough=False, early_stopping=False, random_state=0)
    control = ImplicitRegressor(**common, max_epochs=40, batch_size=50, n_iter_no_change=40).fit(X, y)
    assert np.all(np.abs(control.model_.B.toarray()).max(axis=0) > 0)  # no column is zero without it
    # proximal gradient steps (full-batch SGD, then the prox) from the control
    steps = dict(solver="sgd", learning_rate=0.5, batch_size=200, max_epochs=100, n_iter_no_change=100)
    selected = ImplicitRegressor(**common, **steps, column_linf=0.12, init_model=control.model_).fit(X, y)
    norms = np.abs(selected.model_.B.toarray()).max(axis=0)
    assert norms[:3].min() > 0.1  # the used inputs stay
    assert (norms[3:] == 0.0).sum() >= 3 and norms[3:].max() < 0.01  # the unused ones go, most exactly
    assert selected.score(X, y) > 0.6  # shrunk (no refit), but still a fit
    continued = ImplicitRegressor(**common, **steps, init_model=control.model_).fit(X, y)
    unpenalized = np.abs(continued.model_.B.toarray()).max(axis=0)
    assert np.all(unpenalized > 0) and unpenalized[3:].max() > 0.1  # the steps alone zero nothing


def test_robustness_penalty_lowers_the_bound_of_the_fitted_model():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(200, 4))
    y = np.sin(X[:, 0]) + X[:, 1] * X[:, 2]
    common = dict(n_states=8, max_epochs=30, early_stopping=False, random_state=0)
    plain = ImplicitRegressor(**common).fit(X, y)
    robust = ImplicitRegressor(**common, robustness=0.1).fit(X, y)

    def penalty(estimator):  # in the standardized coordinates the penalty was trained in
        model = estimator.model_
        scale, target = estimator.input_scale_, estimator.target_scale_
        B = model.B.toarray() * scale
        C = model.C.toarray() / target[:, None]
        D = model.D.toarray() * scale / target[:, None]
        return numpy_robustness(model.A.toarray(), B, C, D)

    assert penalty(robust) < 0.5 * penalty(plain)
    with pytest.raises(ValueError, match="robustness"):
        ImplicitRegressor(robustness=-1.0).fit(X, y)
    with pytest.raises(ValueError, match="column_linf"):
        ImplicitRegressor(column_linf=-1.0).fit(X, y)
