"""Frank-Wolfe over ||A||_inf <= kappa: the oracle, the gap, sparse iterates, the estimators' solver."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import LinearConstraint, minimize

from implicit_compiler import ImplicitModel
from implicit_compiler.errors import ArgumentTypeError, ArgumentValueError, ShapeError
from implicit_compiler.training import frank_wolfe as fw
from implicit_compiler.training.estimators import ImplicitClassifier, ImplicitRegressor

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # short trainings


def ball_vertices(n_rows: int, n_cols: int, kappa: float, support=None):
    """Every matrix with one entry +-kappa per row (on ``support``'s True entries when given)."""
    per_row = []
    for row in range(n_rows):
        columns = [j for j in range(n_cols) if support is None or support[row, j]]
        choices = []
        for j, sign in itertools.product(columns, (1.0, -1.0)):
            vertex = np.zeros(n_cols)
            vertex[j] = sign * kappa
            choices.append(vertex)
        per_row.append(choices or [np.zeros(n_cols)])
    for rows in itertools.product(*per_row):
        yield np.array(rows)


@pytest.mark.parametrize("seed", range(5))
def test_oracle_matches_brute_force_over_the_vertices(seed):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(3, 3))
    kappa = 0.7
    S = fw.linear_minimization_oracle(G, kappa)
    best = min(float(np.sum(G * V)) for V in ball_vertices(3, 3, kappa))
    assert np.sum(G * S) == pytest.approx(best, abs=1e-12)
    assert np.all(np.count_nonzero(S, axis=1) == 1)  # a vertex: one entry of size kappa per row
    assert np.allclose(np.abs(S).sum(axis=1), kappa)


def test_oracle_over_a_sparsity_pattern_matches_brute_force():
    rng = np.random.default_rng(7)
    support = np.tril(np.ones((4, 4), dtype=bool), k=-1)  # strictly lower triangular (row 0 stores nothing)
    G = np.where(support, rng.normal(size=(4, 4)), 0.0)
    csr = sp.csr_array(np.where(support, G + 1e-300, 0.0))  # keep every pattern entry stored
    csr.data = G[support]
    vertex_values = fw.linear_minimization_oracle(csr.data, 0.5, indptr=csr.indptr)
    S = sp.csr_array((vertex_values, csr.indices, csr.indptr), shape=(4, 4)).toarray()
    best = min(float(np.sum(G * V)) for V in ball_vertices(4, 4, 0.5, support))
    assert np.sum(G * S) == pytest.approx(best, abs=1e-12)
    assert not S[~support].any()


def test_oracle_keeps_torch_tensors_and_zero_rows():
    G = torch.tensor([[0.0, 0.0], [1.0, -3.0]], dtype=torch.float32)
    S = fw.linear_minimization_oracle(G, 0.5)
    assert isinstance(S, torch.Tensor) and S.dtype == torch.float32
    assert S.tolist() == [[0.0, 0.0], [0.0, 0.5]]  # zero gradient row: 0 (a minimizer); else -kappa sign at |G| max


def least_squares(seed: int):
    """0.5 ||A M - Y||_F^2 whose unconstrained minimizer lies well outside the ball."""
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(4, 20))
    Y = 2.0 * rng.normal(size=(3, 4)) @ M + 0.1 * rng.normal(size=(3, 20))
    return (lambda A: 0.5 * float(np.sum((A @ M - Y) ** 2))), (lambda A: (A @ M - Y) @ M.T)


def constrained_minimum(objective, gradient, kappa: float, shape) -> float:
    """min over ||A||_inf <= kappa by scipy (SLSQP on A = P - N, P, N >= 0, row sums of P + N <= kappa)."""
    size = shape[0] * shape[1]

    def split(z):
        return (z[:size] - z[size:]).reshape(shape)

    def split_gradient(z):
        G = gradient(split(z)).ravel()
        return np.concatenate([G, -G])

    row_sums = np.kron(np.eye(shape[0]), np.ones(shape[1]))  # (rows, size): row i's entries
    rows = LinearConstraint(np.hstack([row_sums, row_sums]), -np.inf, kappa)
    result = minimize(
        lambda z: objective(split(z)),
        np.full(2 * size, 1e-3),
        jac=split_gradient,
        method="SLSQP",
        bounds=[(0, None)] * (2 * size),
        constraints=rows,
        options={"ftol": 1e-11, "maxiter": 1000},
    )
    assert result.success
    return float(result.fun)


@pytest.mark.parametrize("line_search", [False, True])
def test_duality_gap_bounds_the_suboptimality_of_a_convex_problem(line_search):
    objective, gradient = least_squares(0)
    kappa = 1.0
    optimum = constrained_minimum(objective, gradient, kappa, (3, 4))
    result = fw.frank_wolfe(objective, gradient, np.zeros((3, 4)), kappa, max_iter=200, line_search=line_search)
    losses, gaps = np.array(result.history.loss), np.array(result.history.duality_gap)
    assert np.all(losses - optimum <= gaps + 1e-7 * max(1.0, optimum))
    assert losses.min() >= optimum - 1e-7 * max(1.0, optimum)  # scipy's optimum is the optimum
    assert losses[-1] - optimum < 1e-2 * (losses[0] - optimum)  # and Frank-Wolfe approaches it
    assert gaps[-1] < 0.05 * gaps[0]


def test_stops_once_the_gap_is_under_tol():
    objective, gradient = least_squares(1)
    result = fw.frank_wolfe(objective, gradient, np.zeros((3, 4)), 1.0, max_iter=500, tol=1.0, line_search=True)
    assert result.converged and result.duality_gap <= 1.0
    assert len(result.history.loss) < 500


def test_iterates_stay_in_the_ball_and_gain_at_most_one_nonzero_per_row():
    rng = np.random.default_rng(3)
    M, Y = rng.normal(size=(30, 40)), rng.normal(size=(12, 40))
    iterates = []

    def objective(A):
        iterates.append(A.copy())
        return 0.5 * float(np.sum((A @ M - Y) ** 2))

    kappa = 0.9
    fw.frank_wolfe(objective, lambda A: (A @ M - Y) @ M.T, np.zeros((12, 30)), kappa, max_iter=25)
    previous = np.zeros(12, dtype=int)
    for t, A in enumerate(iterates):
        assert np.abs(A).sum(axis=1).max() <= kappa * (1 + 1e-12)
        per_row = np.count_nonzero(A, axis=1)
        assert np.all(per_row <= previous + 1) and np.all(per_row <= t)
        previous = per_row
    assert previous.max() < 30  # sparse after 24 steps: fewer non-zeros than columns


def teacher_data(seed: int = 0, n_samples: int = 300):
    """y from a random well-posed implicit teacher (20 states, 5 inputs, 2 outputs)."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(20, 20)) * (rng.random((20, 20)) < 0.2)
    A *= 0.8 / np.abs(A).sum(axis=1).max()
    teacher = ImplicitModel.from_matrices(
        sp.csr_array(A), rng.normal(size=(20, 5)), rng.normal(size=(2, 20)) / 4, np.zeros((2, 5)), "relu"
    )
    X = rng.normal(size=(n_samples, 5))
    return X, teacher.predict(X)


@pytest.fixture
def recorded_steps(monkeypatch):
    """||A||_inf and non-zeros per row of A after every Frank-Wolfe step the estimators take."""
    records = []
    step = fw._frank_wolfe_step_

    def recording(module, kappa, indptr, gamma):
        gap = step(module, kappa, indptr, gamma)
        A = module.dense("A").detach().numpy()
        records.append((float(np.abs(A).sum(axis=1).max()), np.count_nonzero(A, axis=1)))
        return gap

    monkeypatch.setattr(fw, "_frank_wolfe_step_", recording)
    return records


@pytest.mark.parametrize("structure", ["dense", "triangular"])
def test_estimator_steps_stay_in_the_ball_and_stay_sparse(recorded_steps, structure):
    X, y = teacher_data(1, 120)
    kappa = 0.6
    ImplicitRegressor(
        solver="frank_wolfe", n_states=15, kappa=kappa, structure=structure, max_epochs=4, batch_size=40, random_state=0
    ).fit(X, y)
    assert len(recorded_steps) == 4 * 3  # 108 training rows (12 held out), 3 batches a epoch
    previous = np.zeros(15, dtype=int)
    for norm, per_row in recorded_steps:
        assert norm <= kappa * (1 + 1e-12)
        assert np.all(per_row <= previous + 1)
        previous = per_row


def test_estimator_learns_a_teacher_and_reports_gaps_and_nonzeros():
    X, y = teacher_data(0)
    X_test, y_test = teacher_data(0, 600)
    X_test, y_test = X_test[300:], y_test[300:]
    model = ImplicitRegressor(
        solver="frank_wolfe", n_states=20, max_epochs=60, batch_size=300, learning_rate=0.03, random_state=0
    ).fit(X, y)
    history = model.frank_wolfe_history_
    assert len(history.loss) == len(history.duality_gap) == len(history.nonzeros) == model.n_iter_
    assert history.loss[-1] < 0.2 * history.loss[0]
    assert model.score(X_test, y_test) > 0.8
    assert history.nonzeros[0] <= 20  # one vertex per row after the first (full-batch) step
    assert history.step_size[0] == 1.0 and history.step_size[-1] == pytest.approx(2 / (model.n_iter_ + 1))
    assert model.model_.A.toarray().__abs__().sum(axis=1).max() <= 0.95 * (1 + 1e-12)


def test_warm_start_keeps_most_of_the_given_a(recorded_steps):
    X, y = teacher_data(2, 120)
    start = ImplicitRegressor(n_states=10, max_epochs=3, random_state=0).fit(X, y).model_
    tuned = ImplicitRegressor(solver="frank_wolfe", init_model=start, max_epochs=1, batch_size=40, random_state=0)
    tuned.fit(X, y)
    # 3 steps from t = 3: gamma 2/5, 2/6, 2/7, so (3/5)(4/6)(5/7) = 2/7 of the start remains in A
    before, after = start.A.toarray(), tuned.model_.A.toarray()
    assert tuned.frank_wolfe_history_.step_size == (2 / 7,)
    assert np.all(np.count_nonzero(after, axis=1) >= np.count_nonzero(before, axis=1))  # the start is kept


def test_classifier_with_frank_wolfe():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4))
    labels = (X[:, 0] * X[:, 1] > 0).astype(int)  # XOR-like: needs the hidden states
    clf = ImplicitClassifier(solver="frank_wolfe", n_states=12, max_epochs=80, batch_size=50, random_state=0)
    assert clf.fit(X, labels).score(X, labels) > 0.85


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: fw.linear_minimization_oracle(np.ones((2, 2)), -1.0), ArgumentValueError),
        (lambda: fw.linear_minimization_oracle(np.ones((2, 2)), "0.5"), ArgumentTypeError),
        (lambda: fw.linear_minimization_oracle(np.ones(4), 0.5), ShapeError),
        (lambda: fw.linear_minimization_oracle(np.ones(4), 0.5, indptr=np.array([0, 3])), ShapeError),
        (lambda: fw.duality_gap(np.ones((2, 2)), np.ones((2, 3)), np.ones((2, 2))), ShapeError),
        (lambda: fw.standard_step_size(-1), ArgumentValueError),
        (lambda: fw.frank_wolfe(np.sum, np.sign, np.zeros((2, 2)), 1.0, max_iter=0), ArgumentValueError),
        (lambda: fw.frank_wolfe(np.sum, np.sign, np.zeros((2, 2)), 1.0, line_search="yes"), ArgumentTypeError),
        (lambda: fw.frank_wolfe(np.sum, np.sign, np.ones((2, 2)), 1.0), ArgumentValueError),  # start outside
        (lambda: fw.frank_wolfe(np.sum, np.sign, np.zeros((2, 2)), 1.0, tol=-1.0), ArgumentValueError),
        (lambda: ImplicitRegressor(solver="frank-wolfe").fit(np.ones((4, 2)), np.arange(4.0)), ArgumentValueError),
    ],
)
def test_bad_parameters_are_refused_with_typed_errors(call, error):
    with pytest.raises(error):
        call()
