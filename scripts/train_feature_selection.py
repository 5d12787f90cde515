"""Feature selection with an implicit model: the column group lasso on B recovers the used inputs.

    python scripts/train_feature_selection.py [--seed 0] [--out docs/training]

Generator (numpy ``default_rng(seed)``), a well-posed implicit model with n = 20 states,
p = 50 inputs, q = 100 outputs, of which only ``--support`` = 10 input columns of B are non-zero:

    A_ij ~ N(0, 1), then A <- 0.8 A / ||A||_inf          (||A||_inf = 0.8 < 1: well-posed)
    B_:j ~ N(0, I_20) for j in the support (10 columns drawn without replacement), 0 elsewhere
    C_ij ~ N(0, 1 / 20),  D = 0,  b_x ~ N(0, 0.1^2 I),  b_y = 0,  phi = relu
    u ~ N(0, I_50),  y = C x + D u + b_y + e,  e ~ N(0, 0.1^2 I_100)

400 samples. An ``ImplicitRegressor`` with 10 states and no direct term (``feedthrough=False``:
D stays 0, so an input reaches y only through its column of B) is fitted with the column group
lasso lambda sum_j ||B_:j||_2, lambda = ``--group-lasso`` = 0.1 (a proximal group soft threshold
after each Adam step). Its selected inputs, learned column norm ||B_:j|| above ``--threshold``
= 0.1 times the largest, are compared with the true support: precision, recall, the ranked
column norms and the margin (smallest norm on the support / largest off it). Adam's momentum
keeps nudging the thresholded columns, so few end exactly zero: the selection is by threshold.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from implicit_compiler import ImplicitModel
from implicit_compiler.training.estimators import ImplicitRegressor
from implicit_compiler.training.penalties import column_norms

ROOT = Path(__file__).resolve().parents[1]
N_STATES, N_INPUTS, N_OUTPUTS, N_SAMPLES = 20, 50, 100, 400


def generative_model(rng: np.random.Generator, support_size: int) -> tuple[ImplicitModel, np.ndarray]:
    """The ground-truth model (see the module docstring) and its sorted input support."""
    A = rng.normal(size=(N_STATES, N_STATES))
    A *= 0.8 / np.abs(A).sum(axis=1).max()
    support = np.sort(rng.choice(N_INPUTS, size=support_size, replace=False))
    B = np.zeros((N_STATES, N_INPUTS))
    B[:, support] = rng.normal(size=(N_STATES, support_size))
    C = rng.normal(size=(N_OUTPUTS, N_STATES)) / np.sqrt(N_STATES)
    D = np.zeros((N_OUTPUTS, N_INPUTS))
    bias_x = 0.1 * rng.normal(size=N_STATES)
    return ImplicitModel.from_matrices(A, B, C, D, "relu", bias_x=bias_x), support


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--support", type=int, default=10, help="non-zero input columns of the true B")
    parser.add_argument("--group-lasso", type=float, default=0.1, help="lambda of the column group lasso")
    parser.add_argument("--threshold", type=float, default=0.1, help="selected: norm > threshold * largest norm")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "training")
    parser.add_argument("--verbose", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    truth, support = generative_model(rng, args.support)
    U = rng.normal(size=(N_SAMPLES, N_INPUTS))
    Y = truth.predict(U) + 0.1 * rng.normal(size=(N_SAMPLES, N_OUTPUTS))
    print(f"generator: {truth}, ||A||_inf = {np.abs(truth.A.toarray()).sum(axis=1).max():.2f}")
    print(f"true support ({len(support)} of {N_INPUTS} inputs): {support.tolist()}")

    estimator = ImplicitRegressor(
        n_states=10,
        feedthrough=False,
        learning_rate=0.01,
        max_epochs=args.epochs,
        batch_size=50,
        group_lasso=args.group_lasso,
        early_stopping=False,
        n_iter_no_change=20,
        random_state=args.seed,
        verbose=args.verbose,
    )
    start = time.perf_counter()
    estimator.fit(U, Y)
    seconds = time.perf_counter() - start
    norms = column_norms(estimator.model_.B)
    selected = np.flatnonzero(norms > args.threshold * norms.max())
    true_positives = len(np.intersect1d(selected, support))
    precision = true_positives / max(len(selected), 1)
    recall = true_positives / len(support)
    ranking = np.argsort(-norms)
    exact_zeros = int((norms == 0).sum())
    print(
        f"fitted ImplicitRegressor(n_states=10, feedthrough=False, group_lasso={args.group_lasso}) in {seconds:.1f} s, "
        f"{estimator.n_iter_} epochs, training R^2 {estimator.score(U, Y):.3f}"
    )
    print(f"selected inputs (norm > {args.threshold} * max): {selected.tolist()}")
    print(f"precision {precision:.2f}, recall {recall:.2f}; {exact_zeros} of {N_INPUTS} columns exactly zero")
    print("ranked column norms ||B_:j|| (* = true support):")
    for place, column in enumerate(ranking[: len(support) + 5], start=1):
        mark = "*" if column in support else " "
        print(f"  {place:>2}. input {column:>2}{mark} {norms[column]:.4f}")
    largest_outside = float(norms[np.setdiff1d(np.arange(N_INPUTS), support)].max())
    smallest_inside = float(norms[support].min())
    margin = smallest_inside / largest_outside if largest_outside > 0 else float("inf")
    print(
        f"smallest norm on the support {smallest_inside:.4f}, largest off it {largest_outside:.4f}: "
        f"margin {margin:.1f}x"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "command": f"python scripts/train_feature_selection.py --seed {args.seed}",
        "seed": args.seed,
        "generator": {"n_states": N_STATES, "n_inputs": N_INPUTS, "n_outputs": N_OUTPUTS, "samples": N_SAMPLES},
        "group_lasso": args.group_lasso,
        "threshold": args.threshold,
        "true_support": support.tolist(),
        "selected": selected.tolist(),
        "precision": precision,
        "recall": recall,
        "exact_zero_columns": exact_zeros,
        "smallest_norm_on_support": smallest_inside,
        "largest_norm_off_support": largest_outside,
        "margin": margin if np.isfinite(margin) else None,
        "ranked_columns": ranking.tolist(),
        "ranked_norms": norms[ranking].tolist(),
        "training_r2": float(estimator.score(U, Y)),
        "epochs": estimator.n_iter_,
        "seconds": seconds,
    }
    path = args.out / "feature_selection.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0 if recall == 1.0 and precision == 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
