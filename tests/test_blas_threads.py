"""BLAS products on numba's threads (``blas_threads``): the same products as numpy's, split
over the threads (BLAS's gemm called from compiled code), with BLAS's thread count restored
after every run."""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_info

import implicit_compiler as ic
from implicit_compiler import blas_threads


def _blas_threads() -> list[int]:
    return [library["num_threads"] for library in threadpool_info() if library["user_api"] == "blas"]


needs_threads = pytest.mark.skipif(
    numba.get_num_threads() < 2 or blas_threads._controller() is None,
    reason="splitting needs two threads and a BLAS threadpoolctl can limit",
)


@needs_threads
@pytest.mark.parametrize(
    "shapes",
    [
        ((64, 48), (48, 1000)),  # columns
        ((300, 40), (40, 7)),  # rows
        ((6, 20, 30), (6, 30, 200)),  # groups
        ((1, 20, 30), (1, 30, 2000)),  # one group: columns
        ((64, 48), (48, 2000, 2)),  # b's columns of stride 2: numpy's product
    ],
    ids=["columns", "rows", "groups", "one-group", "strided"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_split_products_equal_numpys(shapes, dtype, monkeypatch):
    monkeypatch.setattr(blas_threads, "OWN_THREADS_WORK", 0)
    monkeypatch.setattr(blas_threads, "SPLIT_MIN_WORK", 0)
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=shape).astype(dtype) for shape in shapes)
    b = b[..., 0] if b.ndim == 3 and a.ndim == 2 else b
    expected = np.matmul(a, b)
    out = np.full(expected.shape, np.nan, dtype=dtype)
    before = _blas_threads()
    with blas_threads.own_threads(1):
        assert blas_threads.active() and max(_blas_threads()) == 1
        blas_threads.matmul(a, b, out)
    assert _blas_threads() == before and not blas_threads.active()
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())


def test_small_runs_keep_blas_as_it_is():
    before = _blas_threads()
    with blas_threads.own_threads(blas_threads.OWN_THREADS_WORK - 1):
        assert not blas_threads.active() and _blas_threads() == before


@needs_threads
def test_blas_is_restored_by_the_run_that_limited_it(monkeypatch):
    """Runs overlapping in two threads: the first limits BLAS and restores it when it leaves,
    also when it raises (OpenBLAS takes a count back only from the thread that set it); the
    second, started meanwhile, runs its products whole, and nested runs change nothing."""
    monkeypatch.setattr(blas_threads, "OWN_THREADS_WORK", 0)
    before = _blas_threads()
    inside, leave = threading.Event(), threading.Event()
    seen = []

    def second_run():
        with blas_threads.own_threads(1):
            seen.append(blas_threads.active())
            inside.set()
            leave.wait(10)
        seen.append(_blas_threads())

    worker = threading.Thread(target=second_run)
    with pytest.raises(RuntimeError, match="raised inside"), blas_threads.own_threads(1):
        worker.start()
        assert inside.wait(10)
        with blas_threads.own_threads(1):
            assert blas_threads.active() and max(_blas_threads()) == 1
        raise RuntimeError("raised inside")
    assert _blas_threads() == before and not blas_threads.active()
    leave.set()
    worker.join(10)
    assert seen == [False, before]
    with blas_threads.own_threads(1):  # a later run limits BLAS again
        assert blas_threads.active()


@needs_threads
def test_a_structured_run_predicts_the_same_on_its_own_threads(monkeypatch):
    """ResNet20 of the zoo at batch 4 by its BLAS steps, the products split and not."""
    from pathlib import Path

    import implicit_compiler.runtime.solve  # noqa: F401  (the module, not the function)

    root = Path(__file__).resolve().parents[1]
    model = ic.from_onnx(root / "zoo" / "resnet20.onnx", structure="kernels")
    u = np.random.default_rng(4).normal(size=(4, 3, 32, 32))
    expected = model.predict(u)
    monkeypatch.setattr(blas_threads, "OWN_THREADS_WORK", 0)
    monkeypatch.setattr(blas_threads, "SPLIT_MIN_WORK", 0)
    calls = []
    split = blas_threads.matmul

    def counted(a, b, out):
        calls.append(blas_threads.active())
        return split(a, b, out)

    monkeypatch.setattr("implicit_compiler.structure.matmul", counted)
    got = model.predict(u)
    assert calls and all(calls)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())
