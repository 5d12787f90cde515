"""Train/build the zoo models and export them to ONNX: ``python zoo/export.py [--overwrite]``.

Run from the repository root (or anywhere: the script finds its siblings through its own folder).
It

(a) trains LeNet-5 (``zoo/lenet5.py``) on the training split of scikit-learn's digits upsampled
    to 32x32 (``zoo/data.py``) with torch on CPU, seeded and deterministic, and reports its
    held-out accuracy;
(b) builds ResNet20 (``zoo/resnet20.py``) with seeded random weights and non-trivial BatchNorm
    parameters: gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1), and running mean/variance measured by
    train-mode forward passes over random N(0, 1) images (so activations keep a sane scale through
    the 20 layers), then switches to eval mode;
(c) exports both in eval mode to ``zoo/lenet5.onnx`` and ``zoo/resnet20.onnx`` (input "input",
    output "logits", dynamic batch axis "batch", weights as initializers) with torch's
    torch.export-based ("dynamo") exporter and its onnxscript graph optimizer (constant folding,
    dead-code removal), except that the optimizer's Conv+BatchNormalization fusion is disabled so
    ResNet20 keeps its 19 BatchNormalization nodes;
(d) checks each ONNX file against torch with onnxruntime and computes LeNet-5's held-out accuracy
    through onnxruntime;
(e) writes ``zoo/zoo.json`` describing both models.

Existing .onnx files are never replaced unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ZOO_DIR = Path(__file__).resolve().parent
if str(ZOO_DIR) not in sys.path:
    sys.path.insert(0, str(ZOO_DIR))

import data  # noqa: E402  (zoo/ is a folder of scripts, not a package)

OPSET = 18  # torch's exporter implements opset 18; it cannot down-convert Pad to 17.
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"

LENET_SETTINGS = {
    "optimizer": "Adam",
    "learning_rate": 1e-3,
    "weight_decay": 0.0,
    "batch_size": 32,
    "epochs": 30,
    "loss": "cross-entropy on logits",
    "seed": 0,
    "shuffle": "torch.randperm per epoch with a torch.Generator seeded with `seed`",
    "init": "torch default (seeded with `seed`)",
    "device": "cpu",
    "deterministic": (
        "torch.use_deterministic_algorithms(True); bitwise reproducible for a given machine and thread count"
    ),
}

RESNET_SETTINGS = {
    "seed": 0,
    "conv_linear_init": "kaiming_normal_(nonlinearity='relu'), linear bias torch default",
    "bn_weight": "U(0.5, 1.5)",
    "bn_bias": "N(0, 0.1)",
    "bn_running_stats": (
        "cumulative average (momentum=None) of batch statistics over 8 train-mode forward passes of "
        "64 random N(0, 1) images (3x32x32); then eval()"
    ),
    "calibration_batches": 8,
    "calibration_batch_size": 64,
}

ALLOWED_OPS = {
    "Conv", "BatchNormalization", "Relu", "MaxPool", "Add", "Slice", "Pad", "ReduceMean",
    "GlobalAveragePool", "Flatten", "Reshape", "Gemm", "MatMul",
}  # fmt: skip


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# models


def train_classifier(model, x_train, y_train, settings, log=print, cosine_schedule=False):
    """Seeded, deterministic Adam training with cross-entropy; returns (model in eval mode, seconds).

    Shared by the zoo's classifiers (LeNet-5 here, the LSTM classifier in export_recurrent.py).
    """
    import torch
    import torch.nn.functional as F

    opt = torch.optim.Adam(model.parameters(), lr=settings["learning_rate"], weight_decay=settings["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings["epochs"]) if cosine_schedule else None
    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(settings["seed"])
    bs = settings["batch_size"]
    t0 = time.perf_counter()
    model.train()
    for epoch in range(settings["epochs"]):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), bs):
            idx = perm[i : i + bs]
            opt.zero_grad()
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if sched is not None:
            sched.step()
        if epoch == 0 or (epoch + 1) % 10 == 0:
            log(f"  epoch {epoch + 1:3d}: train loss {total / len(xt):.4f}")
    model.eval()
    return model, time.perf_counter() - t0


def train_lenet5(x_train, y_train, settings, log=print):
    import torch
    from lenet5 import LeNet5

    torch.manual_seed(settings["seed"])
    torch.use_deterministic_algorithms(True)
    return train_classifier(LeNet5(), x_train, y_train, settings, log)


def build_resnet20(settings):
    import torch
    from resnet20 import ResNet20

    torch.manual_seed(settings["seed"])
    model = ResNet20()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average
        model.train()
        for _ in range(settings["calibration_batches"]):
            model(torch.randn(settings["calibration_batch_size"], 3, 32, 32))
    for bn in bns:
        bn.momentum = 0.1  # back to the default; irrelevant in eval mode
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# export


@contextlib.contextmanager
def _without_bn_fusion():
    """Disable onnxscript's Conv+BatchNormalization fusion rule during torch.onnx.export(optimize=True).

    torch's exporter runs ``onnxscript.optimizer.optimize_ir``, whose rewrite pass applies
    ``onnxscript.rewriter._DEFAULT_REWRITE_RULES``; that tuple includes FuseBatchNormIntoConv, which
    would fold every BatchNormalization into the preceding Conv. These are private names (onnxscript
    0.7): if they are missing this does nothing, and main() warns when the graph lost its BN nodes.
    """
    try:
        from onnxscript import rewriter
        from onnxscript.rewriter.rules.common import _fuse_batchnorm
    except ImportError:
        yield
        return
    default = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if default is None:
        yield
        return
    fuse = {id(r) for r in _fuse_batchnorm.rules}
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in default if id(r) not in fuse)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = default


def export_onnx(model, example, path: Path, opset: int = OPSET) -> None:
    """Export `model` (eval mode) with the dynamo exporter, dynamic batch axis, BN kept."""
    import torch

    model.eval()
    batch = torch.export.Dim(BATCH_AXIS)
    onnx_logger = logging.getLogger("torch.onnx")  # silences "torchvision is not installed" notes
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), _without_bn_fusion():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            _export(model, example, path, batch, opset)
    finally:
        onnx_logger.setLevel(level)


def _export(model, example, path: Path, batch, opset: int) -> None:
    import torch

    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        opset_version=opset,
        optimize=True,
        external_data=False,
        verbose=False,
    )


def describe_onnx(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    g = model.graph

    def io(v):
        dims = [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
        return {"name": v.name, "shape": dims, "dtype": dtype}

    counts = collections.Counter(n.op_type for n in g.node)
    return {
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "ir_version": model.ir_version,
        "inputs": [io(v) for v in g.input],
        "outputs": [io(v) for v in g.output],
        "nodes": len(g.node),
        "op_counts": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "initializers": len(g.initializer),
        "initializer_elements": int(sum(int(np.prod(t.dims)) for t in g.initializer)),
        "file_bytes": path.stat().st_size,
        "sha256": _sha256(path),
    }


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def torch_run(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def compare(model, path: Path, xs: list[np.ndarray]) -> float:
    return float(max(np.abs(ort_run(path, x) - torch_run(model, x)).max() for x in xs))


# ---------------------------------------------------------------------------------------------


def output_files(description: str, argv: list[str] | None, names: tuple[str, ...]):
    """The export scripts' command line (--overwrite, --out-dir): the output folder (made) and
    its ``<name>.onnx`` files, or None (said on stderr) when one exists without --overwrite."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--overwrite", action="store_true", help="replace existing .onnx files")
    parser.add_argument("--out-dir", type=Path, default=ZOO_DIR, help="where to write the .onnx files and zoo.json")
    args = parser.parse_args(argv)
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / f"{name}.onnx" for name in names}
    existing = [str(path) for path in files.values() if path.exists()]
    if existing and not args.overwrite:
        print("refusing to overwrite " + ", ".join(existing) + " (pass --overwrite)", file=sys.stderr)
        return None
    return out, files


def main(argv: list[str] | None = None) -> int:
    found = output_files(__doc__.split("\n")[0], argv, ("lenet5", "resnet20"))
    if found is None:
        return 1
    out, files = found

    import torch

    # (a) LeNet-5 ------------------------------------------------------------------------------
    x_train, y_train, x_test, y_test = data.load_digits_32x32()
    print(f"digits: {len(x_train)} train / {len(x_test)} held-out, x {x_train.shape[1:]} float32")
    print("training LeNet-5 ...")
    lenet, train_s = train_lenet5(x_train, y_train, LENET_SETTINGS)
    acc_torch = float((torch_run(lenet, x_test).argmax(1) == y_test).mean())
    acc_train = float((torch_run(lenet, x_train).argmax(1) == y_train).mean())
    print(
        f"LeNet-5: trained in {train_s:.1f} s, train accuracy {acc_train:.4f}, "
        f"held-out accuracy (torch) {acc_torch:.4f}"
    )

    # (b) ResNet20 -----------------------------------------------------------------------------
    resnet = build_resnet20(RESNET_SETTINGS)
    gen = np.random.default_rng(1)
    x_res = gen.standard_normal((64, 3, 32, 32)).astype(np.float32)
    logits = torch_run(resnet, x_res)
    logits_std = float(logits.std())
    bns = [m for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    rm = torch.cat([b.running_mean for b in bns]).numpy()
    rv = torch.cat([b.running_var for b in bns]).numpy()
    print(
        f"ResNet20: logits std {logits_std:.3f}, mean |logit| {np.abs(logits).mean():.3f} on 64 N(0,1) images; "
        f"BN running_mean in [{rm.min():.3f}, {rm.max():.3f}], running_var in [{rv.min():.3f}, {rv.max():.3f}]"
    )
    if not 0.1 <= logits_std <= 100:
        print("ResNet20 logits have an unreasonable scale", file=sys.stderr)
        return 1

    # (c) export -------------------------------------------------------------------------------
    print("exporting ...")
    export_onnx(lenet, torch.from_numpy(x_test[:2]), files["lenet5"])
    export_onnx(resnet, torch.from_numpy(x_res[:2]), files["resnet20"])

    # (d) check --------------------------------------------------------------------------------
    desc = {name: describe_onnx(path) for name, path in files.items()}
    for name, d in desc.items():
        extra = set(d["op_counts"]) - ALLOWED_OPS
        if extra:
            print(f"warning: {name}.onnx contains unexpected ops {sorted(extra)}", file=sys.stderr)
    n_bn = desc["resnet20"]["op_counts"].get("BatchNormalization", 0)
    if n_bn != 19:
        print(f"warning: resnet20.onnx has {n_bn} BatchNormalization nodes (expected 19; fused away?)", file=sys.stderr)

    diff_lenet = compare(lenet, files["lenet5"], [x_test[:1], x_test])
    diff_resnet = compare(resnet, files["resnet20"], [x_res[:1], x_res])
    acc_ort = float((ort_run(files["lenet5"], x_test).argmax(1) == y_test).mean())
    print(f"LeNet-5:  max |torch - onnxruntime| = {diff_lenet:.3g}; held-out accuracy (onnxruntime) {acc_ort:.4f}")
    print(f"ResNet20: max |torch - onnxruntime| = {diff_resnet:.3g}")
    tol = 1e-3
    if max(diff_lenet, diff_resnet) > tol or abs(acc_ort - acc_torch) * len(y_test) > 1:
        print(f"onnxruntime disagrees with torch (tolerance {tol})", file=sys.stderr)
        return 1
    for name, d in desc.items():
        print(f"{name}.onnx: opset {d['opset']}, {d['nodes']} nodes: {d['op_counts']}")

    # (e) zoo.json -----------------------------------------------------------------------------
    def params(m):
        return int(sum(p.numel() for p in m.parameters()))

    exporter = (
        f"torch.onnx.export(dynamo=True, optimize=True, opset_version={OPSET}, external_data=False) "
        "with onnxscript's Conv+BatchNormalization fusion rule disabled; dynamic_shapes={0: Dim('batch')}"
    )
    record = {
        "generated_by": "python zoo/export.py",
        "exporter": exporter,
        "versions": {
            "python": platform.python_version(),
            **{k: _version(k) for k in ("torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime")},
            **{k: _version(k) for k in ("numpy", "scipy", "scikit-learn")},
        },
        "torch_threads": torch.get_num_threads(),
        "models": {
            "lenet5": {
                "file": files["lenet5"].name,
                "source": "zoo/lenet5.py:LeNet5",
                "description": (
                    "LeNet-5 (conv5x5 6 / maxpool / conv5x5 16 / maxpool / fc 120 / fc 84 / fc 10, ReLU), "
                    "trained on sklearn digits upsampled to 32x32"
                ),
                "input": desc["lenet5"]["inputs"][0],
                "output": desc["lenet5"]["outputs"][0],
                "parameters": params(lenet),
                **{k: v for k, v in desc["lenet5"].items() if k not in ("inputs", "outputs")},
                "max_abs_diff_torch_vs_onnxruntime": diff_lenet,
                "dataset": {
                    "loader": "zoo/data.py:load_digits_32x32",
                    "description": data.SPLIT_DESCRIPTION,
                    "train_samples": len(x_train),
                    "test_samples": len(x_test),
                    "input_range": [0.0, 1.0],
                },
                "train_accuracy_torch": acc_train,
                "heldout_accuracy": {"torch": acc_torch, "onnxruntime": acc_ort},
                "heldout_correct": {
                    "torch": int(round(acc_torch * len(y_test))),
                    "onnxruntime": int(round(acc_ort * len(y_test))),
                },
                "training": {**LENET_SETTINGS, "train_seconds": round(train_s, 1)},
            },
            "resnet20": {
                "file": files["resnet20"].name,
                "source": "zoo/resnet20.py:ResNet20",
                "description": (
                    "CIFAR ResNet20 (He et al. 2016), option-A shortcuts, seeded random weights with "
                    "non-trivial BatchNorm"
                ),
                "input": desc["resnet20"]["inputs"][0],
                "output": desc["resnet20"]["outputs"][0],
                "parameters": params(resnet),
                **{k: v for k, v in desc["resnet20"].items() if k not in ("inputs", "outputs")},
                "max_abs_diff_torch_vs_onnxruntime": diff_resnet,
                "weights": RESNET_SETTINGS,
                "logits_std_on_random_inputs": logits_std,
                "bn_running_mean_range": [float(rm.min()), float(rm.max())],
                "bn_running_var_range": [float(rv.min()), float(rv.max())],
            },
        },
    }
    (out / "zoo.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {files['lenet5']}, {files['resnet20']}, {out / 'zoo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
