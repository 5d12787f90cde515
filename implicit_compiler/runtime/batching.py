"""Turning user inputs into one (batch, p) array and flat outputs back into tensors.

The leading axis of an array is the batch axis. A single sample (an array with exactly the
input's per-sample shape) is accepted too and gives unbatched results. A model with several
inputs takes a dict keyed by input name, or a sequence in input order; any model also takes the
flat concatenation, (p,) or (batch, p).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import NonFiniteError, ShapeError
from ..model import FLOAT_DTYPES, TensorSpec


def flatten_inputs(specs: Sequence[TensorSpec], u: Any, check_finite: bool = True) -> tuple[np.ndarray, bool]:
    """Return (U, single): U of shape (batch, p) and whether u was one unbatched sample.

    Float32 and float64 inputs keep their dtype; other numbers become float64. NaN or infinite
    values raise NonFiniteError, unless ``check_finite`` is False (the caller checks).
    """
    if isinstance(u, Mapping):
        missing = [spec.name for spec in specs if spec.name not in u]
        unknown = sorted(set(u) - {spec.name for spec in specs})
        if missing or unknown:
            raise ShapeError(f"inputs: expected names {[s.name for s in specs]}, missing {missing}, unknown {unknown}")
        parts = [_as_float_array(u[spec.name], spec.name, check_finite) for spec in specs]
    elif _is_sequence_of_tensors(u, specs):
        parts = [_as_float_array(value, spec.name, check_finite) for value, spec in zip(u, specs)]
    else:
        array = _as_float_array(u, "u", check_finite)
        if len(specs) != 1 or _sample_rank(array, specs[0].shape) is None:
            return _flat(array, sum(spec.size for spec in specs), specs)
        parts = [array]
    return _concatenate(parts, specs)


def _is_sequence_of_tensors(u: Any, specs: Sequence[TensorSpec]) -> bool:
    """A list with one tensor per input (a number only where the input is a scalar, rank 0: a
    list of numbers for tensor inputs is one flat sample)."""
    if len(specs) < 2 or not isinstance(u, (list, tuple)) or len(u) != len(specs):
        return False
    return all(np.ndim(value) > 0 or spec.shape == () for value, spec in zip(u, specs))


def _concatenate(parts: list[np.ndarray], specs: Sequence[TensorSpec]) -> tuple[np.ndarray, bool]:
    singles, batches = set(), set()
    flat = []
    for array, spec in zip(parts, specs):
        rank = _sample_rank(array, spec.shape)
        if rank is None:
            raise ShapeError(
                f"input {spec.name!r}: expected shape {spec.shape} (one sample) or "
                f"(batch, {', '.join(map(str, spec.shape))}), got {array.shape}"
            )
        single = rank == 0
        singles.add(single)
        batch = 1 if single else array.shape[0]
        batches.add(batch)
        flat.append(array.reshape(batch, spec.size))
    if len(singles) > 1 or len(batches) > 1:
        raise ShapeError(f"inputs disagree on batching: shapes {[a.shape for a in parts]}")
    if not flat:  # a model with no inputs (a graph of constants): one sample of nothing
        return np.zeros((1, 0)), True
    if len(flat) == 1:
        return flat[0], singles.pop()
    dtype = np.result_type(*(a.dtype for a in flat))
    return np.concatenate([a.astype(dtype, copy=False) for a in flat], axis=1), singles.pop()


def _flat(array: np.ndarray, p: int, specs: Sequence[TensorSpec]) -> tuple[np.ndarray, bool]:
    if array.shape == (p,):
        return array.reshape(1, p), True
    if array.ndim == 2 and array.shape[1] == p:
        return array, False
    expected = " or ".join(f"{spec.shape}" for spec in specs)
    raise ShapeError(
        f"input: expected one sample of shape {expected}, a batch with a leading batch axis, "
        f"or flat ({p},) / (batch, {p}); got shape {array.shape}"
    )


def _sample_rank(array: np.ndarray, shape: tuple[int, ...]) -> int | None:
    """0 for one sample of ``shape``, 1 for a batch of them, None otherwise."""
    if array.shape == shape:
        return 0
    if array.ndim == len(shape) + 1 and array.shape[1:] == shape:
        return 1
    return None


def _as_float_array(value: Any, name: str, check_finite: bool = True) -> np.ndarray:
    """The input as native float32 or float64: floats of at most 4 bytes (float16, big-endian
    '>f4') as float32, exactly; wider floats (big-endian '>f8', longdouble) as float64, the
    most precise the runtime has, never below it; integers and bools as float64."""
    array = np.asarray(value)
    if array.dtype not in FLOAT_DTYPES:
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
            raise ShapeError(f"input {name!r}: expected real numbers, got dtype {array.dtype}")
        narrow = np.issubdtype(array.dtype, np.floating) and array.dtype.itemsize <= 4
        array = array.astype(np.float32 if narrow else np.float64)
    if check_finite and not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise NonFiniteError(f"input {name!r} holds {bad} NaN or inf value(s); expected finite inputs")
    return array


def shape_outputs(specs: Sequence[TensorSpec], y: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
    """Split flat outputs, (q,) or (batch, q), into tensors: one array, or a dict for several."""
    single = y.ndim == 1
    rows = y.reshape(1, -1) if single else y
    tensors, offset = {}, 0
    for spec in specs:
        part = rows[:, offset : offset + spec.size]
        offset += spec.size
        tensors[spec.name] = part.reshape(spec.shape) if single else part.reshape((rows.shape[0], *spec.shape))
    return next(iter(tensors.values())) if len(tensors) == 1 else tensors
