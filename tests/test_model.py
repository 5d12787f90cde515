"""ImplicitModel construction: validation, from_matrices, homogeneous form, dtype casts."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import implicit_compiler as ic
from implicit_compiler import ImplicitModel, StateBlock, TensorSpec


def _parts(n=3, p=2, q=1):
    return dict(
        A=sp.csr_array((n, n)), B=sp.csr_array(np.ones((n, p))), C=sp.csr_array(np.ones((q, n))),
        D=sp.csr_array((q, p)), bias_x=None, bias_y=None,
        blocks=(StateBlock("x", 0, n, "relu", (n,)),),
        inputs=(TensorSpec("u", (p,)),), outputs=(TensorSpec("y", (q,)),),
    )  # fmt: skip


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(A=sp.csr_array((3, 4))), r"matrix A must be square.*expected shape \(3, 3\), got \(3, 4\)"),
        (dict(B=sp.csr_array((4, 2))), r"matrix B .*expected shape \(3, 2\), got \(4, 2\)"),
        (dict(C=sp.csr_array((1, 2))), r"matrix C .*expected shape \(1, 3\), got \(1, 2\)"),
        (dict(D=sp.csr_array((1, 3))), r"matrix D .*expected shape \(1, 2\), got \(1, 3\)"),
        (dict(bias_x=np.zeros(4)), r"bias_x: expected a vector of length 3, got shape \(4,\)"),
        (dict(bias_y=np.zeros((2, 2))), r"bias_y: expected a vector of length 1"),
        (dict(blocks=(StateBlock("x", 0, 2, "relu", (2,)),)), r"blocks cover states 0:2, expected 0:3"),
        (
            dict(blocks=(StateBlock("a", 0, 1, "relu", (1,)), StateBlock("b", 2, 3, "relu", (1,)))),
            "starts at 2, expected 1",
        ),
        (dict(blocks=(StateBlock("a", 0, 1, "relu", (1,)), StateBlock("a", 1, 3, "relu", (2,)))), "unique"),
        (dict(inputs=(TensorSpec("u", (3,)),)), r"inputs \[u\(3,\)\] hold 3 values per sample, expected 2"),
        (dict(outputs=(TensorSpec("y", (2, 1)),)), r"outputs .* hold 2 values per sample, expected 1"),
    ],
    ids=[
        "A-not-square",
        "B-rows",
        "C-cols",
        "D-cols",
        "bias_x",
        "bias_y",
        "blocks-short",
        "blocks-gap",
        "blocks-dup",
        "inputs",
        "outputs",
    ],
)
def test_bad_dimensions_raise_shape_error_saying_expected_and_found(change, message):
    parts = _parts() | change
    with pytest.raises(ic.ShapeError, match=message):
        ImplicitModel(**parts)


def test_block_shape_must_match_its_size():
    with pytest.raises(ic.ShapeError, match=r"shape \(2, 2\) holds 4 values but the block spans 3"):
        StateBlock("x", 0, 3, "relu", (2, 2))


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_weights_raise(bad):
    A = np.zeros((3, 3))
    A[0, 1] = bad
    with pytest.raises(ic.NonFiniteError, match="matrix A holds NaN or inf"):
        ImplicitModel.from_matrices(A, np.ones((3, 2)), np.ones((1, 3)), np.zeros((1, 2)))
    with pytest.raises(ic.NonFiniteError, match="bias_x"):
        ImplicitModel.from_matrices(
            np.zeros((3, 3)), np.ones((3, 2)), np.ones((1, 3)), np.zeros((1, 2)), bias_x=[0, bad, 0]
        )


def test_from_matrices_accepts_lists_dense_and_any_sparse_format():
    A = [[0, 0.5], [0.25, 0]]
    model = ImplicitModel.from_matrices(
        A, sp.coo_matrix(np.eye(2)), np.array([[1.0, 2.0]]), sp.lil_array((1, 2)), activation="leaky_relu(0.1)"
    )
    for name in "ABCD":
        assert isinstance(getattr(model, name), sp.csr_array)
    assert model.dtype == np.float64 and (model.n, model.p, model.q) == (2, 2, 1)
    assert model.blocks[0].activation == ic.Activation("leaky_relu", 0.1)
    assert model.A.nnz == 2 and model.nnz == 2 + 2 + 2 + 0


def test_common_dtype_is_float32_only_when_every_part_is():
    m32 = ImplicitModel.from_matrices(*(np.eye(2, dtype=np.float32) for _ in range(4)))
    assert m32.dtype == np.float32 and m32.bias_x.dtype == np.float32
    mixed = ImplicitModel.from_matrices(np.eye(2, dtype=np.float32), np.eye(2), np.eye(2), np.eye(2))
    assert mixed.dtype == np.float64 and mixed.A.dtype == np.float64
    ints = ImplicitModel.from_matrices(
        np.eye(2, dtype=int), np.eye(2, dtype=int), np.eye(2, dtype=int), np.eye(2, dtype=int)
    )
    assert ints.dtype == np.float64


def test_astype_casts_everything_and_is_cached(mlp):
    model = mlp.implicit()
    m32 = model.astype(np.float32)
    assert all(getattr(m32, name).dtype == np.float32 for name in "ABCD")
    assert m32.bias_x.dtype == m32.bias_y.dtype == np.float32
    assert model.astype("float32") is m32 and model.astype(np.float64) is model
    with pytest.raises(ic.ShapeError, match="float32 or float64"):
        model.astype(np.int32)


def test_homogeneous_form_moves_biases_into_a_constant_input(mlp, rng):
    model = mlp.implicit()
    homogeneous = model.homogeneous()
    assert not homogeneous.bias_x.any() and not homogeneous.bias_y.any()
    assert homogeneous.p == model.p + 1 and homogeneous.inputs[-1] == TensorSpec("one", (1,))
    u = rng.normal(size=(4, model.p))
    with_one = np.concatenate([u, np.ones((4, 1))], axis=1)
    np.testing.assert_allclose(homogeneous.predict(with_one), mlp.forward(u), rtol=1e-12, atol=1e-12)


def test_repr_is_short_and_informative(mlp):
    text = repr(mlp.implicit())
    assert text == "ImplicitModel(n=15, p=6, q=3, nnz(A)=56, blocks=2, dtype=float64)"


def test_models_are_frozen(mlp):
    model = mlp.implicit()
    with pytest.raises(AttributeError):
        model.A = None
