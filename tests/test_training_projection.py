"""The projection onto ||A||_inf <= kappa, checked against a per-row bisection on theta."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from implicit_compiler import ImplicitModel, ShapeError
from implicit_compiler.training import project_inf_norm, project_rows_l1, row_l1_norms


def reference_row_projection(row: np.ndarray, kappa: float) -> np.ndarray:
    """Project one row onto the l1 ball by bisection on theta: sum max(|a| - theta, 0) = kappa."""
    row = np.asarray(row, dtype=np.float64)
    magnitude = np.abs(row)
    if magnitude.sum() <= kappa:
        return row.copy()
    low, high = 0.0, magnitude.max()
    for _ in range(200):
        theta = 0.5 * (low + high)
        if np.maximum(magnitude - theta, 0).sum() > kappa:
            low = theta
        else:
            high = theta
    return np.sign(row) * np.maximum(magnitude - 0.5 * (low + high), 0)


def reference_dense(A: np.ndarray, kappa: float, mask: np.ndarray | None = None) -> np.ndarray:
    result = np.zeros_like(A, dtype=np.float64)
    for i, row in enumerate(A):
        keep = np.ones(row.shape, bool) if mask is None else mask[i]
        result[i, keep] = reference_row_projection(row[keep], kappa)
    return result


def random_rows(rng: np.random.Generator, shape=(40, 17)) -> np.ndarray:
    """Rows at several scales (inside and outside the unit ball), a zero row, rows with ties."""
    A = rng.normal(size=shape) * rng.choice([0.01, 0.1, 0.5, 2.0, 10.0], size=(shape[0], 1))
    A[0] = 0
    A[1] = [1.0, -1.0] * (shape[1] // 2) + [1.0] * (shape[1] % 2)  # all magnitudes tied
    A[2, :4] = [3.0, 3.0, -3.0, 0.5]
    A[2, 4:] = 0
    A[3] = A[4]  # a duplicate row
    return A


@pytest.mark.parametrize("kappa", [0.0, 0.3, 0.95, 1.0, 4.0], ids=lambda k: f"kappa={k}")
def test_dense_projection_matches_bisection(rng, kappa):
    A = random_rows(rng)
    projected = project_rows_l1(A, kappa)
    np.testing.assert_allclose(projected, reference_dense(A, kappa), rtol=0, atol=1e-10)
    assert np.abs(projected).sum(axis=1).max() <= kappa * (1 + 1e-12) + 1e-300


def test_rows_inside_the_ball_are_unchanged_bit_for_bit(rng):
    A = random_rows(rng)
    kappa = 0.9
    inside = np.abs(A).sum(axis=1) <= kappa
    assert inside.any() and not inside.all()
    projected = project_rows_l1(A, kappa)
    assert np.array_equal(projected[inside], A[inside])
    assert np.abs(projected[~inside]).sum(axis=1) == pytest.approx(kappa, rel=1e-12)
    assert project_rows_l1(A, kappa) is not A  # a new array, the input untouched
    assert np.array_equal(A, random_rows(np.random.default_rng(1234)))


def test_ties_and_hand_checked_rows():
    A = np.array([[1.0, 1.0, 1.0, 1.0], [3.0, -3.0, 0.5, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    projected = project_rows_l1(A, 2.0)
    expected = np.array([[0.5, 0.5, 0.5, 0.5], [1.0, -1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(projected, expected, atol=1e-15)
    assert np.array_equal(project_rows_l1(A, 0.0), np.zeros_like(A))


def test_projection_is_idempotent(rng):
    A = random_rows(rng)
    once = project_rows_l1(A, 0.7)
    np.testing.assert_allclose(project_rows_l1(once, 0.7), once, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kappa", [0.5, 0.95], ids=lambda k: f"kappa={k}")
def test_csr_projection_matches_bisection_per_row(rng, kappa):
    A = sp.random_array((60, 50), density=0.15, rng=rng, format="csr")
    A.data = rng.normal(size=A.nnz)
    row_scales = rng.choice([0.0, 0.01, 0.1, 1.0, 5.0], size=60)  # empty rows, rows inside, rows outside
    A = sp.csr_array(sp.diags_array(row_scales) @ A)
    A.eliminate_zeros()
    assert (np.diff(A.indptr) == 0).any()
    projected = project_rows_l1(A.data, kappa, indptr=A.indptr)
    for i in range(A.shape[0]):
        segment = slice(A.indptr[i], A.indptr[i + 1])
        np.testing.assert_allclose(projected[segment], reference_row_projection(A.data[segment], kappa), atol=1e-10)
    norms = row_l1_norms(projected, A.indptr)
    assert norms.max() <= kappa * (1 + 1e-12)
    inside = row_l1_norms(A.data, A.indptr) <= kappa
    rows = np.repeat(np.arange(A.shape[0]), np.diff(A.indptr))
    assert np.array_equal(projected[inside[rows]], A.data[inside[rows]])


def test_csr_projection_is_the_dense_projection_restricted_to_the_pattern(rng):
    A = sp.random_array((30, 30), density=0.3, rng=rng, format="csr") * 2
    A = sp.csr_array(A)
    result = project_inf_norm(A, 0.8)
    assert isinstance(result, sp.csr_array)
    assert np.array_equal(result.indptr, A.indptr) and np.array_equal(result.indices, A.indices)
    dense = A.toarray()
    np.testing.assert_allclose(result.toarray(), reference_dense(dense, 0.8, mask=dense != 0), atol=1e-10)


def test_mask_zeroes_entries_outside_and_projects_the_rest(rng):
    A = rng.normal(size=(12, 12))
    mask = rng.random((12, 12)) < 0.5
    projected = project_rows_l1(A, 0.6, mask=mask)
    assert np.all(projected[~mask] == 0)
    np.testing.assert_allclose(projected, reference_dense(A, 0.6, mask=mask), atol=1e-10)


def test_triangular_mask_keeps_the_model_acyclic(rng):
    A = rng.normal(size=(9, 9))
    projected = project_inf_norm(A, 0.5, mask="triangular")
    assert np.all(np.triu(projected) == 0)
    np.testing.assert_allclose(projected, reference_dense(A, 0.5, mask=np.tri(9, k=-1, dtype=bool)), atol=1e-10)
    sparse = project_inf_norm(sp.csr_array(A), 0.5, mask="triangular")
    np.testing.assert_allclose(sparse.toarray(), projected, atol=1e-15)


def test_numpy_and_torch_agree(rng):
    A = random_rows(rng)
    expected = project_rows_l1(A, 0.8)
    dense = project_rows_l1(torch.tensor(A), 0.8)
    assert isinstance(dense, torch.Tensor) and dense.dtype == torch.float64
    np.testing.assert_allclose(dense.numpy(), expected, rtol=0, atol=1e-14)
    S = sp.csr_array(sp.random_array((50, 40), density=0.2, rng=rng, format="csr") * 3)
    expected_csr = project_rows_l1(S.data, 0.8, indptr=S.indptr)
    from_torch = project_rows_l1(torch.tensor(S.data), 0.8, indptr=torch.tensor(S.indptr))
    np.testing.assert_allclose(from_torch.numpy(), expected_csr, rtol=0, atol=1e-14)
    mask = rng.random(A.shape) < 0.5
    np.testing.assert_allclose(
        project_rows_l1(torch.tensor(A), 0.8, mask=torch.tensor(mask)).numpy(),
        project_rows_l1(A, 0.8, mask=mask),
        atol=1e-14,
    )


def test_torch_keeps_float32_and_ignores_autograd(rng):
    A = torch.tensor(random_rows(rng), dtype=torch.float32, requires_grad=True)
    projected = project_rows_l1(A, 0.9)
    assert projected.dtype == torch.float32 and not projected.requires_grad
    np.testing.assert_allclose(projected.numpy(), reference_dense(A.detach().double().numpy(), 0.9), atol=1e-6)
    assert float(projected.abs().sum(1).max()) <= 0.9 * (1 + 1e-6)


def test_project_inf_norm_of_a_model_changes_only_A(rng):
    A = rng.normal(size=(5, 5))
    model = ImplicitModel.from_matrices(A, rng.normal(size=(5, 2)), rng.normal(size=(1, 5)), np.zeros((1, 2)))
    projected = project_inf_norm(model, 0.9)
    assert abs(projected.A).sum(axis=1).max() <= 0.9 * (1 + 1e-12)
    for name in "BCD":
        assert (getattr(projected, name) != getattr(model, name)).nnz == 0
    assert projected.blocks == model.blocks


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: project_rows_l1(np.ones((2, 2)), -1.0), ValueError),
        (lambda: project_rows_l1(np.ones((2, 2)), 1.0, mask=np.ones((3, 2), bool)), ShapeError),
        (lambda: project_rows_l1(np.ones(4), 1.0, indptr=np.array([0, 2, 3])), ShapeError),
        (lambda: project_rows_l1(np.ones(3), 1.0), ShapeError),
        (lambda: project_inf_norm(np.ones((2, 2)), 1.0, mask="upper"), ShapeError),
    ],
    ids=["negative-kappa", "mask-shape", "indptr-length", "1d-without-indptr", "unknown-mask"],
)
def test_bad_arguments_raise_typed_errors(call, error):
    with pytest.raises(error):
        call()
