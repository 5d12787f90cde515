"""wellposedness: verdicts per cyclic component, with the numbers checked against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import model_with_blocks

from implicit_compiler import ImplicitModel
from implicit_compiler.analysis import ComponentReport, WellPosednessReport, wellposedness


def build(A, blocks, p=3, q=2, seed=0) -> ImplicitModel:
    """A model with state matrix A and blocks [(name, size, activation)], random B and C."""
    return model_with_blocks(A, blocks, p, q, seed, random_feedthrough=False)


def with_radius(rng, n, radius, density=1.0):
    """A random matrix with mixed signs whose |A| has Perron-Frobenius eigenvalue ``radius``."""
    magnitude = rng.uniform(0.1, 1.0, size=(n, n)) * (rng.uniform(size=(n, n)) < density)
    np.fill_diagonal(magnitude, rng.uniform(0.1, 1.0, n))  # irreducible enough, never nilpotent
    magnitude *= radius / np.abs(np.linalg.eigvals(magnitude)).max()
    return magnitude * rng.choice([-1.0, 1.0], size=(n, n))


def numpy_pf(matrix) -> float:
    return float(np.abs(np.linalg.eigvals(np.abs(matrix))).max())


def test_acyclic_mlp_is_well_posed(mlp):
    report = wellposedness(mlp.implicit())
    assert isinstance(report, WellPosednessReport)
    assert report.acyclic and report.well_posed
    assert report.components == ()
    assert "acyclic" in report.reason


@pytest.mark.parametrize(
    "activation, radius, expected",
    [
        ("relu", 0.5, True),
        ("relu", 0.95, True),
        ("relu", 1.3, None),
        ("identity", 0.9, True),
        ("identity", 1.01, None),
        ("tanh", 0.8, True),
        ("tanh", 1.5, None),
        ("sigmoid", 3.0, True),  # L = 1/4: 0.75 < 1
        ("sigmoid", 4.5, None),  # 1.125 >= 1
        ("leaky_relu(2.0)", 0.4, True),  # L = 2: 0.8 < 1
        ("leaky_relu(2.0)", 0.6, None),  # 1.2 >= 1
        ("leaky_relu(0.1)", 0.9, True),  # L = 1
    ],
    ids=lambda v: str(v),
)
def test_single_loop_verdict_and_numbers(rng, activation, radius, expected):
    A = with_radius(rng, 6, radius)
    report = wellposedness(build(A, [("loop", 6, activation)]))
    assert not report.acyclic
    (component,) = report.components
    assert isinstance(component, ComponentReport)
    assert component.blocks == ("loop",)
    assert component.states == 6
    assert component.perron_frobenius == pytest.approx(numpy_pf(A), rel=1e-10)
    assert component.perron_frobenius == pytest.approx(radius, rel=1e-10)
    assert component.inf_norm == pytest.approx(np.abs(A).sum(axis=1).max(), rel=1e-12)
    assert component.well_posed is expected
    assert report.well_posed is (expected is True)
    if expected:
        assert component.reason.startswith("well-posed")
    else:
        assert "not shown" in component.reason and "not shown" in report.reason
        assert f"{radius:.6g}" in component.reason  # the numbers are in the reason
        assert "shrink the loop gain" in component.reason


@pytest.mark.parametrize(
    "activation, lipschitz", [("relu", 1.0), ("sigmoid", 0.25), ("leaky_relu(3.0)", 3.0), ("square", np.inf)]
)
def test_reported_lipschitz(rng, activation, lipschitz):
    report = wellposedness(build(with_radius(rng, 4, 0.2), [("loop", 4, activation)]))
    assert report.components[0].lipschitz == lipschitz


def test_square_in_a_loop_is_not_shown(rng):
    report = wellposedness(build(with_radius(rng, 4, 0.1), [("loop", 4, "square")]))
    (component,) = report.components
    assert component.well_posed is None and not report.well_posed
    assert "square" in component.reason and "Lipschitz" in component.reason


def test_square_with_nilpotent_self_loop_is_well_posed(rng):
    """A block reading itself only through a strictly lower triangular A_cc is acyclic per state."""
    A = np.tril(rng.normal(size=(5, 5)) * 4, k=-1)
    report = wellposedness(build(A, [("chain", 5, "square")]))
    (component,) = report.components
    assert component.perron_frobenius == 0.0
    assert component.well_posed is True and report.well_posed
    assert "nilpotent" in component.reason


def test_large_inf_norm_but_small_radius_mentions_rescale(rng):
    """||A||_inf > 1 while lambda_pf(|A|) < 1: well-posed, the cheaper test fails, rescale is suggested."""
    A0 = with_radius(rng, 5, 0.6)
    scaling = np.exp(rng.uniform(-3, 3, 5))
    A = A0 * scaling[None, :] / scaling[:, None]
    assert np.abs(A).sum(axis=1).max() > 1
    report = wellposedness(build(A, [("loop", 5, "relu")]))
    (component,) = report.components
    assert component.well_posed is True
    assert component.perron_frobenius == pytest.approx(0.6, rel=1e-9)
    assert "cheaper test" in component.reason and "fails" in component.reason and "rescale" in component.reason


def test_only_the_cyclic_component_is_reported(rng):
    """in (relu, acyclic) -> loop (tanh, reads itself) -> out (relu): one component, 'loop'."""
    sizes = {"in": 3, "loop": 4, "out": 2}
    n = sum(sizes.values())
    A = np.zeros((n, n))
    loop = with_radius(rng, 4, 0.7)
    A[3:7, 0:3] = rng.normal(size=(4, 3)) * 5  # loop reads in (big weights do not matter)
    A[3:7, 3:7] = loop
    A[7:9, 3:7] = rng.normal(size=(2, 4)) * 5  # out reads loop
    model = build(A, [("in", 3, "relu"), ("loop", 4, "tanh"), ("out", 2, "relu")])
    report = wellposedness(model)
    assert not report.acyclic and report.well_posed
    (component,) = report.components
    assert component.blocks == ("loop",) and component.states == 4
    assert component.perron_frobenius == pytest.approx(numpy_pf(loop), rel=1e-10)
    assert component.inf_norm == pytest.approx(np.abs(loop).sum(axis=1).max())


def test_two_block_cycle_with_an_unstable_second_loop(rng):
    """a <-> b form one component (radius of the joint submatrix); c alone loops too strongly."""
    n = 9
    A = np.zeros((n, n))
    A[0:3, 3:6] = rng.uniform(0.1, 0.5, size=(3, 3))  # a reads b
    A[3:6, 0:3] = rng.uniform(0.1, 0.5, size=(3, 3))  # b reads a
    A[6:9, 0:3] = rng.normal(size=(3, 3))  # c reads a
    A[6:9, 6:9] = with_radius(rng, 3, 1.5)  # c reads itself
    model = build(A, [("a", 3, "relu"), ("b", 3, "relu"), ("c", 3, "relu")])
    report = wellposedness(model)
    assert not report.well_posed
    first, second = report.components
    assert first.blocks == ("a", "b") and first.states == 6
    assert first.perron_frobenius == pytest.approx(numpy_pf(A[:6, :6]), rel=1e-10)
    assert first.well_posed is (numpy_pf(A[:6, :6]) < 1)
    assert second.blocks == ("c",) and second.well_posed is None
    assert second.perron_frobenius == pytest.approx(1.5, rel=1e-10)
    assert "[c]" in report.reason and "1 of 2" in report.reason


def test_non_contiguous_component(rng):
    """Blocks a and c form a cycle around an acyclic block b placed between them in state order."""
    n = 6
    A = np.zeros((n, n))
    A[0:2, 4:6] = rng.uniform(0.2, 0.6, size=(2, 2))  # a reads c
    A[4:6, 0:2] = rng.uniform(0.2, 0.6, size=(2, 2))  # c reads a
    A[2:4, 0:2] = rng.normal(size=(2, 2))  # b reads a
    model = build(A, [("a", 2, "relu"), ("b", 2, "relu"), ("c", 2, "relu")])
    (component,) = wellposedness(model).components
    assert component.blocks == ("a", "c") and component.states == 4
    joint = A[np.ix_([0, 1, 4, 5], [0, 1, 4, 5])]
    assert component.perron_frobenius == pytest.approx(numpy_pf(joint), rel=1e-10)
