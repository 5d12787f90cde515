"""LeNet-5 closed in a feedback loop: well-posedness, rescaling, and the fixed-point solve.

    python scripts/demo_feedback.py [--out out/demos] [--target 0.9]

The trained LeNet-5 of the zoo (compiled from zoo/lenet5.onnx) maps a 32x32 digit u to 10
logits y. Closing the loop u = v + K y, with K a fixed random 1024 x 10 pattern scaled by a gain
g, feeds the logits back into the image: A becomes cyclic (A' = A + g B K C). The gain is chosen
by bisection so that the Perron-Frobenius eigenvalue of |A'| is ``--target`` (< 1: well-posed).
The script prints the well-posedness report, rescales the model when ||A'||_inf >= 1 (same
predictions, ||.||_inf < 1), solves the closed loop on the held-out digits with Anderson
acceleration (auto) and plain Picard iteration, and saves the residual curves as a PNG.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

import implicit_compiler as ic  # noqa: E402
from implicit_compiler.analysis import perron_frobenius_eigenvalue, rescale, wellposedness  # noqa: E402
from implicit_compiler.runtime.solve import DEFAULT_TOLERANCE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "zoo"))
from data import load_digits_32x32  # noqa: E402


def closed_loop(model: ic.ImplicitModel, pattern: np.ndarray, gain: float) -> ic.ImplicitModel:
    return ic.feedback(model, gain * pattern)


def gain_for_eigenvalue(model: ic.ImplicitModel, pattern: np.ndarray, target: float) -> tuple[float, float]:
    """Bisection on the gain g so that lambda_pf(|A + g B K C|) = target (it grows with g)."""
    low, high = 0.0, 1.0
    while perron_frobenius_eigenvalue(abs(closed_loop(model, pattern, high).A)) < target:
        high *= 2
    for _ in range(40):
        middle = (low + high) / 2
        if perron_frobenius_eigenvalue(abs(closed_loop(model, pattern, middle).A)) < target:
            low = middle
        else:
            high = middle
    return low, perron_frobenius_eigenvalue(abs(closed_loop(model, pattern, low).A))


def inf_norm(matrix: sp.csr_array) -> float:
    return float(abs(matrix).sum(axis=1).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "out" / "demos", help="folder for the PNG (default out/demos)"
    )
    parser.add_argument(
        "--target", type=float, default=0.9, help="Perron-Frobenius eigenvalue of the loop (default 0.9)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    lenet = ic.from_onnx(ROOT / "zoo" / "lenet5.onnx")
    rng = np.random.default_rng(args.seed)
    pattern = rng.normal(size=(lenet.p, lenet.q)) / np.sqrt(lenet.p)
    gain, eigenvalue = gain_for_eigenvalue(lenet, pattern, args.target)
    closed = closed_loop(lenet, pattern, gain)
    print(f"LeNet-5: {lenet}; open loop ||A||_inf = {inf_norm(lenet.A):.2f}, acyclic")
    print(f"feedback u = v + K y with K = {gain:.4g} * pattern (1024 x 10): lambda_pf(|A'|) = {eigenvalue:.4f}")

    report = wellposedness(closed)
    print(f"well-posedness: {report.well_posed} - {report.reason}")
    for component in report.components:
        print(
            f"  cyclic component of {len(component.blocks)} blocks, {component.states} states: "
            f"lambda_pf = {component.perron_frobenius:.4f}, ||A||_inf = {component.inf_norm:.2f}, "
            f"Lipschitz {component.lipschitz:g}"
        )

    _, _, images, labels = load_digits_32x32()
    v = images.astype(np.float64)
    model = closed
    if inf_norm(closed.A) >= 1:
        start = time.perf_counter()
        model = rescale(closed)
        seconds = time.perf_counter() - start
        # Solved tightly, so that the comparison shows the rescaling, not the solver tolerance.
        gap = np.abs(model.predict(v[:50], tol=1e-14) - closed.predict(v[:50], tol=1e-14)).max()
        print(
            f"rescaled ({seconds:.2f} s): ||A||_inf {inf_norm(closed.A):.2f} -> {inf_norm(model.A):.4f}, "
            f"max |y_rescaled - y| on 50 digits (solved to 1e-14) = {gap:.1e}"
        )

    curves = {}
    for label, candidate, method in (
        ("Anderson (auto)", closed, "auto"),
        ("Picard", closed, "picard"),
        ("Picard, rescaled", model, "picard"),
    ):
        start = time.perf_counter()
        solution = candidate.solve(v, method=method)
        seconds = time.perf_counter() - start
        curves[label] = solution.residual_history
        accuracy = float((solution.y.argmax(axis=1) == labels).mean())
        print(
            f"solve ({label}) on {len(v)} held-out digits: {solution.iterations} iterations, final residual "
            f"{solution.residual_history[-1]:.1e}, {seconds:.2f} s; accuracy of the closed loop {accuracy:.2%}"
        )
    open_accuracy = float((lenet.predict(v).argmax(axis=1) == labels).mean())
    print(f"open-loop LeNet-5 accuracy {open_accuracy:.2%}")

    figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
    for label, curve in curves.items():
        axis.semilogy(np.arange(1, len(curve) + 1), curve, marker="o", markersize=3, label=label)
    axis.axhline(DEFAULT_TOLERANCE[np.dtype(np.float64)], color="grey", linestyle=":", label="tolerance")
    axis.set_xlabel("iteration")
    axis.set_ylabel("relative residual ||g(x) - x||_inf")
    axis.set_title(f"LeNet-5 in a feedback loop, lambda_pf(|A|) = {eigenvalue:.2f}")
    axis.legend()
    figure.tight_layout()
    path = args.out / "lenet5_feedback_residuals.png"
    figure.savefig(path)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
