"""BLAS products of a structured run on the runtime's own threads, one BLAS thread each.

A structured block's GEMM (``structure.Convolution``, ``Dense``) is followed by compiled passes
on numba's threads (im2col, ``kernels.finish_rows``). OpenBLAS's own worker threads busy-wait
after each product for about 2^28 cycles (0.1 s) before they sleep, so on a 2-core machine every
pass that follows a GEMM shared one core with a spinning thread: its two threads ran at the speed
of one. Inside ``own_threads`` BLAS runs on one thread (threadpoolctl) and ``matmul`` splits a
product into one part per thread, the caller taking the last; the BLAS workers stay asleep.

    out[g] = a[g] @ b[g]     split over g when there are enough groups, else over a's rows
                             (m >= n) or b's columns (multiples of 16: no cache line shared)

``run_on_threads`` shares other work out the same way (a convolution's bands of output rows:
``structure.Convolution``).

What keeps it (ResNet-18 at 224, float32, 2 cores, 2026-12-07, in-process, alternating runs):
the whole predict at batch 16 took 383 ms (median) with OpenBLAS's threads and 326 ms so; a
max-pool level's pass right after a GEMM 10.8-19.7 ms with them against 6.3-9.7 ms when they
sleep. Alone, one GEMM (128 x 1152 by 1152 x 12,544) takes 10.6 ms on OpenBLAS's two threads
and 10.3-11.2 ms split here.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache

import numba
import numpy as np

# A run goes on its own threads when its BLAS products average this many multiply-adds: waking a
# pool thread took 0.05-0.3 ms on this VM, against 0.3-0.8 ms for a GEMM of ResNet-18 at batch 1
# (split, its 8 convolution shapes took 5.1-7.5 ms against 4.2-4.3 on OpenBLAS's threads; at batch
# 16, 76.4-76.7 ms against 74.4-75.9).
OWN_THREADS_WORK = 128_000_000
# Inside, products of fewer multiply-adds run whole on the calling thread.
SPLIT_MIN_WORK = 16_000_000
# A split of columns keeps parts a multiple of this many columns.
COLUMN_ALIGN = 16

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


@lru_cache(maxsize=1)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="implicit_compiler_blas")


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
    if not active() or groups * m * k * n < SPLIT_MIN_WORK:
        return np.matmul(a, b, out=out)
    if groups >= threads:
        bounds = np.linspace(0, groups, threads + 1).astype(int)
        parts = [(a[i:j], b[i:j], out[i:j]) for i, j in zip(bounds[:-1], bounds[1:])]
    elif m >= n:
        bounds = np.linspace(0, m, threads + 1).astype(int)
        parts = [(a[..., i:j, :], b, out[..., i:j, :]) for i, j in zip(bounds[:-1], bounds[1:])]
    else:
        bounds = np.linspace(0, n // COLUMN_ALIGN, threads + 1).astype(int) * COLUMN_ALIGN
        bounds[-1] = n
        parts = [(a, b[..., i:j], out[..., i:j]) for i, j in zip(bounds[:-1], bounds[1:])]
    pending = [_pool(threads - 1).submit(np.matmul, x, y, out=z) for x, y, z in parts[:-1]]
    x, y, z = parts[-1]
    np.matmul(x, y, out=z)
    for future in pending:
        future.result()
    return out


def run_on_threads(function, items) -> None:
    """function(item) for each of ``items``, shared by the threads: the pool's take the first
    parts, the caller the last (contiguous parts of about equal size)."""
    items = list(items)
    threads = min(numba.get_num_threads(), len(items))
    bounds = np.linspace(0, len(items), threads + 1).astype(int)

    def part(first: int, last: int) -> None:
        for item in items[first:last]:
            function(item)

    pool = _pool(numba.get_num_threads() - 1) if threads > 1 else None
    pending = [pool.submit(part, i, j) for i, j in zip(bounds[:-2], bounds[1:-1])] if pool else []
    part(bounds[-2], bounds[-1])
    for future in pending:
        future.result()
