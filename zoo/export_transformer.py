"""Train and export the zoo's vision transformer: ``python zoo/export_transformer.py [--overwrite]``.

Run from the repository root (or anywhere: the script finds its siblings through its own folder).
It trains ``zoo/vit.py:ViT`` on scikit-learn's digits upsampled to 32x32 (the split of
``zoo/data.py``, as LeNet-5), then exports it twice with a dynamic batch axis:

- ``zoo/vit.onnx``: the torch.export-based exporter (``dynamo=True``, opset 18), as
  ``zoo/export.py`` exports LeNet-5 and ResNet20;
- ``zoo/vit_legacy.onnx``: the legacy TorchScript exporter (``dynamo=False``, opset 14, the
  newest before LayerNormalization became an op), which writes LayerNorm and GELU as their
  decompositions (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div, Div/Erf/Add/Mul/Mul).

Both files are checked against torch through onnxruntime (max |difference| below 1e-4 at batch 1
and on the held-out set, the same held-out accuracy) and recorded in ``zoo/zoo.json`` under
``models.vit`` and ``models.vit_legacy``, keeping the other entries as they are. Existing .onnx
files are never replaced unless ``--overwrite`` is given.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np

ZOO_DIR = Path(__file__).resolve().parent
if str(ZOO_DIR) not in sys.path:
    sys.path.insert(0, str(ZOO_DIR))

import data  # noqa: E402  (zoo/ is a folder of scripts, not a package)
import export  # noqa: E402

LEGACY_OPSET = 14
TOLERANCE = 1e-4
SETTINGS = {
    "optimizer": "Adam",
    "learning_rate": 2e-3,
    "weight_decay": 0.0,
    "batch_size": 32,
    "epochs": 60,
    "lr_schedule": "cosine annealing to 0 over all epochs (torch.optim.lr_scheduler.CosineAnnealingLR, per epoch)",
    "loss": "cross-entropy on logits",
    "seed": 0,
    "device": "cpu",
}


def train_vit(x_train: np.ndarray, y_train: np.ndarray):
    """The ViT trained with ``SETTINGS`` (seeded); returns (model in eval mode, seconds)."""
    import torch
    from vit import ViT

    torch.manual_seed(SETTINGS["seed"])
    return export.train_classifier(ViT(), x_train, y_train, SETTINGS, cosine_schedule=True)


def export_legacy(model, example, path: Path) -> None:
    """The legacy TorchScript exporter, dynamic batch axis, constants folded."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=LEGACY_OPSET,
            input_names=[export.INPUT_NAME],
            output_names=[export.OUTPUT_NAME],
            dynamic_axes={export.INPUT_NAME: {0: export.BATCH_AXIS}, export.OUTPUT_NAME: {0: export.BATCH_AXIS}},
            do_constant_folding=True,
        )


def main(argv: list[str] | None = None) -> int:
    found = export.output_files(__doc__.split("\n")[0], argv, ("vit", "vit_legacy"))
    if found is None:
        return 1
    out, files = found

    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    x_train, y_train, x_test, y_test = data.load_digits_32x32()
    print(f"digits: {len(x_train)} train / {len(x_test)} held-out")
    print("training the ViT ...")
    model, seconds = train_vit(x_train, y_train)
    accuracy_torch = float((export.torch_run(model, x_test).argmax(1) == y_test).mean())
    accuracy_train = float((export.torch_run(model, x_train).argmax(1) == y_train).mean())
    print(
        f"ViT: trained in {seconds:.1f} s, train accuracy {accuracy_train:.4f}, held-out (torch) {accuracy_torch:.4f}"
    )

    example = torch.from_numpy(x_test[:2])
    export.export_onnx(model, example, files["vit"])
    export_legacy(model, example, files["vit_legacy"])

    zoo_json = out / "zoo.json"
    record = json.loads(zoo_json.read_text()) if zoo_json.exists() else {"models": {}}
    parameters = int(sum(p.numel() for p in model.parameters()))
    exporters = {
        "vit": f"torch.onnx.export(dynamo=True, optimize=True, opset_version={export.OPSET}) as zoo/export.py",
        "vit_legacy": f"torch.onnx.export(dynamo=False, opset_version={LEGACY_OPSET}, do_constant_folding=True)",
    }
    for name, path in files.items():
        difference = export.compare(model, path, [x_test[:1], x_test])
        accuracy_ort = float((export.ort_run(path, x_test).argmax(1) == y_test).mean())
        described = export.describe_onnx(path)
        print(f"{path.name}: max |torch - onnxruntime| {difference:.3g}, held-out (onnxruntime) {accuracy_ort:.4f}")
        print(f"  opset {described['opset']}, {described['nodes']} nodes: {described['op_counts']}")
        if difference > TOLERANCE or abs(accuracy_ort - accuracy_torch) * len(y_test) > 1:
            print(f"onnxruntime disagrees with torch on {path.name} (tolerance {TOLERANCE})", file=sys.stderr)
            return 1
        record["models"][name] = {
            "file": path.name,
            "source": "zoo/vit.py:ViT",
            "description": (
                "vision transformer: 8x8 patches (16 tokens of 32), 2 pre-norm encoder layers of 4-head "
                "softmax attention and a GELU MLP, LayerNorm, mean over tokens, linear 32->10; trained on "
                "sklearn digits upsampled to 32x32"
            ),
            "exporter": exporters[name],
            "input": described["inputs"][0],
            "output": described["outputs"][0],
            "parameters": parameters,
            **{k: v for k, v in described.items() if k not in ("inputs", "outputs")},
            "max_abs_diff_torch_vs_onnxruntime": difference,
            "train_accuracy_torch": accuracy_train,
            "heldout_accuracy": {"torch": accuracy_torch, "onnxruntime": accuracy_ort},
            "training": {**SETTINGS, "train_seconds": round(seconds, 1)},
        }
    zoo_json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {', '.join(str(p) for p in files.values())}, {zoo_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
