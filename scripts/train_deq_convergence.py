"""Gradient descent on deep equilibrium linear models converges linearly, with width below the output dimension.

    python scripts/train_deq_convergence.py [--seed 0] [--steps 3000] [--out docs/training]

The setting of Kawaguchi (ICLR 2021; ``implicit_compiler/training/deq.py`` has the math):
z = gamma sigma(A) z + phi(x), f(x) = B z*, sigma the column softmax, gamma = 0.8, square loss
||B z* - y||^2 / 2 averaged over n = 200 samples. Data (numpy ``default_rng(seed)``): x ~ N(0, I_10),
targets y = tanh(T x) + 0.1 sin(3 x[:10]) in R^10 (m_y = 10 outputs, T ~ N(0, 1/10)), fixed features
phi(x) = tanh(P x), P ~ N(0, 1/10) of shape (m, 10), for widths m = 2, 4, 6, 8 (all below m_y).
Start A ~ N(0, 1), B ~ N(0, 1/m); full-batch gradient descent on A and B together with the step
alpha = 1 / lambda_max(Z Z^T / n) (the smoothness of the B block at the start, Z the equilibria).

Recorded per width: the optimum L* (least squares of the linear model on phi, the global minimum
of the non-convex problem), the gap L - L* per step, the per-step factor r fitted to log(gap) by
least squares (over the steps where the gap is above 1e-11 of its start: below that float64
rounding of L takes over) and the R^2 of that straight-line fit, the bound 1 - 2 alpha min_t mu(A_t)
that the Polyak-Lojasiewicz inequality through B gives for small steps, and the fit time. Writes
docs/training/deq_convergence.json and .png (gap vs step, log scale).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from implicit_compiler.training import deq  # noqa: E402

N_SAMPLES, N_INPUTS, N_OUTPUTS, GAMMA = 200, 10, 10, 0.8
WIDTHS = (2, 4, 6, 8)


def data(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Inputs X (10, n) and targets Y (10, n), one column per sample."""
    X = rng.normal(size=(N_INPUTS, N_SAMPLES))
    T = rng.normal(size=(N_OUTPUTS, N_INPUTS)) / np.sqrt(N_INPUTS)
    return X, np.tanh(T @ X) + 0.1 * np.sin(3 * X[:N_OUTPUTS])


def run_width(m: int, X: np.ndarray, Y: np.ndarray, steps: int, rng: np.random.Generator) -> dict:
    Phi = np.tanh(rng.normal(size=(m, N_INPUTS)) / np.sqrt(N_INPUTS) @ X)
    A0, B0 = rng.normal(size=(m, m)), rng.normal(size=(N_OUTPUTS, m)) / np.sqrt(m)
    step_size = 1.0 / deq.b_smoothness(A0, Phi, GAMMA)
    start = time.perf_counter()
    history = deq.gradient_descent(A0, B0, Phi, Y, GAMMA, step_size, steps)
    seconds = time.perf_counter() - start
    gap = history.gap
    rate, r_squared, used = deq.fitted_rate(gap)
    return {
        "width": m,
        "step_size": step_size,
        "optimal_loss": history.optimal_loss,
        "initial_loss": history.loss[0],
        "final_loss": history.loss[-1],
        "fitted_rate": rate,
        "fit_r_squared": r_squared,
        "steps_fitted": used,
        "pl_bound_rate": deq.pl_rate(step_size, min(history.pl_constant)),
        "lambda_min_features": float(np.linalg.eigvalsh(Phi @ Phi.T / N_SAMPLES)[0]),
        "A_moved": float(np.linalg.norm(history.A - A0)),
        "fit_seconds": seconds,
        "gap": [float(g) for g in gap],  # every step, for the plot; the JSON keeps every 10th
    }


def plot(results: list[dict], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for result in results:
        gap = np.asarray(result["gap"])
        positive = gap > 0
        steps = np.arange(len(gap))
        line = axis.semilogy(
            steps[positive], gap[positive], label=f"m = {result['width']}: r = {result['fitted_rate']:.4f}"
        )
        fitted = np.arange(result["steps_fitted"])
        intercept = np.exp(np.mean(np.log(gap[fitted]) - fitted * np.log(result["fitted_rate"])))
        axis.semilogy(fitted, intercept * result["fitted_rate"] ** fitted, "--", color=line[0].get_color(), lw=0.8)
    axis.set_xlabel("gradient descent step t")
    axis.set_ylabel("L(A_t, B_t) - L*")
    axis.set_title(f"z = {GAMMA} softmax(A) z + phi(x), m_y = {N_OUTPUTS} outputs (dashed: fitted r^t)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "training")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    X, Y = data(rng)
    results = []
    print(f"{'m':>3} {'L*':>9} {'L_0':>9} {'rate r':>8} {'R^2':>7} {'steps':>6} {'PL bound':>9} {'fit s':>6}")
    for m in WIDTHS:
        result = run_width(m, X, Y, args.steps, rng)
        results.append(result)
        print(
            f"{m:>3} {result['optimal_loss']:9.5f} {result['initial_loss']:9.4f} {result['fitted_rate']:8.5f} "
            f"{result['fit_r_squared']:7.4f} {result['steps_fitted']:>6} {result['pl_bound_rate']:9.5f} "
            f"{result['fit_seconds']:6.2f}"
        )
    summary = {
        "setting": {
            "model": "z = gamma softmax_columns(A) z + tanh(P x), y = B z",
            "gamma": GAMMA,
            "samples": N_SAMPLES,
            "inputs": N_INPUTS,
            "outputs": N_OUTPUTS,
            "steps": args.steps,
            "seed": args.seed,
        },
        "widths": [
            {
                **{k: v for k, v in r.items() if k != "gap"},
                "gap_every_10_steps": [float(f"{g:.4g}") for g in r["gap"][::10]],
            }
            for r in results
        ],
    }
    (args.out / "deq_convergence.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(results, args.out / "deq_convergence.png")
    print(
        f"total fit time {sum(r['fit_seconds'] for r in results):.2f} s; "
        f"wrote {args.out / 'deq_convergence.json'} and .png"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
