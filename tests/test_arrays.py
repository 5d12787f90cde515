"""``arrays.sorted_unique`` against numpy's np.unique."""

from __future__ import annotations

import numpy as np
import pytest

from implicit_compiler.arrays import sorted_unique


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint64, np.float64])  # (indices; floats without NaN)
def test_sorted_unique_is_numpys_unique(dtype):
    rng = np.random.default_rng(0)
    for values in (
        rng.integers(0, 50, size=1000),  # many repeats
        rng.integers(0, 10**6, size=(300, 7)),  # few, two-dimensional (flattened, as np.unique)
        np.arange(5)[::-1],
        np.array([3]),
        np.zeros(0),
    ):
        values = values.astype(dtype)
        got = sorted_unique(values)
        np.testing.assert_array_equal(got, np.unique(values))
        assert got.dtype == values.dtype and got.ndim == 1
