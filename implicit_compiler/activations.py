"""Componentwise activations phi, one per state block.

Each activation is a scalar function applied to every entry of a block's pre-activation
z = A x + B u + b_x. What analyses need to know about it is recorded here:

- ``lipschitz``: the smallest L with |phi(a) - phi(b)| <= L |a - b| (inf where none exists:
  then the well-posedness, sensitivity and output-bound results do not apply, and they say so);
  phi is non-expansive when L <= 1, which is what the well-posedness and sensitivity results
  assume.
- ``positively_homogeneous``: phi(c z) = c phi(z) for every c > 0 (identity, relu, leaky_relu);
  a positive diagonal rescaling of the state then leaves predictions unchanged.
- ``derivative(z)``: phi'(z), with phi's own choice at a kink (the branch taken at z).

================= ====================================== =========================
name              phi(z)                                 Lipschitz
================= ====================================== =========================
identity          z                                      1
relu              max(z, 0)                              1
leaky_relu(a)     z if z >= 0 else a z                   max(1, |a|)
tanh              tanh(z)                                1
sigmoid           1 / (1 + exp(-z))                      1/4
square            z**2                                   inf
exp               exp(z)                                 inf
log               log(z) (NaN for z < 0, -inf at 0)      inf
reciprocal        1 / z                                  inf
sqrt              sqrt(z) (NaN for z < 0)                inf
rsqrt             1 / sqrt(z)                            inf
erf               erf(z)                                 2 / sqrt(pi)
gelu              z Phi(z) = z erfc(-z / sqrt 2) / 2     Phi(sqrt 2) + sqrt 2 Phi'(sqrt 2) ~ 1.129
gelu_tanh         z (1 + tanh(c (z + 0.044715 z^3))) / 2 ~ 1.129
elu(a)            z if z >= 0 else a (exp(z) - 1)        max(1, |a|)
selu(a, g)        g z if z > 0 else g a (exp(z) - 1)     |g| max(1, |a|)
celu(a)           max(z, 0) + min(0, a (exp(z / a) - 1)) 1
softplus          log(1 + exp(z))                        1
softsign          z / (1 + |z|)                          1
hard_sigmoid(a,b) max(0, min(1, a z + b))                |a|
hard_swish        z max(0, min(1, z / 6 + 1 / 2))        3/2
silu              z sigmoid(z)                           ~ 1.0998
mish              z tanh(softplus(z))                    ~ 1.0885
power(p)          z**p (NaN for z < 0 and p not whole)   1 if p = 1, 0 if p = 0, else inf
thresholded_relu  z if z > a else 0                      1 if a = 0, else inf (a jump)
log_positive      log(max(z, 2**-1022))                  inf
heaviside(h)      1 if z > 0, h if z = 0, else 0 (NaN: 0) inf (a jump)
================= ====================================== =========================

``log_positive`` is log where z is positive and log(2**-1022) ~ -708.4 (float64's smallest
normal number: above it lies every positive float32) where it is not, so that its states are
never -inf nor NaN (NaN stays NaN): the normalizations take the log of a centred value c and of
-c, one of them <= 0, and exponentiate it plus a log scale (``frontend.ops.standardize``).

Every phi is evaluated in float64 (and rounded to the model's dtype), in numerically stable
forms. Outside its domain phi gives what IEEE arithmetic and ONNX give (log(-1) = NaN,
1 / 0 = inf): predictions then hold NaN or inf, as onnxruntime's would, rather than raising.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from scipy import special

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; kept importable without it
    numba = None

from .errors import GraphError

ACTIVATION_NAMES = (
    "identity", "relu", "leaky_relu", "tanh", "sigmoid", "square",
    "exp", "log", "reciprocal", "sqrt", "rsqrt", "erf", "gelu", "gelu_tanh", "elu", "selu", "celu",
    "softplus", "softsign", "hard_sigmoid", "hard_swish", "silu", "mish", "power", "thresholded_relu",
    "log_positive",
    "heaviside",
)  # fmt: skip

# The parameters of each parameterised activation, with their defaults (those of ONNX; None:
# required). Stored as ``alpha`` and ``beta``.
PARAMETERS = {
    "leaky_relu": (0.01,),
    "elu": (1.0,),
    "celu": (1.0,),
    "selu": (1.67326319217681884765625, 1.05070102214813232421875),  # alpha, gamma
    "hard_sigmoid": (0.2, 0.5),
    "thresholded_relu": (1.0,),
    "power": (None,),  # the exponent
    "heaviside": (None,),  # the value at 0: 0 for a strict comparison (a < b), 1 for a <= b
}

GELU_TANH_SCALE = math.sqrt(2 / math.pi)
# log_positive(z) = log(max(z, LOG_POSITIVE_FLOOR)): the smallest normal float64, 2**-1022
LOG_POSITIVE_FLOOR = float(np.finfo(np.float64).tiny)
GELU_TANH_CUBIC = 0.044715

# sup |phi'| of the smooth activations without a closed form, maximised numerically (scipy,
# 2026-12-07) and rounded up: gelu_tanh at z ~ 1.4185, silu at 2.3994, mish at 1.4906.
_LIPSCHITZ = {
    "identity": 1.0, "relu": 1.0, "tanh": 1.0, "sigmoid": 0.25, "erf": 2 / math.sqrt(math.pi),
    "gelu": 0.5 * math.erfc(-1.0) + math.sqrt(2) * math.exp(-1.0) / math.sqrt(2 * math.pi),
    "gelu_tanh": 1.128993068659, "silu": 1.099839320129, "mish": 1.088498161252,
    "celu": 1.0, "softplus": 1.0, "softsign": 1.0, "hard_swish": 1.5,
}  # fmt: skip


@dataclass(frozen=True)
class Activation:
    """A componentwise activation: a name from ``ACTIVATION_NAMES`` and its parameters
    (``PARAMETERS``): alpha (leaky_relu, elu, celu, selu, hard_sigmoid, thresholded_relu; the
    exponent of power; heaviside's value at 0) and beta (selu's gamma, hard_sigmoid's beta)."""

    name: str
    alpha: float | None = None
    beta: float | None = None

    def __post_init__(self) -> None:
        if self.name not in ACTIVATION_NAMES:
            raise GraphError(f"unknown activation {self.name!r}: expected one of {', '.join(ACTIVATION_NAMES)}")
        count = len(PARAMETERS.get(self.name, ()))
        given = [value for value in (self.alpha, self.beta) if value is not None]
        if count == 0 and given:
            raise GraphError(f"activation {self.name!r} takes no alpha (no parameters), got {given!r}")
        if len(given) != count or (count == 1 and self.beta is not None):
            raise GraphError(
                f"activation {self.name!r} takes {count} parameter(s), got alpha={self.alpha!r}, beta={self.beta!r}"
            )
        for field in ("alpha", "beta")[:count]:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
                raise GraphError(f"activation {self.name!r} needs a finite {field}, got {value!r}")
            object.__setattr__(self, field, float(value))
        if self.name == "celu" and self.alpha == 0:
            raise GraphError("celu needs a non-zero alpha (phi divides by it), got 0.0")

    @property
    def parameters(self) -> tuple[float, ...]:
        """The parameters, in the order of ``PARAMETERS`` (empty for most activations)."""
        return tuple(value for value in (self.alpha, self.beta) if value is not None)

    @property
    def lipschitz(self) -> float:
        """The Lipschitz constant of phi (``math.inf`` when phi is not Lipschitz)."""
        name, alpha = self.name, self.alpha
        if name in _LIPSCHITZ:
            return _LIPSCHITZ[name]
        if name in ("leaky_relu", "elu"):
            return max(1.0, abs(alpha))
        if name == "selu":
            return abs(self.beta) * max(1.0, abs(alpha))
        if name == "hard_sigmoid":
            return abs(alpha)
        if name == "power" and alpha in (0.0, 1.0):
            return alpha
        if name == "thresholded_relu" and alpha == 0:
            return 1.0
        return math.inf  # square, exp, log, log_positive, reciprocal, sqrt, rsqrt, other powers, jumps

    @property
    def positively_homogeneous(self) -> bool:
        """True when phi(c z) = c phi(z) for every c > 0."""
        return self.name in ("identity", "relu", "leaky_relu")

    def __call__(self, z: np.ndarray) -> np.ndarray:
        """phi(z), a new array with z's dtype."""
        return self.apply_inplace(np.array(z, copy=True))

    def apply_inplace(self, z: np.ndarray) -> np.ndarray:
        """Overwrite z with phi(z) and return it (the runtime's hot path allocates nothing for
        the activations of before issue 17; the others are computed in float64 and rounded)."""
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
        elif self.name != "identity":
            # the parameters rounded to z's dtype, as the compiled kernels hold them
            alpha, beta = (None if v is None else float(z.dtype.type(v)) for v in (self.alpha, self.beta))
            with np.errstate(all="ignore"):
                z[...] = _evaluate(self.name, z.astype(np.float64), alpha, beta)
        return z

    def derivative(self, z: np.ndarray) -> np.ndarray:
        """phi'(z) in float64 (at a kink: the derivative of the branch phi takes there, e.g.
        relu' = 0 and leaky_relu' = 1 at z = 0)."""
        with np.errstate(all="ignore"):
            return _derivative(self.name, np.asarray(z, dtype=np.float64), self.alpha, self.beta)

    def to_spec(self) -> str:
        """A string that ``activation()`` reads back: 'relu', 'leaky_relu(0.01)',
        'hard_sigmoid(0.2, 0.5)'."""
        if not self.parameters:
            return self.name
        return f"{self.name}({', '.join(repr(value) for value in self.parameters)})"

    def __str__(self) -> str:
        return self.to_spec()


def _evaluate(name: str, z: np.ndarray, alpha: float | None, beta: float | None) -> np.ndarray:
    """phi(z) for float64 z (may be overwritten), by a numerically stable formula."""
    if name == "exp":
        return np.exp(z)
    if name == "log":
        return np.log(z)
    if name == "reciprocal":
        return 1.0 / z
    if name == "sqrt":
        return np.sqrt(z)
    if name == "rsqrt":
        return 1.0 / np.sqrt(z)
    if name == "erf":
        return special.erf(z)
    if name == "gelu":  # erfc: no cancellation in 1 + erf(z / sqrt 2) for z << 0
        return 0.5 * z * special.erfc(-z / math.sqrt(2))
    if name == "gelu_tanh":  # (1 + tanh(w)) / 2 = sigmoid(2 w): no cancellation for z << 0
        return z * special.expit(2 * GELU_TANH_SCALE * (z + GELU_TANH_CUBIC * z**3))
    if name == "elu":
        return np.where(z >= 0, z, alpha * np.expm1(np.minimum(z, 0)))
    if name == "selu":
        return beta * np.where(z > 0, z, alpha * np.expm1(np.minimum(z, 0)))
    if name == "celu":
        return np.maximum(z, 0) + np.minimum(0, alpha * np.expm1(np.minimum(z, 0) / alpha))
    if name == "softplus":
        return _softplus(z)
    if name == "softsign":
        return z / (1 + np.abs(z))
    if name == "hard_sigmoid":
        return np.clip(alpha * z + beta, 0.0, 1.0)
    if name == "hard_swish":
        return z * np.clip(z * (1 / 6) + 0.5, 0.0, 1.0)
    if name == "silu":
        return z * special.expit(z)
    if name == "mish":
        return z * np.tanh(_softplus(z))
    if name == "power":
        return np.power(z, alpha)
    if name == "thresholded_relu":
        return np.where(z > alpha, z, 0.0)
    if name == "log_positive":  # (np.maximum keeps NaN)
        return np.log(np.maximum(z, LOG_POSITIVE_FLOOR))
    if name == "heaviside":  # (not numpy's heaviside: a comparison with NaN is false, so NaN -> 0)
        return np.where(z > 0, 1.0, np.where(z == 0, alpha, 0.0))
    raise AssertionError(name)  # pragma: no cover - the old activations are in apply_inplace


def _softplus(z: np.ndarray) -> np.ndarray:
    """log(1 + exp(z)) = max(z, 0) + log1p(exp(-|z|)): no overflow, no cancellation."""
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


def _derivative(name: str, z: np.ndarray, alpha: float | None, beta: float | None) -> np.ndarray:
    """phi'(z) for float64 z."""
    one = np.ones_like(z)
    simple = {
        "identity": lambda: one,
        "relu": lambda: (z > 0) * one,
        "leaky_relu": lambda: np.where(z < 0, alpha, 1.0),
        "tanh": lambda: 1.0 - np.tanh(z) ** 2,
        "sigmoid": lambda: special.expit(z) * special.expit(-z),
        "square": lambda: 2.0 * z,
        "exp": lambda: np.exp(z),
        "log": lambda: 1.0 / z,
        "reciprocal": lambda: -1.0 / (z * z),
        "sqrt": lambda: 0.5 / np.sqrt(z),
        "rsqrt": lambda: -0.5 / (z * np.sqrt(z)),
        "erf": lambda: 2 / math.sqrt(math.pi) * np.exp(-z * z),
        "gelu": lambda: 0.5 * special.erfc(-z / math.sqrt(2)) + z * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi),
        "elu": lambda: np.where(z >= 0, 1.0, alpha * np.exp(np.minimum(z, 0))),
        "selu": lambda: beta * np.where(z > 0, 1.0, alpha * np.exp(np.minimum(z, 0))),
        "celu": lambda: np.where(z > 0, 1.0, np.exp(np.minimum(z, 0) / alpha)),
        "softplus": lambda: special.expit(z),
        "softsign": lambda: 1.0 / (1 + np.abs(z)) ** 2,
        "hard_sigmoid": lambda: np.where((alpha * z + beta > 0) & (alpha * z + beta < 1), alpha, 0.0),
        "hard_swish": lambda: np.where(z <= -3, 0.0, np.where(z >= 3, 1.0, z / 3 + 0.5)),
        "silu": lambda: special.expit(z) * (1 + z * special.expit(-z)),
        "power": lambda: alpha * np.power(z, alpha - 1) if alpha != 0 else 0 * one,
        "thresholded_relu": lambda: (z > alpha) * one,
        "log_positive": lambda: np.where(z > LOG_POSITIVE_FLOOR, 1.0 / z, 0.0),
        "heaviside": lambda: 0 * one,  # (a jump at 0: no derivative there; 0 everywhere else)
    }
    if name in simple:
        return np.asarray(simple[name](), dtype=np.float64) * one
    if name == "gelu_tanh":
        t = np.tanh(GELU_TANH_SCALE * (z + GELU_TANH_CUBIC * z**3))
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * GELU_TANH_SCALE * (1 + 3 * GELU_TANH_CUBIC * z * z)
    if name == "mish":
        t = np.tanh(_softplus(z))
        return t + z * (1 - t * t) * special.expit(z)
    raise AssertionError(name)  # pragma: no cover - every name is above


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
    """Resolve an activation from a name ('relu'), a spec string ('leaky_relu(0.1)',
    'hard_sigmoid(0.2, 0.5)', 'power(3)') or itself.

    Parameters left out take the defaults of ONNX (``PARAMETERS``): ``activation('leaky_relu')``
    uses alpha=0.01, as ONNX and torch do; 'selu' ONNX's alpha and gamma.
    """
    if isinstance(spec, Activation):
        return spec
    match = _SPEC_PATTERN.match(str(spec))
    if match is None:
        raise GraphError(f"cannot read activation {spec!r}: expected e.g. 'relu' or 'leaky_relu(0.1)'")
    name, argument = match.group(1), match.group(2)
    values = [] if alpha is None else [alpha]
    if argument:
        try:
            values = [float(part) for part in argument.split(",")]
        except ValueError:
            raise GraphError(
                f"cannot read the alpha (the parameters) of activation {spec!r}: expected numbers"
            ) from None
    defaults = PARAMETERS.get(name, ())
    if values and not defaults:
        raise GraphError(f"activation {name!r} takes no alpha (no parameters), got {spec!r}")
    if len(values) > len(defaults):
        raise GraphError(f"activation {spec!r} takes {len(defaults)} parameter(s), got {len(values)}")
    values += list(defaults[len(values) :])
    if None in values:
        raise GraphError(f"activation {name!r} needs its parameter, e.g. '{name}(2)'")
    return Activation(name, *values)
