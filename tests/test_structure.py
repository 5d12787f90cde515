"""Structured matrices (issue 20, steps 1-2): convolution and dense terms plus a sparse remainder,
checked against the model's own CSR matrices (to_csr, products, |M|, non-zero counts); models
holding them read as the plain model, materialize only when A-D are read, and refuse with
ModelTooLargeError when that would not fit."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from onnx import TensorProto, helper, numpy_helper

import implicit_compiler as ic
from implicit_compiler import blas_threads
from implicit_compiler import model as model_module
from implicit_compiler import structure as structure_module
from implicit_compiler.structure import Convolution, Dense, StructuredMatrix, Term, convolution_transposed, lift

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rng():
    return np.random.default_rng(20)


def conv_net(rng, stride, pads, dilation, size=14) -> ic.ImplicitModel:
    """u (1, 3, size, size) -> Conv 3x3 (8 channels) -> Relu -> Conv 3x3 (6) -> Relu -> Flatten -> Gemm (5)."""
    first = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    second = rng.normal(size=(6, 8, 3, 3)).astype(np.float32)
    attributes = dict(kernel_shape=[3, 3], strides=[stride] * 2, pads=[pads] * 4, dilations=[dilation] * 2)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], **attributes),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "L"], ["y"], transB=1),
    ]
    extent = dilation * 2 + 1
    out = (size + 2 * pads - extent) // stride + 1
    last = rng.normal(size=(5, 6 * out * out)).astype(np.float32)
    graph = helper.make_graph(
        nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [numpy_helper.from_array(first, "W1"), numpy_helper.from_array(second, "W2"), numpy_helper.from_array(last, "L")],
    )  # fmt: skip
    return ic.from_onnx(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), dtype=np.float64, structure="csr"
    )


def models(rng):
    yield "lenet5", ic.from_onnx(ROOT / "zoo" / "lenet5.onnx", dtype=np.float64, structure="csr")
    for stride, pads, dilation in [(1, 0, 1), (2, 1, 1), (1, 2, 2), (3, 0, 1)]:
        yield f"conv s{stride} p{pads} d{dilation}", conv_net(rng, stride, pads, dilation)


def assert_same_matrix(structured: StructuredMatrix, matrix) -> None:
    csr, expected = structured.to_csr(), sp.csr_array(matrix)
    csr.sum_duplicates()
    expected.sum_duplicates()
    assert csr.shape == expected.shape and structured.nnz == expected.nnz == csr.nnz
    difference = abs(csr - expected)
    assert difference.max() <= 1e-12 * abs(expected).max()  # (kernels are read from the CSR to a few ulps)
    assert ((csr != 0) != (expected != 0)).nnz == 0  # the same pattern


def test_lift_keeps_the_matrices_and_finds_their_structure(rng):
    for name, model in models(rng):
        lifted = lift(model).structure
        B, A = lifted.B, lifted.A
        assert_same_matrix(B, model.B)
        assert_same_matrix(A, model.A)
        assert B.terms and all(isinstance(term.op, Convolution) for term in B.terms), name
        assert A.terms, name
        kept = B.remainder.nnz + A.remainder.nnz
        assert kept < 0.1 * (model.A.nnz + model.B.nnz), f"{name}: {kept} non-zeros left to the remainder"
    lenet = lift(ic.from_onnx(ROOT / "zoo" / "lenet5.onnx", dtype=np.float64, structure="csr")).structure
    lenet_B, lenet_A = lenet.B, lenet.A
    assert any(isinstance(term.op, Dense) for term in lenet_A.terms)  # the fully connected layers
    assert sum(term.op.weight.size for term in lenet_B.terms) == 150  # 6 kernels of 5x5, not 117,600 entries


def test_products_and_absolute_values_equal_the_csr_ones(rng):
    for name, model in models(rng):
        lifted = lift(model).structure
        for structured, matrix in zip((lifted.B, lifted.A), (model.B, model.A)):
            X = rng.normal(size=(matrix.shape[1], 3))
            Y = rng.normal(size=(matrix.shape[0], 4))
            np.testing.assert_allclose(structured.matvec(X), matrix @ X, rtol=1e-11, atol=1e-11, err_msg=name)
            np.testing.assert_allclose(structured.rmatvec(Y), matrix.T @ Y, rtol=1e-11, atol=1e-11, err_msg=name)
            assert_same_matrix(structured.abs(), abs(matrix))


@pytest.mark.parametrize("segment", [1, 3, 7])
def test_the_transposed_convolution_skips_zero_segments_exactly(segment, rng):
    """Segments of ``segment`` columns that are zero at a position are skipped: the product is
    the same as the CSR's transpose whatever the zeros."""
    model = conv_net(rng, 2, 1, 1)
    (term,) = lift(model).structure.B.terms
    T = rng.normal(size=(term.rows.stop - term.rows.start, 21))
    T[rng.uniform(size=T.shape) < 0.7] = 0.0
    T[:, :segment] = 0.0  # a whole first segment zero everywhere
    expected = model.B[term.rows].T @ T
    np.testing.assert_allclose(convolution_transposed(term.op, T, segment), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- models holding structure
def lenet_pair():
    plain = ic.from_onnx(ROOT / "zoo" / "lenet5.onnx", dtype=np.float64, structure="csr")
    return plain, lift(plain)


def test_a_lifted_model_reads_as_the_plain_one_bitwise():
    plain, lifted = lenet_pair()
    assert lifted.is_structured and not plain.is_structured
    for name in "ABCD":
        matrix, expected = getattr(lifted, name), getattr(plain, name)
        assert isinstance(matrix, sp.csr_array) and matrix.indices.dtype == np.int32
        assert (matrix != expected).nnz == 0, name  # the kernels are the CSR's own entries
    assert lifted.materialized().A is lifted.A and not lifted.materialized().is_structured
    assert plain.materialized() is plain
    u = np.random.default_rng(0).uniform(size=(3, 1, 32, 32))
    np.testing.assert_array_equal(lifted.materialized().predict(u), plain.predict(u))


def test_sizes_shapes_and_casts_never_materialize():
    plain, lifted = lenet_pair()
    assert (lifted.n, lifted.p, lifted.q, lifted.nnz, lifted.dtype) == (
        plain.n,
        plain.p,
        plain.q,
        plain.nnz,
        plain.dtype,
    )
    assert repr(lifted) == repr(plain)
    assert lifted.memory_bytes < plain.memory_bytes / 4  # kernels, not one entry per multiply-accumulate
    single = lifted.astype(np.float32)
    assert single.is_structured and single.dtype == np.float32
    assert all(term.op.weight.dtype == np.float32 for term in single.structure.A.terms)
    homogeneous = lifted.homogeneous()
    assert homogeneous.is_structured and homogeneous.p == plain.p + 1
    for model in (lifted, single, homogeneous):
        assert not any(isinstance(key, tuple) and key[0] == "csr" for key in model._cache), model
    assert (homogeneous.B != plain.homogeneous().B).nnz == 0
    assert (single.A != plain.astype(np.float32).A).nnz == 0


def test_the_plain_structure_has_no_terms():
    plain, _ = lenet_pair()
    structure = plain.structure
    assert all(not getattr(structure, name).terms for name in "ABCD")
    assert structure.A.remainder is plain.A


def test_reading_a_matrix_too_large_for_memory_is_refused_with_its_size(monkeypatch):
    _, lifted = lenet_pair()
    monkeypatch.setattr(model_module, "available_memory_bytes", lambda: 1e6)
    with pytest.raises(ic.ModelTooLargeError, match=r"model\.A would hold 0\.00G non-zeros .*model\.structure"):
        _ = lifted.A
    with pytest.raises(ic.ModelTooLargeError):
        lifted.materialized()
    assert lifted.nnz > 0 and lifted.structure.A.terms  # what needs no CSR still works
    monkeypatch.setattr(model_module, "available_memory_bytes", lambda: 1e12)
    assert lifted.A.nnz == lifted.structure.A.nnz


def test_structured_matrices_are_validated():
    plain, lifted = lenet_pair()
    B = lifted.structure.B
    term = B.terms[0]
    with pytest.raises(ic.ShapeError, match="overlap"):
        StructuredMatrix(B.shape, (term, term), sp.csr_array(B.shape))
    with pytest.raises(ic.ShapeError, match="remainder .* where a term writes"):
        StructuredMatrix(B.shape, (term,), plain.B)
    with pytest.raises(ic.ShapeError, match="maps"):
        StructuredMatrix(B.shape, (Term(slice(0, 5), term.op),), sp.csr_array(B.shape))
    with pytest.raises(ic.ShapeError, match="outside"):
        StructuredMatrix((10, B.shape[1]), (term,), sp.csr_array((10, B.shape[1])))
    weight = term.op.weight.copy()
    weight[0, 0] = np.inf
    assert not StructuredMatrix(B.shape, (Term(term.rows, replace(term.op, weight=weight)),), B.remainder).is_finite()
    infinite = StructuredMatrix(B.shape, (Term(term.rows, replace(term.op, weight=weight)),), B.remainder)
    with pytest.raises(ic.NonFiniteError, match="matrix B"):
        ic.ImplicitModel(
            lifted.structure.A, infinite, *lifted._parts()[2:], None, None, lifted.blocks, lifted.inputs, lifted.outputs
        )


def test_the_adjoint_by_gemm_equals_the_csr_transpose_in_chunks(rng, monkeypatch):
    """rmatvec's convolution adjoint (one GEMM, then each tap's plane added at its window),
    with the columns split into chunks of one or two: M^T Y of the CSR, for strides, pads and
    dilations."""
    monkeypatch.setattr(structure_module, "ADJOINT_CHUNK_BYTES", 1)
    for name, model in models(rng):
        for term in lift(model).structure.B.terms:
            Y = rng.normal(size=(term.rows.stop - term.rows.start, 3))
            expected = model.B[term.rows].T @ Y
            got = structure_module.convolution_adjoint(term.op, Y)
            np.testing.assert_allclose(
                got[term.op.source], expected[term.op.source], rtol=1e-12, atol=1e-12, err_msg=name
            )


@pytest.mark.parametrize("batch, bands", [(1, False), (9, False), (9, True)], ids=["one", "nine", "nine-bands"])
def test_a_convolution_applies_as_its_csr_at_every_batch(batch, bands, monkeypatch):
    """Convolution.apply, by the padded image's strided view (a few samples), by the compiled
    im2col (from COMPILED_IM2COL_BATCH samples on, into a buffer kept between calls), or, in a run
    on numba's threads (``blas_threads``), by bands of output rows (here one row each, the
    bands shared by the threads), over random geometries (strides, dilations, pads
    past the kernel's reach, outputs cut short): the product of the term's CSR, whose entries
    come from the geometry alone."""
    assert (batch >= structure_module.COMPILED_IM2COL_BATCH) == (batch == 9)
    if bands:
        if blas_threads._controller() is None:
            pytest.skip("no BLAS threadpoolctl can limit: no run on numba's threads")
        monkeypatch.setattr(blas_threads, "OWN_THREADS_WORK", 0)
        monkeypatch.setattr(structure_module, "BAND_BYTES", 1)
        bands_run = []
        monkeypatch.setattr(
            structure_module, "_convolution_bands",
            lambda *args, real=structure_module._convolution_bands: bands_run.append(1) or real(*args),
        )  # fmt: skip
    context = blas_threads.own_threads(1) if bands else contextlib.nullcontext()
    with context:
        _check_random_convolutions(batch)
    assert not bands or len(bands_run) >= 60  # (a 1 x 1 convolution of stride 1 reads X as it is)


def _check_random_convolutions(batch: int) -> None:
    rng = np.random.default_rng(21)
    checked = 0
    while checked < 60:
        C, H, W, Co = (int(v) for v in rng.integers(1, 7, 4))
        kh, kw, sh, sw, dh, dw = (int(v) for v in rng.integers(1, 4, 6))
        ph, pw = (int(v) for v in rng.integers(0, 5, 2))
        full_h, full_w = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if full_h < 1 or full_w < 1:
            continue
        Ho, Wo = int(rng.integers(1, full_h + 1)), int(rng.integers(1, full_w + 1))
        weight = rng.normal(size=(Co, C * kh * kw))
        op = Convolution(slice(0, C * H * W), (C, H, W), (Co, Ho, Wo), (kh, kw), (sh, sw), (dh, dw), (ph, pw), weight)
        rows, columns = Co * Ho * Wo, C * H * W
        matrix = StructuredMatrix((rows, columns), (Term(slice(0, rows), op),), sp.csr_array((rows, columns)))
        X = rng.normal(size=(columns, batch))
        expected = matrix.to_csr() @ X
        np.testing.assert_allclose(op.apply(X), expected, rtol=1e-12, atol=1e-12)
        out = np.full((rows, batch), np.nan)
        op.apply(X, out=out)
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
        checked += 1
