"""Exact Euclidean projection of every row onto the l1 ball: ||A||_inf <= kappa.

||A||_inf is the largest row l1 norm, so the set {||A||_inf <= kappa} is a product of l1 balls,
one per row, and its Euclidean projection is done row by row. For one row a with
||a||_1 > kappa the projection is the soft threshold

    x_i = sign(a_i) max(|a_i| - theta, 0),   theta > 0 solving  sum_i max(|a_i| - theta, 0) = kappa;

rows with ||a||_1 <= kappa are already inside and are returned unchanged, bit for bit.

theta could be found by bisection (the left-hand side is continuous and decreasing in theta);
we use the exact sort-based threshold instead (Duchi et al. 2008, Condat 2016). With
mu_1 >= mu_2 >= ... the sorted magnitudes and the partial averages
g_k = (mu_1 + ... + mu_k - kappa) / k, the threshold is theta = max_k g_k: g_k increases while
mu_k > g_{k-1} (the k-th entry survives the threshold) and decreases after, and at the last
surviving k the equation above holds exactly. Taking the maximum, rather than searching for the
last surviving k, needs no branching per row, so every row of the matrix is done at once: one
sort of the whole dense array, or of all CSR entries keyed by (row, -|value|). The partial sums
are accumulated in float64 whatever the storage dtype.

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


# ----------------------------------------------------------------------------------- numpy
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
        theta = _dense_threshold_numpy(np.abs(values).astype(np.float64), kappa)[:, None]
    else:
        indptr = _check_indptr(np.asarray(indptr, dtype=np.int64), values)
        rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        theta = _segment_threshold_numpy(np.abs(values).astype(np.float64), indptr, rows, kappa)[rows]
    outside = np.isfinite(theta)  # theta is -inf on rows inside the ball
    shrunk = np.maximum(np.abs(values) - np.where(outside, theta, 0.0), 0.0).astype(values.dtype)
    return np.where(outside, np.sign(values) * shrunk, values)


def _dense_threshold_numpy(magnitude: np.ndarray, kappa: float) -> np.ndarray:
    """theta per row; -inf (project nothing) for rows inside the ball."""
    theta = np.full(magnitude.shape[0], -np.inf)
    outside = magnitude.sum(axis=1) > kappa
    if outside.any():
        mu = -np.sort(-magnitude[outside], axis=1)
        counts = np.arange(1, mu.shape[1] + 1)
        theta[outside] = ((np.cumsum(mu, axis=1) - kappa) / counts).max(axis=1)
    return theta


def _segment_threshold_numpy(magnitude: np.ndarray, indptr: np.ndarray, rows: np.ndarray, kappa: float) -> np.ndarray:
    n_rows = len(indptr) - 1
    theta = np.full(n_rows, -np.inf)
    outside = np.bincount(rows, weights=magnitude, minlength=n_rows) > kappa
    if outside.any():
        order = np.lexsort((-magnitude, rows))  # by row, then by decreasing magnitude
        mu = magnitude[order]
        partial = np.concatenate(([0.0], np.cumsum(mu)))
        starts = indptr[rows]
        within = partial[1:] - partial[starts]  # mu_1 + ... + mu_k inside each row
        counts = np.arange(1, len(mu) + 1) - starts
        np.maximum.at(theta, rows, (within - kappa) / counts)
        theta[~outside] = -np.inf
    return theta


# ----------------------------------------------------------------------------------- torch
def _project_torch(values: Any, kappa: float, indptr: Any, mask: Any) -> Any:
    torch = sys.modules["torch"]
    with torch.no_grad():
        values = values.detach()
        if not values.is_floating_point():
            values = values.to(torch.float64)
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=torch.bool, device=values.device)
            _check_mask_shape(tuple(mask.shape), tuple(values.shape))
            values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
        magnitude = values.abs().to(torch.float64)
        if indptr is None:
            if values.dim() != 2:
                raise ShapeError(
                    f"expected a 2-D tensor of rows (or 1-D CSR data with indptr), got shape {tuple(values.shape)}"
                )
            theta = _dense_threshold_torch(magnitude, kappa)[:, None]
        else:
            indptr = torch.as_tensor(indptr, dtype=torch.int64, device=values.device)
            _check_indptr(indptr, values)
            rows = _torch_row_ids(indptr, values.numel())
            theta = _segment_threshold_torch(magnitude, indptr, rows, kappa)[rows]
        outside = torch.isfinite(theta)  # theta is -inf on rows inside the ball
        shrunk = (magnitude - torch.where(outside, theta, 0.0)).clamp_min(0).to(values.dtype)
        return torch.where(outside, torch.sign(values) * shrunk, values)


def _dense_threshold_torch(magnitude: Any, kappa: float) -> Any:
    torch = sys.modules["torch"]
    theta = torch.full((magnitude.shape[0],), -torch.inf, dtype=torch.float64, device=magnitude.device)
    outside = magnitude.sum(1) > kappa
    if bool(outside.any()):
        mu = torch.sort(magnitude[outside], dim=1, descending=True).values
        counts = torch.arange(1, mu.shape[1] + 1, dtype=torch.float64, device=mu.device)
        theta[outside] = ((torch.cumsum(mu, 1) - kappa) / counts).amax(1)
    return theta


def _segment_threshold_torch(magnitude: Any, indptr: Any, rows: Any, kappa: float) -> Any:
    torch = sys.modules["torch"]
    n_rows = len(indptr) - 1
    theta = torch.full((n_rows,), -torch.inf, dtype=torch.float64, device=magnitude.device)
    norms = torch.zeros(n_rows, dtype=torch.float64, device=magnitude.device).index_add_(0, rows, magnitude)
    outside = norms > kappa
    if bool(outside.any()):
        by_magnitude = torch.argsort(magnitude, descending=True, stable=True)
        order = by_magnitude[torch.argsort(rows[by_magnitude], stable=True)]  # by row, then magnitude
        mu = magnitude[order]
        partial = torch.cat((mu.new_zeros(1), torch.cumsum(mu, 0)))
        starts = indptr[rows]
        within = partial[1:] - partial[starts]
        counts = (torch.arange(1, len(mu) + 1, device=mu.device) - starts).to(torch.float64)
        theta.scatter_reduce_(0, rows, (within - kappa) / counts, reduce="amax")
        theta[~outside] = -torch.inf
    return theta


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
