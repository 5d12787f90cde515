"""sensitivity and output_bounds: S against a dense numpy computation, bounds against sampling."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

import implicit_compiler as ic
from implicit_compiler import ImplicitModel, StateBlock, TensorSpec
from implicit_compiler.analysis import OutputBounds, SensitivityReport, output_bounds, sensitivity
from implicit_compiler.errors import AnalysisError

ZOO = Path(__file__).resolve().parents[1] / "zoo"
LIPSCHITZ = {"relu": 1.0, "identity": 1.0, "tanh": 1.0, "sigmoid": 0.25, "leaky_relu(2.0)": 2.0, "leaky_relu(0.1)": 1.0}


def build(A, blocks, p, q, seed=0, nonnegative=False, input_shape=None) -> ImplicitModel:
    """A model with state matrix A, blocks [(name, size, activation)], random B, C, D and biases."""
    rng = np.random.default_rng(seed)
    n = A.shape[0]
    draw = (lambda *s: rng.uniform(0, 1, size=s)) if nonnegative else (lambda *s: rng.normal(size=s))
    states, start = [], 0
    for name, size, activation in blocks:
        states.append(StateBlock(name, start, start + size, activation, (size,)))
        start += size
    return ImplicitModel(
        sp.csr_array(A), draw(n, p), draw(q, n), draw(q, p), rng.normal(size=n), rng.normal(size=q),
        tuple(states), (TensorSpec("u", input_shape or (p,)),), (TensorSpec("y", (q,)),),
    )  # fmt: skip


def with_radius(rng, n, radius, signed=True):
    """A random n x n matrix whose |A| has Perron-Frobenius eigenvalue ``radius``."""
    magnitude = rng.uniform(0.1, 1.0, size=(n, n))
    magnitude *= radius / np.abs(np.linalg.eigvals(magnitude)).max()
    return magnitude * rng.choice([-1.0, 1.0], size=(n, n)) if signed else magnitude


def dense_sensitivity(model: ImplicitModel) -> np.ndarray:
    """|C| (I - Lambda|A|)^{-1} Lambda |B| + |D| with numpy's dense inverse."""
    lipschitz = np.concatenate([np.full(b.size, LIPSCHITZ[str(b.activation)]) for b in model.blocks])
    A, B, C, D = (np.abs(m.toarray()) for m in (model.A, model.B, model.C, model.D))
    Lam = np.diag(lipschitz)
    return C @ np.linalg.inv(np.eye(model.n) - Lam @ A) @ Lam @ B + D


def layered(rng, activation, loop_radius):
    """in (relu, 3) -> loop (activation, 4, cyclic) -> out (relu, 2); C reads loop and out; p = 5, q = 3."""
    n = 9
    A = np.zeros((n, n))
    A[3:7, 0:3] = rng.normal(size=(4, 3))
    A[3:7, 3:7] = with_radius(rng, 4, loop_radius)
    A[7:9, 3:7] = rng.normal(size=(2, 4))
    model = build(A, [("in", 3, "relu"), ("loop", 4, activation), ("out", 2, "relu")], p=5, q=3)
    C = model.C.toarray()
    C[:, 0:3] = 0  # C reads loop and out only
    return ImplicitModel(
        model.A, model.B, C, model.D, model.bias_x, model.bias_y, model.blocks, model.inputs, model.outputs
    )


MODELS = {
    "cyclic-relu": lambda rng: layered(rng, "relu", 0.7),
    "cyclic-tanh": lambda rng: layered(rng, "tanh", 0.9),
    "cyclic-sigmoid": lambda rng: layered(rng, "sigmoid", 3.0),  # lambda_pf(Lambda|A|) = 0.75
    "cyclic-leaky2": lambda rng: layered(rng, "leaky_relu(2.0)", 0.4),  # lambda_pf(Lambda|A|) = 0.8
    "two-block-loop": lambda rng: build(
        np.block([[np.zeros((3, 3)), with_radius(rng, 3, 0.4)], [with_radius(rng, 3, 0.9), np.zeros((3, 3))]]),
        [("a", 3, "tanh"), ("b", 3, "leaky_relu(0.1)")],
        p=4,
        q=2,
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_matches_dense_computation_cyclic(rng, name):
    model = MODELS[name](rng)
    report = sensitivity(model)
    assert isinstance(report, SensitivityReport)
    assert report.valid and report.reason.startswith("valid")
    assert 0 < report.perron_frobenius < 1
    assert report.matrix.shape == (model.q, model.p)
    np.testing.assert_allclose(report.matrix, dense_sensitivity(model), rtol=1e-11)


def test_matches_dense_computation_feedforward(mlp):
    model = mlp.implicit()
    report = sensitivity(model)
    assert report.valid and report.perron_frobenius == 0 and "acyclic" in report.reason
    np.testing.assert_allclose(report.matrix, dense_sensitivity(model), rtol=1e-12)
    # and against the MLP's own weights: |W3| |W2| |W1|
    expected = np.abs(mlp.W3) @ np.abs(mlp.W2) @ np.abs(mlp.W1)
    np.testing.assert_allclose(report.matrix, expected, rtol=1e-12)


def test_matrix_is_read_only(mlp):
    with pytest.raises(ValueError):
        sensitivity(mlp.implicit()).matrix[0, 0] = 1.0


@pytest.mark.parametrize(
    "activation, radius, bias",
    [("identity", 0.6, 0.0), ("leaky_relu(2.0)", 0.4, -100.0)],
    ids=["linear", "leaky2-steep-regime"],
)
def test_tight_for_nonnegative_weights(rng, activation, radius, bias):
    """Nonnegative A, B, C, D and every state where phi has slope L (leaky_relu(2) below zero):
    the model is linear with gain exactly S on the box, so y(u0 +- sigma) = y(u0) +- S sigma."""
    model = build(with_radius(rng, 5, radius, signed=False), [("x", 5, activation)], p=3, q=2, nonnegative=True)
    model = ImplicitModel(
        model.A, model.B, model.C, model.D, np.full(5, bias), None, model.blocks, model.inputs, model.outputs
    )
    sigma = rng.uniform(0.1, 1.0, 3)
    u0 = rng.normal(size=3)
    bounds = output_bounds(model, u0, sigma)
    np.testing.assert_allclose(model.predict(u0 + sigma, tol=1e-14), bounds.upper - bounds.margin, rtol=1e-10)
    np.testing.assert_allclose(model.predict(u0 - sigma, tol=1e-14), bounds.lower + bounds.margin, rtol=1e-10)
    assert (bounds.margin <= 1e-8 * np.abs(bounds.center)).all()  # the default tolerance, 1e-10, amplified


def box_samples(rng, u0, sigma, count=300):
    """Uniform samples in the box |u - u0| <= sigma, plus all of its corners."""
    p = u0.size
    uniform = u0 + rng.uniform(-1, 1, size=(count, p)) * sigma
    corners = u0 + np.array(list(itertools.product([-1.0, 1.0], repeat=p))) * sigma
    return np.concatenate([uniform, corners])


@pytest.mark.parametrize("name", list(MODELS) + ["mlp"])
@pytest.mark.parametrize("radius", ["scalar", "per-input"])
def test_bounds_never_violated(rng, mlp, name, radius):
    model = mlp.implicit() if name == "mlp" else MODELS[name](rng)
    report = sensitivity(model)
    for trial in range(3):
        u0 = rng.normal(size=model.p)
        sigma = 0.3 if radius == "scalar" else rng.uniform(0.05, 0.6, model.p)
        bounds = output_bounds(model, u0, sigma, sensitivity_report=report)
        y = model.predict(box_samples(rng, u0, np.broadcast_to(sigma, (model.p,))), tol=1e-13)
        assert (y >= bounds.lower - 1e-9).all() and (y <= bounds.upper + 1e-9).all(), f"trial {trial}"


@pytest.mark.parametrize("name", ["cyclic-relu", "cyclic-tanh", "cyclic-leaky2"])
def test_lipschitz_bound_on_random_pairs(rng, name):
    model = MODELS[name](rng)
    S = sensitivity(model).matrix
    u, v = rng.normal(size=(2, 200, model.p)) * 2
    difference = np.abs(model.predict(u, tol=1e-13) - model.predict(v, tol=1e-13))
    assert (difference <= np.abs(u - v) @ S.T + 1e-9).all()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda rng: layered(rng, "relu", 1.2), "lambda_pf"),
        (lambda rng: layered(rng, "leaky_relu(2.0)", 0.6), "lambda_pf"),  # Lambda|A| has radius 1.2
        (lambda rng: build(np.zeros((3, 3)), [("sq", 3, "square")], p=2, q=2), "'sq' \\(square\\)"),
    ],
    ids=["relu-radius-1.2", "leaky2-radius-0.6", "square"],
)
def test_invalid_sensitivity(rng, make, message):
    model = make(rng)
    report = sensitivity(model)
    assert not report.valid
    assert report.reason.startswith("not valid")
    assert np.isinf(report.matrix).all() and report.matrix.shape == (model.q, model.p)
    assert report.perron_frobenius >= 1
    with pytest.raises(AnalysisError, match=message):
        output_bounds(model, np.zeros(model.p), 0.1, method="sensitivity")


def test_output_shapes_and_sigma_forms(rng):
    """Input of shape (2, 3): sigma as a scalar, (6,) or (2, 3); one sample or a batch."""
    model = build(with_radius(rng, 4, 0.5), [("x", 4, "relu")], p=6, q=2, input_shape=(2, 3))
    single = rng.normal(size=(2, 3))
    batch = rng.normal(size=(4, 2, 3))
    report = sensitivity(model)
    scalar = output_bounds(model, single, 0.2, sensitivity_report=report)
    assert isinstance(scalar, OutputBounds)
    assert scalar.center.shape == scalar.lower.shape == scalar.upper.shape == (2,)
    flat = output_bounds(model, single, np.full(6, 0.2), sensitivity_report=report)
    shaped = output_bounds(model, single, np.full((2, 3), 0.2), sensitivity_report=report)
    for other in (flat, shaped):
        np.testing.assert_array_equal(other.lower, scalar.lower)
    spread = report.matrix.sum(axis=1) * 0.2
    np.testing.assert_allclose(scalar.upper - scalar.center - scalar.margin, spread, rtol=1e-12)
    batched = output_bounds(model, batch, 0.2)
    assert batched.center.shape == batched.lower.shape == (4, 2)
    np.testing.assert_allclose(batched.center, model.predict(batch))


@pytest.mark.parametrize(
    "sigma, message",
    [(np.ones(5), "shape"), (-0.1, "nonnegative"), (np.array([0.1, np.nan, 0, 0, 0, 0]), "finite")],
    ids=["wrong-shape", "negative", "nan"],
)
def test_bad_sigma(rng, sigma, message):
    model = build(with_radius(rng, 4, 0.5), [("x", 4, "relu")], p=6, q=2)
    with pytest.raises(AnalysisError, match=message):
        output_bounds(model, np.zeros(6), sigma)


def triangular_reference(model: ImplicitModel) -> np.ndarray:
    """S for a relu/identity feedforward model with scipy's spsolve_triangular (an independent path)."""
    absolute = abs(model.A)
    system = sp.csr_array((sp.eye_array(model.n, format="csr") - absolute).T)
    Z = spla.spsolve_triangular(system, abs(model.C).T.toarray(), lower=False, unit_diagonal=True)
    return (abs(model.B).T @ Z).T + abs(model.D).toarray()


def test_lenet5_matches_triangular_solve_and_finite_differences(rng):
    model = ic.from_onnx(str(ZOO / "lenet5.onnx"))
    assert {str(b.activation) for b in model.blocks} <= {"relu", "identity"}
    assert sp.triu(model.A).nnz == 0  # strictly lower triangular
    report = sensitivity(model)
    assert report.valid
    np.testing.assert_allclose(report.matrix, triangular_reference(model), rtol=1e-10)
    # |y(u + h e_j) - y(u)| <= S[:, j] h for a few inputs j
    u = rng.uniform(0, 1, size=model.p)
    h = 1e-3
    columns = rng.choice(model.p, 20, replace=False)
    shifted = u + h * np.eye(model.p)[columns]
    change = np.abs(model.solve(shifted).y - model.solve(u).y)
    assert (change <= report.matrix[:, columns].T * h * (1 + 1e-9)).all()


@pytest.mark.slow
def test_resnet20_matches_triangular_solve():
    model = ic.from_onnx(str(ZOO / "resnet20.onnx"))
    report = sensitivity(model)
    assert report.valid and report.matrix.shape == (10, 3072)
    np.testing.assert_allclose(report.matrix, triangular_reference(model), rtol=1e-10)


def test_report_of_another_model_is_refused(rng, mlp):
    model = build(with_radius(rng, 4, 0.5), [("x", 4, "relu")], p=6, q=2)
    with pytest.raises(AnalysisError, match="sensitivity_report"):
        output_bounds(model, np.zeros(6), 0.1, sensitivity_report=sensitivity(mlp.implicit()))


@pytest.mark.parametrize("name", ["cyclic-relu", "cyclic-leaky2", "two-block-loop"])
def test_iterative_path_for_cyclic_components(rng, monkeypatch, name):
    """With the direct-solve limit at 0 every loop goes through GMRES: same S as the dense computation."""
    from implicit_compiler.analysis import _block_solve

    monkeypatch.setattr(_block_solve, "DIRECT_LIMIT", 0)
    model = MODELS[name](rng)
    np.testing.assert_allclose(sensitivity(model).matrix, dense_sensitivity(model), rtol=1e-9)


def test_large_random_loop_matches_neumann_series(rng):
    """6000 states in one random loop (a sparse LU would fill in): S against sum_k (|A|^T)^k |C|^T."""
    n, p, q = 6000, 20, 4
    A = sp.random_array((n, n), density=8 / n, format="csr", rng=rng)
    A.data = rng.uniform(-1, 1, A.nnz)
    A = sp.csr_array(A + sp.csr_array((np.full(n, 0.3), (np.arange(n), np.roll(np.arange(n), 1))), shape=(n, n)))
    A = sp.csr_array(sp.diags_array(0.5 / abs(A).sum(axis=1)) @ A)  # ||A||_inf = 0.5, so lambda_pf(|A|) <= 0.5
    B = sp.random_array((n, p), density=0.05, format="csr", rng=rng)
    C = sp.random_array((q, n), density=0.05, format="csr", rng=rng)
    model = ImplicitModel.from_matrices(A, B, C, np.zeros((q, p)), activation="relu")
    report = sensitivity(model)
    assert report.valid and report.perron_frobenius <= 0.5 + 1e-12
    Z = np.zeros((n, q))
    R = abs(C).T.toarray()
    for _ in range(80):  # 0.5^80: converged far below rounding
        Z = R + abs(A).T @ Z
    np.testing.assert_allclose(report.matrix, (abs(B).T @ Z).T, rtol=1e-9)
