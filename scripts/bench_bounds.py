"""Certified output bounds side by side: ours (sensitivity, IBP, CROWN) and auto_LiRPA 0.3's.

    python scripts/bench_bounds.py [--nets mnist_mlp lenet5] [--eps 0.001 0.01] [--inputs 20]
                                   [--samples 200] [--repeat 3] [--threads 1] [--json PATH]
                                   [--mnist-layout centered|full] [--lirpa-batch 1]

The benchmark of issue 18: for each net and radius eps, the l_inf boxes |u - u0| <= eps (plain
boxes, not clipped to [0, 1]) around 20 fixed inputs, and per method the mean width (mean over
inputs and outputs of upper - lower), the time per input, and a soundness check by sampling. It
prints figures and never fails on them (exit status 0 unless it cannot run at all).

Nets and inputs (deterministic):

- mnist_mlp: the VNN-COMP 2021 MNIST MLP (tests/onnx-corpus/vnncomp/vnncomp2021_mnistfc_mnist-
  net_256x2.onnx, 784 inputs in [0, 1]). There is no MNIST here, so its inputs are the first 20
  held-out images of scikit-learn's 8x8 digits (the zoo's split, ``zoo/data.py``), pixels / 16,
  upsampled by the zoo's bilinear align-corners interpolation (``data.upsample``): white digits
  on black in [0, 1], like MNIST's. ``--mnist-layout centered`` (default) upsamples to 16x16 and
  pads 6 black pixels each side to 28x28, as MNIST centers its digits inside a black border:
  the net classifies 68% of the 450 held-out digits right, and no box of the 20 has a constant
  output. ``--mnist-layout full`` upsamples to the whole 28x28 frame, the inputs of issue 18's
  table: there the net is at chance (9.6%), and on 16 of the 20 boxes every neuron of its first
  layer is inactive (one is active on the other 4): a constant output, zero width, which the
  mean width averages in.
- lenet5: the zoo's LeNet-5 (zoo/lenet5.onnx) on the first 20 held-out images of its own
  pipeline (``data.load_digits_32x32``, 32x32 in [0, 1]).

Ours: ``implicit_compiler.analysis.bounds.output_bounds(model, u0, eps, method=m)`` on the model
compiled in float64, all 20 inputs in one call, for m in sensitivity, ibp, crown. Where that
keyword or method does not exist (TypeError, or an ImplicitCompilerError naming the method) the
row says "not available"; before ``method`` existed, sensitivity was the only bound, so for it
the call without the keyword is used. Time per input: the best of --repeat calls / 20, after one
untimed call (numba compiles the runtime on first use), BLAS and OpenMP on --threads threads.

auto_LiRPA: ``scripts/lirpa/reference.py`` run by ``.venv-lirpa/bin/python`` (made by
``scripts/setup_lirpa``; without it the rows say how to make it), on the same inputs and
torch threads; see that script for how it batches (--lirpa-batch, default one input per call:
auto_LiRPA 0.3's bound of a sample depends on the others in its batch; batching all 20 makes
the MNIST MLP's CROWN faster per input, LeNet-5's slower) and for its dtype (float64 for every
row, LeNet-5's MaxPool CROWN included, with torch's default dtype set to float64).

Soundness: each box gets --samples uniform samples plus, per output j, the two corners
u0 +- eps sign(g_j) with g_j the central secant slope of y_j across the box along each input
(the corners where the linearized y_j is largest and smallest). All are predicted by our
float64 model (which matches onnx.reference to ~1e-9), and every printed bound is checked on
them: "violations" counts (sample, output) pairs outside [lower, upper], with the largest
excess. auto_LiRPA does not round its bounds outward, so where a box's outputs are (nearly)
linear its float64 CROWN bounds can miss a corner by a few ulps (excess ~1e-15); ours are
rounded outward with a margin for the rounding of the predictions.

Targets printed (issue 18): ours-crown / auto_LiRPA-crown width <= 1.5, ours-crown / ours-ibp
width <= 0.5, ours-crown / auto_LiRPA-crown time per input <= 2.

Then: the MNIST MLP's VNN-COMP-style verdicts (robust / not proved, ``certify_robustness``) at
the 2021 radii (--verdict-eps), and LeNet-5 closed in the feedback loop of
scripts/demo_feedback.py: its CROWN widths against the open network's (target <= 2x), checked
by --loop-samples samples per box (around the first --loop-inputs digits: each sample is a
solve of the loop).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "zoo"))

from data import load_digits_8x8, load_digits_32x32, upsample  # noqa: E402

import implicit_compiler as ic  # noqa: E402
from implicit_compiler.analysis.bounds import output_bounds  # noqa: E402
from implicit_compiler.errors import ImplicitCompilerError  # noqa: E402

MNIST_MLP = ROOT / "tests" / "onnx-corpus" / "vnncomp" / "vnncomp2021_mnistfc_mnist-net_256x2.onnx"
NETS = {
    "mnist_mlp": ("VNN-COMP MNIST MLP 256x2", MNIST_MLP),
    "lenet5": ("LeNet-5 (zoo)", ROOT / "zoo/lenet5.onnx"),
}
OUR_METHODS = ("sensitivity", "ibp", "crown")
LIRPA_METHODS = ("IBP", "CROWN")
LIRPA_PYTHON = ROOT / ".venv-lirpa" / "bin" / "python"
MNIST_DIGIT, MNIST_BORDER = 16, 6  # 16 + 2 * 6 = 28
TARGET_VS_LIRPA, TARGET_VS_IBP, TARGET_TIME = 1.5, 0.5, 2.0


def inputs_for(net: str, count: int, mnist_layout: str = "centered") -> np.ndarray:
    """The first ``count`` held-out digits of the zoo's split, as the net's flat inputs (count, p)."""
    if net == "lenet5":
        _, _, images, _ = load_digits_32x32()
        return images[:count].reshape(count, -1).astype(np.float64)
    _, _, images, _ = load_digits_8x8()
    images = images[:count].astype(np.float64)
    if mnist_layout == "full":
        return upsample(images, 28).reshape(count, -1)
    digits = np.pad(upsample(images, MNIST_DIGIT), [(0, 0)] + 2 * [(MNIST_BORDER, MNIST_BORDER)])
    return digits.reshape(count, -1)


def our_bounds(model: ic.ImplicitModel, u0: np.ndarray, eps: float, method: str, repeat: int) -> dict:
    """Our bounds and time per input, or {"error": why} when this method is not available."""

    def call():
        try:
            return output_bounds(model, u0, eps, method=method), ""
        except TypeError as error:
            if "method" not in str(error):
                raise
            if method != "sensitivity":
                return None, f"not available (no method keyword: {error})"
            return output_bounds(model, u0, eps), "no method keyword: the default bound"
        except ImplicitCompilerError as error:  # an unknown method, or one that does not apply
            word = "not available" if "method" in str(error) else "failed"
            return None, f"{word} ({type(error).__name__}: {error})"

    result, note = call()  # untimed: numba compiles the runtime on first use
    if result is None:
        return {"error": note}
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result, _ = call()
        times.append(time.perf_counter() - start)
    lower, upper = np.asarray(result.lower, dtype=np.float64), np.asarray(result.upper, dtype=np.float64)
    return {"lower": lower, "upper": upper, "time_per_input_s": min(times) / len(u0), "note": note}


def lirpa_bounds(onnx_path: Path, u0: np.ndarray, eps: list[float], repeat: int, threads: int, batch: int) -> dict:
    """auto_LiRPA's rows from scripts/lirpa/reference.py, keyed by (eps, method), or {"error": why}."""
    if not LIRPA_PYTHON.exists():
        return {"error": "not available (no .venv-lirpa: run scripts/setup_lirpa to make it)"}
    with tempfile.TemporaryDirectory() as folder:
        inputs, output = Path(folder) / "inputs.npy", Path(folder) / "lirpa.json"
        np.save(inputs, u0)
        command = [str(LIRPA_PYTHON), str(ROOT / "scripts/lirpa/reference.py"), str(onnx_path), str(inputs)]
        command += ["--eps", *map(str, eps), "--repeat", str(repeat), "--threads", str(threads)]
        command += ["--batch", str(batch), "--json", str(output)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": f"reference.py failed ({done.returncode}): {done.stderr.strip()[-500:]}"}
        report = json.loads(output.read_text())
    rows = {}
    for row in report["rows"]:
        if "error" in row:
            rows[(row["eps"], row["method"])] = {"error": f"failed ({row['error']})"}
            continue
        rows[(row["eps"], row["method"])] = {
            "lower": np.asarray(row["lower"]),
            "upper": np.asarray(row["upper"]),
            "time_per_input_s": row["time_per_input_s"],
            "note": f"{row['dtype']}, {row['batch']} input(s) per call",
        }
    return {"rows": rows, "report": {k: v for k, v in report.items() if k != "rows"}}


def box_samples(model: ic.ImplicitModel, u0: np.ndarray, eps: float, count: int, rng) -> np.ndarray:
    """Outputs of samples of every box, (inputs, samples, q): ``count`` uniform ones, and per output
    the two corners along the sign of its central secant slope across the box."""
    batch, p = u0.shape
    uniform = u0[:, None, :] + rng.uniform(-eps, eps, size=(batch, count, p))
    steps = eps * np.eye(p)
    corners = []
    for center in u0:
        secant = model.predict(center + steps) - model.predict(center - steps)  # (p, q)
        signs = np.sign(secant.T)  # (q, p)
        corners.append(np.concatenate([center + eps * signs, center - eps * signs]))
    samples = np.concatenate([uniform, np.stack(corners)], axis=1)
    return model.predict(samples.reshape(-1, p)).reshape(batch, samples.shape[1], -1)


def soundness(outputs: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> tuple[int, int, float]:
    """(violations, checks, largest excess) of the sampled outputs against the bounds."""
    below = lower[:, None, :] - outputs
    above = outputs - upper[:, None, :]
    excess = np.maximum(below, above)
    return int((excess > 0).sum()), int(excess.size), float(max(excess.max(), 0.0))


def measure_net(net: str, args, rng) -> list[dict]:
    """Every row (ours and auto_LiRPA's, each eps) of one net."""
    title, path = NETS[net]
    model = ic.from_onnx(path)
    u0 = inputs_for(net, args.inputs, args.mnist_layout)
    print(f"\n{title}: {path.relative_to(ROOT)}, {len(u0)} inputs, n = {model.n} states, p = {model.p}")
    lirpa = lirpa_bounds(path, u0, args.eps, args.repeat, args.threads, args.lirpa_batch)
    if "report" in lirpa:
        report = lirpa["report"]
        print(
            f"auto_LiRPA {report['auto_lirpa']} (torch {report['torch']}): its torch module vs onnxruntime "
            f"max abs diff {report['onnxruntime_max_abs_diff']:.3g}; {report['batching']}"
        )
    rows = []
    for eps in args.eps:
        outputs = box_samples(model, u0, eps, args.samples, rng)
        eps_rows = []
        with threadpool_limits(args.threads):
            for method in OUR_METHODS:
                eps_rows.append({"source": "ours", "method": method, **our_bounds(model, u0, eps, method, args.repeat)})
        for method in LIRPA_METHODS:
            found = lirpa.get("rows", {}).get((eps, method), {"error": lirpa.get("error", "no such row")})
            eps_rows.append({"source": "auto_LiRPA", "method": method, **found})
        for row in eps_rows:
            if "lower" in row:
                row["mean_width"] = float((row["upper"] - row["lower"]).mean())
                row["violations"], row["checks"], row["max_excess"] = soundness(outputs, row["lower"], row["upper"])
        print_table(title, eps, eps_rows, outputs.shape[1])
        rows += [{"net": net, "eps": eps, **without_bounds(row)} for row in eps_rows]
    return rows


def print_table(title: str, eps: float, rows: list[dict], samples: int) -> None:
    print(f"\n{title}, eps {eps:g} ({samples} samples per box)")
    print(f"  {'bound':<24} {'mean width':>12} {'ms/input':>10}  {'violations':>16}  note")
    for row in rows:
        name = f"{row['source']} {row['method']}"
        if "lower" not in row:
            print(f"  {name:<24} {row['error']}")
            continue
        checks = f"{row['violations']}/{row['checks']}"
        if row["violations"]:
            checks += f" (max {row['max_excess']:.2g})"
        time_ms = 1e3 * row["time_per_input_s"]
        print(f"  {name:<24} {row['mean_width']:>12.6g} {time_ms:>10.3f}  {checks:>16}  {row.get('note', '')}")
    by_name = {(r["source"], r["method"]): r for r in rows if "lower" in r}
    crown, ibp = by_name.get(("ours", "crown")), by_name.get(("ours", "ibp"))
    lirpa = by_name.get(("auto_LiRPA", "CROWN"))
    targets = [
        ("width ours-crown / auto_LiRPA-crown", crown, lirpa, "mean_width", TARGET_VS_LIRPA),
        ("width ours-crown / ours-ibp", crown, ibp, "mean_width", TARGET_VS_IBP),
        ("time ours-crown / auto_LiRPA-crown", crown, lirpa, "time_per_input_s", TARGET_TIME),
    ]
    for label, mine, theirs, key, target in targets:
        if mine is None or theirs is None:
            print(f"  target {label} <= {target:g}: n/a")
        else:
            ratio = mine[key] / theirs[key]
            print(f"  target {label} <= {target:g}: {ratio:.3g} ({'met' if ratio <= target else 'not met'})")


def verdicts(args) -> list[dict]:
    """VNN-COMP 2021's MNIST properties: is each input's label kept over its l_inf box? The
    corpus has the network but not the properties' .vnnlib files (nor MNIST's images): the
    verdicts are for our 20 digits at the 2021 radii (0.02 and 0.05), labelled by the net."""
    from implicit_compiler.analysis import certify_robustness

    title, path = NETS["mnist_mlp"]
    model = ic.from_onnx(path)
    u0 = inputs_for("mnist_mlp", args.inputs, args.mnist_layout)
    rows = []
    print(f"\n{title}: VNN-COMP-style verdicts (CROWN), {len(u0)} digits, labels = the net's predictions")
    for eps in args.verdict_eps:
        start = time.perf_counter()
        report = certify_robustness(model, u0, eps)
        seconds = time.perf_counter() - start
        counts = {name: report.verdicts.count(name) for name in ("robust", "not proved")}
        print(f"  eps {eps:g}: {counts['robust']} robust, {counts['not proved']} not proved ({seconds:.2f} s)")
        rows.append({"net": "mnist_mlp", "eps": eps, "verdicts": list(report.verdicts)})
    return rows


def feedback_loop(args, rng) -> list[dict]:
    """LeNet-5 closed by u = v + K y as in scripts/demo_feedback.py (lambda_pf(|A'|) = 0.9):
    CROWN bounds of the loop against the open network's, each checked by --loop-samples
    uniform samples per box (issue 18: valid, and within 2x of the open network's widths)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from demo_feedback import closed_loop, gain_for_eigenvalue

    title, path = NETS["lenet5"]
    lenet = ic.from_onnx(path)
    pattern = np.random.default_rng(0).normal(size=(lenet.p, lenet.q)) / np.sqrt(lenet.p)
    gain, eigenvalue = gain_for_eigenvalue(lenet, pattern, 0.9)
    closed = closed_loop(lenet, pattern, gain)
    u0 = inputs_for("lenet5", args.loop_inputs, args.mnist_layout)
    print(f"\n{title} in a feedback loop (gain {gain:.4g}, lambda_pf(|A'|) = {eigenvalue:.4f}), {len(u0)} inputs")
    rows = []
    for eps in args.eps:
        start = time.perf_counter()
        loop_bounds = output_bounds(closed, u0, eps, method="crown")
        seconds = time.perf_counter() - start
        open_bounds = output_bounds(lenet, u0, eps, method="crown")
        samples = u0[:, None] + rng.uniform(-eps, eps, size=(len(u0), args.loop_samples, *u0.shape[1:]))
        outputs = closed.predict(samples.reshape(-1, *u0.shape[1:]), tol=1e-12).reshape(len(u0), args.loop_samples, -1)
        violations, checks, excess = soundness(outputs, loop_bounds.lower, loop_bounds.upper)
        loop_width = float((loop_bounds.upper - loop_bounds.lower).mean())
        open_width = float((open_bounds.upper - open_bounds.lower).mean())
        ratio = loop_width / open_width
        print(
            f"  eps {eps:g}: loop {loop_width:.6g} vs open {open_width:.6g}: {ratio:.3g}x "
            f"(target <= 2: {'met' if ratio <= 2 else 'not met'}); {1e3 * seconds / len(u0):.1f} ms/input; "
            f"violations {violations}/{checks}" + (f" (max {excess:.2g})" if violations else "")
        )
        rows.append({"net": "lenet5_loop", "eps": eps, "loop_width": loop_width, "open_width": open_width,
                     "violations": violations, "checks": checks})  # fmt: skip
    return rows


def without_bounds(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("lower", "upper")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", choices=sorted(NETS), default=list(NETS))
    parser.add_argument("--eps", nargs="+", type=float, default=[0.001, 0.01], help="l_inf radii")
    parser.add_argument(
        "--mnist-layout",
        choices=["centered", "full"],
        default="centered",
        help="the MNIST MLP's digits: 16x16 in a 6-pixel border (default) or the whole 28x28 (issue 18's table)",
    )
    parser.add_argument("--inputs", type=int, default=20, help="box centers per net (default 20)")
    parser.add_argument("--samples", type=int, default=200, help="uniform samples per box (default 200)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per row, the best counts")
    parser.add_argument("--threads", type=int, default=1, help="BLAS / OpenMP / torch threads (default 1)")
    parser.add_argument(
        "--lirpa-batch", type=int, default=1, help="inputs per auto_LiRPA call (0: all; default 1, see reference.py)"
    )
    parser.add_argument("--seed", type=int, default=0, help="of the uniform samples")
    parser.add_argument("--json", type=Path, help="also save the rows here")
    parser.add_argument(
        "--verdict-eps", nargs="*", type=float, default=[0.02, 0.05], help="radii of the MNIST MLP's verdicts"
    )
    parser.add_argument("--loop-samples", type=int, default=2000, help="samples per box of the feedback loop")
    parser.add_argument("--loop-inputs", type=int, default=5, help="box centers of the feedback loop (default 5)")
    parser.add_argument("--no-loop", action="store_true", help="skip the LeNet-5 feedback loop")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    rows = []
    for net in args.nets:
        rows += measure_net(net, args, rng)
    if "mnist_mlp" in args.nets and args.verdict_eps:
        rows += verdicts(args)
    if "lenet5" in args.nets and not args.no_loop:
        rows += feedback_loop(args, rng)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": {**vars(args), "json": str(args.json)}, "rows": rows}, indent=1))
        print(f"\nsaved {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
