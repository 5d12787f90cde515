"""Exact Euclidean projection of every row onto the l1 ball: ||A||_inf <= kappa.

||A||_inf is the largest row l1 norm, so the set {||A||_inf <= kappa} is a product of l1 balls,
one per row, and its Euclidean projection is done row by row. For one row a with
||a||_1 > kappa the projection is the soft threshold

    x_i = sign(a_i) max(|a_i| - theta, 0),   theta > 0 solving  sum_i max(|a_i| - theta, 0) = kappa;

rows with ||a||_1 <= kappa are already inside and are returned unchanged, bit for bit.

theta is found exactly by Michelot's algorithm (1986; Condat 2016 compares it with the sort-based
threshold of Duchi et al. 2008): from theta = (||a||_1 - kappa) / len(a), repeat theta <- (sum of
the |a_i| > theta, minus kappa) / (their count). theta only grows and the set of surviving
entries only shrinks; once it stops shrinking, the surviving entries are all above theta, the
others at or below it and theta satisfies the equation above: the exact threshold, in a few
passes over the row (sums accumulated in float64 whatever the storage dtype). One compiled
kernel does every row, in parallel over rows (a 500 x 500 matrix: 0.3 ms, where sorting its rows
with torch took 8.6 ms and numpy 1.0 ms).

Structure: projecting only the stored entries of a CSR matrix is the projection onto the
matrices with that sparsity pattern (the set is a product over the stored coordinates); a
boolean ``mask`` does the same for dense arrays (entries outside it are zero afterwards), and
``mask="triangular"`` keeps a matrix strictly lower triangular, i.e. the model acyclic.

numpy arrays and torch tensors are both accepted; the torch path runs under ``no_grad`` and is
meant for the step after each optimizer update (``ImplicitModule.project_``).
"""

from __future__ import annotations

import sys
from typing import Any

import numba
import numpy as np
import scipy.sparse as sp

from ..errors import ShapeError

MASK_NAMES = ("triangular",)


def project_rows_l1(values: Any, kappa: float, indptr: Any = None, mask: Any = None) -> Any:
    """Project every row onto {||row||_1 <= kappa}, all rows at once.

    Args:
        values: a dense 2-D array or tensor (each row projected), or, with ``indptr``, the 1-D
            ``data`` of a CSR matrix (row r is ``values[indptr[r]:indptr[r + 1]]``).
        kappa: the radius, >= 0.
        indptr: CSR row pointers (numpy array or tensor), or None for dense ``values``.
        mask: a boolean array/tensor shaped like ``values``: entries where it is False are set to
            zero and the rest are projected (the projection onto matrices supported on the mask).

    Returns:
        A new array (or tensor) with the dtype of ``values``.
    """
    kappa = _check_radius(kappa)
    if _is_torch(values):
        return _project_torch(values, kappa, indptr, mask)
    return _project_numpy(np.asarray(values), kappa, indptr, mask)


def project_inf_norm(A: Any, kappa: float, mask: Any = None) -> Any:
    """The projection of a matrix onto {||A||_inf <= kappa}, keeping its kind and structure.

    Args:
        A: a scipy sparse matrix (its stored entries are projected; the pattern is kept, zeros
            included), a dense 2-D array or tensor, or an ``ImplicitModel`` (its A is projected).
        kappa: the radius, >= 0; kappa < 1 makes the model well-posed for non-expansive phi.
        mask: None, "triangular" (strictly lower triangular: an acyclic model), or a boolean
            array of A's shape; entries outside it are zero afterwards.
    """
    from ..model import ImplicitModel

    if isinstance(A, ImplicitModel):
        return ImplicitModel(
            project_inf_norm(A.A, kappa, mask), A.B, A.C, A.D, A.bias_x, A.bias_y, A.blocks, A.inputs, A.outputs
        )
    if sp.issparse(A):
        csr = sp.csr_array(A, copy=True)
        csr.sum_duplicates()
        rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
        entry_mask = None if mask is None else structure_mask(mask, csr.shape)[rows, csr.indices]
        csr.data = project_rows_l1(csr.data, kappa, indptr=csr.indptr, mask=entry_mask)
        return csr
    shape = tuple(A.shape)
    if len(shape) != 2:
        raise ShapeError(f"expected a 2-D matrix to project, got shape {shape}")
    dense_mask = None if mask is None else structure_mask(mask, shape)
    if dense_mask is not None and _is_torch(A):
        dense_mask = sys.modules["torch"].as_tensor(dense_mask, device=A.device)
    return project_rows_l1(A, kappa, mask=dense_mask)


def structure_mask(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    """A boolean numpy mask of ``shape`` from "triangular" (strictly lower) or a boolean array."""
    if isinstance(mask, str):
        if mask not in MASK_NAMES:
            raise ShapeError(f"unknown structure mask {mask!r}: expected one of {', '.join(MASK_NAMES)} or an array")
        return np.tril(np.ones(shape, dtype=bool), k=-1)
    array = mask.detach().cpu().numpy() if _is_torch(mask) else np.asarray(mask)
    if array.shape != tuple(shape):
        raise ShapeError(f"mask: expected shape {tuple(shape)} (the matrix's), got {array.shape}")
    return array.astype(bool, copy=False)


def row_l1_norms(values: Any, indptr: Any = None) -> Any:
    """||row||_1 for every row of a dense 2-D array/tensor, or of CSR ``data`` with ``indptr``."""
    if indptr is None:
        return abs(values).sum(1)
    if _is_torch(values):
        torch = sys.modules["torch"]
        rows = _torch_row_ids(indptr, values.numel())
        return torch.zeros(len(indptr) - 1, dtype=values.dtype, device=values.device).index_add_(0, rows, values.abs())
    indptr = np.asarray(indptr)
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    return np.bincount(rows, weights=np.abs(values), minlength=len(indptr) - 1)


# ----------------------------------------------------------------------------------- kernel
def _project_rows(data: np.ndarray, indptr: np.ndarray, kappa: float) -> np.ndarray:
    """A projected copy of CSR ``data`` (rows by ``indptr``), by the compiled kernel."""
    out = np.array(data, copy=True)
    if data.size:
        _michelot_rows(out, np.ascontiguousarray(indptr, dtype=np.int64), float(kappa))
    return out


@numba.njit(cache=True, nogil=True, parallel=True)
def _michelot_rows(data, indptr, kappa):  # pragma: no cover - jitted
    """Project each CSR row of ``data`` onto the l1 ball of radius kappa, in place."""
    for row in numba.prange(indptr.size - 1):
        lo, hi = indptr[row], indptr[row + 1]
        total = 0.0
        for k in range(lo, hi):
            total += abs(data[k])
        if total <= kappa:
            continue
        if kappa <= 0:  # the ball is the origin
            data[lo:hi] = 0.0
            continue
        count = hi - lo
        theta = (total - kappa) / count
        while True:
            kept, kept_sum = 0, 0.0
            for k in range(lo, hi):
                magnitude = abs(data[k])
                if magnitude > theta:
                    kept += 1
                    kept_sum += magnitude
            if kept == count:
                break
            count = kept
            theta = (kept_sum - kappa) / kept
        for k in range(lo, hi):
            magnitude = abs(data[k]) - theta
            data[k] = 0.0 if magnitude <= 0 else (magnitude if data[k] > 0 else -magnitude)


def _project_numpy(values: np.ndarray, kappa: float, indptr: Any, mask: Any) -> np.ndarray:
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        _check_mask_shape(mask.shape, values.shape)
        values = np.where(mask, values, values.dtype.type(0))
    if indptr is None:
        if values.ndim != 2:
            raise ShapeError(f"expected a 2-D array of rows (or 1-D CSR data with indptr), got shape {values.shape}")
        rows, columns = values.shape
        flat = np.ascontiguousarray(values).reshape(-1)
        return _project_rows(flat, np.arange(rows + 1, dtype=np.int64) * columns, kappa).reshape(rows, columns)
    indptr = _check_indptr(np.asarray(indptr, dtype=np.int64), values)
    return _project_rows(values, indptr, kappa)


# ----------------------------------------------------------------------------------- torch
def _project_torch(values: Any, kappa: float, indptr: Any, mask: Any) -> Any:
    """The numpy projection on the tensor's values (copied to the CPU when elsewhere)."""
    torch = sys.modules["torch"]
    with torch.no_grad():
        values = values.detach()
        if not values.is_floating_point():
            values = values.to(torch.float64)
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=torch.bool, device=values.device)
            _check_mask_shape(tuple(mask.shape), tuple(values.shape))
            mask = mask.cpu().numpy()
        if indptr is not None:
            indptr = torch.as_tensor(indptr, dtype=torch.int64)
            _check_indptr(indptr, values)
            indptr = indptr.cpu().numpy()
        elif values.dim() != 2:
            raise ShapeError(
                f"expected a 2-D tensor of rows (or 1-D CSR data with indptr), got shape {tuple(values.shape)}"
            )
        projected = _project_numpy(values.cpu().numpy(), kappa, indptr, mask)
        return torch.from_numpy(projected).to(values.device)


def _torch_row_ids(indptr: Any, nnz: int) -> Any:
    torch = sys.modules["torch"]
    indptr = torch.as_tensor(indptr, dtype=torch.int64)
    rows = torch.arange(len(indptr) - 1, device=indptr.device)
    return torch.repeat_interleave(rows, indptr.diff(), output_size=nnz)


# ----------------------------------------------------------------------------------- checks
def _is_torch(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _check_radius(kappa: float) -> float:
    kappa = float(kappa)
    if not kappa >= 0 or kappa == float("inf"):
        raise ValueError(f"kappa: expected a finite radius >= 0, got {kappa}")
    return kappa


def _check_mask_shape(mask_shape: tuple[int, ...], values_shape: tuple[int, ...]) -> None:
    if tuple(mask_shape) != tuple(values_shape):
        raise ShapeError(f"mask: expected the shape of the values, {tuple(values_shape)}, got {tuple(mask_shape)}")


def _check_indptr(indptr: Any, values: Any) -> Any:
    count = int(values.shape[0]) if values.ndim == 1 else -1
    if values.ndim != 1 or indptr.ndim != 1 or len(indptr) < 1 or int(indptr[0]) != 0 or int(indptr[-1]) != count:
        raise ShapeError(
            f"expected 1-D CSR data with indptr running from 0 to len(data); got data of shape "
            f"{tuple(values.shape)} and indptr of shape {tuple(indptr.shape)}"
        )
    if bool((indptr[1:] < indptr[:-1]).any()):
        raise ShapeError("indptr must be non-decreasing (CSR row pointers)")
    return indptr
