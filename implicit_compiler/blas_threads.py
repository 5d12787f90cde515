"""BLAS products of a structured run on numba's threads, one BLAS thread each.

A structured block's GEMM (``structure.Convolution``, ``Dense``) is followed by compiled passes
on numba's threads (im2col, ``kernels.finish_rows``). OpenBLAS's own worker threads busy-wait
after each product for about 2^28 cycles (0.1 s) before they sleep, so on a 2-core machine every
pass that follows a GEMM shared one core with a spinning thread: its two threads ran at the speed
of one. Inside ``own_threads`` BLAS runs on one thread (threadpoolctl) and the products run on
numba's threads instead, each part one call of BLAS's gemm (``row_major_gemm``: scipy's
cython_blas sgemm / dgemm called from compiled code through their addresses):

    out[g] = a[g] @ b[g]     split over g when there are enough groups, else over a's rows
                             (m >= n) or b's columns (multiples of 16: no cache line shared)

(``matmul``; a convolution goes by bands of output rows, each band's im2col and GEMM on one
thread: ``structure.Convolution``). The BLAS workers stay asleep, and numba's threads, which
spin briefly between parallel regions, pick the work up at once.

What keeps it (ResNet-18 at 224, float32, 2 cores, 2026-12-07, in-process, alternating runs,
medians): the whole predict at batch 16 took 383 ms with OpenBLAS's threads and the passes
beside them, 326 ms with the products split over Python threads (waking one took up to
0.3 ms), 244 ms with the bands on numba's threads; a max-pool level's pass right after a GEMM
10.8-19.7 ms with OpenBLAS's threads spinning against 6.3-9.7 ms when they sleep. Alone, ResNet-
18's 8 convolution shapes at batch 16 took 69.5-71.6 ms on OpenBLAS's threads and 73.0-74.2 ms
split here. At batch 1 OpenBLAS's own threads win (4.3-4.9 against 5.0-5.7 ms): runs whose
products average under ``OWN_THREADS_WORK`` are left to them.
"""

from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager
from functools import lru_cache

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

# A run goes on numba's threads when its BLAS products average this many multiply-adds (ResNet-18
# at batch 1, about 90M: 29 ms as it is, 36 ms on numba's threads; at batch 16, 1.4G).
OWN_THREADS_WORK = 128_000_000
# Inside, products of fewer multiply-adds run whole on the calling thread.
SPLIT_MIN_WORK = 16_000_000
# A split of columns keeps parts a multiple of this many columns.
COLUMN_ALIGN = 16
# BLAS's sizes and leading dimensions are 32-bit: past this, numpy's product.
INT32_LIMIT = 2**31

_state = threading.local()
# One run at a time limits BLAS: OpenBLAS takes a thread count back only from the thread that
# set it (a limit lifted from another thread stayed at 1), so a run that starts while another
# is inside runs as it would without ``own_threads``.
_lock = threading.Lock()
_owned = False


@lru_cache(maxsize=1)
def _controller():
    """threadpoolctl's view of the BLAS libraries loaded (None without threadpoolctl or BLAS)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - a dependency; kept importable without it
        return None
    controller = ThreadpoolController().select(user_api="blas")
    return controller if controller.lib_controllers else None


def active() -> bool:
    """Whether this thread is inside ``own_threads`` (products split by ``matmul``)."""
    return getattr(_state, "active", False)


@contextmanager
def own_threads(work: int):
    """Inside: BLAS on one thread and ``matmul`` splitting products over the runtime's threads,
    for a run whose BLAS products average ``work`` multiply-adds (left as it is below
    ``OWN_THREADS_WORK``, on one thread, or where threadpoolctl finds no BLAS it can limit). A
    nested call, or one in another thread while a run is inside, changes nothing. The BLAS
    thread count is the process's: other threads' products run on one thread meanwhile."""
    global _owned
    controller = _controller() if work >= OWN_THREADS_WORK and numba.get_num_threads() > 1 else None
    with _lock:
        owner = controller is not None and not _owned
        _owned = _owned or owner
    if not owner:
        yield
        return
    try:
        limits = controller.limit(limits=1)
        _state.active = True
        try:
            yield
        finally:
            _state.active = False
            limits.restore_original_limits()
    finally:
        with _lock:
            _owned = False


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """np.matmul(a, b, out=out) for a (g, m, k) or (m, k), b (g, k, n) or (k, n) and out of
    the result's shape: inside ``own_threads`` split over the threads (module docstring)."""
    threads = numba.get_num_threads()
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    groups = a.shape[0] if a.ndim == 3 else 1
    if not active() or groups * m * k * n < SPLIT_MIN_WORK or not _blasable(a, b, out):
        return np.matmul(a, b, out=out)
    a3, b3, out3 = (x.reshape((groups, *x.shape[-2:])) for x in (a, b, out))
    if groups >= threads:
        parts = [(a3[g], b3[g], out3[g]) for g in range(groups)]
    elif m >= n:
        bounds = np.linspace(0, m, threads + 1).astype(int)
        spans = list(zip(bounds[:-1], bounds[1:]))
        parts = [(a3[g, i:j], b3[g], out3[g, i:j]) for g in range(groups) for i, j in spans]
    else:
        bounds = np.linspace(0, n // COLUMN_ALIGN, threads + 1).astype(int) * COLUMN_ALIGN
        bounds[-1] = n
        parts = [
            (a3[g], b3[g, :, i:j], out3[g, :, i:j]) for g in range(groups) for i, j in zip(bounds[:-1], bounds[1:])
        ]
    parts = [(x, y, z) for x, y, z in parts if z.size]
    item = a.itemsize
    addresses = np.array([[x.ctypes.data, y.ctypes.data, z.ctypes.data] for x, y, z in parts], dtype=np.int64)
    sizes = np.stack([
        gemm_sizes(z.shape[0], z.shape[1], x.shape[1], x.strides[0] // item, y.strides[0] // item, z.strides[0] // item)
        for x, y, z in parts
    ])  # fmt: skip
    gemm_tasks(addresses, sizes, GEMM, a.dtype == np.float32)
    return out


def _blasable(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> bool:
    """Whether the compiled GEMM takes these: BLAS found, one float dtype, rows of unit stride,
    leading dimensions of at least a row and within BLAS's 32-bit sizes."""
    if GEMM is None or not (a.dtype == b.dtype == out.dtype) or a.dtype not in (np.float32, np.float64):
        return False
    return all(
        x.strides[-1] == x.itemsize and x.shape[-1] * x.itemsize <= x.strides[-2] < INT32_LIMIT * x.itemsize
        for x in (a, b, out)
    )


def _blas_address(name: str) -> int | None:
    """The address of BLAS's ``name`` in scipy's cython_blas (Fortran calling convention: every
    argument a pointer); None where it is not found."""
    try:
        from scipy.linalg import cython_blas

        capsule = cython_blas.__pyx_capi__[name]
        get_name = ctypes.pythonapi.PyCapsule_GetName
        get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        return get_pointer(capsule, get_name(capsule))
    except (ImportError, AttributeError, KeyError, ValueError):  # pragma: no cover - scipy has them
        return None


@intrinsic
def _call_gemm(typingctx, function, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """The call of the function at address ``function`` (BLAS's gemm: 13 pointers), each
    argument an address."""
    arguments = (transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)

    def codegen(context, builder, signature, args):
        pointer = ir.IntType(8).as_pointer()
        callee = builder.inttoptr(args[0], ir.FunctionType(ir.VoidType(), [pointer] * 13).as_pointer())
        builder.call(callee, [builder.inttoptr(value, pointer) for value in args[1:]])
        return context.get_dummy_value()

    return types.void(function, *arguments), codegen


_ADDRESSES = [_blas_address("sgemm"), _blas_address("dgemm")]
# sgemm's and dgemm's addresses, passed to the kernels (an address is this process's: a cached
# kernel must not hold it); None without them
GEMM = None if None in _ADDRESSES else np.array(_ADDRESSES, dtype=np.int64)
# gemm's constant arguments: "N" (no transpose), alpha = 1 and beta = 0 in each precision
_PLAIN = np.array([78], dtype=np.uint8)
_SINGLE = np.array([1, 0], dtype=np.float32)
_DOUBLE = np.array([1, 0], dtype=np.float64)


def gemm_sizes(rows: int, columns: int, inner: int, lda: int, ldb: int, ldo: int) -> np.ndarray:
    """``row_major_gemm``'s sizes for out (rows x columns, row stride ldo) = a (rows x inner, lda)
    @ b (inner x columns, ldb): BLAS's column-major out^T = b^T a^T."""
    return np.array([columns, rows, inner, ldb, lda, ldo], dtype=np.int32)


@numba.njit(cache=True, nogil=True)
def row_major_gemm(sizes, a, b, out, functions, single):  # pragma: no cover - jitted
    """out = a @ b, row-major, at these addresses, float32 when ``single`` else float64, with
    ``gemm_sizes``'s sizes (an int32 array the caller keeps alive): BLAS's gemm (``functions``:
    ``GEMM``) on this thread."""
    at, plain = sizes.ctypes.data, _PLAIN.ctypes.data
    if single:
        one = _SINGLE.ctypes.data
        _call_gemm(functions[0], plain, plain, at, at + 4, at + 8, one, b, at + 12, a, at + 16, one + 4, out, at + 20)
    else:
        one = _DOUBLE.ctypes.data
        _call_gemm(functions[1], plain, plain, at, at + 4, at + 8, one, b, at + 12, a, at + 16, one + 8, out, at + 20)


@numba.njit(parallel=True, cache=True, nogil=True)
def gemm_tasks(addresses, sizes, functions, single):  # pragma: no cover - jitted
    """``row_major_gemm`` of each task (addresses: a, b, out; sizes: ``gemm_sizes``) on
    numba's threads."""
    for task in numba.prange(addresses.shape[0]):
        row_major_gemm(sizes[task], addresses[task, 0], addresses[task, 1], addresses[task, 2], functions, single)
