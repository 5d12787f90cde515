"""Export recurrent (RNN/GRU/LSTM) ONNX models: ``python zoo/export_recurrent.py [--overwrite]``.

Run from the repository root (or anywhere: the script finds its siblings through its own folder).
It

(a) builds small torch modules around ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` with seeded random
    weights (:func:`_fixtures`), exports eight of them with torch's legacy TorchScript exporter
    (``torch.onnx.export(dynamo=False)``, which emits real ONNX RNN/GRU/LSTM nodes surrounded by
    Shape/Gather/Unsqueeze/Concat/ConstantOfShape initial-state subgraphs) and four more (file
    names ``dynamo_*``) with the torch.export-based exporter (``dynamo=True``, which emits ONNX
    GRU/LSTM nodes with other shape subgraphs, and unrolls ``nn.RNN`` into MatMul/Add/Tanh) into
    ``tests/recurrent-models/`` with a dynamic batch axis and a fixed sequence length, checks
    that each graph holds the expected recurrent nodes, compares it with torch through
    onnxruntime at batch sizes 1, 2 and 3 (max abs difference below 1e-5), and writes
    ``tests/recurrent-models/README.md`` describing every graph node by node;
(b) trains the LSTM classifier of ``zoo/lstm_classifier.py`` on scikit-learn's 8x8 digits read
    row by row (the split of ``zoo/data.py``), exports it to ``zoo/lstm_classifier.onnx``
    (input "input" (batch, 8, 8), output "logits" (batch, 10)) with the same legacy exporter,
    checks it with onnxruntime, and adds or replaces its entry ``models.lstm_classifier`` in
    ``zoo/zoo.json``, keeping the other entries as they are.

``--only fixtures`` or ``--only classifier`` does one of the two. Existing .onnx files are never
replaced unless ``--overwrite`` is given.

The classifier uses the legacy exporter, whose LSTM graphs are the common ones in the wild.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import io
import json
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ZOO_DIR = Path(__file__).resolve().parent
REPO_DIR = ZOO_DIR.parent
FIXTURE_DIR = REPO_DIR / "tests" / "recurrent-models"
if str(ZOO_DIR) not in sys.path:
    sys.path.insert(0, str(ZOO_DIR))

import data  # noqa: E402  (zoo/ is a folder of scripts, not a package)
import export  # noqa: E402

OPSET = 17  # legacy exporter
DYNAMO_OPSET = export.OPSET  # 18, as zoo/export.py
INPUT_NAME = "input"
BATCH_AXIS = "batch"
FIXTURE_TOLERANCE = 1e-5
CHECK_BATCHES = (1, 2, 3)
RECURRENT_OPS = ("RNN", "GRU", "LSTM")

CLASSIFIER_SETTINGS = {
    "optimizer": "Adam",
    "learning_rate": 1e-2,
    "weight_decay": 0.0,
    "batch_size": 32,
    "epochs": 40,
    "lr_schedule": "cosine annealing to 0 over all epochs (torch.optim.lr_scheduler.CosineAnnealingLR, per epoch)",
    "loss": "cross-entropy on logits",
    "seed": 0,
    "shuffle": "torch.randperm per epoch with a torch.Generator seeded with `seed`",
    "init": "torch default (seeded with `seed`)",
    "device": "cpu",
    "deterministic": (
        "torch.use_deterministic_algorithms(True); bitwise reproducible for a given machine and thread count"
    ),
}


def _legacy_exporter_call(dynamic_axes: dict) -> str:
    return (
        f"torch.onnx.export(dynamo=False, opset_version={OPSET}, do_constant_folding=True, export_params=True, "
        f"dynamic_axes={dynamic_axes})"
    )


# ---------------------------------------------------------------------------------------------
# data


# ---------------------------------------------------------------------------------------------
# torch modules for the fixtures


def _modules():
    """The fixture module classes (defined lazily so that importing this file needs no torch)."""
    import torch
    from torch import nn

    class SequenceOutput(nn.Module):
        """Returns the recurrent layer's per-step output (seq, batch, dirs * hidden), or batch-first."""

        def __init__(self, rnn: nn.Module):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            return self.rnn(x)[0]

    class SequenceOutputThenLinear(nn.Module):
        """A Linear layer applied to every step of the recurrent output."""

        def __init__(self, rnn: nn.Module, out_features: int):
            super().__init__()
            self.rnn = rnn
            width = rnn.hidden_size * (2 if rnn.bidirectional else 1)
            self.fc = nn.Linear(width, out_features)

        def forward(self, x):
            return self.fc(self.rnn(x)[0])

    class LearnedInitialState(nn.Module):
        """A batch-first LSTM whose initial state is a learned (1, 1, hidden) vector expanded to the batch."""

        def __init__(self, lstm: nn.LSTM):
            super().__init__()
            self.lstm = lstm
            self.h0 = nn.Parameter(torch.empty(1, 1, lstm.hidden_size))
            self.c0 = nn.Parameter(torch.empty(1, 1, lstm.hidden_size))

        def forward(self, x):
            n = x.shape[0]  # batch-first
            h0 = self.h0.expand(1, n, self.lstm.hidden_size).contiguous()
            c0 = self.c0.expand(1, n, self.lstm.hidden_size).contiguous()
            return self.lstm(x, (h0, c0))[0]

    class AllOutputs(nn.Module):
        """Returns the LSTM's output, h_n and c_n."""

        def __init__(self, lstm: nn.LSTM):
            super().__init__()
            self.lstm = lstm

        def forward(self, x):
            y, (h_n, c_n) = self.lstm(x)
            return y, h_n, c_n

    return SequenceOutput, SequenceOutputThenLinear, LearnedInitialState, AllOutputs


@dataclass
class Fixture:
    """One exported test model: how to build it and what its ONNX graph must look like."""

    name: str
    summary: str  # the torch module, in words
    build: Callable  # (classes) -> nn.Module, called after torch.manual_seed(seed)
    seq_len: int
    input_size: int
    batch_first: bool
    outputs: dict[str, int]  # output name -> its batch axis
    recurrent: dict[str, int]  # expected recurrent op counts
    seed: int
    gain: float = 1.0  # recurrent weights ~ N(0, (gain / sqrt(hidden))^2)
    exporter: str = "legacy"  # or "dynamo"

    @property
    def input_shape(self) -> tuple:
        if self.batch_first:
            return (BATCH_AXIS, self.seq_len, self.input_size)
        return (self.seq_len, BATCH_AXIS, self.input_size)

    @property
    def input_layout(self) -> str:
        return "batch-first (batch, seq, feature)" if self.batch_first else "seq-first (seq, batch, feature)"


def _fixtures() -> list[Fixture]:
    from torch import nn

    return [
        Fixture(
            "rnn_tanh",
            "`nn.RNN(4, 5)` (tanh, 1 layer, seq-first); returns the output sequence",
            lambda c: c[0](nn.RNN(4, 5)),
            seq_len=6, input_size=4, batch_first=False, outputs={"output": 1}, recurrent={"RNN": 1}, seed=1,
        ),
        Fixture(
            "rnn_relu_2layer",
            '`nn.RNN(3, 4, num_layers=2, nonlinearity="relu")` (seq-first); returns the output sequence',
            lambda c: c[0](nn.RNN(3, 4, num_layers=2, nonlinearity="relu")),
            seq_len=5, input_size=3, batch_first=False, outputs={"output": 1}, recurrent={"RNN": 2}, seed=2,
            gain=0.9,
        ),
        Fixture(
            "gru",
            "`nn.GRU(4, 6)` (1 layer, seq-first), then `nn.Linear(6, 3)` on every step",
            lambda c: c[1](nn.GRU(4, 6), 3),
            seq_len=7, input_size=4, batch_first=False, outputs={"output": 1}, recurrent={"GRU": 1}, seed=3,
            gain=1.5,
        ),
        Fixture(
            "gru_bidirectional_batch_first",
            "`nn.GRU(5, 4, bidirectional=True, batch_first=True)`; returns the output sequence (batch, seq, 8)",
            lambda c: c[0](nn.GRU(5, 4, bidirectional=True, batch_first=True)),
            seq_len=6, input_size=5, batch_first=True, outputs={"output": 0}, recurrent={"GRU": 1}, seed=4,
            gain=1.5,
        ),
        Fixture(
            "lstm",
            "`nn.LSTM(3, 5)` (1 layer, seq-first); returns the output sequence",
            lambda c: c[0](nn.LSTM(3, 5)),
            seq_len=6, input_size=3, batch_first=False, outputs={"output": 1}, recurrent={"LSTM": 1}, seed=5,
            gain=1.5,
        ),
        Fixture(
            "lstm_2layer_bidirectional",
            "`nn.LSTM(4, 5, num_layers=2, bidirectional=True)` (seq-first), then `nn.Linear(10, 2)` on every step",
            lambda c: c[1](nn.LSTM(4, 5, num_layers=2, bidirectional=True), 2),
            seq_len=5, input_size=4, batch_first=False, outputs={"output": 1}, recurrent={"LSTM": 2}, seed=6,
            gain=1.5,
        ),
        Fixture(
            "lstm_batch_first_with_initial_state",
            "`nn.LSTM(3, 4, batch_first=True)` with learned `nn.Parameter` h0, c0 of shape (1, 1, 4) "
            "expanded to (1, batch, 4); returns the output sequence (batch, seq, 4)",
            lambda c: c[2](nn.LSTM(3, 4, batch_first=True)),
            seq_len=7, input_size=3, batch_first=True, outputs={"output": 0}, recurrent={"LSTM": 1}, seed=7,
            gain=1.5,
        ),
        Fixture(
            "lstm_outputs_all",
            "`nn.LSTM(4, 6)` (1 layer, seq-first); returns output, h_n and c_n",
            lambda c: c[3](nn.LSTM(4, 6)),
            seq_len=5, input_size=4, batch_first=False, outputs={"output": 1, "h_n": 1, "c_n": 1},
            recurrent={"LSTM": 1}, seed=8, gain=1.5,
        ),
        # The same kinds of module through the torch.export-based exporter.
        Fixture(
            "dynamo_rnn_tanh",
            "`nn.RNN(4, 5)` (tanh, 1 layer, seq-first) as `rnn_tanh`; the dynamo exporter unrolls it (no RNN node)",
            lambda c: c[0](nn.RNN(4, 5)),
            seq_len=6, input_size=4, batch_first=False, outputs={"output": 1}, recurrent={}, seed=1,
            exporter="dynamo",
        ),
        Fixture(
            "dynamo_gru_bidirectional_batch_first",
            "`nn.GRU(5, 4, bidirectional=True, batch_first=True)` as `gru_bidirectional_batch_first`",
            lambda c: c[0](nn.GRU(5, 4, bidirectional=True, batch_first=True)),
            seq_len=6, input_size=5, batch_first=True, outputs={"output": 0}, recurrent={"GRU": 1}, seed=4,
            gain=1.5, exporter="dynamo",
        ),
        Fixture(
            "dynamo_lstm_2layer_bidirectional_batch_first",
            "`nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)`, then `nn.Linear(8, 3)` on every step",
            lambda c: c[1](nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True), 3),
            seq_len=5, input_size=3, batch_first=True, outputs={"output": 0}, recurrent={"LSTM": 2}, seed=9,
            gain=1.5, exporter="dynamo",
        ),
        Fixture(
            "dynamo_lstm_outputs_all",
            "`nn.LSTM(4, 6)` (1 layer, seq-first) as `lstm_outputs_all`; returns output, h_n and c_n",
            lambda c: c[3](nn.LSTM(4, 6)),
            seq_len=5, input_size=4, batch_first=False, outputs={"output": 1, "h_n": 1, "c_n": 1},
            recurrent={"LSTM": 1}, seed=8, gain=1.5, exporter="dynamo",
        ),
    ]  # fmt: skip


def build_fixture(fixture: Fixture):
    """The seeded module in eval mode: recurrent weights N(0, gain^2 / hidden), biases N(0, 0.2^2)."""
    import torch
    from torch import nn

    torch.manual_seed(fixture.seed)
    model = fixture.build(_modules())
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.RNN, nn.GRU, nn.LSTM)):
                std = fixture.gain / module.hidden_size**0.5
                for pname, p in module.named_parameters():
                    if pname.startswith("weight"):
                        p.normal_(0.0, std)
                    else:
                        p.normal_(0.0, 0.2)
        for pname, p in model.named_parameters():
            if pname in ("h0", "c0"):
                p.normal_(0.0, 0.5)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# export and checks


def _check_legacy_exporter() -> None:
    import torch

    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise RuntimeError(
            f"torch {torch.__version__}: torch.onnx.export has no `dynamo` argument; this script needs the legacy "
            "TorchScript exporter (dynamo=False), which emits ONNX RNN/GRU/LSTM nodes"
        )


@contextlib.contextmanager
def _quiet_export():
    """Silence the legacy exporter's deprecation note and its LSTM batch-size warning.

    The warning ("Exporting a model to ONNX with a batch_size other than 1 ... with LSTM can cause
    an error ...") is about initial states baked in as constants; here they are computed from the
    input's shape (or expanded to it), and every model is checked at several batch sizes. The
    dynamo exporter's note that ``_flat_weights`` "were assigned during export" is harmless (the
    weights end up as initializers).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*were assigned during export.*", category=UserWarning)
        yield


def export_legacy(model, example, path: Path, output_names: list[str], dynamic_axes: dict) -> None:
    import torch

    with _quiet_export():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            export_params=True,
        )


def export_dynamo(model, example, path: Path, output_names: list[str], batch_axis: int) -> None:
    """torch.export-based exporter as zoo/export.py uses it (optimize=True), batch axis dynamic."""
    import torch

    onnx_logger = logging.getLogger("torch.onnx")  # silences "torchvision is not installed" notes
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with _quiet_export(), contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=output_names,
                dynamic_shapes=({batch_axis: torch.export.Dim(BATCH_AXIS)},),
                opset_version=DYNAMO_OPSET,
                optimize=True,
                external_data=False,
                verbose=False,
            )
    finally:
        onnx_logger.setLevel(level)


def torch_outputs(model, x: np.ndarray) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(x))
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]


def ort_outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {INPUT_NAME: x})


def fixture_input(fixture: Fixture, batch: int, rng: np.random.Generator) -> np.ndarray:
    shape = tuple(batch if d == BATCH_AXIS else d for d in fixture.input_shape)
    return rng.standard_normal(shape).astype(np.float32)


def _attr_value(attr):
    import onnx

    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    if isinstance(value, onnx.TensorProto):
        arr = onnx.numpy_helper.to_array(value)
        if arr.size <= 8:
            return f"tensor {arr.dtype.name} {list(arr.shape)} = {arr.tolist()}"
        return f"tensor {arr.dtype.name} {list(arr.shape)}"
    return value


def node_attributes(node) -> dict:
    return {a.name: _attr_value(a) for a in node.attribute}


def graph_summary(path: Path) -> dict:
    """Op counts, recurrent-node attributes, a node listing and the graph inputs/outputs."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    g = model.graph
    inits = {t.name: t for t in g.initializer}

    def io(v):
        dims = [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
        return {
            "name": v.name,
            "shape": dims,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
        }

    def operand(name):
        if not name:
            return "''"
        if name in inits:
            arr = onnx.numpy_helper.to_array(inits[name])
            if arr.size <= 8 and arr.dtype.kind in "iu":
                return f"{name}={arr.tolist()}"
            return f"{name}{list(arr.shape)}"
        return name

    listing, recurrent = [], []
    for node in g.node:
        attrs = node_attributes(node)
        ins = ", ".join(operand(n) for n in node.input)
        text = f"{', '.join(node.output)} = {node.op_type}({ins})"
        if attrs:
            text += "  " + ", ".join(f"{k}={v}" for k, v in attrs.items())
        listing.append(text)
        if node.op_type in RECURRENT_OPS:
            recurrent.append(
                {
                    "op": node.op_type,
                    "name": node.name,
                    "attributes": attrs,
                    "inputs": [operand(n) for n in node.input],
                    "outputs": list(node.output),
                }
            )
    counts = collections.Counter(n.op_type for n in g.node)
    return {
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}",
        "inputs": [io(v) for v in g.input],
        "outputs": [io(v) for v in g.output],
        "op_counts": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "nodes": len(g.node),
        "initializers": {name: list(t.dims) for name, t in inits.items()},
        "recurrent": recurrent,
        "listing": listing,
        "sha256": export._sha256(path),
    }


def export_fixtures(out: Path, log=print) -> list[dict]:
    """Build, export and check every fixture; return one record per fixture (raises on a failed check)."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    records = []
    for fixture in _fixtures():
        model = build_fixture(fixture)
        path = out / f"{fixture.name}.onnx"
        rng = np.random.default_rng(100 + fixture.seed)
        example = fixture_input(fixture, 2, rng)
        batch_axis = 1 - int(fixture.batch_first)
        dynamic_axes = {INPUT_NAME: {batch_axis: BATCH_AXIS}}
        dynamic_axes.update({name: {axis: BATCH_AXIS} for name, axis in fixture.outputs.items()})
        if fixture.exporter == "dynamo":
            export_dynamo(model, torch.from_numpy(example), path, list(fixture.outputs), batch_axis)
        else:
            export_legacy(model, torch.from_numpy(example), path, list(fixture.outputs), dynamic_axes)
        summary = graph_summary(path)
        got = {op: summary["op_counts"].get(op, 0) for op in RECURRENT_OPS}
        want = {op: fixture.recurrent.get(op, 0) for op in RECURRENT_OPS}
        if got != want:
            raise RuntimeError(f"{path.name}: recurrent nodes {got}, expected {want}: {summary['op_counts']}")
        diffs, stats = {}, []
        for batch in CHECK_BATCHES:
            x = fixture_input(fixture, batch, rng)
            ref, res = torch_outputs(model, x), ort_outputs(path, x)
            if [r.shape for r in ref] != [r.shape for r in res]:
                raise RuntimeError(f"{path.name}: shapes differ at batch {batch}: torch {ref}, onnxruntime {res}")
            diffs[batch] = float(max(np.abs(a - b).max() for a, b in zip(ref, res)))
            stats.append(ref[0])
        diff = max(diffs.values())
        if diff >= FIXTURE_TOLERANCE:
            raise RuntimeError(f"{path.name}: max |torch - onnxruntime| = {diff:.3g} >= {FIXTURE_TOLERANCE}")
        first = np.concatenate([s.ravel() for s in stats])
        record = {
            "fixture": fixture,
            "module": repr(model),
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "dynamic_axes": dynamic_axes,
            "max_abs_diff": diff,
            "max_abs_diff_per_batch": diffs,
            "output_std": float(first.std()),
            "output_max_abs": float(np.abs(first).max()),
            **summary,
        }
        log(
            f"{path.name}: {summary['nodes']} nodes {summary['op_counts']}; max |torch - onnxruntime| {diff:.2g} "
            f"(batch {', '.join(map(str, CHECK_BATCHES))}); first output std {record['output_std']:.3f}, "
            f"max |.| {record['output_max_abs']:.3f}"
        )
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------
# README for the fixtures


def _shape(dims) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"


def fixtures_readme(records: list[dict], versions: dict) -> str:
    def recurrent_text(r):
        nodes = [f"{n['op']}({', '.join(f'{k}={v}' for k, v in n['attributes'].items())})" for n in r["recurrent"]]
        return ", ".join(nodes) if nodes else "none (unrolled)"

    lines = [
        "# Recurrent models",
        "",
        "Small torch models around `nn.RNN`, `nn.GRU` and `nn.LSTM` with seeded random weights, exported to",
        "ONNX so that the graphs contain real ONNX `RNN`/`GRU`/`LSTM` nodes together with the shape subgraphs",
        "the exporters write around them. Generated, with this README, by",
        "`python zoo/export_recurrent.py --only fixtures --overwrite` (run from the repository root); do not",
        "edit by hand.",
        "",
        "- Exporters: `legacy` is torch's TorchScript exporter,",
        f"  `torch.onnx.export(dynamo=False, opset_version={OPSET}, do_constant_folding=True)` with",
        "  `dynamic_axes` marking the batch axis `batch` on the input and every output; `dynamo` (files",
        "  `dynamo_*`) is the torch.export-based exporter as `zoo/export.py` uses it,",
        f"  `torch.onnx.export(dynamo=True, opset_version={DYNAMO_OPSET}, optimize=True)` with",
        "  `dynamic_shapes` marking the input's batch axis `Dim('batch')`. Input name `input`; output names",
        "  below. The sequence length is fixed; the batch axis is dynamic.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".",
        "- Weights: `torch.manual_seed(seed)`, then every recurrent weight matrix ~ N(0, (gain / sqrt(hidden))^2),",
        "  every recurrent bias (torch's `bias_ih` and `bias_hh`, ONNX's `Wb` and `Rb`) ~ N(0, 0.2^2); Linear",
        "  layers keep torch's default init; the learned initial state of `lstm_batch_first_with_initial_state`",
        "  ~ N(0, 0.5^2). All biases are non-zero, so `Wb` and `Rb` both matter (in the GRUs, `Rb` of the",
        "  hidden gate acts inside the reset product: `linear_before_reset=1`).",
        "- Check: onnxruntime (CPU) against torch on N(0, 1) inputs at batch sizes "
        + ", ".join(map(str, CHECK_BATCHES))
        + f", every output; max abs difference below {FIXTURE_TOLERANCE:g}.",
        "- ONNX's gate order differs from torch's and both exporters reorder the weights: LSTM `W`/`R`/`B`",
        "  rows are i, o, f, c (torch: i, f, g, o); GRU rows are z, r, h (torch: r, z, n). The reordering is",
        "  folded into the initializers. No peephole weights (`P`), no `sequence_lens`, no `clip`.",
        "",
        "| file | exporter | torch module | input `input` | outputs | recurrent nodes | max abs diff |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        f = r["fixture"]
        outs = ", ".join(f"`{o['name']}` {_shape(o['shape'])}" for o in r["outputs"])
        lines.append(
            f"| `{f.name}.onnx` | {f.exporter} | {f.summary} | {_shape(f.input_shape)} "
            f"{f.input_layout.split(' (')[0]} | {outs} | {recurrent_text(r)} | {r['max_abs_diff']:.1g} |"
        )
    lines += [
        "",
        "What the legacy exporter writes around the recurrent nodes (details per model below):",
        "",
        "- Zero initial states: `Shape(input)` -> `Gather(axis=0)` of the batch axis (a scalar index",
        "  `Constant`) -> `Unsqueeze` (axes input `[0]`) -> `Concat(axis=0)` with constants",
        "  `[layers * directions]` and `[hidden]` -> `ConstantOfShape` (float 0), fed to `initial_h` (and",
        "  `initial_c`, the same tensor). With two layers each layer's part is `Slice`d (axes `[0]`) out of",
        "  that one zero tensor.",
        "- A learned initial state expanded to the batch is `Expand(h0, shape)` whose shape comes from",
        "  `Shape`/`Gather`/`Unsqueeze`/`Concat` plus `Reshape`/`Shape`/`ConstantOfShape`(int64 1)/`Mul`/",
        "  `Equal`/`Where` (torch's `expand` semantics for -1 sizes); `h0`, `c0` are initializers.",
        "- No `direction` attribute for one direction (default forward), no `layout` (0), `activations`",
        "  only on RNN (`['Tanh']` or `['Relu']`), `linear_before_reset=1` on GRU. Unused `Y_h`/`Y_c`",
        "  outputs are still named.",
        "- Batch-first modules become `Transpose(perm=[1, 0, 2])` before the recurrent node and after",
        "  it; the exporter never uses ONNX's `layout=1`.",
        "- The recurrent node's `Y` is (seq, num_directions, batch, hidden): `Squeeze` (axes input `[1]`)",
        "  for one direction; for two, `Transpose(perm=[0, 2, 1, 3])` + `Reshape` to `[0, 0, -1]`",
        "  (`allowzero=0`), i.e. (seq, batch, 2 * hidden).",
        "- Constants are `Constant` nodes, weights initializers; a Linear on a 3-D tensor is `MatMul` (with",
        "  the transposed weight as initializer) + `Add`.",
        "",
        "What the dynamo exporter writes:",
        "",
        "- `nn.RNN` is unrolled into per-step `Slice`/`Squeeze`/`MatMul`/`Add`/`Tanh`/`Unsqueeze`/`Concat`:",
        "  no RNN node. GRU and LSTM become ONNX `GRU`/`LSTM` nodes with every attribute written",
        "  (`direction`, `layout=0`, `input_forget=0` on LSTM, `linear_before_reset=1` on GRU), and only",
        "  the outputs that are used (`Y` alone when the states are not returned).",
        "- Zero initial states: `Shape(input, start, end)` (the batch dimension only) -> `Concat` with",
        "  initializers -> `Expand` of a scalar 0 initializer -> `Slice` per layer (even with one layer).",
        "- Batch-first is `Transpose` before and after, as in the legacy export. For two directions `Y` goes",
        "  through `Transpose(perm=[0, 2, 1, 3])` and a `Reshape` whose shape is computed at run time",
        "  (`Shape` -> four `Slice`s -> `Mul` of the last two -> `Reshape([-1])` -> `Concat`); for one",
        "  direction a `Transpose` + `Reshape` to a constant shape with `allowzero=1`.",
        "- Constants are initializers (no `Constant` nodes); graph outputs that come straight from the",
        "  recurrent node (`h_n`, `c_n`) are its outputs.",
        "",
    ]
    for r in records:
        f = r["fixture"]
        lines += [
            f"## `{f.name}.onnx`",
            "",
            f"{f.summary}; {f.exporter} exporter; seed {f.seed}, recurrent weight gain {f.gain:g}; "
            f"{r['parameters']} parameters.",
            "",
            f"- Input `input`: {_shape(f.input_shape)}, {f.input_layout}, float32; sequence length {f.seq_len}.",
            "- Outputs: " + ", ".join(f"`{o['name']}` {_shape(o['shape'])}" for o in r["outputs"]) + ".",
            f"- Graph: opset {r['opset']}, IR {r['ir_version']}, producer {r['producer']}, {r['nodes']} nodes, "
            f"{len(r['initializers'])} initializers; sha256 `{r['sha256']}`.",
            "- Op counts: " + ", ".join(f"{op} {n}" for op, n in r["op_counts"].items()) + ".",
            f"- max abs difference torch vs onnxruntime: {r['max_abs_diff']:.2g}; first output on N(0, 1) inputs: "
            f"std {r['output_std']:.3f}, max abs value {r['output_max_abs']:.3f}.",
        ]
        for n in r["recurrent"]:
            attrs = ", ".join(f"`{k}={v}`" for k, v in n["attributes"].items())
            lines.append(f"- `{n['op']}` node `{n['name']}`: {attrs}; inputs {', '.join(n['inputs'])}.")
        lines += ["", "```text", *r["listing"], "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the zoo's LSTM classifier


def train_lstm_classifier(x_train, y_train, settings, log=print):
    import torch
    from lstm_classifier import LSTMClassifier

    torch.manual_seed(settings["seed"])
    torch.use_deterministic_algorithms(True)
    return export.train_classifier(LSTMClassifier(), x_train, y_train, settings, log, cosine_schedule=True)


def export_classifier(path: Path, zoo_json: Path, log=print) -> dict:
    import torch

    x_train, y_train, x_test, y_test = data.load_digits_8x8()
    # The split must be data.py's: same held-out images in the same order.
    _, _, x_test32, y_test32 = data.load_digits_32x32()
    upsampled = data.upsample(x_test.astype(np.float64)).astype(np.float32)
    if not (np.array_equal(y_test, y_test32) and np.allclose(upsampled, x_test32[:, 0], atol=1e-6)):
        raise RuntimeError("the 8x8 split differs from zoo/data.py's")
    log(f"digits 8x8: {len(x_train)} train / {len(x_test)} held-out, x {x_train.shape[1:]} float32 (rows = steps)")
    log("training the LSTM classifier ...")
    model, train_s = train_lstm_classifier(x_train, y_train, CLASSIFIER_SETTINGS, log)

    def predict(x):
        return torch_outputs(model, x)[0]

    acc_torch = float((predict(x_test).argmax(1) == y_test).mean())
    acc_train = float((predict(x_train).argmax(1) == y_train).mean())
    log(
        f"LSTM classifier: trained in {train_s:.1f} s, train accuracy {acc_train:.4f}, "
        f"held-out accuracy (torch) {acc_torch:.4f}"
    )

    dynamic_axes = {INPUT_NAME: {0: BATCH_AXIS}, export.OUTPUT_NAME: {0: BATCH_AXIS}}
    export_legacy(model, torch.from_numpy(x_test[:2]), path, [export.OUTPUT_NAME], dynamic_axes)
    desc = export.describe_onnx(path)
    summary = graph_summary(path)
    if summary["op_counts"].get("LSTM", 0) != 1:
        raise RuntimeError(f"{path.name}: expected one LSTM node, got {summary['op_counts']}")
    logits_ort = ort_outputs(path, x_test)[0]
    diff = float(
        max(
            np.abs(logits_ort - predict(x_test)).max(),
            np.abs(ort_outputs(path, x_test[:1])[0] - predict(x_test[:1])).max(),
        )
    )
    acc_ort = float((logits_ort.argmax(1) == y_test).mean())
    log(f"LSTM classifier: max |torch - onnxruntime| = {diff:.3g}; held-out accuracy (onnxruntime) {acc_ort:.4f}")
    log(f"{path.name}: opset {desc['opset']}, {desc['nodes']} nodes: {desc['op_counts']}")
    if diff > 1e-3 or abs(acc_ort - acc_torch) * len(y_test) > 1:
        raise RuntimeError("onnxruntime disagrees with torch (tolerance 1e-3)")
    for n in summary["recurrent"]:
        log(f"  {n['op']} {n['attributes']}")

    entry = {
        "file": path.name,
        "source": "zoo/lstm_classifier.py:LSTMClassifier",
        "description": (
            "LSTM(8 -> 16, 1 layer, batch_first) over the 8 rows of an 8x8 digit as a length-8 sequence of 8 "
            "features, then Linear(16 -> 10) on the last hidden state; trained on sklearn digits"
        ),
        "generated_by": "python zoo/export_recurrent.py --only classifier",
        "exporter": _legacy_exporter_call(dynamic_axes),
        "input": desc["inputs"][0],
        "output": desc["outputs"][0],
        "parameters": int(sum(p.numel() for p in model.parameters())),
        **{k: v for k, v in desc.items() if k not in ("inputs", "outputs")},
        "recurrent_nodes": [{"op": n["op"], "attributes": n["attributes"]} for n in summary["recurrent"]],
        "max_abs_diff_torch_vs_onnxruntime": diff,
        "dataset": {
            "loader": "zoo/data.py:load_digits_8x8",
            "description": (
                "sklearn.datasets.load_digits (1797 8x8 images, pixels/16 -> [0, 1], no upsampling; rows are the "
                "time steps, columns the features); sklearn.model_selection.train_test_split(test_size=0.25, "
                "random_state=0, stratify=labels), the same split and order as zoo/data.py:load_digits_32x32"
            ),
            "train_samples": len(x_train),
            "test_samples": len(x_test),
            "input_range": [0.0, 1.0],
        },
        "train_accuracy_torch": acc_train,
        "heldout_accuracy": {"torch": acc_torch, "onnxruntime": acc_ort},
        "heldout_correct": {
            "torch": int((predict(x_test).argmax(1) == y_test).sum()),
            "onnxruntime": int((logits_ort.argmax(1) == y_test).sum()),
        },
        "training": {
            **CLASSIFIER_SETTINGS,
            "train_seconds": round(train_s, 1),
            "torch_threads": torch.get_num_threads(),
        },
    }
    record = json.loads(zoo_json.read_text()) if zoo_json.exists() else {"models": {}}
    record.setdefault("models", {})["lstm_classifier"] = entry
    zoo_json.write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {path}, updated {zoo_json} (models.lstm_classifier)")
    return entry


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--overwrite", action="store_true", help="replace existing .onnx files")
    parser.add_argument("--only", choices=("fixtures", "classifier"), help="do only one of the two parts")
    args = parser.parse_args(argv)

    do_fixtures = args.only in (None, "fixtures")
    do_classifier = args.only in (None, "classifier")
    targets = []
    if do_fixtures:
        targets += [FIXTURE_DIR / f"{f.name}.onnx" for f in _fixtures()]
    classifier_path = ZOO_DIR / "lstm_classifier.onnx"
    if do_classifier:
        targets.append(classifier_path)
    existing = [str(p) for p in targets if p.exists()]
    if existing and not args.overwrite:
        print("refusing to overwrite " + ", ".join(existing) + " (pass --overwrite)", file=sys.stderr)
        return 1

    import torch

    _check_legacy_exporter()
    versions = {k: export._version(k) for k in ("torch", "onnx", "onnxscript", "onnxruntime")}
    try:
        if do_fixtures:
            records = export_fixtures(FIXTURE_DIR)
            versions_threads = {**versions, "torch threads": str(torch.get_num_threads())}
            (FIXTURE_DIR / "README.md").write_text(fixtures_readme(records, versions_threads) + "\n")
            print(f"wrote {len(records)} models and README.md to {FIXTURE_DIR}")
        if do_classifier:
            export_classifier(classifier_path, ZOO_DIR / "zoo.json")
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
