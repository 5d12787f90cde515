"""rescale: same predictions, ||A'||_inf < 1, the right errors; v checked against a dense solve."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import model_with_blocks

import implicit_compiler as ic
from implicit_compiler import ImplicitModel
from implicit_compiler.analysis import rescale, rescaling_diagonal
from implicit_compiler.errors import AnalysisError

build = model_with_blocks


def wild_similarity(rng, n, radius, spread=4.0):
    """D0^{-1} A0 D0 with lambda_pf(|A0|) = radius and D0 spanning e^-spread .. e^spread."""
    A0 = rng.uniform(0.1, 1.0, size=(n, n)) * rng.choice([-1.0, 1.0], size=(n, n))
    A0 *= radius / np.abs(np.linalg.eigvals(np.abs(A0))).max()
    scaling = np.exp(rng.uniform(-spread, spread, n))
    return A0 * scaling[None, :] / scaling[:, None]


def inf_norm(model: ImplicitModel) -> float:
    return float(np.abs(model.A.toarray()).sum(axis=1).max())


@pytest.mark.parametrize("activation", ["relu", "leaky_relu(0.1)", "identity"])
@pytest.mark.parametrize("radius", [0.3, 0.9])
def test_cyclic_model_same_predictions_and_norm_below_one(rng, activation, radius):
    A = wild_similarity(rng, 7, radius)
    model = build(A, [("loop", 7, activation)])
    assert inf_norm(model) > 5
    rescaled = rescale(model)
    assert inf_norm(rescaled) < 1
    u = rng.normal(size=(20, 3))
    assert np.allclose(rescaled.predict(u, tol=1e-14), model.predict(u, tol=1e-14), rtol=1e-10, atol=1e-10)


def test_linear_model_matches_the_closed_form(rng):
    """identity: y = C (I - A)^{-1} (B u + b_x) + D u + b_y, computed densely by numpy."""
    A = wild_similarity(rng, 6, 0.8)
    model = build(A, [("x", 6, "identity")])
    u = rng.normal(size=(10, 3))
    B, C, D = (m.toarray() for m in (model.B, model.C, model.D))
    x = np.linalg.solve(np.eye(6) - A, B @ u.T + model.bias_x[:, None])
    expected = (C @ x + D @ u.T + model.bias_y[:, None]).T
    assert np.allclose(rescale(model).predict(u, tol=1e-14), expected, rtol=1e-10, atol=1e-10)


def test_mlp_matches_numpy_forward(mlp, rng):
    """An acyclic model with ||A||_inf > 1 (lambda_pf = 0): rho = 1/2, predictions as the numpy MLP."""
    model = mlp.implicit()
    assert inf_norm(model) > 1
    rescaled = rescale(model)
    assert inf_norm(rescaled) < 0.5
    u = rng.normal(size=(30, 6))
    assert np.allclose(rescaled.predict(u), mlp.forward(u), rtol=1e-10, atol=1e-10)


def test_mixed_acyclic_and_cyclic_blocks(rng):
    """in (relu) -> loop (leaky_relu, wild scaling) -> out (relu), with big feedforward weights."""
    n = 3 + 5 + 2
    A = np.zeros((n, n))
    A[3:8, 0:3] = rng.normal(size=(5, 3)) * 10
    A[3:8, 3:8] = wild_similarity(rng, 5, 0.7)
    A[8:10, 3:8] = rng.normal(size=(2, 5)) * 10
    model = build(A, [("in", 3, "relu"), ("loop", 5, "leaky_relu(0.2)"), ("out", 2, "relu")])
    rescaled = rescale(model)
    assert inf_norm(rescaled) < 1
    u = rng.normal(size=(25, 3))
    assert np.allclose(rescaled.predict(u, tol=1e-14), model.predict(u, tol=1e-14), rtol=1e-10, atol=1e-10)


def test_structure_is_kept(rng):
    model = build(wild_similarity(rng, 4, 0.5), [("a", 1, "relu"), ("b", 3, "identity")])
    rescaled = rescale(model)
    assert rescaled.blocks == model.blocks
    assert rescaled.inputs == model.inputs and rescaled.outputs == model.outputs
    assert (rescaled.D != model.D).nnz == 0 and np.array_equal(rescaled.bias_y, model.bias_y)
    assert rescaled.dtype == model.dtype


def test_float32_model_keeps_its_dtype(rng):
    model = build(wild_similarity(rng, 5, 0.5, spread=2.0), [("x", 5, "relu")], dtype=np.float32)
    rescaled = rescale(model)
    assert rescaled.dtype == np.float32
    assert inf_norm(rescaled) < 1
    u = rng.normal(size=(8, 3)).astype(np.float32)
    assert np.allclose(rescaled.predict(u), model.predict(u), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rho", [None, 0.95], ids=["default", "rho=0.95"])
def test_rescaling_diagonal_solves_the_dense_system(rng, rho):
    """v = (I - |A|/rho)^{-1} 1 (numpy), v >= 1, and row sums of D^{-1}|A|D equal rho (1 - 1/v)."""
    A = wild_similarity(rng, 6, 0.6)
    model = build(A, [("x", 6, "relu")])
    v = rescaling_diagonal(model, rho)
    target = 0.8 if rho is None else rho  # default rho = (lambda_pf + 1) / 2 = 0.8
    expected = np.linalg.solve(np.eye(6) - np.abs(A) / target, np.ones(6))
    assert np.allclose(v, expected, rtol=1e-10)
    assert (v >= 1).all()
    row_sums = (np.abs(A) * v[None, :] / v[:, None]).sum(axis=1)
    assert np.allclose(row_sums, target * (1 - 1 / v), rtol=1e-10)
    assert inf_norm(rescale(model, rho)) < target


@pytest.mark.parametrize("rho", [0.5, 1.0, 1.5], ids=["below-radius", "one", "above-one"])
def test_rho_out_of_range(rng, rho):
    model = build(wild_similarity(rng, 4, 0.6), [("x", 4, "relu")])
    with pytest.raises(AnalysisError, match="rho"):
        rescale(model, rho)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "square"])
def test_not_positively_homogeneous_names_the_block(rng, activation):
    model = build(wild_similarity(rng, 4, 0.5), [("ok", 2, "relu"), ("bad", 2, activation)])
    with pytest.raises(AnalysisError, match=rf"'bad' \({activation}\)") as error:
        rescale(model)
    assert "'ok'" not in str(error.value)


@pytest.mark.parametrize("radius", [1.05, 1.2, 3.0], ids=["radius-1.05", "radius-1.2", "radius-3"])
def test_radius_at_least_one_is_not_well_posed(rng, radius):
    model = build(wild_similarity(rng, 5, radius), [("x", 5, "relu")])
    with pytest.raises(ic.NotWellPosedError, match="lambda_pf"):
        rescale(model)


def test_permutation_loop_is_not_well_posed():
    """A pure 3-cycle: lambda_pf(|A|) = 1 exactly."""
    A = np.roll(np.eye(3), 1, axis=1)
    with pytest.raises(ic.NotWellPosedError):
        rescale(build(A, [("x", 3, "identity")]))


def test_iterative_path_gives_the_same_rescaling(rng, monkeypatch):
    """Large loops are solved by GMRES instead of a sparse LU: same v as the dense solve."""
    from implicit_compiler.analysis import _block_solve

    A = wild_similarity(rng, 6, 0.6)
    model = build(A, [("x", 6, "relu")])
    monkeypatch.setattr(_block_solve, "DIRECT_LIMIT", 0)
    expected = np.linalg.solve(np.eye(6) - np.abs(A) / 0.8, np.ones(6))
    np.testing.assert_allclose(rescaling_diagonal(model), expected, rtol=1e-9)
