"""Deep equilibrium linear models z = gamma sigma(A) z + phi(x): gradients, the optimum, the linear rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from implicit_compiler.errors import ArgumentTypeError, ArgumentValueError, ShapeError
from implicit_compiler.training import deq


def problem(seed: int = 0, m: int = 3, m_y: int = 5, n: int = 40):
    """Width m below the output dimension m_y, features of full row rank."""
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(m, m)),
        rng.normal(size=(m_y, m)),
        np.tanh(rng.normal(size=(m, n))),
        rng.normal(size=(m_y, n)),
    )


def torch_loss(A, B, Phi, Y, gamma):
    """The same loss written directly in torch (softmax over each column, a dense solve)."""
    S = torch.softmax(A, dim=0)
    Z = torch.linalg.solve(torch.eye(len(A), dtype=A.dtype) - gamma * S, Phi)
    return ((B @ Z - Y) ** 2).sum() / (2 * Phi.shape[1])


@pytest.mark.parametrize("seed", range(3))
def test_gradients_match_torch_autograd(seed):
    A, B, Phi, Y = problem(seed)
    result = deq.loss_and_gradients(A, B, Phi, Y, 0.7)
    A_t, B_t = torch.tensor(A, requires_grad=True), torch.tensor(B, requires_grad=True)
    loss = torch_loss(A_t, B_t, torch.tensor(Phi), torch.tensor(Y), 0.7)
    loss.backward()
    assert result.loss == pytest.approx(float(loss.detach()), rel=1e-12)
    np.testing.assert_allclose(result.grad_A, A_t.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.grad_B, B_t.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_equilibrium_is_the_fixed_point_of_the_layer():
    A, _, Phi, _ = problem(1)
    Z = deq.equilibrium(A, Phi, 0.9)
    S = np.exp(A) / np.exp(A).sum(axis=0)
    np.testing.assert_allclose(0.9 * S @ Z + Phi, Z, atol=1e-12)


def test_the_optimum_is_the_linear_models_and_is_reached_by_some_b():
    A, B, Phi, Y = problem(2)
    optimum = deq.optimal_loss(Phi, Y)
    assert deq.loss_and_gradients(A, B, Phi, Y, 0.5).loss >= optimum
    W = np.linalg.lstsq(Phi.T, Y.T, rcond=None)[0].T
    M = np.linalg.inv(np.eye(3) - 0.5 * np.exp(A) / np.exp(A).sum(axis=0))
    best_B = W @ np.linalg.inv(M)  # B M = W*: any A attains L*
    assert deq.loss_and_gradients(A, best_B, Phi, Y, 0.5).loss == pytest.approx(optimum, rel=1e-10)


@pytest.mark.parametrize("seed", range(5))
def test_polyak_lojasiewicz_inequality_holds(seed):
    A, B, Phi, Y = problem(seed)
    result = deq.loss_and_gradients(3 * A, B, Phi, Y, 0.8)
    squared_gradient = np.sum(result.grad_A**2) + np.sum(result.grad_B**2)
    gap = result.loss - deq.optimal_loss(Phi, Y)
    assert squared_gradient >= 2 * deq.pl_constant(3 * A, Phi, 0.8) * gap


def test_gradient_descent_converges_linearly_below_the_output_dimension():
    A, B, Phi, Y = problem(3, m=2, m_y=6)
    step_size = 1 / deq.b_smoothness(A, Phi, 0.8)
    history = deq.gradient_descent(A, B, Phi, Y, 0.8, step_size=step_size, steps=400)
    rate, r_squared, used = deq.fitted_rate(history.gap)
    assert history.gap[-1] < 1e-8 * history.gap[0]
    assert rate < 1 and r_squared > 0.98 and used > 20
    assert np.all(history.gap >= -1e-12)  # never below the optimum


def test_fitted_rate_recovers_a_geometric_sequence():
    rate, r_squared, used = deq.fitted_rate(3.0 * 0.9 ** np.arange(100))
    assert rate == pytest.approx(0.9, rel=1e-12) and r_squared == pytest.approx(1.0) and used == 100


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: deq.equilibrium(np.zeros((2, 2)), np.ones((2, 3)), 1.0), ArgumentValueError),
        (lambda: deq.equilibrium(np.zeros((2, 2)), np.ones((2, 3)), "0.5"), ArgumentTypeError),
        (lambda: deq.equilibrium(np.zeros((2, 3)), np.ones((2, 3)), 0.5), ShapeError),
        (lambda: deq.loss_and_gradients(np.zeros((2, 2)), np.ones((4, 3)), np.ones((2, 3)), np.ones((4, 3)), 0.5), ShapeError),
        (lambda: deq.gradient_descent(np.zeros((2, 2)), np.ones((1, 2)), np.ones((2, 3)), np.ones((1, 3)), 0.5, -1.0, 3), ArgumentValueError),
        (lambda: deq.gradient_descent(np.zeros((2, 2)), np.ones((1, 2)), np.ones((2, 3)), np.ones((1, 3)), 0.5, 0.1, 0), ArgumentValueError),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused_with_typed_errors(call, error):
    with pytest.raises(error):
        call()
