"""Spy, well-posedness, sensitivity and composition on structured models (issue 20, step 5).

Each function runs on the plain model (CSR) and on the lifted one (``structure.lift``:
convolutions and dense products kept as kernels) with ``available_memory_bytes`` patched to one
byte, so that any read of model.A-D on the lifted model raises ModelTooLargeError. Both results
are checked against an independent computation on the plain model's CSR (numpy counts, a sparse
LU of the whole system, ARPACK on |A_cc|), and the lifted one against the plain one: equal for
counts and matrices, to rounding for sums taken in another order.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
import scipy.sparse.linalg as spla

import implicit_compiler as ic
from implicit_compiler import ImplicitModel, StateBlock, TensorSpec, compose
from implicit_compiler import model as model_module
from implicit_compiler.analysis import _block_solve, output_bounds, rescale, sensitivity, sparse_attack, wellposedness
from implicit_compiler.analysis.bounds import rounding_margin
from implicit_compiler.errors import ModelTooLargeError
from implicit_compiler.runtime.plan import execution_order
from implicit_compiler.structure import Dense, StructuredMatrix, Term, lift
from implicit_compiler.viz import spy_pattern

ROOT = Path(__file__).resolve().parents[1]
FORMS = ("plain", "lifted")
LOOP_GAIN = 1e-6  # K = gain * a fixed random pattern: lambda_pf(|A'|) = 0.69 on the LeNet-5 loop


@pytest.fixture(scope="module")
def lenet() -> ImplicitModel:
    return ic.from_onnx(ROOT / "zoo" / "lenet5.onnx", structure="csr")


@pytest.fixture(scope="module")
def resnet() -> ImplicitModel:
    return ic.from_onnx(ROOT / "zoo" / "resnet20.onnx", structure="csr")


@pytest.fixture(scope="module")
def gain_pattern(lenet) -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.normal(size=(lenet.p, lenet.q)) / np.sqrt(lenet.p)


@pytest.fixture(scope="module")
def loop(lenet, gain_pattern) -> ImplicitModel:
    """LeNet-5 closed in the loop u = v + K y (scripts/demo_feedback.py), plain."""
    return compose.feedback(lenet, LOOP_GAIN * gain_pattern)


@contextmanager
def no_materializing():
    """model.A-D of a structured model refuse to materialize inside (the memory left: 1 byte)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_module, "available_memory_bytes", lambda: 1.0)
        yield


def in_form(model: ImplicitModel, form: str) -> ImplicitModel:
    if form == "plain":
        return model
    lifted = lift(model)
    assert lifted.structure.A.terms and lifted.structure.B.terms
    with no_materializing(), pytest.raises(ModelTooLargeError):
        lifted.A  # noqa: B018 (the guard works)
    return lifted


@pytest.fixture(scope="module")
def composed_lifted_loop(lenet, gain_pattern) -> ImplicitModel:
    with no_materializing():
        return compose.feedback(lift(lenet), LOOP_GAIN * gain_pattern)


@pytest.fixture
def lifted_loop(composed_lifted_loop) -> ImplicitModel:
    """The same loop composed from the lifted LeNet-5, without materializing; a new model for
    each test (no CSR cached by an earlier one)."""
    model = composed_lifted_loop
    return ImplicitModel(*model._parts(), model.bias_x, model.bias_y, model.blocks, model.inputs, model.outputs)


def loop_in_form(loop, lifted_loop, form):
    return loop if form == "plain" else lifted_loop


def assert_same_csr(actual, expected) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert np.array_equal(actual.indptr, expected.indptr)
    assert np.array_equal(actual.indices, expected.indices)
    assert np.array_equal(actual.data, expected.data)


def assert_same_model(actual: ImplicitModel, expected: ImplicitModel) -> None:
    materialized = actual.materialized()
    for name in "ABCD":
        assert_same_csr(getattr(materialized, name), getattr(expected, name))
    for name in ("bias_x", "bias_y"):
        assert np.array_equal(getattr(actual, name), getattr(expected, name))
    assert actual.blocks == expected.blocks and actual.inputs == expected.inputs and actual.outputs == expected.outputs


# ----------------------------------------------------------------------------- structure rows
def test_rows_of_a_structured_matrix_equal_the_csr_rows(lenet):
    """to_csr(rows), row_nnz and row_chunks against slices of the model's own CSR."""
    rng = np.random.default_rng(1)
    lifted = lift(lenet)
    for name in "AB":
        structured, csr = getattr(lifted.structure, name), getattr(lenet, name)
        assert np.array_equal(structured.row_nnz(), np.diff(csr.indptr))
        for _ in range(10):
            start = int(rng.integers(0, csr.shape[0]))
            stop = int(rng.integers(start, csr.shape[0] + 1))
            assert_same_csr(structured.to_csr(slice(start, stop)), csr[start:stop])
        chunks = list(structured.row_chunks(5000))
        assert len(chunks) > 10 and chunks[0][0].start == 0 and chunks[-1][0].stop == csr.shape[0]
        assert_same_csr(sp.csr_array(sp.vstack([chunk for _, chunk in chunks], format="csr")), csr)


@pytest.mark.parametrize(
    "rows",
    [
        slice(9408, 11008),  # the block conv2 writes
        slice(9000, 12700),  # cutting the convolution and the first dense term
        np.r_[8232:9408, 9408:11008, 12608:12728],  # runs of blocks
    ],
    ids=["block", "cut", "runs"],
)
def test_row_blocks_and_component_matrices(lenet, rows, monkeypatch, request):
    """_block_solve's rows of A (kept as kernels) and A_cc, against the CSR's."""
    structured, csr = lift(lenet).structure.A, lenet.A
    low, part = _block_solve.row_block(structured, rows)
    assert len(part.terms) == {"block": 1, "cut": 0, "runs": 2}[request.node.callspec.id]
    expected = sp.csr_array(csr[rows])
    assert expected[:, :low].nnz == 0 and expected[:, low + part.shape[1] :].nnz == 0
    assert_same_csr(part.to_csr(), sp.csr_array(expected[:, low : low + part.shape[1]]))
    assert_same_csr(_block_solve.component_matrix(structured, rows), sp.csr_array(expected[:, rows]))
    monkeypatch.setattr(_block_solve, "COMPONENT_CSR_ENTRIES", 0)
    operator = _block_solve.component_matrix(structured, rows, scale=np.full(expected.shape[0], 0.5))
    assert isinstance(operator, spla.LinearOperator) is bool(part.terms)  # a cut term is built as CSR
    vectors = np.random.default_rng(2).normal(size=(expected.shape[0], 3))
    A_cc = 0.5 * expected[:, rows].astype(np.float64)
    np.testing.assert_allclose(operator @ vectors, A_cc @ vectors, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(operator.T @ vectors, A_cc.T @ vectors, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------- spy
def reference_counts(model: ImplicitModel, order: str, whole: bool, resolution: int) -> np.ndarray:
    """Non-zeros per pixel from the whole CSR, placed by the blocks' drawn order."""
    components = execution_order(model)
    blocks = {
        "state": list(range(len(model.blocks))),
        "topological": [index for component in components for index in component.blocks],
    }
    blocks["paper"] = blocks["topological"][::-1]
    position = np.empty(model.n, dtype=np.int64)
    offset = 0
    for index in blocks[order]:
        block = model.blocks[index]
        position[block.slice] = np.arange(offset, offset + block.size)
        offset += block.size
    if whole:
        matrix = sp.bmat([[model.A, model.B], [model.C, model.D]], format="coo")
        rows = np.concatenate([position, model.n + np.arange(model.q)])
        columns = np.concatenate([position, model.n + np.arange(model.p)])
    else:
        matrix, rows, columns = model.A.tocoo(), position, position
    size = -(-max(len(rows), len(columns)) // resolution)
    counts = np.zeros((-(-len(rows) // size), -(-len(columns) // size)), dtype=np.int64)
    nonzero = matrix.data != 0
    np.add.at(counts, (rows[matrix.row[nonzero]] // size, columns[matrix.col[nonzero]] // size), 1)
    return counts


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("order, whole, resolution", [("paper", False, 300), ("topological", True, 1000)])
def test_spy_of_lenet(lenet, form, order, whole, resolution):
    model = in_form(lenet, form)
    with no_materializing():
        counts = spy_pattern(model, order=order, whole=whole, resolution=resolution)
    assert np.array_equal(counts, reference_counts(lenet, order, whole, resolution))


@pytest.mark.parametrize("form", FORMS)
def test_spy_of_the_lenet_loop(loop, lifted_loop, form):
    model = loop_in_form(loop, lifted_loop, form)
    with no_materializing():
        counts = spy_pattern(model, order="state", resolution=2000)
    assert np.array_equal(counts, reference_counts(loop, "state", False, 2000))


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_spy_of_resnet20(resnet, form):
    model = in_form(resnet, form)
    with no_materializing():
        counts = spy_pattern(model, order="paper", whole=True)
    assert np.array_equal(counts, reference_counts(resnet, "paper", True, 1000))


# ------------------------------------------------------------------------------ well-posedness
def loop_reference(model: ImplicitModel) -> tuple[float, float]:
    """(lambda_pf, ||.||_inf) of |A| on the loop, by ARPACK on the largest strongly connected
    set of states (the others have no self-loop: lambda 0) and numpy row sums."""
    (component,) = [c for c in execution_order(model) if c.cyclic]
    rows = _block_solve.component_states(model, component)
    A_cc = abs(sp.csr_array(model.A[rows][:, rows]))
    count, labels = csgraph.connected_components(A_cc, directed=True, connection="strong")
    largest = np.flatnonzero(labels == np.bincount(labels).argmax())
    assert A_cc.diagonal().max() == 0 and len(largest) > 1000
    core = A_cc[largest][:, largest]
    value = spla.eigs(core, k=1, which="LM", tol=1e-14, return_eigenvectors=False)
    return float(np.abs(value[0])), float(A_cc.sum(axis=1).max())


@pytest.mark.parametrize("form", FORMS)
def test_wellposedness_of_the_lenet_loop(loop, lifted_loop, form):
    model = loop_in_form(loop, lifted_loop, form)
    with no_materializing():
        report = wellposedness(model)
    assert not report.acyclic and report.well_posed
    (component,) = report.components
    radius, inf_norm = loop_reference(loop)
    assert 0.6 < radius < 0.8
    assert component.perron_frobenius == pytest.approx(radius, rel=1e-9)
    assert component.inf_norm == pytest.approx(inf_norm, rel=1e-12)
    if form == "lifted":  # the component is built as CSR: the plain model's numbers exactly
        plain = wellposedness(loop)
        assert report.reason == plain.reason and report.components == plain.components


def test_wellposedness_of_a_large_structured_loop_by_iteration(loop, lifted_loop, monkeypatch):
    """Above COMPONENT_CSR_ENTRIES the loop stays an operator on the kernels."""
    monkeypatch.setattr(_block_solve, "COMPONENT_CSR_ENTRIES", 0)
    with no_materializing():
        report = wellposedness(lifted_loop)
    (component,) = report.components
    radius, inf_norm = loop_reference(loop)
    assert report.well_posed
    assert component.perron_frobenius == pytest.approx(radius, rel=1e-8)
    assert component.inf_norm == pytest.approx(inf_norm, rel=1e-12)
    assert component.states == lifted_loop.n


@pytest.mark.parametrize("form", FORMS)
def test_wellposedness_of_feedforward_zoo_models(lenet, form):
    with no_materializing():
        report = wellposedness(in_form(lenet, form))
    assert report.acyclic and report.well_posed


# -------------------------------------------------------------------------------- sensitivity
def reference_sensitivity(model: ImplicitModel) -> np.ndarray:
    """|C| (I - |A|)^{-1} |B| + |D| (relu and identity: Lambda = I) by one sparse LU of the
    whole system."""
    assert {str(block.activation) for block in model.blocks} <= {"relu", "identity"}
    system = sp.csc_array(sp.eye_array(model.n) - abs(model.A.astype(np.float64)))
    Z = spla.splu(system).solve(abs(model.C.astype(np.float64)).T.toarray(), trans="T")
    return (abs(model.B.astype(np.float64)).T @ Z).T + abs(model.D.astype(np.float64)).toarray()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("which", ["lenet", "loop"])
def test_sensitivity(lenet, loop, lifted_loop, form, which):
    plain = lenet if which == "lenet" else loop
    model = in_form(lenet, form) if which == "lenet" else loop_in_form(loop, lifted_loop, form)
    with no_materializing():
        report = sensitivity(model)
    assert report.valid
    np.testing.assert_allclose(report.matrix, reference_sensitivity(plain), rtol=1e-9)
    if form == "lifted":
        expected = sensitivity(plain)
        assert report.reason == expected.reason and report.perron_frobenius == expected.perron_frobenius
        np.testing.assert_allclose(report.matrix, expected.matrix, rtol=1e-12)


def test_sensitivity_of_a_large_structured_loop_by_gmres(loop, lifted_loop, monkeypatch):
    """The adjoint solves (sensitivity) and the forward ones (rounding margin) by GMRES on the
    kernels."""
    u = np.random.default_rng(9).uniform(0, 1, size=(2, loop.p))
    solution, sigma = loop.solve(u.reshape(2, *loop.inputs[0].shape)), np.full(loop.p, 0.01)
    expected = rounding_margin(loop, solution.x, u, sigma, solution.error)
    monkeypatch.setattr(_block_solve, "COMPONENT_CSR_ENTRIES", 0)
    with no_materializing():
        report = sensitivity(lifted_loop)
        margin = rounding_margin(lifted_loop, solution.x, u, sigma, solution.error)
    assert report.valid
    np.testing.assert_allclose(report.matrix, reference_sensitivity(loop), rtol=1e-9)
    np.testing.assert_allclose(margin, expected, rtol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_sensitivity_of_resnet20(resnet, form):
    model = in_form(resnet, form)
    with no_materializing():
        report = sensitivity(model)
    expected = sensitivity(resnet)
    assert report.valid and report.reason == expected.reason
    np.testing.assert_allclose(report.matrix, expected.matrix, rtol=1e-12)
    triangular = sp.csr_array((sp.eye_array(resnet.n, format="csr") - abs(resnet.A)).T)
    Z = spla.spsolve_triangular(triangular, abs(resnet.C).T.toarray(), lower=False, unit_diagonal=True)
    np.testing.assert_allclose(report.matrix, (abs(resnet.B).T @ Z).T + abs(resnet.D).toarray(), rtol=1e-10)


def solve_as(model: ImplicitModel, plain: ImplicitModel, monkeypatch) -> None:
    """model.solve runs the plain model's runtime: the runtime on the structure is step 3 of
    issue 20, not this one."""
    solve = ImplicitModel.solve
    monkeypatch.setattr(
        ImplicitModel, "solve", lambda self, u, **options: solve(plain if self is model else self, u, **options)
    )


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("which", ["lenet", "loop"])
def test_sensitivity_bounds_and_rounding_margin(lenet, loop, lifted_loop, form, which, monkeypatch):
    plain = lenet if which == "lenet" else loop
    model = in_form(lenet, form) if which == "lenet" else loop_in_form(loop, lifted_loop, form)
    rng = np.random.default_rng(3)
    u = rng.uniform(0, 1, size=(3, *lenet.inputs[0].shape))
    expected = output_bounds(plain, u, 0.01, method="sensitivity")
    solve_as(model, plain, monkeypatch)
    with no_materializing():
        bounds = output_bounds(model, u, 0.01, method="sensitivity")
    np.testing.assert_allclose(bounds.lower, expected.lower, rtol=1e-12)
    np.testing.assert_allclose(bounds.upper, expected.upper, rtol=1e-12)
    np.testing.assert_allclose(bounds.margin, expected.margin, rtol=1e-12)
    # the margin's row counts (nnz per row of A, B, C, D) against the CSR's
    solution, sigma, inputs = plain.solve(u), np.full(lenet.p, 0.01), np.abs(u.reshape(3, -1))
    with no_materializing():
        margin = rounding_margin(model, solution.x, inputs, sigma, solution.error)
    np.testing.assert_allclose(margin, rounding_margin(plain, solution.x, inputs, sigma, solution.error), rtol=1e-12)
    assert (bounds.lower <= solution.y).all() and (solution.y <= bounds.upper).all()


@pytest.mark.parametrize("method", ["crown", "ibp"])
def test_relaxed_bounds_of_a_lifted_lenet_that_fits(lenet, method):
    """CROWN and IBP read model.A (they materialize a structured model that fits): the same bounds."""
    rng = np.random.default_rng(4)
    u = rng.uniform(0, 1, size=lenet.inputs[0].shape)
    expected = output_bounds(lenet, u, 0.002, method=method)
    bounds = output_bounds(lift(lenet), u, 0.002, method=method)
    assert np.array_equal(bounds.lower, expected.lower) and np.array_equal(bounds.upper, expected.upper)


def test_attack_and_rescaling_of_lifted_models_that_fit(lenet, loop, lifted_loop):
    """sparse_attack and rescale read model.A too (materializing): the same answers."""
    u = np.random.default_rng(7).uniform(0, 1, size=lenet.inputs[0].shape)
    expected, attack = sparse_attack(lenet, u, 1, 5, 0.1), sparse_attack(lift(lenet), u, 1, 5, 0.1)
    assert np.array_equal(attack.support, expected.support) and np.array_equal(
        attack.perturbation, expected.perturbation
    )
    rescaled, expected = rescale(lifted_loop), rescale(loop)
    for name in "ABCD":
        assert_same_csr(getattr(rescaled, name), getattr(expected, name))


# ------------------------------------------------------------------- a hand-made structured loop
def hand_made_loop() -> tuple[ImplicitModel, ImplicitModel]:
    """(plain, structured): in (relu, 3) -> loop (tanh, 4, reading itself) -> out (relu, 2), the
    loop's rows of A a ``Dense`` term reading the loop block and one reading the input block."""
    rng = np.random.default_rng(8)
    A = np.zeros((9, 9))
    A[3:7, 0:3] = rng.normal(size=(4, 3))
    loop = rng.uniform(0.1, 1.0, size=(4, 4)) * rng.choice([-1.0, 1.0], size=(4, 4))
    A[3:7, 3:7] = loop * 0.8 / np.abs(np.linalg.eigvals(np.abs(loop))).max()
    A[7:9, 3:7] = rng.normal(size=(2, 4))
    blocks = (
        StateBlock("in", 0, 3, "relu", (3,)),
        StateBlock("loop", 3, 7, "tanh", (4,)),
        StateBlock("out", 7, 9, "relu", (2,)),
    )
    B, C, D = rng.normal(size=(9, 5)), rng.normal(size=(3, 9)), rng.normal(size=(3, 5))
    C[:, 0:3] = 0
    parts = (
        B,
        C,
        D,
        rng.normal(size=9),
        rng.normal(size=3),
        blocks,
        (TensorSpec("u", (5,)),),
        (TensorSpec("y", (3,)),),
    )
    plain = ImplicitModel(sp.csr_array(A), *parts)
    terms = (Term(slice(3, 7), Dense(slice(3, 7), A[3:7, 3:7])), Term(slice(3, 7), Dense(slice(0, 3), A[3:7, 0:3])))
    remainder = sp.csr_array(A)
    remainder[3:7, 0:7] = 0
    remainder.eliminate_zeros()
    return plain, ImplicitModel(StructuredMatrix((9, 9), terms, remainder), *parts)


def test_hand_made_structured_loop():
    plain, structured = hand_made_loop()
    with no_materializing():
        reports = wellposedness(structured), sensitivity(structured)
        counts = spy_pattern(structured, whole=True)
        closed = compose.feedback(structured, 0.1 * np.ones((5, 3)))
    expected = wellposedness(plain), sensitivity(plain)
    assert reports[0].reason == expected[0].reason and reports[0].components == expected[0].components
    assert reports[1].reason == expected[1].reason
    np.testing.assert_allclose(reports[1].matrix, expected[1].matrix, rtol=1e-13)
    np.testing.assert_allclose(reports[1].matrix, reference_sensitivity_lipschitz(plain), rtol=1e-10)
    assert np.array_equal(counts, reference_counts(plain, "paper", True, 1000))
    assert_same_model(structured, plain)
    # B K N C reads the loop and out blocks: the term reading the loop moves to the remainder
    assert [term.op.source for term in closed.structure.A.terms] == [slice(0, 3)]
    assert_same_model(closed, compose.feedback(plain, 0.1 * np.ones((5, 3))))


def reference_sensitivity_lipschitz(model: ImplicitModel) -> np.ndarray:
    """|C| (I - |A|)^{-1} |B| + |D| densely (relu and tanh: Lambda = I)."""
    A, B, C, D = (np.abs(m.toarray()) for m in (model.A, model.B, model.C, model.D))
    return C @ np.linalg.solve(np.eye(model.n) - A, B) + D


# -------------------------------------------------------------------------------- composition
def small_model(rng, p: int, q: int, n: int = 6) -> ImplicitModel:
    return ImplicitModel.from_matrices(
        np.tril(rng.normal(size=(n, n)), k=-1) * 0.3, rng.normal(size=(n, p)) / np.sqrt(p),
        rng.normal(size=(q, n)), rng.normal(size=(q, p)) * 0.1, activation="tanh",
        bias_x=rng.normal(size=n), bias_y=rng.normal(size=q),
    )  # fmt: skip


@pytest.mark.parametrize(
    "operation",
    ["parallel", "add", "multiply", "cascade-after", "cascade-before", "feedback"],
)
def test_composing_lifted_models_keeps_their_terms(lenet, gain_pattern, operation, monkeypatch):
    """The composition of lifted LeNet-5s materializes to the composition of the plain ones,
    bitwise; their terms are kept."""
    rng = np.random.default_rng(6)
    other = small_model(rng, lenet.q, lenet.q)  # 10 -> 10
    front = small_model(rng, 5, lenet.p)  # 5 -> 1024
    compositions = {
        "parallel": lambda m: compose.parallel(m, m),
        "add": lambda m: compose.add(m, m),
        "multiply": lambda m: compose.multiply(m, m),
        "cascade-after": lambda m: compose.cascade(m, other),
        "cascade-before": lambda m: compose.cascade(front, m),
        "feedback": lambda m: compose.feedback(m, LOOP_GAIN * gain_pattern),
    }
    lifted = lift(lenet)
    with no_materializing():
        composed = compositions[operation](lifted)
    terms = len(lifted.structure.A.terms) + len(lifted.structure.B.terms)
    assert len(composed.structure.A.terms) + len(composed.structure.B.terms) >= terms
    plain = compositions[operation](lenet)
    if operation == "cascade-before":  # the second B keeps terms: the link branch, no B_2 C_1
        monkeypatch.setattr(compose, "LINK_GROWTH_LIMIT", -np.inf)
    assert_same_model(composed, compositions[operation](lenet))
    u = rng.uniform(0, 1, size=(2, *composed.inputs[0].shape))
    predicted, expected = composed.predict(u), plain.predict(u)
    if isinstance(expected, dict):  # parallel: one output per operand
        assert predicted.keys() == expected.keys()
        predicted, expected = np.concatenate(list(predicted.values())), np.concatenate(list(expected.values()))
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-5)
