"""The implicit benchmark: truly implicit (cyclic) models solved by us and by the peers, side by side.

    implicit-compiler bench --implicit [--quick] [--out out/bench] [--overwrite]

In one process, the engines taking turns (``bench.time_side_by_side``), every contender solves
the same equilibrium to the same relative tolerance (``TOL``, float32 unless the row says float64):

- **dense**: x = relu(A x + B u + b) with a dense random A (n = 500 / 2000, ||A||_inf = 0.9 /
  0.99, p = 64), batch 1 / 256, float32 / float64. A is nonnegative (uniform entries, scaled to
  the norm): then lambda_pf(A) is about ||A||_inf, the slow case that well-posedness allows. The
  rows marked "signed" take normal entries instead (lambda_pf(A) far below the norm: a few steps
  suffice, and every method is about one product per step). Contenders: ours (``model.solve``),
  a dense torch Picard loop (x <- relu(A x + B u + b) until ||x_new - x||_inf <= TOL ||x_new||_inf,
  what torchidl's inference does), and when installed (``pip install -e ".[peers]"`` then
  ``pip install --no-deps torchidl==0.0.4``): torchidl's ``ImplicitFunctionInf.inn_pred``
  (its absolute tolerance set to TOL ||x*||_inf) and torchdeq's anderson and broyden solvers
  (stop_mode "rel").
- **lenet5 loop**: LeNet-5 of the zoo closed in the feedback loop of scripts/demo_feedback.py
  (u = v + K y, lambda_pf(|A|) = 0.9), batch 1 / 256: ours, and the loop as a torch user writes
  it: torchdeq's broyden (and anderson) on the 10 fed-back values, y = LeNet(v + K y), with the
  torch LeNet-5 holding the same weights. Ours is ``predict`` (y only, as the peers return);
  one open-loop ``predict`` is timed beside it. Beside them, the same model exported by
  ``to_onnx`` (tol = TOL; a Loop of accelerated Gauss-Seidel sweeps) run by onnxruntime on every
  core (``EXPORTED``: reported, not counted as a peer in our row's ratio).

- **trained classifier**: an ``ImplicitClassifier`` (200 states, A dense and cyclic, ||A||_inf <=
  0.95 kept by projection) fitted on scikit-learn's 8 x 8 digits (needs torch and scikit-learn), its equilibrium
  x = relu(A x + B u + b) for held-out digits solved by the same contenders as the dense rows.

Each contender's answer is checked the same way, in float64: for the dense rows the true
residual ||x - relu(A x + B u + b)||_inf / ||x||_inf (the largest over the samples), for the
loop the residual of the fed-back values ||y - LeNet(v + K y)||_inf / ||y||_inf with our
float64 open-loop LeNet-5. It is printed beside the time.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bench import ROOT, machine_info, time_side_by_side, usable_cores
from .errors import OverwriteError

TOL = 1e-6
# Our model exported by to_onnx, run by onnxruntime: reported beside ours, not a peer (our row's
# ratio is to the best peer's time).
EXPORTED = "onnxruntime (to_onnx)"
REPORT_FILES = ("implicit.json", "implicit.md")
P = 64


@dataclass(frozen=True)
class ImplicitRow:
    """One contender on one case: its median and best time and the true residual it reached."""

    case: str
    batch: int
    dtype: str
    engine: str
    median_ms: float
    min_ms: float
    residual: float
    ratio: float  # the best peer's median / ours (> 1: we are faster); on our row, the best peer's
    note: str = ""


def dense_problem(n: int, norm: float, signed: bool, seed: int = 0):
    """(A, B, b) float64: A dense random with ||A||_inf = norm, nonnegative unless ``signed``."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, n)) if signed else rng.uniform(size=(n, n))
    A *= norm / np.abs(A).sum(axis=1).max()
    return A, rng.normal(size=(n, P)) / np.sqrt(P), 0.1 * rng.normal(size=n)


def dense_residual(A, B, b, u, x) -> float:
    x, u = np.asarray(x, np.float64), np.asarray(u, np.float64)
    gap = np.abs(x - np.maximum(x @ A.T + u @ B.T + b, 0)).max(axis=1)
    return float((gap / np.maximum(np.abs(x).max(axis=1), 1e-300)).max())


def _peers() -> dict[str, Any]:
    found: dict[str, Any] = {}
    try:
        import torch

        found["torch"] = torch
    except Exception:  # noqa: BLE001 - torch is optional
        return found
    try:
        from torchdeq.solver import get_solver

        found["torchdeq"] = get_solver
    except Exception:  # noqa: BLE001 - a peer is optional
        pass
    try:
        from torchidl.implicit_function import ImplicitFunctionInf

        found["torchidl"] = ImplicitFunctionInf
    except Exception:  # noqa: BLE001
        pass
    return found


def _dense_contenders(A, B, b, u, dtype, peers, scale) -> dict[str, Callable[[], np.ndarray]]:
    """name -> function returning x (batch, n) as numpy."""
    from .model import ImplicitModel

    n = A.shape[0]
    model = ImplicitModel.from_matrices(A, B, np.zeros((1, n)), np.zeros((1, B.shape[1])), bias_x=b).astype(dtype)
    U = u.astype(dtype)
    contenders: dict[str, Callable[[], np.ndarray]] = {"ours": lambda: model.solve(U, tol=TOL).x}
    torch = peers.get("torch")
    if torch is None:
        return contenders
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    At, Bt, bt = (torch.tensor(m, dtype=tdtype) for m in (A, B, b))
    Ut = torch.tensor(U)

    def torch_picard():
        with torch.no_grad():
            Z = Bt @ Ut.T + bt[:, None]
            X = torch.zeros_like(Z)
            for _ in range(10_000):
                new = torch.relu(At @ X + Z)
                if (new - X).abs().max() <= TOL * new.abs().max():
                    return new.T.numpy()
                X = new
        raise RuntimeError("torch Picard did not converge")

    contenders["torch picard"] = torch_picard
    if "torchidl" in peers:
        idl = peers["torchidl"]

        def torchidl():
            with torch.no_grad():
                Z = Bt @ Ut.T + bt[:, None]
                X, _, _ = idl.inn_pred(At, Z, torch.zeros_like(Z), 10_000, TOL * scale)
                return X.T.numpy()

        contenders["torchidl"] = torchidl
    if "torchdeq" in peers:
        for solver_name in ("anderson", "broyden"):
            solver = peers["torchdeq"](solver_name)

            def deq(solver=solver):
                with torch.no_grad():
                    Z = Ut @ Bt.T + bt
                    z, _, _ = solver(lambda z: torch.relu(z @ At.T + Z), torch.zeros_like(Z), max_iter=500,
                                     tol=TOL, stop_mode="rel")  # fmt: skip
                    return z.numpy()

            contenders[f"torchdeq {solver_name}"] = deq
    return contenders


def _lenet_loop(peers):
    """(closed-loop model, open-loop model, K, torch LeNet-5 or None)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from demo_feedback import closed_loop, gain_for_eigenvalue

    from . import bench
    from .frontend import from_onnx

    path = ROOT / "zoo" / "lenet5.onnx"
    lenet = from_onnx(path)
    pattern = np.random.default_rng(0).normal(size=(lenet.p, lenet.q)) / np.sqrt(lenet.p)
    gain, _ = gain_for_eigenvalue(lenet, pattern, 0.9)
    net = None
    if "torch" in peers:
        net, weights, _ = bench._torch_module("lenet5", path, ROOT / "zoo", peers["torch"])
        net = net if weights == "onnx" else None
    return closed_loop(lenet, pattern, gain), lenet, gain * pattern, net


def _loop_contenders(closed, lenet, K, net, v, peers) -> tuple[dict[str, Callable[[], np.ndarray]], Callable]:
    """name -> function returning y (batch, 10); and the open-loop predict."""
    closed32, lenet32, v32 = closed.astype(np.float32), lenet.astype(np.float32), v.astype(np.float32)
    contenders: dict[str, Callable[[], np.ndarray]] = {"ours": lambda: closed32.predict(v32, tol=TOL)}
    contenders[EXPORTED] = _exported(closed32, v32)
    if net is not None and "torchdeq" in peers:
        torch = peers["torch"]
        Kt, vt = torch.tensor(K.T, dtype=torch.float32), torch.tensor(v32.reshape(len(v32), -1))
        for solver_name in ("broyden", "anderson"):
            solver = peers["torchdeq"](solver_name)

            def deq(solver=solver):
                with torch.no_grad():
                    f = lambda y: net((vt + y @ Kt).reshape(-1, 1, 32, 32))
                    y, _, _ = solver(f, torch.zeros(len(vt), 10), max_iter=200, tol=TOL, stop_mode="rel")
                    return y.numpy()

            contenders[f"torchdeq {solver_name} (10 values)"] = deq
    return contenders, lambda: lenet32.predict(v32)


def _exported(model, v: np.ndarray) -> Callable[[], np.ndarray]:
    """onnxruntime on ``model.to_onnx(tol=TOL)`` (every core): y for the inputs v."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = usable_cores()
    proto = model.to_onnx(tol=TOL)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {model.inputs[0].name: v}
    return lambda: session.run([model.outputs[0].name], feeds)[0]


def loop_residual(lenet, K, v, y) -> float:
    y = np.asarray(y, np.float64).reshape(len(v), -1)
    again = lenet.predict(v.reshape(len(v), -1) + y @ K.T).reshape(len(v), -1)
    return float((np.abs(y - again).max(axis=1) / np.abs(y).max(axis=1)).max())


def run_implicit_benchmark(quick: bool = False, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every case, every contender; returns the report (rows and the machine)."""
    say = progress or (lambda message: None)
    peers = _peers()
    if "torch" in peers:
        peers["torch"].set_num_threads(usable_cores())
    timing = dict(repeats=1, warmup=1, min_seconds=0.0, rounds=1) if quick else dict(
        repeats=5, warmup=1, min_seconds=0.5, rounds=3
    )  # fmt: skip
    rows: list[ImplicitRow] = []
    cases = [(500, 0.9, False)] if quick else [
        (n, norm, False) for n in (500, 2000) for norm in (0.9, 0.99)
    ] + [(2000, 0.9, True), (2000, 0.99, True)]  # fmt: skip
    batches = (1, 16) if quick else (1, 256)
    dtypes = (np.float32,) if quick else (np.float32, np.float64)
    rng = np.random.default_rng(1)
    for n, norm, signed in cases:
        A, B, b = dense_problem(n, norm, signed)
        for dtype in dtypes if not signed else (np.float32,):
            for batch in batches:
                u = rng.normal(size=(batch, P))
                scale = float(np.abs(_reference(A, B, b, u)).max())
                case = f"dense n={n} ||A||={norm}" + (" signed" if signed else "")
                say(f"implicit bench: {case}, batch {batch}, {np.dtype(dtype).name}")
                contenders = _dense_contenders(A, B, b, u, dtype, peers, scale)
                timed = time_side_by_side(contenders, batch=batch, **timing)
                residuals = {name: dense_residual(A, B, b, u, x) for name, (_, x) in timed.items()}
                rows += _rows(case, batch, np.dtype(dtype).name, timed, residuals)
    if "torch" in peers and importlib.util.find_spec("sklearn") is not None:  # (the estimators need both)
        say("implicit bench: a trained implicit classifier (fitting it)")
        A, B, b, digits = trained_classifier(quick)
        for batch in batches:
            u = digits[:batch]
            scale = float(np.abs(_reference(A, B, b, u)).max())
            contenders = _dense_contenders(A, B, b, u, np.float32, peers, scale)
            timed = time_side_by_side(contenders, batch=batch, **timing)
            residuals = {name: dense_residual(A, B, b, u, x) for name, (_, x) in timed.items()}
            rows += _rows(f"trained classifier n={A.shape[0]}", batch, "float32", timed, residuals)
    say("implicit bench: LeNet-5 feedback loop")
    closed, lenet, K, net = _lenet_loop(peers)
    digits = np.random.default_rng(2).uniform(0, 1, size=(256, 1, 32, 32))
    for batch in batches:
        v = digits[:batch]
        contenders, open_loop = _loop_contenders(closed, lenet, K, net, v, peers)
        timed = time_side_by_side({**contenders, "open-loop predict": open_loop}, batch=batch, **timing)
        open_time = timed.pop("open-loop predict")[0]
        residuals = {name: loop_residual(lenet, K, v, y) for name, (_, y) in timed.items()}
        note = f"one open-loop predict: {open_time.median_seconds * 1e3:.3f} ms; ours / predict = "
        note += f"{timed['ours'][0].median_seconds / open_time.median_seconds:.1f}x"
        rows += _rows("lenet5 feedback loop", batch, "float32", timed, residuals, note)
    machine = asdict(machine_info(0, peers.get("torch")))
    return {"tol": TOL, "peers": sorted(peers), "machine": machine, "rows": [asdict(row) for row in rows]}


def trained_classifier(quick: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, b) of an ImplicitClassifier fitted on the first 1,000 8 x 8 digits (dense, float64)
    and the 797 held-out digits, (797, 64), whose equilibria are solved."""
    from sklearn.datasets import load_digits

    from .training import ImplicitClassifier

    X, labels = load_digits(return_X_y=True)
    states, epochs = (50, 3) if quick else (200, 40)
    with warnings.catch_warnings():  # (quick: stopped at max_epochs, still improving)
        warnings.simplefilter("ignore")
        classifier = ImplicitClassifier(n_states=states, max_epochs=epochs, random_state=0).fit(X[:1000], labels[:1000])
    model = classifier.model_
    return model.A.toarray(), model.B.toarray(), model.bias_x.copy(), X[1000:]


def _reference(A, B, b, u) -> np.ndarray:
    """x* by plain float64 Picard (for the absolute tolerance torchidl takes)."""
    Z = u @ B.T + b
    x = np.zeros_like(Z)
    for _ in range(20_000):
        new = np.maximum(x @ A.T + Z, 0)
        if np.abs(new - x).max() <= 1e-12 * np.abs(new).max():
            return new
        x = new
    return x


def _rows(case, batch, dtype, timed, residuals, note="") -> list[ImplicitRow]:
    ours = timed["ours"][0].median_seconds
    peers = [timing.median_seconds for name, (timing, _) in timed.items() if name not in ("ours", EXPORTED)]
    best = min(peers) if peers else float("nan")
    rows = []
    for name, (timing, _) in timed.items():
        ratio = best / ours if name == "ours" else timing.median_seconds / ours
        milliseconds = (timing.median_seconds * 1e3, timing.min_seconds * 1e3)
        own_note = note if name == "ours" else ""
        rows.append(ImplicitRow(case, batch, dtype, name, *milliseconds, residuals[name], ratio, own_note))
    return rows


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"tolerance {report['tol']:g} (relative); peers installed: {', '.join(report['peers']) or 'none'}",
        "ratio: on a peer's row its time / ours; on our row the best peer's time / ours (> 1: ours faster)",
        "",
        "| case | batch | dtype | engine | median ms | min ms | true residual | ratio | note |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['dtype']} | {r['engine']} | {r['median_ms']:.3f} | {r['min_ms']:.3f} "
            f"| {r['residual']:.1e} | {r['ratio']:.2f} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir, overwrite: bool = False) -> tuple[Path, Path]:
    check_writable(out_dir, overwrite)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = (folder / name for name in REPORT_FILES)
    json_path.write_text(json.dumps(report, indent=2))
    md_path.write_text(format_table(report))
    return json_path, md_path


def check_writable(out_dir, overwrite: bool = False) -> None:
    for name in REPORT_FILES:
        path = Path(out_dir) / name
        if path.exists() and not overwrite:
            raise OverwriteError(f"{path} exists; pass --overwrite to replace it")
