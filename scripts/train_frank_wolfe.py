"""Frank-Wolfe training (solver="frank_wolfe") against Adam with the projection, on the 8x8 digits: sparsity of A.

    python scripts/train_frank_wolfe.py [--seeds 0 1 2] [--out docs/training]

Data: scikit-learn's digits, raw pixels, the split of scripts/train_digits_attack.py (1347
training, 450 held-out digits). For each seed, two ``ImplicitClassifier(n_states=40)`` with the
estimators' defaults otherwise (batch 64, learning rate 0.01, early stopping on 10%):
``solver="adam"`` (Adam on everything, A projected onto ||A||_inf <= 0.95 after every step, from
a random dense A) and ``solver="frank_wolfe"`` (Frank-Wolfe steps on A over the same ball from
A = 0, gamma_t = 2 / (t + 2) per mini-batch step; Adam on B, C, D). Recorded: held-out accuracy,
epochs, non-zeros of A (of 1600) and the most in one row, ||A||_inf, fit time, and for
Frank-Wolfe the duality gap and non-zeros per epoch. A third run, "frank_wolfe_full_batch", takes
one deterministic Frank-Wolfe step per epoch on the whole training set (batch 2000, learning rate
0.03 for the Adam steps on B, C, D): its gap is exact, its steps fewer. Writes docs/training/frank_wolfe.json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from implicit_compiler.training.estimators import ImplicitClassifier  # noqa: E402

N_STATES = 40


CONFIGURATIONS = {
    "adam": {"solver": "adam"},
    "frank_wolfe": {"solver": "frank_wolfe"},
    "frank_wolfe_full_batch": {"solver": "frank_wolfe", "batch_size": 2000, "learning_rate": 0.03},
}


def fit(name: str, seed: int, data) -> tuple[dict, ImplicitClassifier]:
    X_train, X_test, y_train, y_test = data
    classifier = ImplicitClassifier(n_states=N_STATES, random_state=seed, **CONFIGURATIONS[name])
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(X_train, y_train)
    seconds = time.perf_counter() - start
    A = classifier.model_.A.toarray()
    row = {
        "solver": name,
        "seed": seed,
        "held_out_accuracy": classifier.score(X_test, y_test),
        "epochs": classifier.n_iter_,
        "nonzeros_A": int(np.count_nonzero(A)),
        "most_nonzeros_in_a_row": int(np.count_nonzero(A, axis=1).max()),
        "A_inf_norm": float(np.abs(A).sum(axis=1).max()),
        "fit_seconds": seconds,
    }
    if name.startswith("frank_wolfe"):
        history = classifier.frank_wolfe_history_
        row["duality_gap_per_epoch"] = list(history.duality_gap)
        row["nonzeros_per_epoch"] = list(history.nonzeros)
    return row, classifier


def plot(rows: list[dict], path: Path) -> None:
    figure, (gap_axis, count_axis) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for row in rows:
        if not row["solver"].startswith("frank_wolfe"):
            continue
        epochs = np.arange(1, len(row["duality_gap_per_epoch"]) + 1)
        style = "-" if row["solver"] == "frank_wolfe" else ":"
        label = f"seed {row['seed']}" + ("" if row["solver"] == "frank_wolfe" else ", full batch")
        gap_axis.semilogy(epochs, row["duality_gap_per_epoch"], style, marker=".", label=label)
        count_axis.plot(epochs, row["nonzeros_per_epoch"], style, marker=".", label=label)
    for row in rows:
        if row["solver"] == "adam":
            count_axis.axhline(row["nonzeros_A"], color="gray", lw=0.8, ls="--")
    gap_axis.set_xlabel("epoch")
    gap_axis.set_ylabel("mean mini-batch duality gap")
    count_axis.set_xlabel("epoch")
    count_axis.set_ylabel(f"non-zeros of A (of {N_STATES**2}); dashed: Adam")
    gap_axis.legend(fontsize=7)
    figure.suptitle("Frank-Wolfe on ||A||_inf <= 0.95, digits 8x8, 40 states")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "training")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    data = train_test_split(
        digits.data.astype(np.float64), digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    rows = []
    print(
        f"{'solver':>22} {'seed':>4} {'accuracy':>9} {'epochs':>6} {'nnz(A)':>7} {'row max':>7} "
        f"{'||A||inf':>8} {'fit s':>6}"
    )
    for seed in args.seeds:
        for name in CONFIGURATIONS:
            row, _ = fit(name, seed, data)
            rows.append(row)
            print(
                f"{name:>22} {seed:>4} {row['held_out_accuracy']:9.2%} {row['epochs']:>6} {row['nonzeros_A']:>7} "
                f"{row['most_nonzeros_in_a_row']:>7} {row['A_inf_norm']:8.4f} {row['fit_seconds']:6.1f}"
            )
    summary = {"setting": {"data": "sklearn digits 8x8, raw pixels", "n_states": N_STATES}, "runs": rows}
    (args.out / "frank_wolfe.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(rows, args.out / "frank_wolfe.png")
    print(f"total fit time {sum(r['fit_seconds'] for r in rows):.1f} s; wrote {args.out / 'frank_wolfe.json'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
