"""perron_frobenius_eigenvalue against numpy's dense eigenvalues and hand-checkable matrices."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from implicit_compiler.analysis import perron_frobenius_eigenvalue
from implicit_compiler.analysis import spectral as spectral_module
from implicit_compiler.errors import AnalysisError


def numpy_radius(matrix) -> float:
    dense = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    return float(np.abs(np.linalg.eigvals(dense)).max())


def random_sparse_nonnegative(rng, n, density, irreducible=True):
    """Random nonnegative sparse matrix; a cycle through all states makes it irreducible."""
    M = sp.random_array((n, n), density=density, format="csr", rng=rng)
    if irreducible:
        cycle = sp.csr_array((rng.uniform(0.1, 1.0, n), (np.arange(n), np.roll(np.arange(n), 1))), shape=(n, n))
        M = M + cycle
    return sp.csr_array(M)


@pytest.mark.parametrize("n", [1, 2, 5, 30, 200], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_matches_numpy_on_random_nonnegative(n, kind):
    rng = np.random.default_rng(n)
    dense = rng.uniform(0, 1, size=(n, n)) * (rng.uniform(size=(n, n)) < 0.3)
    matrix = sp.csr_array(dense) if kind == "sparse" else dense
    assert perron_frobenius_eigenvalue(matrix) == pytest.approx(numpy_radius(dense), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("sizes", [(3, 4), (10, 1, 20), (50, 50, 50)], ids=["3-4", "10-1-20", "50-50-50"])
def test_reducible_block_triangular(sizes):
    """Block upper triangular with positive diagonal blocks: lambda_pf = max of the blocks' radii."""
    rng = np.random.default_rng(len(sizes))
    n = sum(sizes)
    M = np.triu(rng.uniform(0, 1, size=(n, n)), k=1)
    start, radii = 0, []
    for size in sizes:
        block = rng.uniform(0, 1, size=(size, size)) * rng.uniform(0.2, 3)
        M[start : start + size, start : start + size] = block
        radii.append(numpy_radius(block))
        start += size
    assert perron_frobenius_eigenvalue(M) == pytest.approx(max(radii), rel=1e-9)
    assert perron_frobenius_eigenvalue(sp.csr_array(M)) == pytest.approx(numpy_radius(M), rel=1e-9)


@pytest.mark.parametrize("n", [2, 50, 400, 3000], ids=lambda n: f"n{n}")
def test_nilpotent_is_exactly_zero(n):
    """Strictly lower triangular: lambda_pf = 0 exactly (dense LAPACK would return eps^(1/n) noise)."""
    rng = np.random.default_rng(n)
    M = sp.tril(sp.random_array((n, n), density=min(1.0, 20 / n), rng=rng), k=-1, format="csr")
    assert perron_frobenius_eigenvalue(M) == 0.0


@pytest.mark.parametrize(
    "matrix, expected",
    [
        (np.zeros((0, 0)), 0.0),
        (np.zeros((4, 4)), 0.0),
        (np.diag([0.3, 2.5, 1.0]), 2.5),
        (np.array([[0.0, 4.0], [1.0, 0.0]]), 2.0),  # periodic: eigenvalues +-2
        (np.array([[0.5]]), 0.5),
    ],
    ids=["empty", "zero", "diagonal", "periodic-2x2", "scalar"],
)
def test_hand_checkable(matrix, expected):
    assert perron_frobenius_eigenvalue(matrix) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n", [1000, 2000], ids=lambda n: f"n{n}")
def test_eigs_path_matches_numpy_on_larger_sparse(n):
    """Above DENSE_LIMIT the irreducible part goes to ARPACK; compare with numpy's dense eigvals."""
    rng = np.random.default_rng(7)
    M = random_sparse_nonnegative(rng, n, density=3 / n)
    assert n > spectral_module.DENSE_LIMIT
    assert perron_frobenius_eigenvalue(M) == pytest.approx(numpy_radius(M), rel=1e-8)


def test_eigs_path_on_reducible_larger_sparse():
    """Two large irreducible blocks coupled one way plus a nilpotent tail: the larger radius wins."""
    rng = np.random.default_rng(8)
    first = random_sparse_nonnegative(rng, 700, 4 / 700) * 0.5
    second = random_sparse_nonnegative(rng, 900, 4 / 900)
    tail = sp.tril(sp.random_array((300, 300), density=0.05, rng=rng), k=-1)
    coupling = sp.random_array((700, 900), density=0.01, rng=rng)
    M = sp.block_array([[first, coupling, None], [None, second, None], [None, None, tail]], format="csr")
    expected = max(numpy_radius(first), numpy_radius(second))
    assert perron_frobenius_eigenvalue(M) == pytest.approx(expected, rel=1e-8)
    assert perron_frobenius_eigenvalue(M) == pytest.approx(numpy_radius(M), rel=1e-8)


def weighted_cycle(n: int) -> tuple[sp.csr_array, float]:
    """A weighted cycle: every eigenvalue has modulus (product of the weights)^(1/n)."""
    weights = np.random.default_rng(3).uniform(0.5, 1.5, n)
    M = sp.csr_array((weights, (np.arange(n), np.roll(np.arange(n), 1))), shape=(n, n))
    return M, float(np.exp(np.log(weights).mean()))


def test_periodic_large_cycle():
    """n eigenvalues on one circle: ARPACK and power iteration stall, the dense fallback answers."""
    M, expected = weighted_cycle(1000)
    assert perron_frobenius_eigenvalue(M) == pytest.approx(expected, rel=1e-8)


def test_upper_bound_when_nothing_converges(monkeypatch):
    """Without the dense fallback the answer is a Collatz-Wielandt upper bound, never below lambda_pf."""
    monkeypatch.setattr(spectral_module, "DENSE_FALLBACK_LIMIT", 0)
    monkeypatch.setattr(spectral_module, "ARPACK_RESTARTS", 5)
    M, expected = weighted_cycle(1000)
    value = perron_frobenius_eigenvalue(M, max_iter=200)
    assert expected <= value <= M.data.max()


def test_wrong_arpack_answer_is_rejected(monkeypatch):
    """An eigenpair whose |vector| does not certify the value is not trusted."""
    rng = np.random.default_rng(5)
    M = random_sparse_nonnegative(rng, 1500, 4 / 1500)

    def wrong_eigs(matrix, **kwargs):
        return np.array([0.5 * numpy_radius(M) + 0j]), rng.uniform(0.1, 1, size=(matrix.shape[0], 1)) + 0j

    monkeypatch.setattr(spectral_module.spla, "eigs", wrong_eigs)
    assert perron_frobenius_eigenvalue(M) == pytest.approx(numpy_radius(M), rel=1e-8)


@pytest.mark.parametrize("periodic", [False, True], ids=["random", "periodic"])
def test_power_iteration_fallback_when_arpack_fails(monkeypatch, periodic):
    """When ARPACK does not converge the shifted power iteration gives the same answer."""

    def failing_eigs(*args, **kwargs):
        raise spla.ArpackNoConvergence("forced", np.array([]), np.array([]))

    monkeypatch.setattr(spectral_module.spla, "eigs", failing_eigs)
    rng = np.random.default_rng(11)
    n = 800
    if periodic:  # bipartite: eigenvalues come in +- pairs, plain power iteration would oscillate
        top = random_sparse_nonnegative(rng, n // 2, 4 / n)
        bottom = random_sparse_nonnegative(rng, n // 2, 4 / n)
        M = sp.block_array([[None, top], [bottom, None]], format="csr")
    else:
        M = random_sparse_nonnegative(rng, n, 4 / n)
    assert perron_frobenius_eigenvalue(M, tol=1e-11) == pytest.approx(numpy_radius(M), rel=1e-8)


@pytest.mark.parametrize(
    "matrix, message",
    [
        (np.array([[0.0, -1.0], [1.0, 0.0]]), "nonnegative"),
        (np.ones((2, 3)), "square"),
        (np.ones(3), "square"),
        (np.array([[np.inf]]), "finite"),
    ],
    ids=["negative", "rectangular", "vector", "inf"],
)
def test_rejects_bad_matrices(matrix, message):
    with pytest.raises(AnalysisError, match=message):
        perron_frobenius_eigenvalue(matrix)
