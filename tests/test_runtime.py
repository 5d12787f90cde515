"""The runtime against independent computations: numpy forward passes and scipy root finding."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse as sp
from conftest import contractive_matrix

import implicit_compiler as ic
from implicit_compiler import ImplicitModel, StateBlock, TensorSpec


def test_mlp_matches_numpy_forward_pass(mlp, rng):
    u = rng.normal(size=(32, 6))
    solution = mlp.implicit().solve(u)
    expected = mlp.forward(u)
    np.testing.assert_allclose(solution.y, expected, rtol=1e-12, atol=1e-12)
    assert solution.iterations == 0 and solution.residual_history == ()
    hidden = solution.x[:, :8]
    assert (hidden > 0).any() and (hidden == 0).any(), "ReLUs should land on both sides"


def test_mlp_single_sample_and_float32_keep_shape_and_dtype(mlp, rng):
    model = mlp.implicit()
    u = rng.normal(size=6)
    single = model.predict(u)
    assert single.shape == (3,)
    np.testing.assert_allclose(single, mlp.forward(u[None])[0], rtol=1e-12)
    batch32 = model.predict(u[None].astype(np.float32))
    assert batch32.dtype == np.float32 and batch32.shape == (1, 3)
    np.testing.assert_allclose(batch32[0], single, rtol=1e-5, atol=1e-5)


def test_mlp_picard_on_whole_model_reaches_the_same_answer_in_depth_plus_one_steps(mlp, rng):
    u = rng.normal(size=(5, 6))
    picard = mlp.implicit().solve(u, method="picard")
    np.testing.assert_allclose(picard.y, mlp.forward(u), rtol=1e-12, atol=1e-12)
    assert picard.residual_history[-1] == 0.0
    assert picard.iterations == 3  # two layers, then a step that changes nothing


def _independent_fixed_point(A, B, b, u, phi):
    """Solve x = phi(A x + B u + b) with scipy's hybrid Powell root finder, per sample."""
    solutions = []
    for sample in u:
        residual = lambda x, sample=sample: x - phi(A @ x + B @ sample + b)
        result = scipy.optimize.root(residual, np.zeros(A.shape[0]), tol=1e-14)
        assert result.success
        solutions.append(result.x)
    return np.array(solutions)


@pytest.mark.parametrize(
    "activation,phi", [("tanh", np.tanh), ("sigmoid", lambda z: 1 / (1 + np.exp(-z)))], ids=["tanh", "sigmoid"]
)
def test_cyclic_model_matches_independent_fixed_point(rng, activation, phi):
    n, p, q = 12, 4, 3
    A = contractive_matrix(rng, n, 0.9)
    B, C, D = rng.normal(size=(n, p)), rng.normal(size=(q, n)), rng.normal(size=(q, p))
    b = rng.normal(size=n)
    model = ImplicitModel.from_matrices(A, B, C, D, activation=activation, bias_x=b)
    u = rng.normal(size=(7, p))
    expected_x = _independent_fixed_point(A, B, b, u, phi)
    for method in ("auto", "picard", "anderson"):
        solution = model.solve(u, method=method)
        np.testing.assert_allclose(solution.x, expected_x, rtol=1e-9, atol=1e-9, err_msg=method)
        np.testing.assert_allclose(solution.y, expected_x @ C.T + u @ D.T, rtol=1e-9, atol=1e-9)
        assert solution.iterations > 0 and solution.residual_history[-1] <= 1e-10


def test_cyclic_relu_picard_and_auto_agree(rng):
    n, p = 30, 5
    A = contractive_matrix(rng, n, 0.95)
    model = ImplicitModel.from_matrices(
        A, rng.normal(size=(n, p)), np.eye(n), np.zeros((n, p)), bias_x=rng.normal(size=n)
    )
    u = rng.normal(size=(16, p))
    auto = model.solve(u)
    picard = model.solve(u, method="picard")
    np.testing.assert_allclose(auto.x, picard.x, rtol=1e-9, atol=1e-9)
    x = auto.x
    np.testing.assert_allclose(x, np.maximum(x @ A.T + u @ model.B.toarray().T + model.bias_x, 0), atol=1e-9)
    # a cheap map contracting fast: acceleration does not pay (fixed_point.accelerate_from), and
    # it may only ever save steps
    assert auto.iterations <= picard.iterations


def test_auto_iterates_only_on_the_cyclic_component(rng):
    """in -> loop (cyclic, tanh) -> out: one fixed-point solve, on the loop block alone."""
    sizes = {"encoder": 4, "loop": 5, "decoder": 3}
    p = 3
    W_in, W_loop, W_out = rng.normal(size=(4, p)), contractive_matrix(rng, 5, 0.8), rng.normal(size=(3, 5))
    W_enc_loop = rng.normal(size=(5, 4))
    A = sp.bmat(
        [[sp.csr_array((4, 4)), None, None], [W_enc_loop, W_loop, None], [None, W_out, sp.csr_array((3, 3))]],
        format="csr",
    )
    B = sp.vstack([W_in, sp.csr_array((8, p))], format="csr")
    C = sp.hstack([sp.csr_array((2, 9)), rng.normal(size=(2, 3))], format="csr")
    blocks, start = [], 0
    for name, activation in zip(sizes, ("relu", "tanh", "relu")):
        blocks.append(StateBlock(name, start, start + sizes[name], activation, (sizes[name],)))
        start += sizes[name]
    model = ImplicitModel(
        A, B, C, sp.csr_array((2, p)), None, None, tuple(blocks), (TensorSpec("u", (p,)),), (TensorSpec("y", (2,)),)
    )
    u = rng.normal(size=(6, p))
    auto = model.solve(u)
    assert [names for names, _ in auto.component_histories] == [("loop",)]
    encoder = np.maximum(u @ W_in.T, 0)
    loop = _independent_fixed_point(W_loop, W_enc_loop, np.zeros(5), encoder, np.tanh)
    decoder = np.maximum(loop @ W_out.T, 0)
    np.testing.assert_allclose(auto.y, decoder @ C.toarray()[:, 9:].T, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(model.solve(u, method="picard").y, auto.y, rtol=1e-9, atol=1e-9)


def test_non_contractive_model_raises_convergence_error_with_history():
    model = ImplicitModel.from_matrices(2 * np.eye(3), np.ones((3, 1)), np.eye(3), np.zeros((3, 1)))
    with pytest.raises(ic.ConvergenceError) as caught:
        model.solve([1.0], max_iter=200)
    assert caught.value.iterations > 0
    assert len(caught.value.residual_history) == caught.value.iterations
    assert "well-posed" in str(caught.value)


def test_oscillating_model_raises_convergence_error_under_picard():
    rotation = np.array([[0.0, -1.0], [1.0, 0.0]])
    model = ImplicitModel.from_matrices(rotation, np.eye(2), np.eye(2), np.zeros((2, 2)), activation="identity")
    with pytest.raises(ic.ConvergenceError, match="did not converge in 50 iterations"):
        model.solve([1.0, 0.0], method="picard", max_iter=50)
    # Anderson solves the linear system (I - A) x = u exactly, as GMRES would.
    x = model.solve([1.0, 0.0], method="anderson").x
    np.testing.assert_allclose(x, np.linalg.solve(np.eye(2) - rotation, [1.0, 0.0]), atol=1e-9)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("batch", [1, 2, 40], ids=["one", "two", "tiles"])
def test_non_finite_inputs_raise(mlp, bad, batch):
    """One sample is checked as it is read; a batch as it is loaded (the tile transpose), at
    any place: in a tile, on the right and bottom edges."""
    for row, column in {(0, 0), (batch - 1, 3), (batch // 2, 5)}:
        u = np.zeros((batch, 6))
        u[row, column] = bad
        with pytest.raises(ic.NonFiniteError, match="NaN or inf"):
            mlp.implicit().solve(u)
        with pytest.raises(ic.NonFiniteError, match="NaN or inf"):
            mlp.implicit().predict(u.astype(np.float32))


@pytest.mark.parametrize("shape", [(5,), (2, 5), (2, 3, 2)], ids=["short", "batch-short", "3d"])
def test_wrong_input_shape_raises_shape_error(mlp, shape):
    with pytest.raises(ic.ShapeError, match="expected"):
        mlp.implicit().solve(np.zeros(shape))


def test_unknown_method_raises(mlp):
    with pytest.raises(ic.ShapeError, match="unknown solve method"):
        mlp.implicit().solve(np.zeros(6), method="newton")


def test_multi_input_model_takes_dict_sequence_or_flat(rng):
    # y = u1 (2x2 image) summed with u2 (vector of 3) through one linear layer.
    B = rng.normal(size=(4, 7))
    model = ImplicitModel(
        sp.csr_array((4, 4)), B, np.eye(4), sp.csr_array((4, 7)), None, None,
        (StateBlock("h", 0, 4, "relu", (2, 2)),),
        (TensorSpec("image", (2, 2)), TensorSpec("vector", (3,))),
        (TensorSpec("out", (2, 2)), ),
    )  # fmt: skip
    image, vector = rng.normal(size=(5, 2, 2)), rng.normal(size=(5, 3))
    flat = np.concatenate([image.reshape(5, 4), vector], axis=1)
    expected = np.maximum(flat @ B.T, 0).reshape(5, 2, 2)
    np.testing.assert_allclose(model.predict({"image": image, "vector": vector}), expected, rtol=1e-12)
    np.testing.assert_allclose(model.predict([image, vector]), expected, rtol=1e-12)
    np.testing.assert_allclose(model.predict(flat), expected, rtol=1e-12)
    np.testing.assert_allclose(model.predict({"image": image[0], "vector": vector[0]}), expected[0], rtol=1e-12)
    with pytest.raises(ic.ShapeError, match="missing"):
        model.predict({"image": image})
    with pytest.raises(ic.ShapeError, match="disagree"):
        model.predict({"image": image, "vector": vector[0]})


def test_multiple_outputs_come_back_as_a_dict(mlp, rng):
    base = mlp.implicit()
    model = ImplicitModel(
        base.A, base.B, base.C, base.D, base.bias_x, base.bias_y, base.blocks, base.inputs,
        (TensorSpec("first", (1,)), TensorSpec("rest", (2,))),
    )  # fmt: skip
    u = rng.normal(size=(4, 6))
    outputs = model.predict(u)
    expected = mlp.forward(u)
    np.testing.assert_allclose(outputs["first"], expected[:, :1], rtol=1e-12)
    np.testing.assert_allclose(outputs["rest"], expected[:, 1:], rtol=1e-12)


@pytest.mark.parametrize("batch", [1, 7], ids=["single", "batch"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_fused_kernel_and_scipy_fallback_agree_with_numpy(mlp, rng, monkeypatch, batch, dtype):
    """Both execution paths of forward substitution against the numpy forward pass."""
    from implicit_compiler.runtime import kernels

    u = rng.normal(size=(batch, 6)).astype(dtype)
    expected = mlp.forward(u.astype(np.float64))
    fused = mlp.implicit().predict(u)
    monkeypatch.setattr(kernels, "available", lambda: False)
    fallback = mlp.implicit().predict(u)  # a new model: its plan is built without the kernel
    tolerance = 1e-12 if dtype == np.float64 else 1e-4
    for result in (fused, fallback):
        assert result.dtype == dtype
        np.testing.assert_allclose(result, expected, rtol=tolerance, atol=tolerance)


def test_states_stored_last_layer_first_give_the_same_predictions(mlp, rng):
    """The paper's ordering (x = [h2; h1]): forward substitution follows dependencies, not storage."""
    base = mlp.implicit()
    n1, n2 = 8, 7
    perm = np.concatenate([np.arange(n1, n1 + n2), np.arange(n1)])  # new state i is old state perm[i]
    A = base.A[perm][:, perm]
    blocks = (StateBlock("h2", 0, n2, "relu", (n2,)), StateBlock("h1", n2, n1 + n2, "relu", (n1,)))
    model = ImplicitModel(
        A, base.B[perm], base.C[:, perm], base.D, base.bias_x[perm], base.bias_y, blocks, base.inputs, base.outputs
    )
    assert sp.triu(model.A, k=1).nnz == model.A.nnz, "strictly upper triangular in this order"
    for batch in (1, 5):
        u = rng.normal(size=(batch, 6))
        np.testing.assert_allclose(model.predict(u), mlp.forward(u), rtol=1e-12, atol=1e-12)


def test_predict_reuses_its_state_without_touching_returned_arrays(mlp, rng):
    """predict keeps its state array between calls; what solve returned, and what an earlier
    predict returned, stay as they were."""
    model = mlp.implicit()
    u1, u2 = rng.normal(size=(20, 6)), rng.normal(size=(20, 6))
    solved = model.solve(u1)
    x1 = solved.x.copy()
    y1 = model.predict(u1)
    y2 = model.predict(u2)
    np.testing.assert_allclose(y1, mlp.forward(u1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y2, mlp.forward(u2), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(solved.x, x1)


def test_predict_from_several_threads_at_once(rng):
    """Threads predicting at once (the kernels release the GIL) each get their own state."""
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    import onnxruntime

    path = Path(__file__).resolve().parents[1] / "zoo" / "lenet5.onnx"
    model = ic.from_onnx(path, dtype=np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    inputs = [rng.normal(size=(48, 1, 32, 32)).astype(np.float32) for _ in range(6)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        outputs = list(pool.map(lambda u: [model.predict(u) for _ in range(15)], inputs))
    for u, ys in zip(inputs, outputs):
        expected = session.run(None, {name: u})[0]
        for y in ys:
            np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
