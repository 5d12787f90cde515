"""Float64-exact replacements for the onnx.reference ops that compute in float32.

onnx.reference (1.23) evaluates Erf through ``np.vectorize(math.erf, otypes=["f"])`` (float32
values even for float64 inputs), and Gelu and HardSwish through their schemas' function bodies,
whose constants are float32 (1/sqrt(2), sqrt(2/pi), 1/6): 1e-9 to 3e-8 relative error in float64,
more than the 1e-9 the float64 comparisons allow. These classes compute the ops' definitions in
the input's dtype. LRN's (1.23) sums each window over the batch axis's range instead of the
channels' (``for c in range(x.shape[0])``: at batch 1 only channel 0 is normalized) and takes only
4-D inputs: ``LRN`` computes the schema's definition for any (N, C, ...) input. Pass
``REFERENCE_OPS`` as ``ReferenceEvaluator(model, new_ops=REFERENCE_OPS)``.
"""

from __future__ import annotations

import math

import numpy as np
from onnx.reference.op_run import OpRun
from scipy import special


class Erf(OpRun):
    op_domain = ""

    def _run(self, x):
        return (special.erf(x).astype(x.dtype, copy=False),)


class Gelu(OpRun):
    op_domain = ""

    def _run(self, x, approximate=None):
        if (approximate or "none") == "tanh":
            inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
            return ((0.5 * x * (1 + np.tanh(inner))).astype(x.dtype, copy=False),)
        return ((0.5 * x * (1 + special.erf(x / math.sqrt(2)))).astype(x.dtype, copy=False),)


class HardSwish(OpRun):
    op_domain = ""

    def _run(self, x):
        return ((x * np.clip(x / 6 + 0.5, 0, 1)).astype(x.dtype, copy=False),)


class LRN(OpRun):
    op_domain = ""

    def _run(self, x, alpha=None, beta=None, bias=None, size=None):
        """x / (bias + alpha / size * sum of x^2 over channels c - floor((size-1)/2) .. c + ceil((size-1)/2))^beta
        (the evaluator passes the schema's defaults, as float32 scalars: alpha / size in float64 here)."""
        alpha, beta, bias = float(alpha), float(beta), float(bias)
        channels, before, after = x.shape[1], (size - 1) // 2, size // 2
        square_sum = np.zeros_like(x)
        for c in range(channels):
            square_sum[:, c] = np.sum(x[:, max(0, c - before) : min(channels, c + after + 1)] ** 2, axis=1)
        return ((x / (bias + alpha / size * square_sum) ** beta).astype(x.dtype, copy=False),)


REFERENCE_OPS = [Erf, Gelu, HardSwish, LRN]
