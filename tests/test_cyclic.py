"""Cyclic components by block Gauss-Seidel sweeps (runtime/cyclic.py) and the fixed-point
iteration's stopping test (runtime/fixed_point.py), against independent fixed points: scipy's
root finder per sample, and a plain numpy/scipy Picard loop on the whole model in float64."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse as sp
from conftest import contractive_matrix, run_readme_block

import implicit_compiler as ic
from implicit_compiler import ImplicitModel, StateBlock, TensorSpec
from implicit_compiler.runtime import cyclic, fixed_point, sample_tiles
from implicit_compiler.runtime.cyclic import Sweep, torn_blocks
from implicit_compiler.runtime.solve import _execution_steps, _plan

ROOT = Path(__file__).resolve().parents[1]
NUMPY_PHI = {
    "relu": lambda z: np.maximum(z, 0),
    "identity": lambda z: z,
    "tanh": np.tanh,
    "leaky_relu": lambda z: np.where(z < 0, 0.1 * z, z),
}


def numpy_fixed_point(model: ImplicitModel, u: np.ndarray, iterations: int = 400) -> np.ndarray:
    """x = phi(A x + B u + b) by plain Picard on the whole model in float64 with scipy
    products (every model here contracts fast): the reference, (batch, n)."""
    A, B = model.A.astype(np.float64), model.B.astype(np.float64)
    constant = B @ u.T.astype(np.float64) + model.bias_x.astype(np.float64)[:, None]
    x = np.zeros_like(constant)
    for _ in range(iterations):
        z = A @ x + constant
        new = np.empty_like(z)
        for block in model.blocks:
            new[block.start : block.stop] = NUMPY_PHI[block.activation.name](z[block.start : block.stop])
        if np.array_equal(new, x):
            break
        x = new
    return x.T


def root_fixed_point(A, B, b, u, phi):
    """x = phi(A x + B u + b) per sample by scipy's hybrid Powell root finder."""
    rows = []
    for sample in u:
        equation = lambda x, s=sample: x - phi(A @ x + B @ s + b)
        result = scipy.optimize.root(equation, np.zeros(A.shape[0]), tol=1e-14)
        assert np.abs(equation(result.x)).max() <= 1e-13, result.message  # ("xtol too small" at 1e-14 is fine)
        rows.append(result.x)
    return np.array(rows)


def dense_model(rng, n=60, p=7, norm=0.9, activation="tanh", nonnegative=False):
    A = rng.uniform(size=(n, n)) if nonnegative else rng.normal(size=(n, n))
    A *= norm / np.abs(A).sum(axis=1).max()
    B, C = rng.normal(size=(n, p)), rng.normal(size=(3, n))
    return ImplicitModel.from_matrices(A, B, C, np.zeros((3, p)), activation=activation, bias_x=rng.normal(size=n))


def ring_model(rng, sizes=(5, 6, 4), p=3) -> ImplicitModel:
    """Blocks a -> b -> c -> a (tanh, leaky relu, tanh): one cyclic component, c torn."""
    n = sum(sizes)
    starts = np.cumsum((0,) + sizes)
    A = np.zeros((n, n))
    for k in range(len(sizes)):
        source = (k - 1) % len(sizes)
        block = rng.normal(size=(sizes[k], sizes[source]))
        A[starts[k] : starts[k + 1], starts[source] : starts[source + 1]] = 0.8 * block / np.abs(block).sum(1).max()
    B = np.zeros((n, p))
    B[: sizes[0]] = rng.normal(size=(sizes[0], p))
    C = np.zeros((2, n))
    C[:, starts[-2] :] = rng.normal(size=(2, sizes[-1]))
    names, activations = ("a", "b", "c"), ("tanh", "leaky_relu(0.1)", "tanh")
    blocks = tuple(
        StateBlock(name, int(starts[k]), int(starts[k + 1]), activation, (sizes[k],))
        for k, (name, activation) in enumerate(zip(names, activations))
    )
    return ImplicitModel(
        sp.csr_array(A), sp.csr_array(B), sp.csr_array(C), sp.csr_array((2, p)), rng.normal(size=n), None,
        blocks, (TensorSpec("u", (p,)),), (TensorSpec("y", (2,)),),
    )  # fmt: skip


def lenet_loop(dtype=np.float64) -> ImplicitModel:
    """LeNet-5 of the zoo closed in a feedback loop u = v + K y (the loop of demo_feedback)."""
    lenet = ic.from_onnx(ROOT / "zoo" / "lenet5.onnx")
    pattern = np.random.default_rng(0).normal(size=(lenet.p, lenet.q)) / np.sqrt(lenet.p)
    return ic.feedback(lenet, 2e-4 * pattern).astype(dtype)


def record_self_loops(monkeypatch) -> list:
    """The results of ``cyclic._self_loop`` in the solves that follow (None: not a dense layer)."""
    taken = []
    original = cyclic._self_loop
    monkeypatch.setattr(cyclic, "_self_loop", lambda sweep, V: taken.append(original(sweep, V)) or taken[-1])
    return taken


def test_torn_blocks_are_the_sources_of_back_edges():
    edges = {0: {2}, 1: {0}, 2: {1}}  # a ring: block 0 reads block 2
    assert torn_blocks([0, 1, 2], edges.__getitem__) == [2]
    assert torn_blocks([0], {0: {0}}.__getitem__) == [0]  # a block reading itself
    assert torn_blocks([0, 1, 2], {0: {2, 1}, 1: {0}, 2: {1}}.__getitem__) == [1, 2]


@pytest.mark.parametrize("batch", [1, 5, 70])
@pytest.mark.parametrize("method", ["auto", "auto broyden", "picard", "anderson"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_dense_loop_matches_root_finding(rng, batch, method, activation):
    """A dense cyclic A (one block reading itself: a structured BLAS product, out of place)."""
    model = dense_model(rng, activation=activation)
    steps = _execution_steps(model, structured=False)
    assert len(steps) == 1 and isinstance(steps[0], Sweep) and steps[0].torn.size == model.n
    u = rng.normal(size=(batch, model.p))
    A, B = model.A.toarray(), model.B.toarray()
    expected = root_fixed_point(A, B, model.bias_x, u, NUMPY_PHI[activation])
    method, _, acceleration = method.partition(" ")
    solution = model.solve(u, method=method, acceleration=acceleration or "anderson")
    np.testing.assert_allclose(solution.x, expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(solution.y, expected @ model.C.toarray().T, rtol=1e-9, atol=1e-9)
    assert solution.iterations > 0 and 0 <= solution.error <= 1e-10


@pytest.mark.parametrize("acceleration", ["anderson", "broyden"])
@pytest.mark.parametrize("compact_share", [0.0, 0.5, 1.0], ids=["never", "half", "always"])
@pytest.mark.parametrize("batch", [1, 3, 40])
def test_ring_sweeps_match_root_finding_whatever_the_compaction(rng, monkeypatch, compact_share, batch, acceleration):
    """Inputs of very different sizes: samples stop at different iterations; the stopped ones
    are kept aside, and the rest compacted never, from half, or at every stop."""
    monkeypatch.setattr(cyclic, "COMPACT_SHARE", compact_share)
    model = ring_model(rng)
    (sweep,) = _execution_steps(model, structured=batch <= 7)
    assert sweep.names == ("a", "b", "c") and list(sweep.torn) == list(range(model.p + 11, model.p + 15))
    u = rng.normal(size=(batch, model.p)) * np.geomspace(1e-3, 10, batch)[:, None]
    phi = lambda z: np.concatenate([np.tanh(z[:5]), NUMPY_PHI["leaky_relu"](z[5:11]), np.tanh(z[11:])])
    expected = root_fixed_point(model.A.toarray(), model.B.toarray(), model.bias_x, u, phi)
    solution = model.solve(u, acceleration=acceleration)
    np.testing.assert_allclose(solution.x, expected, rtol=1e-9, atol=1e-9)
    assert [names for names, _ in solution.component_histories] == [("a", "b", "c")]


@pytest.mark.parametrize("acceleration", ["anderson", "broyden"])
def test_two_components_in_sequence(rng, acceleration):
    """ring -> dense loop: two cyclic components, each solved by its own sweeps."""
    first, second = ring_model(rng), dense_model(rng, n=20, p=2)
    model = ic.cascade(first, second)
    u = rng.normal(size=(9, first.p))
    solution = model.solve(u, acceleration=acceleration)
    assert len(solution.component_histories) == 2
    np.testing.assert_allclose(solution.x, numpy_fixed_point(model, u), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(solution.y, second.predict(first.predict(u)), rtol=1e-9, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lenet_feedback_loop_by_the_plan(dtype):
    """LeNet-5 in a feedback loop: one sample by the plan in one values array, a batch by tiles
    of samples (sweeps on the tiles still running), a small batch by the steps; every one
    against the float64 Picard loop on the whole model."""
    model = lenet_loop(dtype)
    plan = _plan(model)
    assert plan is not None and isinstance(plan[0], Sweep) and plan[0].torn.size == 84
    digits = np.random.default_rng(1).uniform(0, 1, size=(70, 1, 32, 32))
    expected_x = numpy_fixed_point(lenet_loop(np.float64), digits.reshape(70, -1))
    expected_y = expected_x @ model.C.T.astype(np.float64) + model.bias_y.astype(np.float64)
    assert sample_tiles.least_batch(dtype) <= 70
    tol, close = (1e-12, 1e-9) if dtype == np.float64 else (1e-6, 2e-5)
    scale = np.abs(expected_y).max()
    for batch, acceleration in ((1, "anderson"), (3, "anderson"), (70, "anderson"), (1, "broyden"), (70, "broyden")):
        u = digits[:batch].astype(dtype)
        solution = model.solve(u, tol=tol, acceleration=acceleration)
        assert solution.iterations >= 2 and solution.x.dtype == dtype
        np.testing.assert_allclose(solution.y, expected_y[:batch], rtol=0, atol=close * scale)
        np.testing.assert_allclose(solution.x, expected_x[:batch], rtol=0, atol=close * np.abs(expected_x).max())
        predicted = model.predict(u, tol=tol)
        np.testing.assert_allclose(predicted.reshape(batch, -1), expected_y[:batch], rtol=0, atol=close * scale)


@pytest.mark.parametrize("acceleration", ["anderson", "broyden"])
def test_diverging_loop_raises_without_hanging(acceleration):
    model = ImplicitModel.from_matrices(1.5 * np.eye(4), np.ones((4, 1)), np.eye(4), np.zeros((4, 1)))
    for batch in (1, 50):
        with pytest.raises(ic.ConvergenceError) as caught:
            model.solve(np.ones((batch, 1)), max_iter=100, acceleration=acceleration)
        assert 0 < caught.value.iterations <= 100
        assert len(caught.value.residual_history) == caught.value.iterations


@pytest.mark.slow
def test_diverging_lenet_loop_by_tiles_raises():
    lenet = ic.from_onnx(ROOT / "zoo" / "lenet5.onnx")
    model = ic.feedback(lenet, 0.5 * np.ones((lenet.p, lenet.q))).astype(np.float32)
    with pytest.raises(ic.ConvergenceError, match="cyclic component"):
        model.predict(np.ones((70, 1, 32, 32), np.float32), max_iter=50)


def test_the_tolerance_bounds_the_error_not_the_last_step(rng):
    """A linear loop contracting slowly (rate 0.99): the error of x is within tol, where a
    residual test alone would stop about 100x too early."""
    n = 30
    A = rng.uniform(size=(n, n))
    A *= 0.99 / A.sum(axis=1, keepdims=True)  # every row sums to 0.99: lambda_pf = 0.99
    model = ImplicitModel.from_matrices(A, np.eye(n), np.eye(n), np.zeros((n, n)), activation="identity")
    u = rng.uniform(size=(4, n))
    exact = np.linalg.solve(np.eye(n) - A, u.T).T
    for method in ("picard", "auto"):
        solution = model.solve(u, tol=1e-6, method=method, anderson_memory=0, max_iter=5000)
        error = np.abs(solution.x - exact).max(axis=1) / np.abs(exact).max(axis=1)
        assert error.max() <= 1e-6, method
        assert solution.residual_history[-1] < 3e-8  # (a residual test would stop at 1e-6)


def test_tolerance_below_the_dtype_is_refused(rng):
    model = dense_model(rng).astype(np.float32)
    u = rng.normal(size=(2, model.p)).astype(np.float32)
    for tol in (1e-10, 0.0, -1.0, float("nan")):
        with pytest.raises(ic.ToleranceError):
            model.solve(u, tol=tol)
    with pytest.raises(ic.ToleranceError, match="float32"):
        model.predict(u, tol=1e-9)
    model.solve(u.astype(np.float64), tol=1e-10)  # float64 reaches it


def test_rounding_floor_stops_with_a_clear_error(rng):
    """float32, rate 0.9999: the error cannot reach 1e-6; the iteration says so early."""
    n = 8
    A = np.full((n, n), 0.9999 / n)
    model = ImplicitModel.from_matrices(A, np.eye(n), np.eye(n), np.zeros((n, n)), activation="identity")
    with pytest.raises(ic.ConvergenceError, match="rounding floor of float32") as caught:
        model.astype(np.float32).solve(np.ones((2, n), np.float32), tol=1e-6, anderson_memory=0, max_iter=100000)
    assert caught.value.iterations < 100000


def test_anderson_needs_fewer_sweeps_on_a_slow_loop(rng):
    model = dense_model(rng, norm=0.99, activation="relu", nonnegative=True)
    u = rng.normal(size=(6, model.p))
    auto = model.solve(u, tol=1e-9)
    picard = model.solve(u, tol=1e-9, method="picard")
    np.testing.assert_allclose(auto.x, picard.x, rtol=1e-7, atol=1e-7)
    assert auto.iterations < picard.iterations / 2
    x = auto.x
    residual = x - np.maximum(x @ model.A.T + u @ model.B.T + model.bias_x, 0)
    assert np.abs(residual).max() <= 1e-9 * np.abs(x).max()


def test_safeguard_restarts_keep_anderson_near_picard(rng):
    """A rotation-like loop where mixing can overshoot: auto never needs many more sweeps
    than Picard."""
    n = 16
    A = contractive_matrix(rng, n, 0.95)
    model = ImplicitModel.from_matrices(A, np.eye(n), np.eye(n), np.zeros((n, n)), activation="tanh")
    u = rng.normal(size=(8, n)) * 3
    auto = model.solve(u, tol=1e-10)
    picard = model.solve(u, tol=1e-10, method="picard")
    np.testing.assert_allclose(auto.x, picard.x, rtol=1e-8, atol=1e-8)
    assert auto.iterations <= picard.iterations + 3


@pytest.mark.parametrize("acceleration", ["anderson", "broyden"])
def test_an_overshooting_step_does_not_send_the_iteration_round_in_a_cycle(acceleration):
    """A relu loop with repeated rows (as Frank-Wolfe's vertices make them), ||A||_inf = 0.95:
    Anderson's second step overshoots to all-negative pre-activations, where g is 0, the start;
    going on from there repeated the same three steps until max_iter. After a restart the
    iteration goes on from the iterate before the overshoot (its plain step) and converges to
    the fixed point (root finding on x = relu(A x + u))."""
    r1, r2, r3 = [0, 0, 0.855, 0.095, 0, 0, 0, 0], [0, 0.57, 0, 0, 0, 0, 0, 0.38], [0, 0, 0.855, -0.095, 0, 0, 0, 0]
    A = np.array([r1, r2, r1, r3, r2, r1, r2, r2])
    model = ImplicitModel.from_matrices(A, np.eye(8), np.eye(8), np.zeros((8, 8)), activation="relu")
    u = np.array([[0.759, -1.472, 1.087, 0.869, -0.535, 0.791, -0.676, -1.643]])
    expected = root_fixed_point(A, np.eye(8), np.zeros(8), u, NUMPY_PHI["relu"])
    solution = model.solve(u, acceleration=acceleration)
    np.testing.assert_allclose(solution.x, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_readme_feedback_example_runs_as_written(monkeypatch):
    """The README's composition example: its loop is well-posed, rescales and predicts."""
    namespace = run_readme_block("## Composition and analysis", ROOT, monkeypatch)
    assert namespace["report"].well_posed
    assert namespace["y"].shape == (1, 10) and np.isfinite(namespace["y"]).all()


@pytest.mark.parametrize("method", ["auto", "auto broyden", "picard", "anderson"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_the_tolerance_bounds_the_output_error_whatever_the_scaling_of_the_states(method, dtype):
    """A loop of 5 blocks (each reads the one before it, the first the last), the input into the
    first, the output read from the last; and the same model with the states of blocks 2-5
    scaled down by 1e8 (x' = V^-1 x: identical y, for relu). Measured on all states at once, the
    first block hides the others' steps: a whole-model Picard iteration would stop before the
    input has reached the output. The relative error of y at tol stays within 2 tol on both,
    against the float64 reference."""
    rng = np.random.default_rng(11)
    size, count, p = 8, 5, 4
    n = size * count
    A = np.zeros((n, n))
    for k in range(1, count):
        A[k * size : (k + 1) * size, (k - 1) * size : k * size] = rng.uniform(size=(size, size))
    A[:size, -size:] = 0.2 * rng.uniform(size=(size, size))  # the loop back
    A *= 0.9 / np.abs(A).sum(axis=1).max()
    B = np.zeros((n, p))
    B[:size] = rng.uniform(size=(size, p))
    C = np.zeros((3, n))
    C[:, -size:] = rng.normal(size=(3, size))
    blocks = tuple(StateBlock(f"b{k}", k * size, (k + 1) * size, "relu", (size,)) for k in range(count))
    specs = ((TensorSpec("u", (p,)),), (TensorSpec("y", (3,)),))
    v = np.concatenate([np.ones(size), np.full(n - size, 1e-8)])
    models = [
        ImplicitModel(
            sp.csr_array(A * v[None, :] / v[:, None]),
            sp.csr_array(B / v[:, None]),
            sp.csr_array(C * v),
            sp.csr_array((3, p)),
            None,
            None,
            blocks,
            *specs,
        )  # fmt: skip
        for v in (np.ones(n), v)
    ]
    u = rng.uniform(size=(6, p))
    reference = numpy_fixed_point(models[0], u, iterations=2000) @ C.T
    tol = 1e-6 if dtype == np.float64 else 1e-5
    method, _, acceleration = method.partition(" ")
    for model in models:
        y = (
            model.astype(dtype)
            .solve(u.astype(dtype), method=method, tol=tol, acceleration=acceleration or "anderson")
            .y
        )
        error = np.abs(y - reference).max(axis=1) / np.abs(reference).max(axis=1)
        assert error.max() <= 2 * tol, (method, error.max() / tol)


def test_an_unknown_acceleration_is_a_shape_error(rng):
    with pytest.raises(ic.ShapeError, match="unknown acceleration 'newton'"):
        dense_model(rng).solve(np.zeros((2, 7)), acceleration="newton")


@pytest.mark.parametrize("compact_share", [0.0, 0.5, 1.0], ids=["never", "half", "always"])
def test_dense_loop_with_samples_stopping_apart_matches_root_finding(rng, monkeypatch, compact_share):
    """A dense loop reading the inputs through B (a term folded, once per solve, into a bias per
    sample): inputs of very different sizes stop at different sweeps, and the columns left are
    compacted never, from half, or at every stop, the folded bias with them."""
    monkeypatch.setattr(cyclic, "COMPACT_SHARE", compact_share)
    model = dense_model(rng, n=60, p=64, activation="tanh", nonnegative=True)
    (sweep,) = _execution_steps(model, structured=False)
    assert any(len(step.terms) == 2 for step in sweep.steps)  # B u and A x
    u = rng.normal(size=(30, model.p)) * np.geomspace(1e-3, 1e3, 30)[:, None]  # (tanh saturates: fast)
    expected = root_fixed_point(model.A.toarray(), model.B.toarray(), model.bias_x, u, np.tanh)
    solution = model.solve(u)
    np.testing.assert_allclose(solution.x, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("batch", [1, 4, 40])
def test_dense_layer_after_an_encoder_is_iterated_as_one_map(rng, monkeypatch, batch, dtype):
    """encoder (relu) -> a dense implicit layer reading itself and the encoder (relu) -> output:
    the encoder's term and the inputs' are folded into a bias once per solve and the layer is
    iterated as t -> relu(M t + c) (``cyclic._self_loop``); the states match scipy's root
    finder on the layer's equation with the encoder's states computed directly."""
    taken = record_self_loops(monkeypatch)
    p, encoder, layer = 6, 30, 50
    W_enc, W_in = rng.normal(size=(encoder, p)), rng.normal(size=(layer, p))
    W_cross, M = rng.normal(size=(layer, encoder)) / encoder, contractive_matrix(rng, layer, 0.9)
    A = np.block([[np.zeros((encoder, encoder)), np.zeros((encoder, layer))], [W_cross, M]])
    B = np.vstack([W_enc, W_in])
    blocks = (
        StateBlock("encoder", 0, encoder, "relu", (encoder,)),
        StateBlock("layer", encoder, encoder + layer, "relu", (layer,)),
    )
    bias = rng.normal(size=encoder + layer)
    C = rng.normal(size=(2, encoder + layer))
    model = ImplicitModel(
        sp.csr_array(A), sp.csr_array(B), sp.csr_array(C), sp.csr_array((2, p)), bias, np.zeros(2), blocks,
        (TensorSpec("u", (p,)),), (TensorSpec("y", (2,)),),
    ).astype(dtype)  # fmt: skip
    u = rng.normal(size=(batch, p))
    hidden = np.maximum(u @ W_enc.T + bias[:encoder], 0)
    constant = hidden @ W_cross.T + u @ W_in.T + bias[encoder:]
    expected_layer = root_fixed_point(M, np.eye(layer), np.zeros(layer), constant, NUMPY_PHI["relu"])
    solution = model.solve(u.astype(dtype), tol=1e-10 if dtype == np.float64 else 1e-5)
    assert taken and all(loop is not None for loop in taken)
    tolerance = 1e-9 if dtype == np.float64 else 2e-4
    np.testing.assert_allclose(solution.x[:, :encoder], hidden, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(solution.x[:, encoder:], expected_layer, rtol=tolerance, atol=tolerance)
    expected_y = np.hstack([hidden, expected_layer]) @ C.T
    np.testing.assert_allclose(solution.y, expected_y, rtol=tolerance, atol=tolerance * np.abs(expected_y).max())


def test_acceleration_pays_from_a_rate_that_grows_with_its_cost():
    """``accelerate_from``: the floor for a free acceleration, increasing with its cost, never
    reaching 1 (a slow enough contraction is always accelerated); no cost model without the
    map's work or without memory."""
    rates = [fixed_point.accelerate_from(cost) for cost in (0.0, 0.3, 1.0, 3.0, 30.0)]
    assert rates[0] == fixed_point.ACCELERATE_FROM
    assert all(a < b for a, b in zip(rates[1:], rates[2:])) and rates[1] > rates[0] and rates[-1] < 1
    assert fixed_point.acceleration_cost(500, 64, None, 5, np.float64) == 0.0
    assert fixed_point.acceleration_cost(500, 64, 250_000, 0, np.float64) == 0.0
    # cheaper relative to a larger map, dearer at one sample (its passes do not vectorize)
    small, large = (fixed_point.acceleration_cost(200, 256, work, 5, np.float32) for work in (40_000, 4_000_000))
    assert large < small
    assert fixed_point.acceleration_cost(500, 1, 250_000, 5, np.float64) > fixed_point.acceleration_cost(
        500, 64, 250_000, 5, np.float64
    )


@pytest.mark.parametrize("rate", [0.3, 0.99])
def test_a_cheap_map_is_accelerated_only_when_its_contraction_is_slow(rng, rate):
    """x = rate S x + c with S row-stochastic (the slowest mode contracts by exactly ``rate``) on
    512 samples, the map declared as cheap as one pass over its states (map_work = rows): the
    acceleration costs several steps of it, so a fast contraction takes Picard's steps exactly
    and a slow one still far fewer; both reach the linear solution."""
    n, batch = 40, 512
    S = rng.uniform(size=(n, n))
    P = rate * S / S.sum(axis=1, keepdims=True)
    c = rng.normal(size=(n, batch))
    expected = np.linalg.solve(np.eye(n) - P, c)
    g = lambda x, columns: P @ x + c[:, columns]
    assert fixed_point.accelerate_from(round(fixed_point.acceleration_cost(n, batch, n, 5, np.float64), 2)) > 0.5
    picard = fixed_point.iterate(g, np.zeros((n, batch)), 1e-10, 5000, memory=0)
    gated = fixed_point.iterate(g, np.zeros((n, batch)), 1e-10, 5000, memory=5, map_work=n)
    np.testing.assert_allclose(gated.x, expected, rtol=1e-8, atol=1e-8)
    if rate < 0.5:
        assert len(gated.history) == len(picard.history)
    else:
        assert len(gated.history) < len(picard.history) / 2


@pytest.mark.parametrize("batch", [1, 5])
def test_dense_layer_reading_no_input_is_iterated_as_one_map(rng, monkeypatch, batch):
    """A dense layer that reads only itself (its rows of B are zero: nothing to fold, the bias is
    the block's own) next to a block that reads the inputs and the layer: the layer is the map
    t -> tanh(M t + b), its states the root of that equation whatever the inputs."""
    taken = record_self_loops(monkeypatch)
    layer, head, p = 60, 3, 4  # (60 x 60: above structured.MIN_STRUCTURED_NONZEROS, a dense term)
    M = contractive_matrix(rng, layer, 0.9)
    A = np.zeros((layer + head, layer + head))
    A[:layer, :layer] = M
    A[layer:, :layer] = rng.normal(size=(head, layer))
    B = np.vstack([np.zeros((layer, p)), rng.normal(size=(head, p))])
    bias = rng.normal(size=layer + head)
    blocks = (StateBlock("layer", 0, layer, "tanh", (layer,)), StateBlock("head", layer, layer + head, "relu", (head,)))
    model = ImplicitModel(
        sp.csr_array(A), sp.csr_array(B), sp.csr_array(np.eye(layer + head)), sp.csr_array((layer + head, p)),
        bias, np.zeros(layer + head), blocks, (TensorSpec("u", (p,)),), (TensorSpec("y", (layer + head,)),),
    )  # fmt: skip
    u = rng.normal(size=(batch, p))
    expected = root_fixed_point(M, np.zeros((layer, p)), bias[:layer], u, np.tanh)
    solution = model.solve(u)
    assert taken and all(loop is not None for loop in taken)
    np.testing.assert_allclose(solution.x[:, :layer], expected, rtol=1e-9, atol=1e-9)
    head_states = np.maximum(expected @ A[layer:, :layer].T + u @ B[layer:].T + bias[layer:], 0)
    np.testing.assert_allclose(solution.x[:, layer:], head_states, rtol=1e-9, atol=1e-9)
