"""The sparse sensitivity attack on an ImplicitClassifier trained here on the native 8x8 digits, beside LeNet-5.

    python scripts/train_digits_attack.py [--seed 0] [--out docs/training]

Data: scikit-learn's digits, raw pixels 0..16 (64 features), split as LeNet-5's 32x32 digits are
(``train_test_split(test_size=0.25, random_state=0, stratify=labels)``: the same 1347 training and
450 held-out digits). Model: a default ``ImplicitClassifier`` (20 states, relu, dense A with
||A||_inf <= 0.95, Adam, early stopping) with ``random_state=seed``, trained on the raw pixels.

Attack (``analysis.sparse_attack``, as scripts/demo_sensitivity.py runs it on LeNet-5): for each
held-out digit the model gets right, with true class t and runner-up r, the k pixels of largest
S[r, j] + S[t, j] (S the sensitivity matrix of ``model_``), then the linear program that pushes
y_r - y_t up with |delta_j| <= sigma = 8 on them and pixels kept in [0, 16] (half the range, as
LeNet-5's sigma = 0.5 on [0, 1]); next to k random pixels moved by +-8. Accuracy over all 450
held-out digits for k = 0, 1, 2, 4, ..., 64 (all pixels), with LeNet-5's figures read from
docs/figures/demo_sensitivity.txt. Also recorded: the training standard deviation of the pixels
the k = 1 attack chooses, and the smallest input scales the estimator divides by.
Writes docs/training/digits_attack.json and .png.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from implicit_compiler.analysis import sensitivity, sparse_attack  # noqa: E402
from implicit_compiler.training.estimators import ImplicitClassifier  # noqa: E402

KS = (0, 1, 2, 4, 8, 16, 32, 64)
SIGMA, PIXEL_RANGE = 8.0, (0.0, 16.0)
LENET_RECORD = ROOT / "docs" / "figures" / "demo_sensitivity.txt"


def lenet_accuracy() -> dict[int, tuple[float, float]]:
    """k -> (accuracy under the sensitivity attack, under random pixels), from the LeNet-5 demo's record."""
    pattern = re.compile(
        r"k =\s*(\d+) pixels: accuracy under the sensitivity attack ([\d.]+)%, under random pixels ([\d.]+)%"
    )
    return {int(k): (float(a) / 100, float(r) / 100) for k, a, r in pattern.findall(LENET_RECORD.read_text())}


def attack_accuracy(model, images, labels, report, k: int, rng) -> tuple[float, float, list[int]]:
    """Held-out accuracy under the k-pixel sensitivity attack and under k random pixels; the k = 1 pixels chosen."""
    attacked = randomly = 0
    chosen = []
    logits = model.predict(images)
    for image, clean, label in zip(images, logits, labels):
        ranked = np.argsort(clean)[::-1]
        if ranked[0] != label:
            continue  # already wrong: stays wrong under both
        if k == 0:
            attacked, randomly = attacked + 1, randomly + 1
            continue
        result = sparse_attack(
            model, image, target=ranked[1], reference=label, k=k, sigma=SIGMA, input_bounds=PIXEL_RANGE,
            sensitivity_report=report,
        )  # fmt: skip
        attacked += int(np.argmax(result.y_perturbed) == label)
        chosen.extend(int(j) for j in result.support[:1])
        moved = image.copy()
        pixels = rng.choice(image.size, size=k, replace=False)
        moved[pixels] = np.clip(moved[pixels] + SIGMA * rng.choice([-1.0, 1.0], size=k), *PIXEL_RANGE)
        randomly += int(np.argmax(model.predict(moved)) == label)
    return attacked / len(labels), randomly / len(labels), chosen


def plot(rows: list[dict], lenet: dict, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ks = [row["k"] for row in rows]
    axis.plot(ks, [row["attack_accuracy"] for row in rows], "o-", label="ImplicitClassifier 8x8: S + LP attack")
    axis.plot(ks, [row["random_accuracy"] for row in rows], "s:", label="ImplicitClassifier 8x8: random pixels")
    lenet_ks = sorted(lenet)
    axis.plot(lenet_ks, [lenet[k][0] for k in lenet_ks], "o-", alpha=0.6, label="LeNet-5 32x32: S + LP attack")
    axis.plot(lenet_ks, [lenet[k][1] for k in lenet_ks], "s:", alpha=0.6, label="LeNet-5 32x32: random pixels")
    axis.set_xscale("symlog", linthresh=1)
    axis.set_xlabel("k pixels changed by at most half the pixel range")
    axis.set_ylabel("held-out accuracy (450 digits)")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "training")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    X, y = digits.data.astype(np.float64), digits.target
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)

    classifier = ImplicitClassifier(random_state=args.seed)
    start = time.perf_counter()
    classifier.fit(X_train, y_train)
    fit_seconds = time.perf_counter() - start
    model = classifier.model_
    print(f"ImplicitClassifier fit in {fit_seconds:.1f} s ({classifier.n_iter_} epochs); "
          f"held-out accuracy {classifier.score(X_test, y_test):.2%}")  # fmt: skip
    scales = np.sort(classifier.input_scale_)
    print(f"smallest input scales (training std of a pixel, 1 when constant): {np.round(scales[:6], 4).tolist()}")

    report = sensitivity(model)
    rng = np.random.default_rng(args.seed)
    lenet = lenet_accuracy()
    rows, pixel_std = [], X_train.std(axis=0)
    start = time.perf_counter()
    for k in KS:
        attacked, randomly, chosen = attack_accuracy(model, X_test, y_test, report, k, rng)
        rows.append({"k": k, "attack_accuracy": attacked, "random_accuracy": randomly})
        line = f"k = {k:2d}: accuracy under the attack {attacked:7.2%}, random pixels {randomly:7.2%}"
        if k in lenet:
            line += f"   (LeNet-5: {lenet[k][0]:.2%}, {lenet[k][1]:.2%})"
        print(line)
        if k == 1:
            counts = np.bincount(chosen, minlength=X.shape[1])
            top = np.argsort(counts)[::-1][:5]
            first_pixels = [{"pixel": int(j), "times": int(counts[j]), "train_std": float(pixel_std[j])} for j in top]
            print("k = 1 attack's most chosen pixels (pixel, times, training std):",
                  [(p["pixel"], p["times"], round(p["train_std"], 4)) for p in first_pixels])  # fmt: skip
    attack_seconds = time.perf_counter() - start
    print(f"attacks took {attack_seconds:.1f} s for {len(y_test)} digits x {len(KS)} values of k")
    summary = {
        "setting": {
            "classifier": "ImplicitClassifier() defaults",
            "seed": args.seed,
            "sigma": SIGMA,
            "pixel_range": PIXEL_RANGE,
            "held_out": len(y_test),
        },  # fmt: skip
        "fit_seconds": fit_seconds,
        "epochs": classifier.n_iter_,
        "held_out_accuracy": classifier.score(X_test, y_test),
        "smallest_input_scales": [float(s) for s in scales[:6]],
        "k1_most_chosen_pixels": first_pixels,
        "attack_seconds": attack_seconds,
        "accuracy": rows,
        "lenet5": [{"k": k, "attack_accuracy": a, "random_accuracy": r} for k, (a, r) in sorted(lenet.items())],
    }
    (args.out / "digits_attack.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(rows, lenet, args.out / "digits_attack.png")
    print(f"wrote {args.out / 'digits_attack.json'} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
