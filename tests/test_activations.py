"""Activations: values against numpy formulas, Lipschitz constants and homogeneity checked numerically."""

from __future__ import annotations

import math

import numpy as np
import pytest

import implicit_compiler as ic
from implicit_compiler.activations import ACTIVATION_NAMES, activation

FORMULAS = {
    "identity": lambda z: z,
    "relu": lambda z: np.maximum(z, 0),
    "leaky_relu(0.2)": lambda z: np.where(z >= 0, z, 0.2 * z),
    "leaky_relu(-1.5)": lambda z: np.where(z >= 0, z, -1.5 * z),
    "tanh": np.tanh,
    "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
    "square": np.square,
}


@pytest.mark.parametrize("spec", list(FORMULAS), ids=list(FORMULAS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_values_match_formula_and_keep_dtype(spec, dtype):
    z = np.linspace(-30, 30, 2001).astype(dtype)
    phi = activation(spec)
    out = phi(z)
    assert out.dtype == dtype and out is not z
    np.testing.assert_allclose(
        out, FORMULAS[spec](z.astype(np.float64)), rtol=1e-6 if dtype == np.float32 else 1e-14, atol=1e-7
    )


@pytest.mark.parametrize("spec", list(FORMULAS), ids=list(FORMULAS))
def test_lipschitz_constant_bounds_and_is_attained_by_slopes(spec):
    phi = activation(spec)
    z = np.linspace(-10, 10, 200001)
    slopes = np.abs(np.diff(phi(z)) / np.diff(z))
    if math.isinf(phi.lipschitz):
        assert slopes.max() > 10
    else:
        assert slopes.max() <= phi.lipschitz + 1e-9
        assert slopes.max() >= phi.lipschitz - 1e-3


@pytest.mark.parametrize("spec", list(FORMULAS), ids=list(FORMULAS))
def test_positive_homogeneity_flag_is_true_exactly_when_it_holds(spec):
    phi = activation(spec)
    z = np.linspace(-5, 5, 101)
    holds = all(np.allclose(phi(c * z), c * phi(z)) for c in (0.3, 2.0, 7.5))
    assert phi.positively_homogeneous == holds


def test_spec_strings_round_trip():
    required = {"power": "power(3)", "heaviside": "heaviside(0.5)"}  # no default exponent / value at 0
    for name in ACTIVATION_NAMES:
        phi = activation(required.get(name, name))
        assert activation(phi.to_spec()) == phi
    assert activation("leaky_relu").alpha == 0.01
    assert activation(" leaky_relu( 0.3 ) ") == ic.Activation("leaky_relu", 0.3)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("swish", "unknown activation 'swish'"),
        ("relu(0.1)", "takes no alpha"),
        ("leaky_relu(x)", "cannot read the alpha"),
        ("relu(", "cannot read activation"),
    ],
    ids=["unknown", "alpha-on-relu", "bad-alpha", "syntax"],
)
def test_bad_specs_raise_graph_error(spec, message):
    with pytest.raises(ic.GraphError, match=message.replace("(", r"\(")):
        activation(spec)


@pytest.mark.parametrize("spec", ["relu", "leaky_relu(0.1)", "leaky_relu(-0.5)"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_rectifiers_in_place_match_numpy_on_special_values(spec, dtype, layout):
    """The compiled in-place relu / leaky_relu (contiguous arrays) and the numpy fallback
    (strided views) against numpy's formula: NaN stays NaN, +-inf and -0.0 as numpy gives them."""
    phi = activation(spec)
    special = np.array([np.nan, -1.5, 2.0, -0.0, 0.0, np.inf, -np.inf, 1e-30, -1e-30])
    z = np.concatenate([special, np.random.default_rng(0).normal(size=55)]).astype(dtype).reshape(8, 8)
    view = z if layout == "contiguous" else np.asfortranarray(z)[:, ::2]
    expected = np.maximum(view, 0) if phi.name == "relu" else np.where(view < 0, dtype(phi.alpha) * view, view)
    result = phi.apply_inplace(view)
    assert result is view and result.dtype == dtype
    np.testing.assert_array_equal(result, expected)
    assert not np.signbit(result[expected == 0]).any() or phi.name != "relu"
