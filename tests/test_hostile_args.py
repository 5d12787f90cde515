"""Hostile arguments (issue 16): every bad argument is a typed error naming it, on every path.

The runtime has several paths for one call of ``predict``: one sample by a compiled program,
small batches by row groups (or the steps), large batches by tiles of samples, and cyclic
models by their plan. Each test of an argument runs every path (checked with a spy, so a test
cannot pass by missing the path it is about); predictions are compared with a direct numpy
iteration of x = relu(A x + B u + b_x), or with onnxruntime for an ONNX model.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnxruntime
import pytest
import scipy.sparse as sp

import implicit_compiler as ic
from implicit_compiler import ImplicitModel, StateBlock, TensorSpec
from implicit_compiler.analysis import output_bounds, rescale, rescaling_diagonal, sensitivity, sparse_attack
from implicit_compiler.errors import (
    AnalysisError,
    ArgumentTypeError,
    ArgumentValueError,
    ImplicitCompilerError,
    ShapeError,
    ToleranceError,
)
from implicit_compiler.runtime import sample_tiles

solve_module = importlib.import_module("implicit_compiler.runtime.solve")

P, Q, BLOCK = 4, 3, 8
# a batch that goes by tiles of samples whatever the thread count
LARGE = max(256, sample_tiles.least_batch(np.float64))
PATH_FUNCTIONS = ("_predict_by_tiles", "_run_program", "_run_plan_one_sample", "_solve_flat")


def numpy_predict(model: ImplicitModel, U: np.ndarray, iterations: int = 200) -> np.ndarray:
    """y (batch, q) by plain numpy Picard iteration of the dense matrices (every test model is
    acyclic or contractive with ||A||_inf well below 1, so 200 steps reach float64 precision)."""
    A, B, C, D = (getattr(model, name).toarray().astype(np.float64) for name in "ABCD")
    U = np.asarray(U, dtype=np.float64).reshape(len(U), -1).T
    X = np.zeros((model.n, U.shape[1]))
    for _ in range(iterations):
        X = np.maximum(A @ X + B @ U + model.bias_x.astype(np.float64)[:, None], 0)
    return (C @ X + D @ U + model.bias_y.astype(np.float64)[:, None]).T


def three_blocks(rng: np.random.Generator, cyclic: bool = False) -> ImplicitModel:
    """Three dense ReLU blocks in a chain (a -> b -> c); ``cyclic`` adds a weak c -> a loop."""
    n = 3 * BLOCK
    A = np.zeros((n, n))
    A[BLOCK : 2 * BLOCK, :BLOCK] = rng.normal(size=(BLOCK, BLOCK)) * 0.3
    A[2 * BLOCK :, BLOCK : 2 * BLOCK] = rng.normal(size=(BLOCK, BLOCK)) * 0.3
    if cyclic:
        A[:BLOCK, 2 * BLOCK :] = rng.normal(size=(BLOCK, BLOCK)) * 0.02
    B = np.zeros((n, P))
    B[:BLOCK] = rng.normal(size=(BLOCK, P))
    C = np.zeros((Q, n))
    C[:, 2 * BLOCK :] = rng.normal(size=(Q, BLOCK))
    blocks = tuple(StateBlock(name, i * BLOCK, (i + 1) * BLOCK, "relu", (BLOCK,)) for i, name in enumerate("abc"))
    return ImplicitModel(
        A, B, C, rng.normal(size=(Q, P)) * 0.1, rng.normal(size=n), rng.normal(size=Q), blocks,
        (TensorSpec("u", (P,)),), (TensorSpec("y", (Q,)),),
    )  # fmt: skip


@pytest.fixture
def acyclic(rng):
    return three_blocks(rng)


@pytest.fixture
def cyclic(rng):
    return three_blocks(rng, cyclic=True)


@pytest.fixture
def paths(monkeypatch):
    """The runtime paths taken by the calls made since the last clear (spied, not replaced)."""
    taken: list[str] = []
    for name in PATH_FUNCTIONS:
        original = getattr(solve_module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            taken.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(solve_module, name, spy)
    return taken


# ----------------------------------------------------------------------------- the paths
@pytest.mark.parametrize(
    "kind, batch, path",
    [
        ("acyclic", 1, "_run_program"),
        ("acyclic", 5, "_solve_flat"),
        ("acyclic", LARGE, "_predict_by_tiles"),
        ("cyclic", 1, "_run_plan_one_sample"),
        ("cyclic", 5, "_solve_flat"),
        ("cyclic", LARGE, "_solve_flat"),
    ],
)
def test_each_path_predicts_as_numpy(request, rng, paths, kind, batch, path):
    """The paths the argument tests below rely on are the ones taken, and they are right."""
    model = request.getfixturevalue(kind)
    U = rng.normal(size=(batch, P))
    y = model.predict(U)
    assert path in paths
    np.testing.assert_allclose(y, numpy_predict(model, U), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- empty batches
@pytest.mark.parametrize("kind", ["acyclic", "cyclic"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_empty_batch_gives_an_empty_result(request, kind, dtype):
    """An empty batch returns empty (0, q) outputs in the input's dtype, as numpy would (it was
    ZeroDivisionError, IndexError); solve and predict, with every method."""
    model = request.getfixturevalue(kind)
    empty = np.zeros((0, P), dtype=dtype)
    y = model.predict(empty)
    assert y.shape == (0, Q) and y.dtype == dtype
    for method in ("auto", "picard", "anderson"):
        solution = model.solve(empty, method=method)
        assert solution.x.shape == (0, model.n) and solution.y.shape == (0, Q)
        assert model.predict(empty, method=method).shape == (0, Q)


def test_empty_batch_of_an_onnx_model_against_onnxruntime():
    """LeNet-5 (tiles for large batches, row groups for small ones) on 0 images: the shape
    onnxruntime gives for the same empty batch."""
    model = ic.from_onnx("zoo/lenet5.onnx", dtype=np.float32)
    empty = np.zeros((0, 1, 32, 32), dtype=np.float32)
    session = onnxruntime.InferenceSession("zoo/lenet5.onnx", providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: empty})[0]
    y = model.predict(empty)
    assert y.shape == expected.shape == (0, 10) and y.dtype == np.float32


# ----------------------------------------------------------------------------- models with no states
def stateless(rng: np.random.Generator) -> ImplicitModel:
    """n = 0: y = D u + b_y, a model with no states (an ONNX graph that is one linear layer)."""
    D = rng.normal(size=(Q, P))
    return ImplicitModel.from_matrices(
        np.zeros((0, 0)), np.zeros((0, P)), np.zeros((Q, 0)), D, bias_y=rng.normal(size=Q)
    )


@pytest.mark.parametrize("batch", [1, 5, LARGE])
def test_stateless_model_predicts(rng, batch):
    model = stateless(rng)
    U = rng.normal(size=(batch, P))
    expected = U @ model.D.toarray().T + model.bias_y
    np.testing.assert_allclose(model.predict(U), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(model.predict(U[0]), expected[0], rtol=1e-12, atol=1e-12)
    for method in ("picard", "anderson"):
        np.testing.assert_allclose(model.solve(U, method=method).y, expected, rtol=1e-12, atol=1e-12)


def test_stateless_model_analyses(rng):
    """Sensitivity |D|, bounds y -/+ |D| sigma, rescale a no-op, the attack on D's row."""
    model = stateless(rng)
    D = model.D.toarray()
    np.testing.assert_allclose(sensitivity(model).matrix, np.abs(D), rtol=1e-12)
    u0 = rng.normal(size=P)
    bounds = output_bounds(model, u0, 0.1)
    center = D @ u0 + model.bias_y
    np.testing.assert_allclose(bounds.lower, center - 0.1 * np.abs(D).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(bounds.upper, center + 0.1 * np.abs(D).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(rescale(model).predict(u0), center, rtol=1e-12)
    result = sparse_attack(model, u0, 0, k=1, sigma=0.1)
    best = int(np.argmax(np.abs(D[0])))
    assert result.support.tolist() == [best]
    assert result.actual_change == pytest.approx(0.1 * abs(D[0, best]), rel=1e-9)


# ----------------------------------------------------------------------------- solver options
BAD_OPTIONS = [
    ({"max_iter": 0}, ArgumentValueError, "max_iter: .* got 0"),
    ({"max_iter": -1}, ArgumentValueError, "max_iter: .* got -1"),
    ({"max_iter": 1.5}, ArgumentTypeError, r"max_iter: .* got 1\.5"),
    ({"max_iter": None}, ArgumentTypeError, "max_iter: .* got None"),
    ({"tol": -1.0}, ToleranceError, "tol=-1"),
    ({"tol": float("nan")}, ToleranceError, "tol=nan"),
    ({"tol": "1e-6"}, ArgumentTypeError, "tol: .* got '1e-6'"),
    ({"anderson_memory": -1}, ArgumentValueError, "anderson_memory: .* got -1"),
    ({"anderson_memory": "5"}, ArgumentTypeError, "anderson_memory: .* got '5'"),
    ({"bogus": 1}, ArgumentTypeError, "unknown keyword argument.*'bogus'"),
    ({"tolerance": 1e-6}, ArgumentTypeError, "unknown keyword argument.*'tolerance'"),
]


@pytest.mark.parametrize("kind", ["acyclic", "cyclic"])
@pytest.mark.parametrize("batch", [1, 5, LARGE])
@pytest.mark.parametrize("options, error, message", BAD_OPTIONS, ids=lambda v: repr(v) if isinstance(v, dict) else "")
def test_bad_solver_options_are_refused_on_every_path(request, rng, kind, batch, options, error, message):
    """Each bad option is a typed error (also the builtin) naming it, whatever path the batch
    would take: the tiles and the acyclic programs never iterate, and used to ignore them."""
    model = request.getfixturevalue(kind)
    U = rng.normal(size=(batch, P))
    with pytest.raises(error, match=message) as raised:
        model.predict(U, **options)
    assert isinstance(raised.value, ImplicitCompilerError)
    assert isinstance(raised.value, TypeError if error is ArgumentTypeError else ValueError)
    if "bogus" not in options and "tolerance" not in options:
        with pytest.raises(error, match=message):
            model.solve(U, **options)


def test_good_solver_options_still_work(cyclic, rng):
    U = rng.normal(size=(5, P))
    expected = numpy_predict(cyclic, U)
    for options in (
        {"max_iter": np.int64(50)},
        {"tol": np.float64(1e-9)},
        {"anderson_memory": 0},
        {"method": "picard"},
    ):
        np.testing.assert_allclose(cyclic.predict(U, **options), expected, rtol=1e-8, atol=1e-8)


def test_verify_samples_is_checked():
    with pytest.raises(ArgumentValueError, match="samples: .* got 0"):
        ic.verify("zoo/lenet5.onnx", samples=0)
    with pytest.raises(ArgumentTypeError, match="samples: .* got 1.5"):
        ic.verify("zoo/lenet5.onnx", samples=1.5)


# ----------------------------------------------------------------------------- inputs
def test_model_with_no_inputs_against_onnxruntime():
    """A graph of constants: predict({}) (and the empty flat input) give onnxruntime's output
    (predict({}) was a plain ValueError from numpy's concatenate)."""
    constant = np.array([[0.5, -1.0, 2.0]], dtype=np.float32)
    graph = oh.make_graph(
        [oh.make_node("Relu", ["c"], ["y"])],
        "constants",
        [],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
        [onh.from_array(constant, "c")],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    expected = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
    model = ic.from_onnx(proto)
    assert model.p == 0
    np.testing.assert_allclose(model.predict({}), expected[0], rtol=1e-7)
    np.testing.assert_allclose(model.predict(np.zeros(0)), expected[0], rtol=1e-7)


@pytest.mark.parametrize("dtype", [">f8", np.longdouble])
@pytest.mark.parametrize("model_dtype", [np.float64, np.float32])
@pytest.mark.parametrize("batch", [1, 5, LARGE])
def test_wide_and_big_endian_inputs_compute_in_float64(acyclic, rng, dtype, model_dtype, batch):
    """'>f8' and longdouble inputs were cast to float32: they compute in float64 now, for a
    float64 and a float32 model alike (the input never lowers the precision below float64)."""
    model = acyclic.astype(model_dtype)
    U = rng.normal(size=(batch, P)) + 1 / 3
    y = model.predict(U.astype(dtype))
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, numpy_predict(model, U), rtol=1e-12, atol=1e-12)


def test_big_endian_float32_input_is_byte_swapped(acyclic, rng):
    U = (rng.normal(size=(5, P)) + 1 / 3).astype(np.float32)
    y = acyclic.predict(U.astype(">f4"))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, numpy_predict(acyclic, U.astype(np.float64)), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- float16
def test_float16_weights_compute_in_float32(rng):
    """float16 weights (scipy.sparse has no float16: a bare ValueError before) widen to float32,
    exactly; float16 inputs too."""
    A = (np.tril(rng.normal(size=(6, 6)), -1) * 0.3).astype(np.float16)
    B, C, D = (rng.normal(size=shape).astype(np.float16) for shape in ((6, P), (Q, 6), (Q, P)))
    model = ImplicitModel.from_matrices(A, B, C, D, bias_x=rng.normal(size=6).astype(np.float16))
    assert model.dtype == np.float32
    assert np.array_equal(model.A.toarray(), A.astype(np.float32))
    U = rng.normal(size=(5, P)).astype(np.float16)
    y = model.predict(U)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, numpy_predict(model, U.astype(np.float64)), rtol=1e-5, atol=1e-5)


def test_float16_model_dtype_is_refused_by_name(acyclic):
    with pytest.raises(ShapeError, match="float16 weights and inputs are widened to float32"):
        acyclic.astype(np.float16)


# ----------------------------------------------------------------------------- complex and copies
@pytest.mark.parametrize("where", ["A", "B", "C", "D", "bias_x", "bias_y"])
def test_complex_weights_are_refused(rng, where):
    """Complex A / B / C / D (sparse or dense) and biases were cast to real with only numpy's
    ComplexWarning: the imaginary part silently dropped."""
    parts = {
        "A": sp.csr_array(np.tril(rng.normal(size=(6, 6)), -1)),
        "B": sp.csr_array(rng.normal(size=(6, P))),
        "C": sp.csr_array(rng.normal(size=(Q, 6))),
        "D": sp.csr_array(rng.normal(size=(Q, P))),
        "bias_x": rng.normal(size=6),
        "bias_y": rng.normal(size=Q),
    }
    parts[where] = parts[where] * (1 + 1j)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before any cast warns
        with pytest.raises(ShapeError, match=f"{where}: expected real numbers, got dtype complex128"):
            ImplicitModel.from_matrices(**parts)


def test_from_matrices_neither_changes_nor_shares_the_callers_matrix(rng):
    """The caller's CSR, with a duplicate entry, keeps its entries; editing it afterwards
    changes neither model.A nor the predictions."""
    A = sp.csr_array(
        (np.array([0.2, 0.3, -0.4]), np.array([0, 0, 1]), np.array([0, 0, 2, 3, 3])), shape=(4, 4)
    )  # row 1 holds (1, 0) twice
    data, indices = A.data.copy(), A.indices.copy()
    B, C, D = rng.normal(size=(4, P)), rng.normal(size=(Q, 4)), np.zeros((Q, P))
    model = ImplicitModel.from_matrices(A, B, C, D)
    assert A.nnz == 3 and np.array_equal(A.data, data) and np.array_equal(A.indices, indices)
    dense = A.toarray()
    assert dense[1, 0] == pytest.approx(0.5)
    U = rng.normal(size=(5, P))
    A.data[:] = 7.0  # the caller reuses its array
    assert np.array_equal(model.A.toarray(), dense)
    reference = ImplicitModel.from_matrices(dense, B, C, D)
    np.testing.assert_allclose(model.predict(U), numpy_predict(reference, U), rtol=1e-12)


# ----------------------------------------------------------------------------- compositions and analyses
def test_feedback_gain_must_be_real(cyclic):
    square = ImplicitModel.from_matrices(np.zeros((2, 2)), np.eye(2), np.eye(2), np.zeros((2, 2)))
    for gain in ("x", None, "0.5", np.array(["a", "b"]), np.eye(2) * 1j):
        with pytest.raises(ArgumentTypeError, match="K: expected"):
            ic.feedback(square, gain)
    with pytest.raises(ArgumentTypeError, match="model: expected an ImplicitModel"):
        ic.feedback("x", 0.5)


def test_feedback_with_a_scalar_gain_matches_numpy(rng):
    """u = v + k y with a scalar k (as a float and a 0-d array): the closed loop iterated in
    numpy, x = relu(A x + B (v + k C x) + b), y = C x (D = 0)."""
    n = 5
    A, B, C = np.tril(rng.normal(size=(n, n)), -1) * 0.2, rng.normal(size=(n, 2)) * 0.3, rng.normal(size=(2, n)) * 0.3
    bias = rng.normal(size=n)
    model = ImplicitModel.from_matrices(A, B, C, np.zeros((2, 2)), bias_x=bias)
    V = rng.normal(size=(4, 2))
    X = np.zeros((n, 4))
    for _ in range(300):
        X = np.maximum(A @ X + B @ (V.T + 0.5 * C @ X) + bias[:, None], 0)
    for gain in (0.5, np.float32(0.5), np.array(0.5)):
        np.testing.assert_allclose(ic.feedback(model, gain).predict(V), (C @ X).T, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("operation", [ic.cascade, ic.parallel, ic.add])
def test_compositions_take_models(acyclic, operation):
    with pytest.raises(ArgumentTypeError, match="second: expected an ImplicitModel .*'x'"):
        operation(acyclic, "x")
    with pytest.raises(ArgumentTypeError, match="first: expected an ImplicitModel .*3"):
        operation(3, acyclic)


@pytest.mark.parametrize("k", [float("inf"), float("nan"), np.inf])
def test_sparse_attack_k_must_be_finite(acyclic, k):
    with pytest.raises(AnalysisError, match="k: expected a positive integer"):
        sparse_attack(acyclic, np.zeros(P), 0, k=k, sigma=0.1)


def test_sparse_attack_k_and_sigma_must_be_numbers(acyclic):
    with pytest.raises(ArgumentTypeError, match="k: expected a positive integer, got '2'"):
        sparse_attack(acyclic, np.zeros(P), 0, k="2", sigma=0.1)
    with pytest.raises(ArgumentTypeError, match="sigma: .*'abc'"):
        sparse_attack(acyclic, np.zeros(P), 0, k=1, sigma="abc")


@pytest.mark.parametrize("function", [rescale, rescaling_diagonal])
def test_rho_must_be_a_number(cyclic, function):
    with pytest.raises(ArgumentTypeError, match="rho: .* got '0.9'"):
        function(cyclic, rho="0.9")


@pytest.mark.parametrize("sigma", ["abc", "0.1", None, ["a", "b", "c", "d"], [0.1, 0.2j, 0.1, 0.1]])
def test_output_bounds_sigma_must_be_real(acyclic, sigma):
    with pytest.raises(ArgumentTypeError, match="sigma: expected a number or an array of real numbers"):
        output_bounds(acyclic, np.zeros(P), sigma=sigma)


# ----------------------------------------------------------------------------- memory
MEMORY_SCRIPT = """
import resource, sys
import numpy as np
from implicit_compiler import ImplicitModel, ModelTooLargeError

n, p, batch = {n}, 3, {batch}
rng = np.random.default_rng(0)
A = np.tril(rng.normal(size=(n, n)), -1) * (0.5 / n)
model = ImplicitModel.from_matrices(A, rng.normal(size=(n, p)), rng.normal(size=(2, n)), np.zeros((2, p)))
U = rng.normal(size=(batch, p))
model.predict(U[:{small}])  # compiles the kernels before the limit
with open("/proc/self/status") as status:
    used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (used + {headroom}, resource.RLIM_INFINITY))
try:
    model.predict(U)
except ModelTooLargeError as error:
    print("typed:", error)
    sys.exit(0)
except MemoryError as error:
    print("raw MemoryError:", repr(error))
    sys.exit(3)
print("no error")
sys.exit(4)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_out_of_memory_in_predict_is_model_too_large():
    """Under a process memory limit, a batch whose work arrays (about 1.6 GB) do not fit is a
    ModelTooLargeError saying to predict in smaller batches, not a bare MemoryError."""
    script = MEMORY_SCRIPT.format(n=1000, batch=200_000, small=5, headroom=400 * 2**20)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smaller batches" in result.stdout and "200000 samples" in result.stdout


def test_the_constructor_does_not_sum_the_callers_duplicates_in_place(rng):
    """ImplicitModel(...) takes canonical CSR arrays over as they are (the lowering's: no copy
    of gigabytes), but one with duplicates is summed in a copy, never in the caller's array."""
    A = sp.csr_array((np.array([0.2, 0.3]), np.array([0, 0]), np.array([0, 0, 2, 2])), shape=(3, 3))
    block = (StateBlock("x", 0, 3, "relu", (3,)),)
    model = ImplicitModel(
        A, rng.normal(size=(3, P)), rng.normal(size=(Q, 3)), np.zeros((Q, P)), None, None, block,
        (TensorSpec("u", (P,)),), (TensorSpec("y", (Q,)),),
    )  # fmt: skip
    assert A.nnz == 2 and A.data.tolist() == [0.2, 0.3]
    assert model.A.nnz == 1 and model.A.toarray()[1, 0] == pytest.approx(0.5)
