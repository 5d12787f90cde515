"""The main job: ``python -m implicit_compiler.demo`` (run by scripts/demo).

1. Compiles the zoo's ONNX models (LeNet-5, ResNet20, an LSTM classifier) into implicit models, verifies each
   against onnxruntime (float32) and the ONNX reference evaluator (float64), and prints n,
   nnz, blocks and compile time; measures the implicit classifiers' accuracy on the held-out
   digits next to the ONNX models'.
2. Builds a hand-made feedforward network, closes it in a feedback loop (a cyclic A) and solves
   that by Anderson-accelerated and plain Picard iteration; saves and reloads it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from . import ImplicitModel, StateBlock, TensorSpec, __version__, load
from .analysis import certify_robustness, output_bounds


def feedforward_network(rng: np.random.Generator, sizes=(16, 64, 64, 32, 4)) -> tuple[ImplicitModel, list]:
    """A ReLU MLP u -> h1 -> h2 -> h3 -> y as an implicit model, with its dense layers."""
    layers = [(rng.normal(size=(o, i)) / np.sqrt(i), rng.normal(size=o) * 0.1) for i, o in zip(sizes, sizes[1:])]
    hidden = sizes[1:-1]
    offsets = np.concatenate([[0], np.cumsum(hidden)])
    n, p, q = int(offsets[-1]), sizes[0], sizes[-1]
    A = sp.lil_array((n, n))
    for k in range(1, len(hidden)):
        A[offsets[k] : offsets[k + 1], offsets[k - 1] : offsets[k]] = layers[k][0]
    B = sp.lil_array((n, p))
    B[: hidden[0], :] = layers[0][0]
    C = sp.lil_array((q, n))
    C[:, offsets[-2] :] = layers[-1][0]
    blocks = tuple(
        StateBlock(f"h{k + 1}", int(offsets[k]), int(offsets[k + 1]), "relu", (size,), source_node=f"fc{k + 1}")
        for k, size in enumerate(hidden)
    )
    bias_x = np.concatenate([bias for _, bias in layers[:-1]])
    model = ImplicitModel(
        A, B, C, sp.csr_array((q, p)), bias_x, layers[-1][1], blocks, (TensorSpec("u", (p,)),), (TensorSpec("y", (q,)),)
    )
    return model, layers


def numpy_forward(layers: list, u: np.ndarray) -> np.ndarray:
    """The reference: the same network evaluated layer by layer with numpy."""
    h = u
    for k, (weight, bias) in enumerate(layers):
        h = h @ weight.T + bias
        if k < len(layers) - 1:
            h = np.maximum(h, 0)
    return h


def with_feedback(model: ImplicitModel, rng: np.random.Generator, gain: float) -> ImplicitModel:
    """Feed the last hidden block back into the first: A gains an upper-right block, a loop.

    The whole A is then rescaled so that ||A||_inf = gain < 1, a sufficient condition for a
    unique equilibrium with ReLU.
    """
    first, last = model.blocks[0], model.blocks[-1]
    loop = sp.lil_array(model.A.shape)
    loop[first.slice, last.slice] = rng.normal(size=(first.size, last.size))
    A = sp.csr_array(model.A + loop)
    A = A * (gain / np.abs(A).sum(axis=1).max())
    return ImplicitModel(
        A, model.B, model.C, model.D, model.bias_x, model.bias_y, model.blocks, model.inputs, model.outputs
    )


def _timed(function, repeats: int = 5):
    best, result = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return result, best


ZOO = Path(__file__).resolve().parents[1] / "zoo"
ZOO_MODELS = ("lenet5.onnx", "resnet20.onnx", "lstm_classifier.onnx", "vit.onnx", "vit_legacy.onnx")
# the held-out digits of each classifier: (model, loader in zoo/data.py)
CLASSIFIERS = (
    ("lenet5.onnx", "load_digits_32x32"),
    ("lstm_classifier.onnx", "load_digits_8x8"),
    ("vit.onnx", "load_digits_32x32"),
    ("vit_legacy.onnx", "load_digits_32x32"),
)


def zoo_section(samples: int, figures: Path | None) -> bool:
    """Compile and verify the zoo models (and draw their spy plots); return whether all passed."""
    from . import viz
    from .frontend import from_onnx, verify

    if not all((ZOO / name).exists() for name in ZOO_MODELS):
        print(f"zoo models not found under {ZOO} (a source checkout has them); skipping\n")
        return True
    passed = True
    compiled = {}
    for name in ZOO_MODELS:
        start = time.perf_counter()
        model = from_onnx(ZOO / name)
        seconds = time.perf_counter() - start
        compiled[name] = model
        report = verify(ZOO / name, samples=samples)
        passed &= report.passed
        errors = ", ".join(
            f"{o.name}: float32 max abs {o.max_abs_error_float32:.1e}, float64 rel {o.max_rel_error_float64:.1e}"
            for o in report.outputs
        )
        if not report.float64_checked:
            errors += f"; float64 not checked: {report.reference_error}"
        print(
            f"{name:<20} n = {model.n:,}  nnz(A) = {model.structure.A.nnz:,}  nnz(all) = {model.nnz:,}  "
            f"blocks = {len(model.blocks)}  compile {seconds:.2f} s  memory {model.memory_bytes / 2**20:.1f} MiB"
        )
        print(f"{'':<20} verify ({samples} samples): {'PASSED' if report.passed else 'FAILED'} ({errors})")
        if figures is not None:
            start = time.perf_counter()
            stem = name.removesuffix(".onnx")
            # The figures folder is the demo's own output (default out/demo): redrawn on every run.
            viz.spy(model, figures / f"{stem}_spy.png", title=f"{stem}: A in the paper's order", overwrite=True)
            if model.n < 50_000:
                title = f"{stem}: [[A, B], [C, D]]"
                viz.spy(model, figures / f"{stem}_spy_whole.png", whole=True, title=title, overwrite=True)
            print(f"{'':<20} spy plot(s) in {figures}/ ({time.perf_counter() - start:.2f} s)")
    passed &= held_out_accuracy(compiled)
    bounds_section(compiled["lenet5.onnx"], figures)
    print()
    return passed


def bounds_section(lenet: ImplicitModel, figures: Path | None, eps: float = 0.01, count: int = 5) -> None:
    """Certified bounds of LeNet-5 over l_inf boxes around held-out digits: CROWN against the
    global sensitivity bound, and the robustness verdicts."""
    from . import viz

    sys.path.insert(0, str(ZOO))
    try:
        import data  # zoo/data.py: numpy + scikit-learn
    except ImportError as error:
        print(f"certified bounds skipped: {error} (scripts/demo installs scikit-learn)")
        return
    finally:
        sys.path.remove(str(ZOO))
    images = data.load_digits_32x32()[2][:count].astype(np.float64)
    start = time.perf_counter()
    report = certify_robustness(lenet, images, eps)  # the verdicts and the outputs' CROWN bounds
    crown, verdicts = report.bounds, report.verdicts
    seconds = time.perf_counter() - start
    sensitivity_width = float(np.mean(output_bounds(lenet, images, eps, method="sensitivity").upper - crown.center))
    print(
        f"lenet5 certified bounds over |u - u0| <= {eps:g} ({count} digits, {seconds:.2f} s): mean width "
        f"{float(np.mean(crown.upper - crown.lower)):.3g} (CROWN) against {2 * sensitivity_width:.3g} (sensitivity); "
        f"verdicts: {verdicts.count('robust')} robust, {verdicts.count('not proved')} not proved"
    )
    if figures is not None:
        viz.bounds_plot(crown, figures / "lenet5_bounds.png", overwrite=True)


def held_out_accuracy(compiled: dict[str, ImplicitModel]) -> bool:
    """Held-out digits accuracy of the implicit classifiers (LeNet-5, the LSTM, the vision
    transformer as both exporters wrote it) next to the ONNX models' (onnxruntime); True when
    they are equal."""
    try:
        sys.path.insert(0, str(ZOO))
        import data  # zoo/data.py: numpy + scikit-learn
    except ImportError as error:
        print(f"held-out accuracy skipped: {error} (scripts/demo installs scikit-learn)")
        return True
    finally:
        sys.path.remove(str(ZOO))
    import onnxruntime

    equal = True
    for name, loader in CLASSIFIERS:
        _, _, images, labels = getattr(data, loader)()
        session = onnxruntime.InferenceSession(str(ZOO / name), providers=["CPUExecutionProvider"])
        onnx_accuracy = float((session.run(None, {"input": images})[0].argmax(axis=1) == labels).mean())
        implicit = compiled[name].predict(images.astype(np.float64))
        implicit_accuracy = float((implicit.argmax(axis=1) == labels).mean())
        same = implicit_accuracy == onnx_accuracy
        equal &= same
        print(
            f"{name} held-out digits ({len(labels)} images): implicit model {implicit_accuracy:.2%}, "
            f"ONNX model (onnxruntime) {onnx_accuracy:.2%}: {'equal' if same else 'DIFFERENT'}"
        )
    return equal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="samples per solve (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--samples", type=int, default=10, help="verification samples per zoo model (default 10)")
    parser.add_argument("--skip-zoo", action="store_true", help="only run the hand-made models")
    parser.add_argument(
        "--figures", type=Path, default=Path("out/demo"), help="folder for the spy plots (default out/demo; redrawn)"
    )
    parser.add_argument("--no-figures", action="store_true", help="do not draw the spy plots")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(f"implicit_compiler {__version__} demo\n")
    passed = True if args.skip_zoo else zoo_section(args.samples, None if args.no_figures else args.figures)

    model, layers = feedforward_network(rng)
    u = rng.normal(size=(args.batch, model.p))
    print(f"hand-made feedforward MLP 16-64-64-32-4: {model}")
    print(f"  blocks: {', '.join(f'{b.name}[{b.start}:{b.stop}] {b.activation}' for b in model.blocks)}")
    solution, seconds = _timed(lambda: model.solve(u))
    error = np.abs(solution.y - numpy_forward(layers, u)).max()
    print(
        f"  forward substitution, batch {args.batch}: {seconds * 1e3:.2f} ms, "
        f"{solution.iterations} iterations, max |y - numpy| = {error:.1e}"
    )
    picard = model.solve(u, method="picard")
    gap = np.abs(picard.y - solution.y).max()
    print(f"  Picard on the whole model: {picard.iterations} iterations (depth + 1), max |y - auto| = {gap:.1e}")
    y32 = model.predict(u.astype(np.float32))
    print(f"  float32 run: dtype {y32.dtype}, max |y32 - y64| = {np.abs(y32 - solution.y).max():.1e}\n")

    closed = with_feedback(model, rng, gain=0.95)
    print(f"closed loop h3 -> h1 with ||A||_inf = {np.abs(closed.A).sum(axis=1).max():.2f}: {closed}")
    for method in ("auto", "picard"):
        result, seconds = _timed(lambda method=method: closed.solve(u, method=method), repeats=3)
        x = result.x
        fixed_point_gap = np.abs(x - np.maximum(x @ closed.A.T + u @ closed.B.T + closed.bias_x, 0)).max()
        label = "auto (Anderson on the loop)" if method == "auto" else "picard (whole model)"
        print(
            f"  {label:<28} {result.iterations:4d} iterations, final residual {result.residual_history[-1]:.1e}, "
            f"|x - phi(Ax+Bu+b)| = {fixed_point_gap:.1e}, {seconds * 1e3:.1f} ms"
        )
    print(f"  cyclic components solved by auto: {[names for names, _ in result.component_histories] or 'none'}")
    center, eps = u[0], 0.05
    bounds = output_bounds(closed, center, eps)
    samples = closed.predict(center + rng.uniform(-eps, eps, size=(1000, closed.p)))
    inside = bool(((samples >= bounds.lower) & (samples <= bounds.upper)).all())
    print(
        f"  certified bounds over |u - u0| <= {eps:g} ({bounds.condition.split(';')[0]}): mean width "
        f"{float(np.mean(bounds.upper - bounds.lower)):.3g}; 1,000 samples inside: {inside}"
    )

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "closed_loop.npz"
        closed.save(path)
        reloaded = load(path)
        same = all((getattr(reloaded, m) != getattr(closed, m)).nnz == 0 for m in "ABCD")
        print(f"\nsaved and reloaded {path.name} ({path.stat().st_size / 1024:.0f} KiB): matrices identical: {same}")
    return 0 if passed and same and inside else 1


if __name__ == "__main__":
    raise SystemExit(main())
