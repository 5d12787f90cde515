"""The sensitivity matrix of the trained LeNet-5, and the sparse attack chosen from it.

    python scripts/demo_sensitivity.py [--out out/demos] [--sigma 0.5] [--images 450]

S = |C| (I - |A|)^{-1} |B| + |D| bounds how much each logit can move per unit change of each
pixel (|y(u) - y(u')| <= S |u - u'|). Its 10 rows, one per class, are shown as 32x32 images.
The attack on a held-out digit of true class t with runner-up class r: the k pixels with the
largest S[r, j] + S[t, j], then the linear program (HiGHS) that maximizes the linearized margin
y_r - y_t with |delta_j| <= sigma on those pixels and pixels kept in [0, 1]. The script measures
accuracy versus k on the held-out digits, next to a random k-pixel perturbation of the same
size, prints the table and saves both figures as PNG.
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

import implicit_compiler as ic  # noqa: E402
from implicit_compiler.analysis import sensitivity, sparse_attack  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "zoo"))
from data import load_digits_32x32  # noqa: E402

KS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)


def plot_sensitivity(S: np.ndarray, path: Path) -> None:
    figure, axes = plt.subplots(2, 5, figsize=(10, 4.4), dpi=120)
    for digit, axis in enumerate(axes.ravel()):
        image = axis.imshow(S[digit].reshape(32, 32), cmap="magma")
        axis.set_title(f"class {digit}")
        axis.axis("off")
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.02)
    figure.suptitle("LeNet-5 sensitivity: S[class, pixel] bounds |dy_class| per unit |du_pixel|")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def random_attack(model: ic.ImplicitModel, image: np.ndarray, k: int, sigma: float, rng) -> np.ndarray:
    """k random pixels moved by +-sigma (random signs), kept in [0, 1]."""
    flat = image.ravel().copy()
    if k:
        pixels = rng.choice(flat.size, size=k, replace=False)
        flat[pixels] = np.clip(flat[pixels] + sigma * rng.choice([-1.0, 1.0], size=k), 0, 1)
    return model.predict(flat.reshape(image.shape)).argmax()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "out" / "demos", help="folder for the PNGs (default out/demos)"
    )
    parser.add_argument("--sigma", type=float, default=0.5, help="largest change of one pixel (pixels are in [0, 1])")
    parser.add_argument("--images", type=int, default=450, help="held-out digits to attack (default all 450)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    model = ic.from_onnx(ROOT / "zoo" / "lenet5.onnx")
    start = time.perf_counter()
    report = sensitivity(model)
    print(f"sensitivity matrix {report.matrix.shape} in {time.perf_counter() - start:.2f} s; valid: {report.valid}")
    S = report.matrix
    plot_sensitivity(S, args.out / "lenet5_sensitivity.png")
    print(f"saved {args.out / 'lenet5_sensitivity.png'}")

    _, _, images, labels = load_digits_32x32()
    images, labels = images[: args.images].astype(np.float64), labels[: args.images]
    clean = model.predict(images)
    rng = np.random.default_rng(args.seed)
    rows = []
    start = time.perf_counter()
    for k in KS:
        attacked_correct = random_correct = 0
        for image, logits, label in zip(images, clean, labels):
            ranked = np.argsort(logits)[::-1]
            if ranked[0] != label:
                continue  # already wrong: stays wrong under both attacks
            runner_up = ranked[1]
            if k == 0:
                attacked_correct += 1
                random_correct += 1
                continue
            result = sparse_attack(
                model,
                image,
                target=runner_up,
                reference=label,
                k=k,
                sigma=args.sigma,
                input_bounds=(0.0, 1.0),
                sensitivity_report=report,
            )
            attacked_correct += int(np.argmax(result.y_perturbed) == label)
            random_correct += int(random_attack(model, image, k, args.sigma, rng) == label)
        rows.append((k, attacked_correct / len(labels), random_correct / len(labels)))
        print(
            f"k = {k:3d} pixels: accuracy under the sensitivity attack {rows[-1][1]:.2%}, "
            f"under random pixels {rows[-1][2]:.2%}"
        )
    print(f"attacks took {time.perf_counter() - start:.1f} s for {len(labels)} digits x {len(KS)} values of k")

    figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
    axis.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label="pixels chosen from S + LP")
    axis.plot([r[0] for r in rows], [r[2] for r in rows], marker="s", label="random pixels, random signs")
    axis.set_xscale("symlog", linthresh=1)
    axis.set_xlabel(f"k pixels changed by at most {args.sigma}")
    axis.set_ylabel("held-out accuracy")
    axis.set_ylim(0, 1)
    axis.set_title(f"LeNet-5 on {len(labels)} held-out digits")
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out / "lenet5_attack_accuracy.png")
    print(f"saved {args.out / 'lenet5_attack_accuracy.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
