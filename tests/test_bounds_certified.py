"""Certified bounds (issue 18): interval (IBP) and linear relaxation (CROWN) bounds on the
implicit form, checked against dense sampling, box corners and vertex enumeration, never
against our own output."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp

from implicit_compiler import ImplicitModel, StateBlock, TensorSpec
from implicit_compiler.activations import activation
from implicit_compiler.analysis import output_bounds
from implicit_compiler.analysis.relaxation import (
    interval_image,
    linear_relaxation,
    parallel_relaxation,
)
from implicit_compiler.errors import AnalysisError, ArgumentValueError

ACTIVATIONS = [
    "identity", "relu", "leaky_relu(0.1)", "leaky_relu(-0.5)", "leaky_relu(2.0)", "tanh", "sigmoid", "square",
    "exp", "gelu", "gelu_tanh", "silu", "mish", "softplus", "softsign", "elu", "selu", "celu", "erf",
    "hard_sigmoid", "hard_swish", "power(3)", "power(2)", "log_positive",
]  # fmt: skip
POSITIVE_DOMAIN = ["log", "sqrt", "rsqrt", "reciprocal", "power(0.5)", "power(-1.5)"]


@pytest.fixture
def rng():
    return np.random.default_rng(18)


def mlp(rng, sizes, activations, dtype=np.float64, scale=1.0) -> ImplicitModel:
    """A dense network u -> h1 -> ... -> y, one block per layer (acyclic)."""
    hidden = sizes[1:-1]
    offsets = np.concatenate([[0], np.cumsum(hidden)]).astype(int)
    n, p, q = int(offsets[-1]), sizes[0], sizes[-1]
    weights = [scale * rng.normal(size=(o, i)) / np.sqrt(i) for i, o in zip(sizes, sizes[1:])]
    A = sp.lil_array((n, n))
    for k in range(1, len(hidden)):
        A[offsets[k] : offsets[k + 1], offsets[k - 1] : offsets[k]] = weights[k]
    B = sp.lil_array((n, p))
    B[: hidden[0]] = weights[0]
    C = sp.lil_array((q, n))
    C[:, offsets[-2] :] = weights[-1]
    blocks = [
        StateBlock(f"h{k}", int(offsets[k]), int(offsets[k + 1]), activations[k], (size,))
        for k, size in enumerate(hidden)
    ]
    model = ImplicitModel(
        A, B, C, sp.csr_array((q, p)), rng.normal(size=n) * 0.3, rng.normal(size=q) * 0.1, blocks,
        (TensorSpec("u", (p,)),), (TensorSpec("y", (q,)),),
    )  # fmt: skip
    return model.astype(dtype)


def box(rng, center, sigma, count=2000):
    """Uniform samples in |u - center| <= sigma and every corner (p small)."""
    p = center.size
    corners = center + np.array(list(itertools.product([-1.0, 1.0], repeat=p))) * sigma
    return np.concatenate([center + rng.uniform(-1, 1, size=(count, p)) * sigma, corners])


def assert_contains(bounds, y):
    assert (y >= bounds.lower).all(), f"{(bounds.lower - y).max()} below"
    assert (y <= bounds.upper).all(), f"{(y - bounds.upper).max()} above"


# ----------------------------------------------------------------------------- relaxations
@pytest.mark.parametrize(
    "spec", ACTIVATIONS + POSITIVE_DOMAIN + ["thresholded_relu", "heaviside(0.0)", "heaviside(1.0)"]
)
def test_relaxations_hold_on_a_dense_grid(spec, rng):
    """On random intervals (some straddling 0, some tiny, some flat): the image contains phi on a
    dense grid and is attained there (tight), the lines lie below / above phi, and phi(z) - s z
    stays within the parallel relaxation's offsets."""
    phi = activation(spec)
    positive = spec in POSITIVE_DOMAIN
    low = rng.uniform(0.05, 3, 40) if positive else rng.uniform(-4, 3, 40)
    width = np.concatenate([rng.uniform(0, 4, 30), rng.uniform(0, 1e-6, 5), np.zeros(5)])
    high = low + width
    grid = low[:, None] + np.linspace(0, 1, 4001)[None, :] * width[:, None]
    values = phi(grid)
    smallest, largest = interval_image(phi, low, high)
    assert (values >= smallest[:, None]).all() and (values <= largest[:, None]).all()
    if not spec.startswith(
        ("thresholded_relu", "heaviside")
    ):  # a jump: the range's ends are limits, not attained on a grid
        # the grid misses a kink by up to one step: allow a step's change of phi
        step_change = np.abs(np.diff(values, axis=1)).max(axis=1, initial=0)
        tolerance = 1e-9 * (1 + np.abs(values).max(axis=1)) + step_change
        assert (np.abs(values.min(axis=1) - smallest) <= tolerance).all()
        assert (np.abs(values.max(axis=1) - largest) <= tolerance).all()
    lines = linear_relaxation(phi, low, high)
    below = lines.lower_slope[:, None] * grid + lines.lower_intercept[:, None]
    above = lines.upper_slope[:, None] * grid + lines.upper_intercept[:, None]
    assert (below <= values).all() and (values <= above).all()
    slope, e_lo, e_hi = parallel_relaxation(phi, low, high)
    offset = values - slope[:, None] * grid
    assert (offset >= e_lo[:, None]).all() and (offset <= e_hi[:, None]).all()


def test_relu_relaxation_is_crowns(rng):
    """Unstable relu: the chord above, slope 1 below when h > -l else 0; stable: exact."""
    phi = activation("relu")
    lines = linear_relaxation(phi, np.array([-1.0, -3.0, 0.5, -2.0]), np.array([3.0, 1.0, 2.0, -1.0]))
    np.testing.assert_allclose(lines.upper_slope, [0.75, 0.25, 1.0, 0.0])
    np.testing.assert_allclose(lines.lower_slope, [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(lines.upper_intercept, [0.75, 0.75, 0.0, 0.0], atol=1e-12)


# ----------------------------------------------------------------------------- exactness
def test_crown_equals_vertex_enumeration_on_a_linear_network(rng):
    """Identity activations: y is affine in u, its extremes over the box are at corners, and
    CROWN's back-substitution is exact: equal to the enumerated corners to rounding."""
    model = mlp(rng, (4, 6, 5, 3), ["identity", "identity"])
    center, sigma = rng.normal(size=4), rng.uniform(0.1, 0.5, 4)
    corners = center + np.array(list(itertools.product([-1.0, 1.0], repeat=4))) * sigma
    y = model.predict(corners, tol=1e-14)
    bounds = output_bounds(model, center, sigma, method="crown")
    np.testing.assert_allclose(bounds.lower, y.min(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bounds.upper, y.max(axis=0), rtol=1e-12, atol=1e-12)


def test_ibp_equals_enumeration_of_a_separable_layer(rng):
    """Relu states each reading one input, summed with nonnegative weights: y is separable, so
    its extremes over the box are at corners and IBP gives exactly them."""
    p = 3
    block = StateBlock("h", 0, p, "relu", (p,))
    model = ImplicitModel(
        np.zeros((p, p)), np.diag(rng.normal(size=p)), np.abs(rng.normal(size=(2, p))), np.zeros((2, p)),
        rng.normal(size=p) * 0.2, None, (block,), (TensorSpec("u", (p,)),), (TensorSpec("y", (2,)),),
    )  # fmt: skip
    center, sigma = rng.normal(size=p) * 0.3, np.full(p, 0.4)
    corners = center + np.array(list(itertools.product([-1.0, 1.0], repeat=p))) * sigma
    y = model.predict(corners, tol=1e-14)
    bounds = output_bounds(model, center, sigma, method="ibp")
    np.testing.assert_allclose(bounds.upper, y.max(axis=0), rtol=1e-12)
    np.testing.assert_allclose(bounds.lower, y.min(axis=0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec, at", [("thresholded_relu", "1"), ("heaviside(0.0)", "0")])
def test_a_jump_inside_the_box_is_refused(rng, spec, at):
    """thresholded_relu(1) jumps at 1, heaviside at 0: rounding of z there moves a prediction by
    the jump, which no Lipschitz margin covers; bounds are refused where it is inside the range."""
    model = mlp(rng, (3, 8, 2), [spec])
    with pytest.raises(AnalysisError, match=f"'h0'.*jumps at {at} "):
        output_bounds(model, np.zeros(3), 5.0)


# ----------------------------------------------------------------------------- soundness
@pytest.mark.parametrize("method", ["crown", "ibp"])
@pytest.mark.parametrize("spec", ACTIVATIONS)
def test_bounds_hold_for_every_sample(spec, method, rng):
    model = mlp(rng, (3, 8, 6, 4), [spec, spec])
    center = rng.normal(size=(2, 3)) * 0.5
    bounds = output_bounds(model, center, 0.2, method=method)
    for k in range(2):
        assert_contains(
            type(bounds)(None, bounds.lower[k], bounds.upper[k], None), model.predict(box(rng, center[k], 0.2))
        )


@pytest.mark.parametrize("spec", POSITIVE_DOMAIN)
def test_bounds_in_the_domain_and_refused_outside_it(spec, rng):
    """A positive-domain activation after a relu shifted up: bounded while z stays positive; a
    box reaching z <= 0 is refused, naming the block."""
    model = mlp(rng, (2, 4, 3, 2), ["identity", spec])
    model = ImplicitModel(
        model.A, model.B, model.C, model.D, np.concatenate([model.bias_x[:4], np.full(3, 5.0)]), model.bias_y,
        model.blocks, model.inputs, model.outputs,
    )  # fmt: skip
    center = np.array([0.2, -0.1])
    bounds = output_bounds(model, center, 0.1)
    assert_contains(bounds, model.predict(box(rng, center, 0.1)))
    with pytest.raises(AnalysisError, match="'h1'.*pre-activation ranges over"):
        output_bounds(model, center, 100.0)


@pytest.mark.parametrize("method", ["crown", "ibp"])
def test_bounds_hold_in_float32(method, rng):
    """The rounding margin: float32 predictions of a deep relu net stay inside at a small radius."""
    model = mlp(rng, (6, 32, 32, 32, 5), ["relu", "tanh", "relu"], dtype=np.float32)
    center = rng.normal(size=6).astype(np.float32)
    for sigma in (1e-6, 1e-3):
        bounds = output_bounds(model, center, sigma, method=method)
        samples = box(rng, center.astype(np.float64), sigma, count=3000).astype(np.float32)
        assert_contains(bounds, model.predict(samples))


def test_crown_is_tighter_than_ibp_and_sensitivity(rng):
    model = mlp(rng, (5, 30, 30, 4), ["relu", "relu"])
    center = rng.normal(size=(4, 5))
    widths = {
        method: (output_bounds(model, center, 0.05, method=method).upper
                 - output_bounds(model, center, 0.05, method=method).lower).mean()
        for method in ("crown", "ibp", "sensitivity")
    }  # fmt: skip
    assert widths["crown"] <= 0.5 * widths["ibp"] <= 0.5 * widths["sensitivity"]


# ----------------------------------------------------------------------------- loops
def loop_model(rng, activation_spec="relu", gain=0.6, n=12, p=3, q=2):
    """One block x = phi(A x + B u + b) with lambda_pf(|A|) = gain * (a dense random loop)."""
    A = rng.normal(size=(n, n))
    A *= gain / np.abs(np.linalg.eigvals(np.abs(A))).max()
    block = StateBlock("loop", 0, n, activation_spec, (n,))
    return ImplicitModel(
        A, rng.normal(size=(n, p)), rng.normal(size=(q, n)), rng.normal(size=(q, p)) * 0.1,
        rng.normal(size=n) * 0.2, None, (block,), (TensorSpec("u", (p,)),), (TensorSpec("y", (q,)),),
    )  # fmt: skip


@pytest.mark.parametrize("method", ["crown", "ibp"])
@pytest.mark.parametrize("spec", ["relu", "tanh", "sigmoid", "leaky_relu(0.2)", "gelu"])
def test_bounds_of_a_cyclic_model_hold(spec, method, rng):
    model = loop_model(rng, spec)
    center = rng.normal(size=3)
    bounds = output_bounds(model, center, 0.1, method=method)
    assert "cyclic component" in bounds.condition
    assert_contains(bounds, model.predict(box(rng, center, 0.1), tol=1e-13))


def test_crown_on_a_loop_is_tighter_than_its_interval_fixed_point(rng):
    model = loop_model(rng, "relu", gain=0.5, n=30)
    center = rng.normal(size=3)
    crown = output_bounds(model, center, 0.05, method="crown")
    ibp = output_bounds(model, center, 0.05, method="ibp")
    assert (crown.upper - crown.lower).mean() < 0.7 * (ibp.upper - ibp.lower).mean()


def test_a_loop_that_does_not_contract_is_refused(rng):
    model = loop_model(rng, "relu", gain=1.1)
    with pytest.raises(AnalysisError, match=r"\[loop\]: lambda_pf\(Lambda \|A_cc\|\) = 1.1 >= 1"):
        output_bounds(model, np.zeros(3), 0.1)


def test_a_loop_through_a_non_lipschitz_activation_is_refused(rng):
    model = loop_model(rng, "square", gain=0.3)
    with pytest.raises(AnalysisError, match="not Lipschitz"):
        output_bounds(model, np.zeros(3), 0.1, method="ibp")


@pytest.mark.parametrize("method", ["crown", "ibp"])
def test_a_nilpotent_loop_is_bounded_as_its_unrolled_network(method, rng):
    """One block with a strictly lower triangular A (cyclic as a block, acyclic state by state)
    has exactly the bounds of the same network with one block per state (but for the margin of
    its iterated solve)."""
    n, p, q = 7, 3, 2
    A = np.tril(rng.normal(size=(n, n)), k=-1)
    B, C, bias = rng.normal(size=(n, p)), rng.normal(size=(q, n)), rng.normal(size=n) * 0.3
    spec = (TensorSpec("u", (p,)),), (TensorSpec("y", (q,)),)
    D = np.zeros((q, p))
    one_block = ImplicitModel(A, B, C, D, bias, None, (StateBlock("x", 0, n, "relu", (n,)),), *spec)
    unrolled_blocks = tuple(StateBlock(f"x{i}", i, i + 1, "relu", (1,)) for i in range(n))
    unrolled = ImplicitModel(A, B, C, D, bias, None, unrolled_blocks, *spec)
    center = rng.normal(size=p)
    cyclic = output_bounds(one_block, center, 0.3, method=method)
    acyclic = output_bounds(unrolled, center, 0.3, method=method)
    # the margins differ (the runtime iterates the one-block model to a tolerance): compare without
    np.testing.assert_allclose(cyclic.lower + cyclic.margin, acyclic.lower + acyclic.margin, rtol=1e-12)
    np.testing.assert_allclose(cyclic.upper - cyclic.margin, acyclic.upper - acyclic.margin, rtol=1e-12)


# ----------------------------------------------------------------------------- arguments
def test_method_argument(rng):
    model = mlp(rng, (3, 4, 2), ["relu"])
    assert output_bounds(model, np.zeros(3), 0.1).method == "crown"
    assert output_bounds(model, np.zeros(3), 0.1, method="ibp").method == "ibp"
    with pytest.raises(ArgumentValueError, match="method: expected one of crown, ibp, sensitivity"):
        output_bounds(model, np.zeros(3), 0.1, method="lp")
    from implicit_compiler.analysis import sensitivity

    report = sensitivity(model)
    assert output_bounds(model, np.zeros(3), 0.1, sensitivity_report=report).method == "sensitivity"
    with pytest.raises(ArgumentValueError, match="sensitivity_report is only used"):
        output_bounds(model, np.zeros(3), 0.1, sensitivity_report=report, method="crown")


# ----------------------------------------------------------------------------- robustness
def test_robustness_margins_hold_and_beat_differences_of_bounds(rng):
    """Lower bounds of y_c - y_j: no sample goes below; as CROWN rows they are at least as tight
    as lower_c - upper_j; a wrong label is reported as misclassified."""
    from implicit_compiler.analysis import certify_robustness

    model = mlp(rng, (4, 16, 16, 3), ["relu", "relu"])
    centers = rng.normal(size=(5, 4))
    eps = 0.05
    report = certify_robustness(model, centers, eps)
    bounds = output_bounds(model, centers, eps)
    for k in range(5):
        c = report.labels[k]
        y = model.predict(box(rng, centers[k], eps))
        differences = y[:, [c]] - y
        others = np.arange(3) != c
        assert (differences[:, others] >= report.margins[k, others]).all()
        assert (report.margins[k, others] >= bounds.lower[k, c] - bounds.upper[k, others] - 1e-9).all()
        if report.verdicts[k] == "robust":
            assert (y.argmax(axis=1) == c).all()
    assert report.verdicts == tuple("robust" if (m > 0).all() else "not proved" for m in report.margins)
    wrong = certify_robustness(model, centers[:1], eps, labels=(report.predictions[0] + 1) % 3)
    assert wrong.verdicts == ("misclassified",)


def test_the_plot_of_bounds(rng, tmp_path):
    from implicit_compiler import viz
    from implicit_compiler.errors import OverwriteError

    model = mlp(rng, (4, 8, 3), ["relu"])
    bounds = output_bounds(model, rng.normal(size=(2, 4)), 0.1)
    path = viz.bounds_plot(bounds, tmp_path / "b.png", sample=1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(OverwriteError):
        viz.bounds_plot(bounds, tmp_path / "b.png")


# ----------------------------------------------------------------------------- the zoo's LeNet-5
@pytest.fixture(scope="module")
def lenet5_digits():
    import sys
    from pathlib import Path

    import implicit_compiler as ic

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "zoo"))
    from data import load_digits_32x32

    _, _, images, labels = load_digits_32x32()
    return ic.from_onnx(root / "zoo" / "lenet5.onnx"), images[:2].astype(np.float64), labels[:2]


def test_lenet5_crown_bounds_hold_in_float32(lenet5_digits, rng):
    model, images, _ = lenet5_digits
    model = model.astype(np.float32)
    eps = 0.01
    bounds = output_bounds(model, images[:1], eps)
    samples = images[:1] + rng.uniform(-eps, eps, size=(400, *images.shape[1:]))
    samples[:2] = images[:1] + eps * np.sign(rng.normal(size=(2, *images.shape[1:])))
    assert_contains(bounds, model.predict(samples.astype(np.float32)).reshape(-1, 10)[:, None, :][:, 0])
    ibp = output_bounds(model, images[:1], eps, method="ibp")
    assert (bounds.upper - bounds.lower).mean() <= 0.5 * (ibp.upper - ibp.lower).mean()


def test_lenet5_in_a_feedback_loop_keeps_the_open_networks_bounds(lenet5_digits, rng):
    """The issue's target: LeNet-5 closed by u = v + K y (lambda_pf(|A'|) = 0.9, the gain of
    scripts/demo_feedback.py): valid CROWN bounds, within 2x of the open network's widths."""
    import implicit_compiler as ic
    from implicit_compiler.analysis import perron_frobenius_eigenvalue

    model, images, _ = lenet5_digits
    pattern = np.random.default_rng(0).normal(size=(model.p, model.q)) / np.sqrt(model.p)
    low, high = 0.0, 1e-3  # bisection on the gain for lambda_pf(|A'|) = 0.9
    for _ in range(30):
        middle = (low + high) / 2
        value = perron_frobenius_eigenvalue(abs(ic.feedback(model, middle * pattern).A))
        low, high = (middle, high) if value < 0.9 else (low, middle)
    closed = ic.feedback(model, low * pattern)
    eps = 0.01
    open_bounds = output_bounds(model, images[:1], eps)
    closed_bounds = output_bounds(closed, images[:1], eps)
    assert "cyclic component" in closed_bounds.condition
    samples = images[:1] + rng.uniform(-eps, eps, size=(200, *images.shape[1:]))
    assert_contains(closed_bounds, closed.predict(samples, tol=1e-12))
    ratio = (closed_bounds.upper - closed_bounds.lower).mean() / (open_bounds.upper - open_bounds.lower).mean()
    assert ratio <= 2.0, ratio


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("method", ["crown", "ibp", "sensitivity"])
def test_an_empty_batch_and_a_stateless_model(method, rng):
    model = mlp(rng, (3, 4, 2), ["relu"])
    assert output_bounds(model, np.zeros((0, 3)), 0.1, method=method).lower.shape == (0, 2)
    D = rng.normal(size=(2, 3))
    stateless = ImplicitModel(
        sp.csr_array((0, 0)), sp.csr_array((0, 3)), sp.csr_array((2, 0)), D, None, None, (),
        (TensorSpec("u", (3,)),), (TensorSpec("y", (2,)),),
    )  # fmt: skip
    bounds = output_bounds(stateless, np.zeros(3), 0.1, method=method)
    np.testing.assert_allclose(bounds.upper, 0.1 * np.abs(D).sum(axis=1), rtol=1e-12)


def test_bounds_that_overflow_are_refused_not_nan(rng):
    model = mlp(rng, (3, 4, 2), ["exp"])
    model = ImplicitModel(
        model.A, model.B * 1e4, model.C, model.D, model.bias_x, model.bias_y, model.blocks, model.inputs, model.outputs
    )
    with pytest.raises(AnalysisError, match="overflow"):
        output_bounds(model, np.ones(3), 1.0)


@pytest.mark.parametrize("stride, pads, dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2), (2, 0, 2)])
def test_transposed_convolution_equals_the_matrix_product(stride, pads, dilation, rng):
    """CROWN's transposed convolution (found in B by runtime.structured) is B^T @ T exactly."""
    import onnx
    from onnx import helper, numpy_helper

    import implicit_compiler as ic
    from implicit_compiler.analysis.crown import Relaxations
    from implicit_compiler.analysis.interval import Structure
    from implicit_compiler.structure import convolution_transposed

    weight = rng.normal(size=(4, 3, 3, 3))
    node = helper.make_node("Conv", ["x", "w"], ["z"], strides=[stride] * 2, pads=[pads] * 4, dilations=[dilation] * 2)
    relu = helper.make_node("Relu", ["z"], ["y"])
    graph = helper.make_graph(
        [node, relu], "conv", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 15, 15])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )  # fmt: skip
    model = ic.from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    structure = Structure.of(model)
    relaxations = Relaxations(structure)
    (part,) = structure.parts
    kind, convolution = relaxations.transposed_forms(part.rows.B)
    assert kind == "convolution"
    T = rng.normal(size=(part.rows.size, 300))  # more rows than one ROW_BLOCK
    np.testing.assert_allclose(convolution_transposed(convolution, T, 7), part.rows.B.T @ T, rtol=1e-12, atol=1e-12)


def test_the_verdicts_bound_the_outputs_as_output_bounds_does(rng):
    """certify_robustness's own output bounds (the same pass as its margins) are output_bounds'."""
    from implicit_compiler.analysis import certify_robustness

    model = mlp(rng, (4, 12, 3), ["relu"])
    centers = rng.normal(size=(3, 4))
    for method in ("crown", "ibp"):
        report = certify_robustness(model, centers, 0.05, method=method)
        bounds = output_bounds(model, centers, 0.05, method=method)
        np.testing.assert_array_equal(report.bounds.lower, bounds.lower)
        np.testing.assert_array_equal(report.bounds.upper, bounds.upper)
        assert report.bounds.method == method
