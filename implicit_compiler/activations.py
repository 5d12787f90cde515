"""Componentwise activations phi, one per state block.

Each activation is a scalar function applied to every entry of a block's pre-activation
z = A x + B u + b_x. What analyses need to know about it is recorded here:

- ``lipschitz``: the smallest L with |phi(a) - phi(b)| <= L |a - b| (inf where none exists);
  phi is non-expansive when L <= 1, which is what the well-posedness and sensitivity results
  assume.
- ``positively_homogeneous``: phi(c z) = c phi(z) for every c > 0 (identity, relu, leaky_relu);
  a positive diagonal rescaling of the state then leaves predictions unchanged.

=========== ======================= ============= ========================
name        phi(z)                  Lipschitz     positively homogeneous
=========== ======================= ============= ========================
identity    z                       1             yes
relu        max(z, 0)               1             yes
leaky_relu  z if z >= 0 else a*z    max(1, |a|)   yes
tanh        tanh(z)                 1             no
sigmoid     1 / (1 + exp(-z))       1/4           no
square      z**2                    inf           no
=========== ======================= ============= ========================
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; kept importable without it
    numba = None

from .errors import GraphError

ACTIVATION_NAMES = ("identity", "relu", "leaky_relu", "tanh", "sigmoid", "square")


@dataclass(frozen=True)
class Activation:
    """A componentwise activation: a name from ``ACTIVATION_NAMES`` and, for leaky_relu, alpha."""

    name: str
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.name not in ACTIVATION_NAMES:
            raise GraphError(f"unknown activation {self.name!r}: expected one of {', '.join(ACTIVATION_NAMES)}")
        if self.name == "leaky_relu":
            if self.alpha is None or not math.isfinite(self.alpha):
                raise GraphError(f"leaky_relu needs a finite alpha, got {self.alpha!r}")
            object.__setattr__(self, "alpha", float(self.alpha))
        elif self.alpha is not None:
            raise GraphError(f"activation {self.name!r} takes no alpha, got alpha={self.alpha!r}")

    @property
    def lipschitz(self) -> float:
        """The Lipschitz constant of phi (``math.inf`` when phi is not Lipschitz)."""
        if self.name == "leaky_relu":
            return max(1.0, abs(self.alpha))
        return {"sigmoid": 0.25, "square": math.inf}.get(self.name, 1.0)

    @property
    def positively_homogeneous(self) -> bool:
        """True when phi(c z) = c phi(z) for every c > 0."""
        return self.name in ("identity", "relu", "leaky_relu")

    def __call__(self, z: np.ndarray) -> np.ndarray:
        """phi(z), a new array with z's dtype."""
        return self.apply_inplace(np.array(z, copy=True))

    def apply_inplace(self, z: np.ndarray) -> np.ndarray:
        """Overwrite z with phi(z) and return it (the runtime's hot path allocates nothing)."""
        if self.name in ("relu", "leaky_relu") and _rectify is not None and z.flags.c_contiguous:
            _rectify(z.reshape(-1), self.name == "relu", z.dtype.type(self.alpha or 0.0))
        elif self.name == "relu":
            np.maximum(z, 0, out=z)
        elif self.name == "leaky_relu":
            np.multiply(z, z.dtype.type(self.alpha), out=z, where=z < 0)
        elif self.name == "tanh":
            np.tanh(z, out=z)
        elif self.name == "sigmoid":
            # 1 / (1 + exp(-z)) written as (1 + tanh(z/2)) / 2: no overflow for large |z|.
            np.multiply(z, 0.5, out=z)
            np.tanh(z, out=z)
            np.multiply(z, 0.5, out=z)
            np.add(z, 0.5, out=z)
        elif self.name == "square":
            np.square(z, out=z)
        return z

    def to_spec(self) -> str:
        """A string that ``activation()`` reads back: 'relu', 'leaky_relu(0.01)'."""
        return self.name if self.alpha is None else f"{self.name}({self.alpha!r})"

    def __str__(self) -> str:
        return self.to_spec()


def _rectify_flat(z, relu, alpha):  # pragma: no cover - jitted
    """relu (0 where z < 0) or leaky_relu (alpha z there) in place; NaN stays NaN. Compiled:
    numpy's maximum took 22 us on 200 x 256 float32 values, this 3 us."""
    for i in range(z.size):
        v = z[i]
        if relu and v <= 0:  # (-0.0 too, as numpy's maximum(z, 0) gives 0.0)
            z[i] = 0.0
        elif v < 0 and not relu:
            z[i] = alpha * v


_rectify = None if numba is None else numba.njit(cache=True, nogil=True)(_rectify_flat)

_SPEC_PATTERN = re.compile(r"^\s*([a-z_]+)\s*(?:\(\s*([^)]*)\s*\))?\s*$")


def activation(spec: str | Activation, alpha: float | None = None) -> Activation:
    """Resolve an activation from a name ('relu'), a spec string ('leaky_relu(0.1)') or itself.

    ``activation('leaky_relu')`` uses alpha=0.01, the default of ONNX and torch.
    """
    if isinstance(spec, Activation):
        return spec
    match = _SPEC_PATTERN.match(str(spec))
    if match is None:
        raise GraphError(f"cannot read activation {spec!r}: expected e.g. 'relu' or 'leaky_relu(0.1)'")
    name, argument = match.group(1), match.group(2)
    if argument:
        try:
            alpha = float(argument)
        except ValueError:
            raise GraphError(f"cannot read the alpha of activation {spec!r}") from None
    if name == "leaky_relu" and alpha is None:
        alpha = 0.01
    return Activation(name, alpha)
