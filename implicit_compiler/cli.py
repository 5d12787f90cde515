"""The ``implicit-compiler`` command line.

    implicit-compiler compile model.onnx -o model.npz     ONNX -> implicit model (.npz)
    implicit-compiler info model.npz                       sizes, blocks, memory, well-posedness
    implicit-compiler verify model.onnx                    vs onnxruntime and onnx.reference
    implicit-compiler spy model.npz -o spy.png             sparsity pattern of A (or [[A B] [C D]])
    implicit-compiler wellposed model.npz                  the well-posedness report
    implicit-compiler sensitivity model.npz -o s.png       the sensitivity matrix (image, .npy)
    implicit-compiler compose cascade a.npz b.npz -o c.npz cascade / parallel / add / multiply / feedback
    implicit-compiler run model.npz -i u.npy -o y.npy      predictions for inputs from .npy
    implicit-compiler export model.npz -o model.onnx       an ONNX graph onnxruntime runs
    implicit-compiler ops                                  the supported ONNX ops
    implicit-compiler bench                                throughput vs onnxruntime and torch

A model argument is a saved model (.npz) or an ONNX file (compiled on the fly). Exit codes: 0
success, 1 a check did not pass (verify failed, well-posedness not shown), 2 bad input or a
usage error (a one-line message on stderr). Nothing is overwritten unless --overwrite is given:
the check is on the file actually written (``run -o y`` writes y.npy, as numpy names it) and a
symbolic link counts as an existing file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np

from . import __version__
from .errors import ImplicitCompilerError, ModelTooLargeError, OverwriteError
from .model import ImplicitModel
from .structure import StructuredMatrix

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class ProgressBar:
    """A one-line progress bar on stderr, silent when stderr is not a terminal."""

    def __init__(self, label: str, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.label = label
        self.started = time.perf_counter()

    def __call__(self, done: int, total: int, what: str) -> None:
        if not self.enabled or total == 0:
            return
        width = 30
        filled = int(width * done / total)
        elapsed = time.perf_counter() - self.started
        line = f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {elapsed:5.1f}s {what[:30]:<30}"
        self.stream.write(line)
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def _parse_shapes(items: Sequence[str] | None) -> dict[str, tuple[int | None, ...]] | None:
    """--input-shape name=N,3,32,32 (N or ? or None marks the batch axis)."""
    if not items:
        return None
    shapes = {}
    for item in items:
        name, _, dims = item.partition("=")
        if not name or not dims:
            raise ValueError(f"--input-shape expects name=d1,d2,... (e.g. x=N,3,32,32), got {item!r}")
        shapes[name] = tuple(None if d.strip() in ("N", "?", "None", "") else int(d) for d in dims.split(","))
    return shapes


def _load_model(path: str, args: argparse.Namespace) -> ImplicitModel:
    """A saved model, or an ONNX file compiled now (with a progress bar on a terminal)."""
    from .serialization import load

    if Path(path).suffix.lower() == ".onnx":
        from .frontend import from_onnx

        return from_onnx(
            path, input_shapes=_parse_shapes(getattr(args, "input_shape", None)), progress=ProgressBar("lowering")
        )
    return load(path)


def _check_writable(path: Path, overwrite: bool, folder_needed: bool = True) -> None:
    """Refuse, before the slow work, a file that exists (a dangling symbolic link counts) unless
    --overwrite, a folder, and (when the writer does not create it) a missing folder."""
    from .serialization import writable_target

    if os.path.lexists(path) and not overwrite:
        raise OverwriteError(f"{path} exists; pass --overwrite to replace it")
    if folder_needed:
        writable_target(path, overwrite=True)


def _numpy_path(path: str | Path, suffix: str) -> Path:
    """The file numpy writes for ``path``: np.save adds .npy, np.savez .npz, when it is missing."""
    path = os.fspath(path)
    return Path(path if path.endswith(suffix) else path + suffix)


def _save_arrays(path: Path, arrays: np.ndarray | dict[str, np.ndarray], overwrite: bool) -> Path:
    """Write one array (.npy) or several (.npz) to exactly ``path``, checked like a model file."""
    from .serialization import write_file

    if isinstance(arrays, dict):
        return write_file(path, lambda stream: np.savez(stream, **arrays), overwrite)
    return write_file(path, lambda stream: np.save(stream, arrays), overwrite)


# --------------------------------------------------------------------------------- commands
def command_compile(args: argparse.Namespace) -> int:
    from .frontend import from_onnx

    output = Path(args.output or Path(args.model).with_suffix(".npz"))
    _check_writable(output, args.overwrite)
    start = time.perf_counter()
    model = from_onnx(
        args.model,
        input_shapes=_parse_shapes(args.input_shape),
        dtype=np.dtype(args.dtype),
        progress=ProgressBar("lowering"),
        structure=args.structure,
    )
    seconds = time.perf_counter() - start
    model.save(output, overwrite=args.overwrite)
    print(f"compiled {args.model} in {seconds:.2f} s: {model}")
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
    return EXIT_OK


def command_info(args: argparse.Namespace) -> int:
    from .analysis import wellposedness

    model = _load_model(args.model, args)
    counts = "   ".join(f"{name} {_nonzeros(getattr(model.structure, name))}" for name in "ABCD")
    print(f"model     {args.model}")
    print(f"states    n = {model.n:,}   inputs p = {model.p:,}   outputs q = {model.q:,}   dtype {model.dtype}")
    print(f"nonzeros  {counts}   memory {model.memory_bytes / 2**20:.1f} MiB")
    print("inputs    " + ", ".join(f"{s.name} {s.shape}" for s in model.inputs))
    print("outputs   " + ", ".join(f"{s.name} {s.shape}" for s in model.outputs))
    print(f"blocks    {len(model.blocks)}")
    shown = model.blocks if args.all_blocks or len(model.blocks) <= 40 else model.blocks[:20] + model.blocks[-20:]
    for index, block in enumerate(shown):
        if not args.all_blocks and len(model.blocks) > 40 and index == 20:
            print(f"          ... {len(model.blocks) - 40} more (--all-blocks)")
        print(f"          {block.name:<40} {block.size:>9,} {str(block.activation):<18} {block.shape}")
    try:
        report = wellposedness(model)
    except ModelTooLargeError as error:  # a cyclic structured model whose A does not fit as CSR
        print(f"well-posed not checked: {error}")
        return EXIT_OK
    print(f"well-posed {report.well_posed}: {report.reason}")
    return EXIT_OK


def _nonzeros(matrix: StructuredMatrix) -> str:
    """The non-zeros of a matrix as CSR, with those its terms hold and its remainder's when it
    has terms (counted from the geometry, never materialized)."""
    if not matrix.terms:
        return f"{matrix.nnz:,}"
    remainder = matrix.remainder.nnz
    return f"{matrix.nnz:,} (structured {matrix.nnz - remainder:,} + remainder {remainder:,})"


def command_verify(args: argparse.Namespace) -> int:
    from .frontend import verify

    report = verify(args.model, samples=args.samples, seed=args.seed, input_shapes=_parse_shapes(args.input_shape))
    print(f"{report.model_name}: n = {report.n:,}, nnz(A) = {report.nnz:,}, blocks = {report.blocks}, "
          f"compiled in {report.compile_seconds:.2f} s, {report.samples} samples")  # fmt: skip
    for output in report.outputs:
        float64 = (
            f"max rel {output.max_rel_error_float64:.2e} {'ok' if output.passed_float64 else 'FAIL'}"
            if output.passed_float64 is not None
            else "not checked"
        )
        print(
            f"  {output.name}: float32 vs onnxruntime max abs {output.max_abs_error_float32:.2e} "
            f"{'ok' if output.passed_float32 else 'FAIL'}; float64 vs onnx.reference {float64}"
        )
    if report.reference_error:
        print(f"  note: {report.reference_error}")
    batch = "as one batch" if report.batch_checked else f"one at a time ({report.batch_error})"
    print(f"  onnxruntime ran the {report.samples} samples {batch}")
    print("PASSED" if report.passed else "FAILED")
    return EXIT_OK if report.passed else EXIT_CHECK_FAILED


def command_spy(args: argparse.Namespace) -> int:
    from . import viz

    output = Path(args.output)
    _check_writable(output, args.overwrite, folder_needed=False)  # viz creates folders
    model = _load_model(args.model, args)
    start = time.perf_counter()
    viz.spy(model, output, whole=args.whole, order=args.order, resolution=args.resolution, overwrite=args.overwrite)
    print(f"wrote {output} ({time.perf_counter() - start:.2f} s)")
    return EXIT_OK


def command_wellposed(args: argparse.Namespace) -> int:
    from .analysis import wellposedness

    report = wellposedness(_load_model(args.model, args))
    print(f"acyclic: {report.acyclic}")
    for component in report.components:
        print(
            f"cyclic component ({len(component.blocks)} blocks, {component.states:,} states): "
            f"lambda_pf(|A|) = {component.perron_frobenius:.6g}, ||A||_inf = {component.inf_norm:.6g}, "
            f"Lipschitz {component.lipschitz:g}: {component.reason}"
        )
    print(f"well-posed: {report.well_posed}: {report.reason}")
    return EXIT_OK if report.well_posed else EXIT_CHECK_FAILED


def _check_targets(arrays: str | None, suffix: str, image: str | None, overwrite: bool) -> Path | None:
    """Refuse existing outputs before any work: the arrays' file as numpy will name it (returned)
    and the PNG (viz creates its folders)."""
    path = _numpy_path(arrays, suffix) if arrays else None
    if path:
        _check_writable(path, overwrite)
    if image:
        _check_writable(Path(image), overwrite, folder_needed=False)
    return path


def command_sensitivity(args: argparse.Namespace) -> int:
    from . import viz
    from .analysis import sensitivity

    matrix_path = _check_targets(args.save_matrix, ".npy", args.output, args.overwrite)
    model = _load_model(args.model, args)
    start = time.perf_counter()
    report = sensitivity(model)
    print(f"sensitivity matrix {report.matrix.shape} in {time.perf_counter() - start:.2f} s; valid: {report.valid}")
    print(f"  {report.reason}")
    if report.valid:
        print(
            f"  largest entry {report.matrix.max():.4g}; per output: "
            + ", ".join(f"{v:.3g}" for v in report.matrix.max(axis=1)[:10])
        )
    if matrix_path:
        _save_arrays(matrix_path, report.matrix, args.overwrite)
        print(f"wrote {matrix_path}")
    if args.output:
        viz.sensitivity_image(report, args.output, model=model, overwrite=args.overwrite)
        print(f"wrote {args.output}")
    return EXIT_OK if report.valid else EXIT_CHECK_FAILED


def command_compose(args: argparse.Namespace) -> int:
    from . import compose

    output = Path(args.output)
    _check_writable(output, args.overwrite)
    first = _load_model(args.first, args)
    if args.operation == "feedback":
        if args.second is not None:
            raise ValueError("feedback takes one model and --gain, not a second model")
        gain = _read_gain(args.gain)
        model = compose.feedback(first, gain)
    else:
        if args.second is None:
            raise ValueError(f"{args.operation} needs two models")
        model = getattr(compose, args.operation)(first, _load_model(args.second, args))
    model.save(output, overwrite=args.overwrite)
    print(f"{args.operation}: {model}")
    print(f"wrote {output}")
    return EXIT_OK


def _read_gain(gain: str | None):
    if gain is None:
        raise ValueError("feedback needs --gain: a number (k I) or a .npy file holding the p x q matrix K")
    try:
        return float(gain)
    except ValueError:
        return np.load(gain, allow_pickle=False)


def command_run(args: argparse.Namespace) -> int:
    model = _load_model(args.model, args)
    output = None
    if args.output:  # checked before predicting; one output is saved as .npy, several as .npz
        output = _numpy_path(args.output, ".npz" if len(model.outputs) > 1 else ".npy")
        _check_writable(output, args.overwrite)
    u = np.load(args.input, allow_pickle=False)
    if isinstance(u, np.lib.npyio.NpzFile):
        u = {name: u[name] for name in u.files}
    start = time.perf_counter()
    y = model.predict(u, method=args.method)
    seconds = time.perf_counter() - start
    if output:
        _save_arrays(output, y, args.overwrite)
        print(f"wrote {output} in {seconds:.2f} s")
    else:
        np.set_printoptions(precision=5, suppress=True, threshold=200)
        print(y)
    return EXIT_OK


def command_export(args: argparse.Namespace) -> int:
    output = Path(args.output)
    _check_writable(output, args.overwrite)
    model = _load_model(args.model, args)
    if args.dtype:
        model = model.astype(args.dtype)
    start = time.perf_counter()
    proto = model.to_onnx(output, opset=args.opset, overwrite=args.overwrite, tol=args.tol, max_iter=args.max_iter)
    seconds = time.perf_counter() - start
    residuals = [value.name for value in proto.graph.output[len(model.outputs) :]]
    loops = f"; cyclic components iterate in Loops, their residuals in {', '.join(residuals)}" if residuals else ""
    print(f"exported {model} at opset {proto.opset_import[0].version} in {seconds:.2f} s{loops}")
    print(f"wrote {output} ({output.stat().st_size / 2**20:.2f} MiB)")
    if model.dtype == np.float64:
        print("note: float64 (double) tensors: onnxruntime has no double Conv; --dtype float32 writes float")
    return EXIT_OK


def command_bounds(args: argparse.Namespace) -> int:
    from . import viz
    from .analysis import certify_robustness, output_bounds

    saved = _check_targets(args.save, ".npz", args.output, args.overwrite)
    model = _load_model(args.model, args)
    u0 = np.load(args.input, allow_pickle=False)
    start = time.perf_counter()
    verdicts = None
    if model.q >= 2 and args.method != "sensitivity":  # the verdicts' pass bounds the outputs too
        report = certify_robustness(model, u0, args.eps, method=args.method)
        bounds, verdicts = report.bounds, report.verdicts
    else:
        bounds = output_bounds(model, u0, args.eps, method=args.method)
    seconds = time.perf_counter() - start
    lower, upper, center = (np.atleast_2d(a) for a in (bounds.lower, bounds.upper, bounds.center))
    print(f"{bounds.method} bounds over |u - u0| <= {args.eps:g}, {lower.shape[0]} sample(s) in {seconds:.2f} s")
    print(f"  {bounds.condition}")
    print(f"  mean width {float(np.mean(upper - lower)):.6g}, largest {float(np.max(upper - lower, initial=0)):.6g}")
    np.set_printoptions(precision=5, suppress=True, threshold=200, linewidth=120)
    for index in range(min(lower.shape[0], args.show)):
        verdict = f" - {verdicts[index]}" if verdicts else ""
        print(f"sample {index}{verdict}")
        print(f"  nominal {center[index]}\n  lower   {lower[index]}\n  upper   {upper[index]}")
    if verdicts:
        counts = {name: verdicts.count(name) for name in dict.fromkeys(verdicts)}
        print("verdicts: " + ", ".join(f"{count} {name}" for name, count in counts.items()))
    if saved:
        arrays = {"lower": lower, "upper": upper, "center": center, "margin": np.atleast_2d(bounds.margin)}
        _save_arrays(saved, arrays, args.overwrite)
        print(f"wrote {saved}")
    if args.output:
        viz.bounds_plot(bounds, args.output, overwrite=args.overwrite)
        print(f"wrote {args.output}")
    return EXIT_OK


def command_ops(args: argparse.Namespace) -> int:
    from .frontend import supported_ops_table

    print(supported_ops_table())
    return EXIT_OK


def command_bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.implicit:
        return _command_bench_implicit(args)
    models = [m for item in args.models for m in item.split(",") if m]
    batches = [int(b) for item in args.batches for b in item.split(",") if b]
    bench.check_writable(args.out, args.overwrite)  # refuse before minutes of benchmarking
    quick = dict(repeats=2, warmup=1, min_seconds=0.0, compile_runs=1) if args.quick else {}
    if args.repeats is not None:
        quick["repeats"] = args.repeats
    if args.min_seconds is not None:
        quick["min_seconds"] = args.min_seconds
    if args.rounds is not None:
        quick["rounds"] = args.rounds
    progress = (lambda message: print(message, file=sys.stderr, flush=True)) if not args.quiet else None
    try:
        report = bench.run_benchmark(models, batches, include_torch=not args.no_torch, progress=progress, **quick)
    except bench.CorrectnessError as error:
        print(f"implicit-compiler bench: FAILED: {error}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print(report.format_table(), end="")
    json_path, md_path = bench.write_report(report, args.out, overwrite=args.overwrite)
    print(f"wrote {json_path} and {md_path}")
    return EXIT_OK


def _command_bench_implicit(args: argparse.Namespace) -> int:
    from . import bench_implicit

    bench_implicit.check_writable(args.out, args.overwrite)
    progress = (lambda message: print(message, file=sys.stderr, flush=True)) if not args.quiet else None
    report = bench_implicit.run_implicit_benchmark(quick=args.quick, progress=progress)
    print(bench_implicit.format_table(report), end="")
    json_path, md_path = bench_implicit.write_report(report, args.out, overwrite=args.overwrite)
    print(f"wrote {json_path} and {md_path}")
    return EXIT_OK


# --------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr, exit 2 (argparse prints the usage
    first, several lines for most commands); the subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="implicit-compiler",
        description="Compile neural networks into implicit models x = phi(Ax + Bu + b), y = Cx + Du + c.",
        epilog="Exit codes: 0 success, 1 a check did not pass, 2 bad input.",
    )
    parser.add_argument("--version", action="version", version=f"implicit-compiler {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, function: Callable, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(function=function)
        return sub

    def model_argument(sub: argparse.ArgumentParser, help: str = "a saved model (.npz) or an ONNX file") -> None:
        sub.add_argument("model", help=help)
        sub.add_argument(
            "--input-shape",
            action="append",
            metavar="NAME=D1,D2,...",
            help="fix dynamic input dimensions of an ONNX file, N marks the batch axis (e.g. x=N,3,32,32)",
        )

    sub = add("compile", command_compile, "compile an ONNX file into an implicit model (.npz)")
    model_argument(sub, "the ONNX file")
    sub.add_argument("-o", "--output", help="the .npz to write (default: next to the ONNX file)")
    sub.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    sub.add_argument(
        "--structure", choices=("auto", "kernels", "csr"), default="auto",
        help="keep convolutions and dense products as kernels: in large models (auto), always, or never (csr)",
    )  # fmt: skip
    sub.add_argument("--overwrite", action="store_true", help="replace the output if it exists")

    sub = add("info", command_info, "print n, p, q, non-zeros, blocks, memory and the well-posedness verdict")
    model_argument(sub)
    sub.add_argument("--all-blocks", action="store_true", help="list every block")

    sub = add("verify", command_verify, "compare with onnxruntime (float32) and onnx.reference (float64)")
    model_argument(sub, "the ONNX file")
    sub.add_argument("--samples", type=int, default=10)
    sub.add_argument("--seed", type=int, default=0)

    sub = add("spy", command_spy, "save the sparsity pattern of A (or of [[A, B], [C, D]]) as a PNG")
    model_argument(sub)
    sub.add_argument("-o", "--output", required=True, help="the PNG to write")
    sub.add_argument("--whole", action="store_true", help="the whole [[A, B], [C, D]]")
    sub.add_argument("--order", choices=("paper", "topological", "state"), default="paper")
    sub.add_argument("--resolution", type=int, default=1000, help="largest number of pixels per side")
    sub.add_argument("--overwrite", action="store_true")

    sub = add("wellposed", command_wellposed, "the well-posedness report (exit 1 when not shown)")
    model_argument(sub)

    sub = add("sensitivity", command_sensitivity, "the sensitivity matrix |C|(I-|A|)^-1|B| + |D|")
    model_argument(sub)
    sub.add_argument("-o", "--output", help="a PNG with one image per output")
    sub.add_argument("--save-matrix", metavar="S.npy", help="save the q x p matrix as .npy")
    sub.add_argument("--overwrite", action="store_true")

    sub = add("bounds", command_bounds, "certified output bounds over the box |u - u0| <= eps (CROWN by default)")
    model_argument(sub)
    sub.add_argument("input", help=".npy with u0: one sample or a batch")
    sub.add_argument("--eps", type=float, required=True, help="the l_inf radius of the box")
    sub.add_argument("--method", choices=("crown", "ibp", "sensitivity"), default="crown")
    sub.add_argument("--show", type=int, default=5, help="samples to print (default 5)")
    sub.add_argument("-o", "--output", help="a PNG of the first sample's bounds per output beside its nominal outputs")
    sub.add_argument("--save", metavar="BOUNDS.npz", help="save lower, upper, center and margin")
    sub.add_argument("--overwrite", action="store_true")

    sub = add("compose", command_compose, "compose saved models: cascade, parallel, add, multiply, feedback")
    sub.add_argument("operation", choices=("cascade", "parallel", "add", "multiply", "feedback"))
    sub.add_argument("first", help="the first model (.npz or .onnx)")
    sub.add_argument("second", nargs="?", help="the second model (not for feedback)")
    sub.add_argument("--gain", help="feedback gain K: a number (k I) or a .npy p x q matrix")
    sub.add_argument("-o", "--output", required=True, help="the .npz to write")
    sub.add_argument("--input-shape", action="append", metavar="NAME=D1,D2,...", help=argparse.SUPPRESS)
    sub.add_argument("--overwrite", action="store_true")

    sub = add("run", command_run, "predict outputs for inputs read from .npy (leading axis: batch)")
    model_argument(sub)
    sub.add_argument("-i", "--input", required=True, help=".npy with the inputs (or .npz with one array per input)")
    sub.add_argument("-o", "--output", help=".npy to write (.npz for several outputs); default: print")
    sub.add_argument("--method", choices=("auto", "picard", "anderson"), default="auto")
    sub.add_argument("--overwrite", action="store_true")

    sub = add("export", command_export, "write a model as an ONNX graph that onnxruntime runs (predicts as run does)")
    model_argument(sub)
    sub.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    sub.add_argument("--opset", type=int, help="the ONNX opset (default 17)")
    sub.add_argument("--dtype", choices=("float32", "float64"), help="the graph's float type (default: the model's)")
    sub.add_argument("--tol", type=float, help="cyclic components: the residual to stop at (default predict's)")
    sub.add_argument("--max-iter", type=int, help="cyclic components: the most sweeps (default: predict's, 1000)")
    sub.add_argument("--overwrite", action="store_true", help="replace the output if it exists")

    sub = add("bench", command_bench, "benchmark ours vs onnxruntime and torch on the zoo models (bench.json, .md)")
    sub.add_argument(
        "--models",
        nargs="+",
        default=["lenet5", "resnet20"],
        help="zoo model names (zoo/NAME.onnx), or resnet18_224 / resnet50_224 (ImageNet-size, generated)",
    )
    sub.add_argument("--batches", nargs="+", default=["1", "32", "256"], help="batch sizes (e.g. 1 32 256)")
    sub.add_argument("--quick", action="store_true", help="fewer repeats and one compile (for tests)")
    sub.add_argument("--repeats", type=int, help="least number of timed runs (default 5, --quick 2)")
    sub.add_argument("--min-seconds", type=float, help="least seconds timed per measurement (default 1, --quick 0)")
    sub.add_argument("--rounds", type=int, help="rounds in which the engines take turns (default 5)")
    sub.add_argument("--no-torch", action="store_true", help="skip the torch eager column")
    sub.add_argument("--out", default="out/bench", help="folder for bench.json and bench.md (default out/bench)")
    sub.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    sub.add_argument(
        "--implicit", action="store_true",
        help="cyclic models against a dense torch Picard loop, torchdeq and torchidl (implicit.json, .md)",
    )  # fmt: skip
    sub.add_argument("--overwrite", action="store_true")

    add("ops", command_ops, "print the supported ONNX ops (markdown)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, a usage error: the code, also for main(argv)
        return EXIT_OK if stop.code is None else stop.code if isinstance(stop.code, int) else EXIT_BAD_INPUT
    try:
        return args.function(args)
    except BrokenPipeError:  # e.g. `implicit-compiler info m.npz | head`: stop quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (Python's documented recipe)
        return EXIT_OK
    except (ImplicitCompilerError, OSError, ValueError, KeyError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"implicit-compiler {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("implicit-compiler: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
