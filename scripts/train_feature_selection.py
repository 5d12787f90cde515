"""Feature selection with an implicit model: the column l_inf penalty zeroes the unused inputs of B.

    python scripts/train_feature_selection.py [--seed 0] [--out docs/training]

Generator (numpy ``default_rng(seed)``), a well-posed implicit model with n = 20 states,
p = 50 inputs, q = 100 outputs, of which only ``--support`` = 10 input columns of B are non-zero:

    A_ij ~ N(0, 1), then A <- 0.8 A / ||A||_inf          (||A||_inf = 0.8 < 1: well-posed)
    B_:j ~ N(0, I_20) for j in the support (10 columns drawn without replacement), 0 elsewhere
    C_ij ~ N(0, 1 / 20),  D = 0,  b_x ~ N(0, 0.1^2 I),  b_y = 0,  phi = relu
    u ~ N(0, I_50),  y = C x + D u + b_y + e,  e ~ N(0, 0.1^2 I_100)

Every model has 10 states and no direct term (``feedthrough=False``: D stays 0, so an input reaches
y only through its column of B). For each training-set size (``--samples``: 400 as in the blog,
and 150, where the control's column norms no longer separate the support), four fits:

1. control: Adam, no penalty (early stopping on the training loss);
2. penalty: from the control, proximal gradient steps (full-batch SGD, learning rate ``--lr``)
   with the column l_inf penalty lambda sum_j ||B e_j||_inf, lambda = ``--penalty``: after each
   step B e_j <- B e_j - P_{||w||_1 <= lr lambda}(B e_j), which zeroes a column exactly. The loss
   also has (alpha / 2) ||W||_F^2, alpha = ``--alpha``: with B alone penalized, C grows as B
   shrinks (relu is positively homogeneous), the unused columns' gradients grow with it and
   some of them come back; the L2 term bounds C;
3. control continued: the same steps from the control with lambda = 0 (the steps and the L2 term
   alone);
4. refit: Adam on the penalty's pattern (its zero columns removed from B's sparsity pattern, so
   they stay exactly zero), from its weights: the fit without the penalty's shrinkage.

Selected inputs: the non-zero columns of B (exact); for the controls, which have none exactly
zero, also those with ||B e_j||_inf > 0.1 x the largest (a threshold). Precision and recall
against the true support; test RMSE on 2,000 fresh samples against the noise-free outputs.
Writes ``feature_selection.json`` and ``feature_selection.png`` (column norms) under ``--out``.
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
import scipy.sparse as sp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from implicit_compiler import ImplicitModel  # noqa: E402
from implicit_compiler.training.estimators import ImplicitRegressor  # noqa: E402
from implicit_compiler.training.penalties import column_linf_norms  # noqa: E402

N_STATES, N_INPUTS, N_OUTPUTS, N_TEST = 20, 50, 100, 2000
TRAINED_STATES = 10
THRESHOLD = 0.1  # the controls' threshold selection: norm > THRESHOLD x the largest norm


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


def without_columns(model: ImplicitModel, dropped: np.ndarray) -> ImplicitModel:
    """``model`` with B's entries in the ``dropped`` columns removed from its sparsity pattern."""
    B = sp.coo_array(model.B)
    keep = ~np.isin(B.col, dropped)
    pruned = sp.csr_array((B.data[keep], (B.row[keep], B.col[keep])), shape=B.shape)
    return ImplicitModel(
        model.A, pruned, model.C, model.D, model.bias_x, model.bias_y, model.blocks, model.inputs, model.outputs
    )


def selection_figures(norms: np.ndarray, selected: np.ndarray, support: np.ndarray) -> dict:
    """Precision and recall of ``selected`` against ``support``, and the norms' separation."""
    hits = len(np.intersect1d(selected, support))
    off_support = np.setdiff1d(np.arange(N_INPUTS), support)
    return {
        "selected": selected.tolist(),
        "precision": hits / len(selected) if len(selected) else 0.0,
        "recall": hits / len(support),
        "smallest_norm_on_support": float(norms[support].min()),
        "largest_norm_off_support": float(norms[off_support].max()),
    }


def evaluate(name: str, estimator: ImplicitRegressor, seconds: float, data: dict, support: np.ndarray) -> dict:
    """The figures of one fit, printed and returned."""
    norms = column_linf_norms(estimator.model_.B)
    nonzero = np.flatnonzero(norms > 0)
    result = {
        "fit": name,
        "seconds": seconds,
        "epochs": estimator.n_iter_,
        "exact_zero_columns": int(N_INPUTS - len(nonzero)),
        "exact_zero_columns_off_support": int(len(np.setdiff1d(np.arange(N_INPUTS), np.union1d(nonzero, support)))),
        "nonzero_selection": selection_figures(norms, nonzero, support),
        "threshold_selection": selection_figures(norms, np.flatnonzero(norms > THRESHOLD * norms.max()), support),
        "training_r2": float(estimator.score(data["U"], data["Y"])),
        "test_rmse": float(np.sqrt(np.mean((estimator.predict(data["U_test"]) - data["Y_test_clean"]) ** 2))),
        "column_norms": norms.tolist(),
    }
    exact, threshold = result["nonzero_selection"], result["threshold_selection"]
    zeros, zeros_off = result["exact_zero_columns"], result["exact_zero_columns_off_support"]
    print(
        f"  {name:<19} {seconds:5.1f} s, {estimator.n_iter_:>4} epochs: {zeros:>2} columns exactly 0 "
        f"({zeros_off} of {N_INPUTS - len(support)} off the support); non-zero = selected: "
        f"precision {exact['precision']:.2f} recall {exact['recall']:.2f}; threshold: precision "
        f"{threshold['precision']:.2f} recall {threshold['recall']:.2f}; norms on support >= "
        f"{exact['smallest_norm_on_support']:.3g}, off <= {exact['largest_norm_off_support']:.3g}; "
        f"test RMSE {result['test_rmse']:.4f}, training R^2 {result['training_r2']:.3f}",
        flush=True,
    )
    return result


def fit(name: str, data: dict, support: np.ndarray, **params) -> tuple[ImplicitRegressor, dict]:
    estimator = ImplicitRegressor(n_states=TRAINED_STATES, feedthrough=False, early_stopping=False, **params)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixed-length proximal runs stop at max_epochs by design
        estimator.fit(data["U"], data["Y"])
    return estimator, evaluate(name, estimator, time.perf_counter() - start, data, support)


def run_size(samples: int, data: dict, support: np.ndarray, args: argparse.Namespace) -> dict:
    """The four fits of one training-set size."""
    print(f"{samples} training samples:")
    data = dict(data, U=data["U"][:samples], Y=data["Y"][:samples])
    adam = dict(learning_rate=0.01, batch_size=50, max_epochs=300, n_iter_no_change=20, random_state=args.seed)
    proximal = dict(
        solver="sgd",
        learning_rate=args.lr,
        alpha=args.alpha,
        batch_size=samples,
        max_epochs=args.epochs,
        n_iter_no_change=args.epochs,
        random_state=args.seed,
    )
    control, control_result = fit("control (Adam)", data, support, **adam)
    penalized, penalty_result = fit(
        "penalty", data, support, column_linf=args.penalty, init_model=control.model_, **proximal
    )
    _, continued_result = fit("control continued", data, support, init_model=control.model_, **proximal)
    dropped = np.flatnonzero(column_linf_norms(penalized.model_.B) == 0)
    selection = without_columns(penalized.model_, dropped)
    _, refit_result = fit("refit on selection", data, support, **dict(adam, init_model=selection))
    fits = [control_result, penalty_result, continued_result, refit_result]
    return {"samples": samples, "fits": fits, "seconds": sum(result["seconds"] for result in fits)}


def plot(results: list[dict], support: np.ndarray, path: Path) -> None:
    """Column norms ||B e_j||_inf of the control and of the penalty, per training-set size."""
    figure, axes = plt.subplots(len(results), 1, figsize=(10, 3.2 * len(results)), dpi=120, squeeze=False)
    columns = np.arange(N_INPUTS)
    on_support = np.isin(columns, support)
    for axis, result in zip(axes[:, 0], results):
        control, penalty = (np.asarray(result["fits"][k]["column_norms"]) for k in (0, 1))
        axis.bar(columns - 0.2, control, width=0.4, color="0.6", label="control (no penalty)")
        axis.bar(columns + 0.2, penalty, width=0.4, color="tab:blue", label="column l_inf penalty")
        zeros = columns[penalty == 0]
        axis.plot(zeros + 0.2, np.zeros(len(zeros)), "x", color="tab:red", label="exactly 0 (penalty)")
        below = np.full(on_support.sum(), -0.05 * control.max())
        axis.plot(columns[on_support], below, "^", color="k", label="true support")
        axis.set_xlim(-1, N_INPUTS)
        axis.set_ylim(top=1.4 * max(control.max(), penalty.max()))  # room for the legend
        axis.set_ylabel("||B e_j||_inf")
        axis.set_title(f"{result['samples']} training samples")
        axis.legend(fontsize=8, ncol=4, loc="upper right")
    axes[-1, 0].set_xlabel("input j")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--support", type=int, default=10, help="non-zero input columns of the true B")
    parser.add_argument("--samples", type=int, nargs="+", default=[400, 150], help="training-set sizes")
    parser.add_argument("--penalty", type=float, default=0.08, help="lambda of the column l_inf penalty")
    parser.add_argument("--lr", type=float, default=2.0, help="step size of the proximal gradient steps")
    parser.add_argument("--alpha", type=float, default=3e-3, help="L2 weight during the proximal steps")
    parser.add_argument("--epochs", type=int, default=400, help="proximal gradient steps (full batch)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "training")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    truth, support = generative_model(rng, args.support)
    U = rng.normal(size=(max(args.samples), N_INPUTS))
    Y = truth.predict(U) + 0.1 * rng.normal(size=(len(U), N_OUTPUTS))
    U_test = rng.normal(size=(N_TEST, N_INPUTS))
    data = {"U": U, "Y": Y, "U_test": U_test, "Y_test_clean": truth.predict(U_test)}
    print(f"generator: {truth}, ||A||_inf = {np.abs(truth.A.toarray()).sum(axis=1).max():.2f}")
    print(f"true support ({len(support)} of {N_INPUTS} inputs): {support.tolist()}")
    print(f"test RMSE of predicting the mean: {float(np.sqrt(np.mean((data['Y_test_clean'] - Y.mean(0)) ** 2))):.4f}")

    start = time.perf_counter()
    results = [run_size(samples, data, support, args) for samples in args.samples]
    seconds = time.perf_counter() - start
    print(f"all fits: {seconds:.1f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "command": "python scripts/train_feature_selection.py" + (f" --seed {args.seed}" if args.seed else ""),
        "seed": args.seed,
        "generator": {"n_states": N_STATES, "n_inputs": N_INPUTS, "n_outputs": N_OUTPUTS, "noise": 0.1},
        "trained_states": TRAINED_STATES,
        "penalty": args.penalty,
        "proximal_learning_rate": args.lr,
        "proximal_alpha": args.alpha,
        "proximal_epochs": args.epochs,
        "threshold": THRESHOLD,
        "test_samples": N_TEST,
        "true_support": support.tolist(),
        "sizes": results,
        "seconds": seconds,
    }
    path = args.out / "feature_selection.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    plot(results, support, args.out / "feature_selection.png")
    print(f"wrote {path} and {args.out / 'feature_selection.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
