"""The runtime on structured models (issue 20, step 3): predict and solve read the terms and the
remainders of ``model.structure``, never materializing A, B, C or D. The memory the process has
left is patched to one byte, so reading ``model.A`` of a structured model raises; every result
is compared with the plain (CSR) model's, run by the CSR paths."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import implicit_compiler as ic
from implicit_compiler import ImplicitModel, StateBlock, TensorSpec
from implicit_compiler import model as model_module
from implicit_compiler.runtime import kernels, structured
from implicit_compiler.runtime.solve import STRUCTURED_BATCH_LIMIT, _plan
from implicit_compiler.structure import Convolution, Dense, StructuredMatrix, Term, lift

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 3, 7, 32, 300)
CLOSE = {np.float64: 1e-10, np.float32: 2e-5}  # relative to the largest output


@pytest.fixture
def no_materializing(monkeypatch):
    """Any read of a structured model's A-D (a CSR built from its terms) raises."""
    monkeypatch.setattr(model_module, "available_memory_bytes", lambda: 1.0)


def assert_never_materialized(model: ImplicitModel) -> None:
    assert not [key for key in model._cache if isinstance(key, tuple) and key[0] == "csr"]
    for dtype in (np.float32, np.float64):
        typed = model._cache.get(np.dtype(dtype))
        assert typed is None or not [key for key in typed._cache if isinstance(key, tuple) and key[0] == "csr"]


def assert_close(got: np.ndarray, expected: np.ndarray, dtype) -> None:
    assert got.dtype == dtype and got.shape == expected.shape
    scale = max(np.abs(expected).max(), 1e-30)
    np.testing.assert_allclose(got, expected, rtol=0, atol=CLOSE[dtype] * scale)


@pytest.fixture(scope="module")
def zoo():
    """(plain, lifted) LeNet-5 and ResNet20 of the zoo."""
    models = {}
    for name in ("lenet5", "resnet20"):
        plain = ic.from_onnx(ROOT / "zoo" / f"{name}.onnx", structure="csr")
        models[name] = (plain, lift(plain))
    return models


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_zoo_models_predict_and_solve_from_their_structure(zoo, name, dtype, no_materializing):
    plain, lifted = zoo[name]
    assert lifted.is_structured and lifted.structure.A.terms and lifted.structure.B.terms
    rng = np.random.default_rng(3)
    plain, lifted = plain.astype(dtype), lifted.astype(dtype)
    for batch in BATCHES:
        u = rng.uniform(-1, 1, size=(batch, *plain.inputs[0].shape)).astype(dtype)
        predicted = lifted.predict(u)
        assert_close(predicted, plain.predict(u), dtype)
        if batch <= STRUCTURED_BATCH_LIMIT:  # the plain model's terms, found in its CSR, run the same kernels
            np.testing.assert_array_equal(predicted, plain.predict(u))
        if batch <= 32:  # (300: the same steps as 32; the tiles run by predict above)
            solution, expected = lifted.solve(u), plain.solve(u)
            assert_close(solution.y, expected.y, dtype)
            assert_close(solution.x, expected.x, dtype)
    assert_never_materialized(lifted)


def test_blocks_take_the_terms_of_the_structure_without_searching(zoo, monkeypatch, no_materializing):
    """LeNet-5 lifted: each block's terms are those of B and A writing its rows (A's reading
    rows of V), with no search for convolutions; its remainder is the remainders' rows."""
    plain, lifted = zoo["lenet5"]
    monkeypatch.setattr(structured, "find_convolution", _refuse)
    sources = structured.tensor_sources(lifted)
    structure, p = lifted.structure, lifted.p
    for block in lifted.blocks:
        found = structured.structured_block(lifted, block, sources)
        expected = [term.op for term in structure.B.terms if term.rows == block.slice]
        sources = [op.source for op in expected]
        for term in structure.A.terms:
            if term.rows == block.slice:
                expected.append(term.op)
                sources.append(slice(term.op.source.start + p, term.op.source.stop + p))
        if not expected:
            assert found is None
            continue
        assert [term.source for term in found.terms] == sources
        assert all(np.array_equal(term.weight, op.weight) for term, op in zip(found.terms, expected))
        rows = sp.hstack([plain.B[block.slice], plain.A[block.slice]], format="csr").tocoo()
        covered = np.zeros(rows.shape[1], dtype=bool)
        for term in found.terms:
            covered[term.source] = True
        keep = ~covered[rows.col]
        rest = sp.coo_array((rows.data[keep], (rows.row[keep], rows.col[keep])), shape=rows.shape).tocsr()
        got = sp.csr_array(rows.shape)
        if found.remainder is not None:
            got = sp.csr_array(
                (found.remainder.data, found.remainder_columns[found.remainder.indices], found.remainder.indptr),
                shape=rows.shape,
            )
        assert (got != rest).nnz == 0


def _refuse(*args, **kwargs):
    raise AssertionError("find_convolution ran on a structured model")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_lenet_feedback_loop_lifted_solves_as_the_plain_loop(dtype, no_materializing):
    lenet = ic.from_onnx(ROOT / "zoo" / "lenet5.onnx", structure="csr")
    pattern = np.random.default_rng(0).normal(size=(lenet.p, lenet.q)) / np.sqrt(lenet.p)
    plain = ic.feedback(lenet, 2e-4 * pattern).astype(dtype)
    lifted = lift(plain)
    assert lifted.structure.A.terms
    plan = _plan(lifted)
    assert plan is not None and len(plan) > 1  # cyclic: a sweep, then the program of y
    tol = 1e-12 if dtype == np.float64 else 1e-6
    close = 1e-9 if dtype == np.float64 else 5e-5
    digits = np.random.default_rng(1).uniform(0, 1, size=(70, 1, 32, 32)).astype(dtype)
    for batch in (1, 3, 70):
        u = digits[:batch]
        solution, expected = lifted.solve(u, tol=tol), plain.solve(u, tol=tol)
        assert solution.iterations >= 2
        scale = np.abs(expected.y).max()
        np.testing.assert_allclose(solution.y, expected.y, rtol=0, atol=close * scale)
        np.testing.assert_allclose(
            lifted.predict(u, tol=tol).reshape(batch, -1), expected.y, rtol=0, atol=close * scale
        )
    assert_never_materialized(lifted)


def _conv(rng, source: slice, in_shape, channels: int, scale: float, pad: int = 1) -> Convolution:
    C, H, W = in_shape
    weight = rng.normal(size=(channels, C * 9))
    weight *= scale / np.abs(weight).sum(axis=1, keepdims=True)
    return Convolution(
        source, in_shape, (channels, H + 2 * pad - 2, W + 2 * pad - 2), (3, 3), (1, 1), (1, 1), (pad, pad), weight
    )


def _dense(rng, source: slice, rows: int, scale: float) -> Dense:
    weight = rng.normal(size=(rows, source.stop - source.start))
    return Dense(source, weight * scale / np.abs(weight).sum(axis=1, keepdims=True))


def _sparse(rng, shape, density: float, rows: slice, columns: slice) -> sp.csr_array:
    """Random entries only at rows x columns (away from the terms)."""
    matrix = np.zeros(shape)
    part = rng.normal(size=(rows.stop - rows.start, columns.stop - columns.start))
    matrix[rows, columns] = part * (rng.uniform(size=part.shape) < density)
    return sp.csr_array(matrix)


def cyclic_model(rng) -> ImplicitModel:
    """u (2, 6, 6); a (3, 6, 6) = tanh(conv(a) + conv(u) + b), a convolution reading its own
    block; d (20) = tanh(W d + V a + R u + b), a dense layer reading itself; y (5) = C_d d
    + R_a a + D u + b_y: C and D with dense terms, and remainders."""
    p, n_a, n_d, q = 72, 108, 20, 5
    a, d = slice(0, n_a), slice(n_a, n_a + n_d)
    n = n_a + n_d
    A = StructuredMatrix(
        (n, n),
        (
            Term(a, _conv(rng, a, (3, 6, 6), 3, 0.6)),
            Term(d, _dense(rng, d, n_d, 0.5)),
            Term(d, _dense(rng, a, n_d, 1.0)),
        ),
        sp.csr_array((n, n)),
    )
    B = StructuredMatrix(
        (n, p), (Term(a, _conv(rng, slice(0, p), (2, 6, 6), 3, 1.0)),), _sparse(rng, (n, p), 0.3, d, slice(0, p))
    )
    C = StructuredMatrix(
        (q, n), (Term(slice(0, q), _dense(rng, d, q, 1.0)),), _sparse(rng, (q, n), 0.2, slice(0, q), a)
    )
    D = StructuredMatrix((q, p), (Term(slice(1, 4), _dense(rng, slice(10, 40), 3, 1.0)),), sp.csr_array((q, p)))
    blocks = (StateBlock("a", 0, n_a, "tanh", (3, 6, 6)), StateBlock("d", n_a, n, "tanh", (n_d,)))
    return ImplicitModel(
        A,
        B,
        C,
        D,
        rng.normal(size=n),
        rng.normal(size=q),
        blocks,
        (TensorSpec("u", (2, 6, 6)),),
        (TensorSpec("y", (q,)),),
    )


def cut_terms_model(rng, cut_inside_a_channel: bool) -> ImplicitModel:
    """Terms that do not match the blocks: a convolution of u writing c1 (4, 6, 6) and c2 (2, 6,
    6) (cut between channels); a dense product of c2 writing e1 (30) and e2 (10); one of e1
    writing rows 10:50 of f (72, identity), the rest of f a remainder reading c1; with
    ``cut_inside_a_channel``, a convolution of c1 writing g1 (50) and g2 (22), cut inside its
    second channel (no operation of the one-sample program computes it: the steps do)."""
    p = 72
    sizes = {"c1": 144, "c2": 72, "e1": 30, "e2": 10, "f": 72}
    shapes = {"c1": (4, 6, 6), "c2": (2, 6, 6), "e1": (30,), "e2": (10,), "f": (72,)}
    activations = {"c1": "relu", "c2": "relu", "e1": "relu", "e2": "tanh", "f": "identity"}
    if cut_inside_a_channel:
        sizes |= {"g1": 50, "g2": 22}
        shapes |= {"g1": (50,), "g2": (22,)}
        activations |= {"g1": "relu", "g2": "sigmoid"}
    blocks, start = [], 0
    for name, size in sizes.items():
        blocks.append(StateBlock(name, start, start + size, activations[name], shapes[name]))
        start += size
    n = start
    at = {block.name: block.slice for block in blocks}
    c, e, f = slice(0, 216), slice(216, 256), at["f"]
    terms_A = [
        Term(e, _dense(rng, at["c2"], 40, 1.0)),
        Term(slice(f.start + 10, f.start + 50), _dense(rng, at["e1"], 40, 1.0)),
    ]
    if cut_inside_a_channel:
        terms_A.append(Term(slice(at["g1"].start, at["g2"].stop), _conv(rng, at["c1"], (4, 6, 6), 2, 1.0)))
    remainder_A = _sparse(rng, (n, n), 0.1, slice(f.start, f.start + 10), at["c1"])
    A = StructuredMatrix(
        (n, n), tuple(terms_A), remainder_A + _sparse(rng, (n, n), 0.1, slice(f.start + 50, f.stop), at["c1"])
    )
    B = StructuredMatrix((n, p), (Term(c, _conv(rng, slice(0, p), (2, 6, 6), 6, 1.0)),), sp.csr_array((n, p)))
    C = sp.csr_array(rng.normal(size=(3, n)) * (rng.uniform(size=(3, n)) < 0.1))
    return ImplicitModel(
        A, B, C, sp.csr_array((3, p)), rng.normal(size=n), None, tuple(blocks), (TensorSpec("u", (2, 6, 6)),),
        (TensorSpec("y", (3,)),),
    )  # fmt: skip


def plain_of(model: ImplicitModel) -> ImplicitModel:
    structure = model.structure
    parts = (structure.A.to_csr(), structure.B.to_csr(), structure.C.to_csr(), structure.D.to_csr())
    return ImplicitModel(*parts, model.bias_x, model.bias_y, model.blocks, model.inputs, model.outputs)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_hand_built_cyclic_model_with_self_reading_terms(dtype, no_materializing):
    """A convolution and a dense layer each reading their own block (iterated: sweeps, a dense
    layer as one map), structured C and D; by auto, Anderson and Picard on the whole model."""
    model = cyclic_model(np.random.default_rng(5))
    plain = plain_of(model).astype(dtype)
    model = model.astype(dtype)
    rng = np.random.default_rng(6)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    close = 1e-9 if dtype == np.float64 else 5e-5
    for batch in BATCHES:
        u = rng.normal(size=(batch, 2, 6, 6)).astype(dtype)
        expected = plain.solve(u, tol=tol)
        scale = np.abs(expected.y).max()
        for method in ("auto", "anderson", "picard") if batch in (1, 7) else ("auto",):
            solution = model.solve(u, tol=tol, method=method)
            assert solution.iterations >= 2
            np.testing.assert_allclose(solution.y, expected.y, rtol=0, atol=close * scale)
            np.testing.assert_allclose(solution.x, expected.x, rtol=0, atol=close * np.abs(expected.x).max())
        np.testing.assert_allclose(model.predict(u, tol=tol), expected.y, rtol=0, atol=close * scale)
    assert_never_materialized(model)


@pytest.mark.parametrize("cut_inside_a_channel", [False, True], ids=["between-channels", "inside-a-channel"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_terms_cut_by_block_bounds(dtype, cut_inside_a_channel, no_materializing):
    model = cut_terms_model(np.random.default_rng(7), cut_inside_a_channel)
    plain = plain_of(model).astype(dtype)
    model = model.astype(dtype)
    assert (_plan(model) is None) == cut_inside_a_channel  # (no operation for a channel cut in two)
    rng = np.random.default_rng(8)
    for batch in BATCHES:
        u = rng.normal(size=(batch, 2, 6, 6)).astype(dtype)
        assert_close(model.predict(u), plain.predict(u), dtype)
        assert_close(model.solve(u).x, plain.solve(u).x, dtype)
    assert_never_materialized(model)


def test_structured_models_run_without_the_compiled_kernels(monkeypatch, no_materializing):
    """The scipy fallback (no numba): rows of the remainders and the terms as products."""
    monkeypatch.setattr(kernels, "available", lambda: False)
    rng = np.random.default_rng(9)
    for model in (cyclic_model(np.random.default_rng(5)), cut_terms_model(np.random.default_rng(7), True)):
        plain = plain_of(model)
        for batch in (1, 5):
            u = rng.normal(size=(batch, 2, 6, 6))
            expected = plain.solve(u, tol=1e-12)
            solution = model.solve(u, tol=1e-12)
            np.testing.assert_allclose(solution.y, expected.y, rtol=0, atol=1e-9 * np.abs(expected.y).max())
        assert_never_materialized(model)


@pytest.mark.parametrize(
    "spec", ["identity", "relu", "leaky_relu(0.1)", "tanh", "sigmoid", "gelu", "elu", "softplus", "hard_swish"]
)
@pytest.mark.parametrize("per_sample_bias", [False, True], ids=["bias", "bias-per-sample"])
def test_a_block_is_finished_in_one_pass_as_numpy_computes_it(spec, per_sample_bias):
    """kernels.finish_rows (threads and one thread): Z = phi(Z + bias + R V[sources]), against
    numpy's sum and the activation's numpy formula; a NaN stays NaN (relu's included), and rows
    of the remainder read rows of V anywhere, scattered or on diagonals (``diagonal_runs``'
    streams: a residual identity, a scaled shifted one, runs broken by a gap, a weight change
    and the ``FINISH_RUN`` boundary)."""
    rng = np.random.default_rng(10)
    rows, batch = kernels.FINISH_RUN + 60, 3
    values = rng.normal(size=(2 * rows + 100, batch))
    scattered = sp.random_array((rows, 30), density=0.2, format="csr", rng=rng)
    columns = np.sort(rng.choice(100, size=30, replace=False))
    R = sp.csr_array((scattered.data, columns[scattered.indices], scattered.indptr), shape=(rows, values.shape[0]))
    identity = sp.eye_array(rows, values.shape[0], k=100)  # reads V[r + 100]
    shifted = sp.eye_array(rows, values.shape[0], k=rows + 7).tolil()
    shifted[10:20, :] = 0  # a gap: rows 0-9 and 20-29 are too short a run (scattered)
    shifted = 0.5 * shifted.tocsr()
    shifted[30:50] *= 3  # another weight
    R = (R + identity + shifted).tocsr()
    bias = rng.normal(size=(rows, batch if per_sample_bias else 1))
    Z = rng.normal(size=(rows, batch)) * 3
    Z[3, 2] = np.nan
    phi = ic.activation(spec)
    expected = phi(Z + bias + R @ values)
    assert np.isnan(expected[3, 2])
    remainder = kernels.diagonal_runs(R.indptr, R.indices.astype(np.int64), R.data)
    segments = remainder[3]
    assert remainder[0][-1] == scattered.nnz + 20 and segments.shape[0] == 5  # the diagonals as streams
    assert np.all(segments[:, 0] // kernels.FINISH_RUN == (segments[:, 1] - 1) // kernels.FINISH_RUN)
    alpha, beta = phi.alpha or 0.0, phi.beta or 0.0
    by_rows = kernels.diagonal_runs(R.indptr, R.indices.astype(np.int64), R.data, least_run=None)
    assert by_rows[0][-1] == R.nnz and by_rows[3].shape == (0, 3)  # no run looked for
    code = kernels.ACTIVATION_CODES[phi.name]
    for read, one_sample, flat in itertools.product((remainder, by_rows), (False, True), (False, True)):
        inputs = (bias[:, :1] if per_sample_bias and one_sample else bias, values[:, :1] if one_sample else values)
        sample_values = np.ascontiguousarray(inputs[1])
        flat_values = sample_values.reshape(-1) if flat else np.empty(0)  # (streams of V's flat view)
        for finish in (kernels.finish_rows, kernels.finish_rows_serial):
            got = Z[:, :1].copy() if one_sample else Z.copy()
            finish(got, np.ascontiguousarray(inputs[0]), read, sample_values, flat_values, code, alpha, beta)
            want = expected[:, :1] if one_sample else expected
            np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13, equal_nan=True)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_blocks_without_terms_run_as_remainder_blocks(zoo, dtype, monkeypatch, no_materializing):
    """A structured model's blocks without terms (LeNet-5's pooling trees) as remainder blocks
    (``structured.remainder_block``: bias, sparse rows and activation in one compiled pass), here
    from one row on: every batch size predicts as the plain model by its CSR paths."""
    import importlib

    solve_module = importlib.import_module("implicit_compiler.runtime.solve")
    monkeypatch.setattr(solve_module, "REMAINDER_BLOCK_ROWS", 1)
    plain, lifted = zoo["lenet5"]
    model = lift(plain).astype(dtype)  # (a model of its own: its steps are made here)
    steps = solve_module._execution_steps(model, structured=True)
    alone = [step for step in steps if isinstance(step, structured.StructuredBlock) and not step.terms]
    assert len(alone) >= 4 and all(step.remainder is not None for step in alone)
    rng = np.random.default_rng(11)
    for batch in BATCHES:
        u = rng.normal(size=(batch, 1, 32, 32)).astype(dtype)
        assert_close(model.predict(u), plain.astype(dtype).predict(u), dtype)
    assert_never_materialized(model)


def test_a_sweeps_blocks_made_for_each_solve_do_not_search_diagonals(monkeypatch):
    """A cyclic component's blocks with B u folded into their bias are made anew by every solve
    (``cyclic._frozen``): their remainders are read by rows, without the search for diagonal
    runs (its sorts cost more than the sweeps of a small model); the solution is unchanged."""
    rng = np.random.default_rng(12)
    n, p = 50, 64
    A = np.abs(rng.normal(size=(n, n))) * (rng.random((n, n)) < 0.8)  # (its rows a sparse remainder)
    A *= 0.9 / A.sum(axis=1).max()  # ||A||_inf = 0.9, as a trained implicit classifier's
    B = rng.normal(size=(n, p))
    model = ImplicitModel.from_matrices(A, B, np.zeros((1, n)), np.zeros((1, p)), bias_x=rng.normal(size=n))
    model = model.astype(np.float32)  # (as a trained classifier runs)
    searches = []
    original = kernels.diagonal_runs
    monkeypatch.setattr(
        kernels, "diagonal_runs", lambda *arrays, **options: searches.append(options) or original(*arrays, **options)
    )
    u = rng.normal(size=(1, p)).astype(np.float32)
    first = model.solve(u, tol=1e-6).x
    counted = len(searches)
    again = model.solve(u, tol=1e-6).x
    assert len(searches) > counted and all(options == {"least_run": None} for options in searches[counted:])
    np.testing.assert_array_equal(again, first)
    x = first[0]
    np.testing.assert_allclose(x, np.maximum(A @ x + B @ u[0] + model.bias_x, 0), rtol=0, atol=1e-4)
