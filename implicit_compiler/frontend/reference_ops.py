"""Float64-exact replacements for the onnx.reference ops that compute in float32.

onnx.reference (1.23) evaluates Erf through ``np.vectorize(math.erf, otypes=["f"])`` (float32
values even for float64 inputs), and Gelu and HardSwish through their schemas' function bodies,
whose constants are float32 (1/sqrt(2), sqrt(2/pi), 1/6): 1e-9 to 3e-8 relative error in float64,
more than the 1e-9 the float64 comparisons allow. These classes compute the ops' definitions in
the input's dtype; pass ``REFERENCE_OPS`` as ``ReferenceEvaluator(model, new_ops=REFERENCE_OPS)``.
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


REFERENCE_OPS = [Erf, Gelu, HardSwish]
