"""ic.from_torch: torch modules exported in memory by both exporters, compiled, and checked against
the torch module's own output (an independent reference: torch runs the network, we run A, B, C, D).

float32: |ours - torch| <= 1e-4 |torch| + 1e-5 max(1, |torch|_inf) (verify's float32 criterion);
float64 (module.double(), dtype=np.float64): 1e-9 relative to max(1, |torch|_inf). Each export
runs in an empty folder with an empty temporary folder, both asserted to stay empty (but for
torch's own cache folder). The dynamo
exporter takes about a second per model: the exports are made once per module (``compiled``).
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import implicit_compiler as ic
from implicit_compiler import (
    ArgumentTypeError,
    ArgumentValueError,
    ImplicitCompilerError,
    ImplicitModel,
    MissingDependencyError,
    TorchExportError,
    UnsupportedOpError,
)

ROOT = Path(__file__).resolve().parents[1]
EXPORTERS = ("legacy", "dynamo")
FLOAT32_RTOL, FLOAT32_ATOL, FLOAT64_RTOL = 1e-4, 1e-5, 1e-9


# ------------------------------------------------------------------------------ architectures
class BasicBlock(nn.Module):
    """ResNet's basic block: conv-BN-relu-conv-BN, plus the identity, relu."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.block = BasicBlock(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, image):
        return self.fc(torch.flatten(self.block(self.pool(torch.relu(self.stem(image)))), 1))


class Recurrent(nn.Module):
    """A GRU feeding an LSTM (batch first), the last step read by a linear layer."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 5, batch_first=True)
        self.lstm = nn.LSTM(5, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, sequence):
        hidden, _ = self.gru(sequence)
        hidden, _ = self.lstm(hidden)
        return self.fc(hidden[:, -1])


class TinyEncoder(nn.Module):
    """One transformer encoder layer (self-attention, LayerNorm, GELU feed-forward), mean-pooled."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="gelu", batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, tokens):
        return self.fc(self.layer(tokens).mean(dim=1))


def _mlp():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _with_trained_batchnorm(module):
    """BatchNorm statistics and affine weights away from 0 / 1, so that eval mode matters."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)
    return module


# name -> (builder, per-sample input shape, input name: forward's argument)
ARCHITECTURES = {
    "mlp": (_mlp, (4,), "input"),
    "resnet_block": (lambda: _with_trained_batchnorm(SmallResNet()), (1, 8, 8), "image"),
    "gru_lstm": (Recurrent, (4, 3), "sequence"),
    "transformer_encoder": (TinyEncoder, (3, 8), "tokens"),
}


def build(name: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return ARCHITECTURES[name][0]().to(dtype).eval()


@contextlib.contextmanager
def empty_folders(folder: Path):
    """Run in ``folder`` (empty), with an empty temporary folder; both must stay empty."""
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / "tmp"
    scratch.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setattr(tempfile, "tempdir", str(scratch))
        yield
    assert sorted(os.listdir(folder)) == ["tmp"], "from_torch wrote into the current directory"
    # torch.export keeps its own cache folder there (torchinductor_<user>, as under /tmp): not an export
    left = [name for name in os.listdir(scratch) if not name.startswith("torchinductor_")]
    assert left == [], "from_torch left files in the temporary folder"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """compiled(name, exporter, float64) -> (torch module, ImplicitModel), exported once per module."""
    cache: dict = {}

    def compile_(name: str, exporter: str, float64: bool):
        key = (name, exporter, float64)
        if key not in cache:
            torch_dtype, dtype = (torch.float64, np.float64) if float64 else (torch.float32, np.float32)
            module = build(name, torch_dtype)
            example = torch.randn(2, *ARCHITECTURES[name][1], dtype=torch_dtype)
            with empty_folders(tmp_path_factory.mktemp("export")):
                cache[key] = module, ic.from_torch(module, example, exporter=exporter, dtype=dtype)
        return cache[key]

    return compile_


def torch_output(module: nn.Module, u: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(u)).numpy()


def assert_matches_torch(model: ImplicitModel, module: nn.Module, u: np.ndarray) -> None:
    expected = torch_output(module, u)
    got = model.predict(u)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    scale = max(1.0, float(np.abs(expected).max()))
    if expected.dtype == np.float32:
        bound = FLOAT32_RTOL * np.abs(expected) + FLOAT32_ATOL * scale
        assert np.all(np.abs(got - expected) <= bound), float(np.max(np.abs(got - expected) - bound))
    else:
        error = float(np.max(np.abs(got - expected))) / scale
        assert error <= FLOAT64_RTOL, error


# ---------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("float64", [False, True], ids=["float32", "float64"])
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_predict_matches_the_torch_module(compiled, name, exporter, float64):
    """Exported at batch 2, the model takes a batch of 5 and a single sample (dynamic batch axis)."""
    module, model = compiled(name, exporter, float64)
    dtype = np.float64 if float64 else np.float32
    assert model.dtype == dtype and model.n > 0
    assert [spec.name for spec in model.inputs] == [ARCHITECTURES[name][2]]
    assert [spec.name for spec in model.outputs] == ["output"]
    u = np.random.default_rng(1).normal(size=(5, *ARCHITECTURES[name][1])).astype(dtype)
    assert_matches_torch(model, module, u)
    assert_matches_torch(model, module, u[:1])


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Linear(3, 4), nn.Linear(2, 4)

    def forward(self, a, b):
        mixed = torch.tanh(self.left(a) + self.right(b))
        return mixed, torch.relu(mixed - a.sum(dim=1, keepdim=True))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_tuple_of_inputs_and_outputs_takes_forwards_argument_names(exporter, tmp_path):
    torch.manual_seed(0)
    module = TwoInTwoOut().double()
    with empty_folders(tmp_path):
        model = ic.from_torch(module, (torch.randn(2, 3).double(), torch.randn(2, 2).double()), exporter=exporter)
    assert [spec.name for spec in model.inputs] == ["a", "b"]
    assert [spec.name for spec in model.outputs] == ["output_0", "output_1"]
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
    got = model.predict({"a": a, "b": b})
    with torch.no_grad():
        expected = module(torch.from_numpy(a), torch.from_numpy(b))
    for name, value in zip(("output_0", "output_1"), expected):
        np.testing.assert_allclose(got[name], value.numpy(), rtol=0, atol=1e-12)


def test_names_given_replace_the_defaults(tmp_path):
    module = TwoInTwoOut()
    with empty_folders(tmp_path):
        model = ic.from_torch(
            module, (torch.randn(2, 3), torch.randn(2, 2)), exporter="legacy", input_names=["u", "v"],
            output_names=["y", "z"],
        )  # fmt: skip
    assert [spec.name for spec in model.inputs] == ["u", "v"] and [spec.name for spec in model.outputs] == ["y", "z"]


class SequenceFirstGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 5)  # (seq, batch, features)

    def forward(self, x):
        return self.gru(x)[0]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_batch_axis_1_exports_a_sequence_first_rnn_whose_model_takes_the_batch_first(exporter, tmp_path):
    torch.manual_seed(0)
    module = SequenceFirstGRU().double()
    with empty_folders(tmp_path):
        model = ic.from_torch(module, torch.randn(4, 2, 3).double(), exporter=exporter, batch_axis=1)
    assert model.inputs[0].shape == (4, 3) and model.outputs[0].shape == (4, 5)
    u = np.random.default_rng(5).normal(size=(4, 6, 3))  # 6 sequences, sequence first
    expected = torch_output(module, u).transpose(1, 0, 2)
    np.testing.assert_allclose(model.predict(u.transpose(1, 0, 2)), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------- eval mode
class Regularized(nn.Module):
    """Dropout and BatchNorm: in train mode its output is random and uses batch statistics."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Sequential(nn.Linear(6, 2), nn.Dropout(0.5))

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.bn(self.fc(x)))))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_module_in_train_mode_is_exported_in_eval_mode_and_its_modes_restored(exporter, tmp_path):
    torch.manual_seed(0)
    module = Regularized().double()
    module.bn.running_mean.uniform_(-0.5, 0.5)
    module.bn.running_var.uniform_(0.5, 2.0)
    module.train()
    module.head.eval()  # a submodule in its own mode: restored as it was, not to the parent's
    modes = {name: sub.training for name, sub in module.named_modules()}
    with empty_folders(tmp_path):
        model = ic.from_torch(module, torch.randn(3, 4).double(), exporter=exporter)
    assert {name: sub.training for name, sub in module.named_modules()} == modes
    assert module.training and not module.head.training
    u = np.random.default_rng(3).normal(size=(5, 4))
    assert_matches_torch(model, copy.deepcopy(module).eval(), u)


def test_modes_are_restored_when_the_export_fails():
    module = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)).train()
    with pytest.raises(TorchExportError):
        ic.from_torch(module, torch.randn(2, 4), exporter="legacy")
    assert all(sub.training for sub in module.modules())


# ------------------------------------------------------------------------------------ errors
class DataDependentBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        if x.sum() > 0:  # a Python branch on the input's values: torch.export cannot trace it
            return self.fc(x)
        return -self.fc(x)


def test_an_export_failure_of_the_dynamo_exporter_is_a_torch_export_error(tmp_path):
    with empty_folders(tmp_path), pytest.raises(TorchExportError) as caught:
        ic.from_torch(DataDependentBranch(), torch.randn(2, 3), exporter="dynamo")
    error = caught.value
    message = str(error)
    assert "torch.onnx.export (dynamo exporter) failed on DataDependentBranch, before any lowering" in message
    assert "data-dependent" in message and "exporter='legacy'" in message
    assert not re.search(r"\x1b\[", message)  # the exporter's colours are not copied
    assert isinstance(error, ImplicitCompilerError) and isinstance(error, RuntimeError)
    assert not isinstance(error, (UnsupportedOpError, NotImplementedError, ValueError))
    assert error.__cause__ is not None  # torch's own error, chained


def test_the_legacy_exporter_still_warns_of_a_branch_traced_as_a_constant():
    """torch's TracerWarnings on its own shape checks are silenced, not those on the module's code."""
    with pytest.warns(torch.jit.TracerWarning, match="Converting a tensor to a Python boolean") as caught:
        ic.from_torch(DataDependentBranch(), torch.randn(2, 3), exporter="legacy")
    assert any(Path(w.filename).resolve() == Path(__file__).resolve() for w in caught)


def test_an_export_failure_of_the_legacy_exporter_names_it():
    with pytest.raises(TorchExportError, match=r"\(legacy exporter\) failed on Linear.*mat1 and mat2") as caught:
        ic.from_torch(nn.Linear(3, 2), torch.randn(2, 4), exporter="legacy")  # the wrong input width
    assert isinstance(caught.value.__cause__, RuntimeError)


class ArgMaxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return torch.argmax(self.fc(x), dim=1)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_an_op_without_lowering_raises_the_lowering_error_unchanged(exporter):
    with pytest.raises(UnsupportedOpError, match=r"\(ArgMax, opset \d+\).*output the scores instead") as caught:
        ic.from_torch(ArgMaxHead(), torch.randn(2, 3), exporter=exporter)
    assert not isinstance(caught.value, TorchExportError)


def test_missing_torch_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(
        MissingDependencyError, match=r"needs torch.*pip install 'implicit_compiler\[torch\]'"
    ) as caught:
        ic.from_torch(object(), None)
    assert isinstance(caught.value, ImportError)


def test_missing_onnxscript_names_the_extra_and_the_legacy_exporter(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(MissingDependencyError, match=r"needs onnxscript.*implicit_compiler\[torch\].*'legacy'"):
        ic.from_torch(nn.Linear(3, 2), torch.randn(2, 3))
    with empty_folders(tmp_path):  # the legacy exporter does without it
        model = ic.from_torch(nn.Linear(3, 2), torch.randn(2, 3), exporter="legacy")
    assert model.q == 2


def test_the_attribute_loads_without_importing_torch():
    code = "import sys, implicit_compiler as ic; ic.from_torch; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_the_torch_extra_is_pinned_and_brings_onnxscript():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^torch = \["torch==2\.13\.0", "onnxscript>=[\d.]+"\]$', text, re.MULTILINE)


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (lambda: ic.from_torch(nn.Linear(3, 2), torch.ones(1, 3), dtyp=np.float32), ArgumentTypeError, "export_options"),
        (lambda: ic.from_torch(nn.Linear(3, 2), torch.ones(1, 3), exporter="onnx"), ArgumentValueError, "legacy"),
        (lambda: ic.from_torch(nn.Linear(3, 2)), ArgumentTypeError, "got nothing"),
        (lambda: ic.from_torch(nn.Linear(3, 2), np.ones((1, 3))), ArgumentTypeError, "got ndarray"),
        (lambda: ic.from_torch(nn.Linear(3, 2), ()), ArgumentValueError, "empty"),
        (lambda: ic.from_torch(lambda x: x, torch.ones(1, 3)), ArgumentTypeError, "torch.nn.Module"),
        (lambda: ic.from_torch(nn.Linear(3, 2), torch.ones(1, 3), batch_axis=-1), ArgumentValueError, "batch_axis"),
        (lambda: ic.from_torch(nn.Linear(3, 2), torch.ones(1, 3), export_options={"f": "x.onnx"}), ArgumentValueError, "'f'"),
        (lambda: ic.from_torch(nn.Linear(3, 2), torch.ones(1, 3), export_options=[1]), ArgumentTypeError, "dict"),
    ],
    ids=["unknown-option", "exporter", "no-example", "numpy-example", "empty-example", "not-a-module", "batch-axis",
         "reserved-export-option", "export-options-type"],
)  # fmt: skip
def test_bad_arguments_are_refused_before_exporting(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_export_options_opset_and_the_dynamic_batch_axis_reach_torch_onnx_export(monkeypatch):
    """What from_torch hands the exporters (the round trips above check that they work)."""
    calls = []
    export = torch.onnx.export

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    module = nn.Linear(3, 2)
    ic.from_torch(module, torch.randn(2, 3), exporter="legacy", opset=17, export_options={"do_constant_folding": False})
    assert calls[-1]["dynamic_axes"] == {"input": {0: "batch"}} and calls[-1]["opset_version"] == 17
    assert calls[-1]["do_constant_folding"] is False and calls[-1]["dynamo"] is False
    ic.from_torch(module, torch.randn(2, 3), exporter="legacy", batch_axis=None)
    assert calls[-1]["dynamic_axes"] == {}
    ic.from_torch(module, torch.randn(2, 3), exporter="dynamo", export_options={"optimize": False})
    (shapes,) = calls[-1]["dynamic_shapes"]
    assert list(shapes) == [0] and calls[-1]["optimize"] is False and calls[-1]["dynamo"] is True


# ----------------------------------------------------------------------------- ImplicitModule
def test_an_implicit_module_is_converted_not_exported(mlp):
    module = mlp.implicit().to_torch()
    with torch.no_grad():
        module.A_values.mul_(0.5)  # weights changed after conversion: the module's current ones count
    u = np.random.default_rng(4).normal(size=(5, mlp.sizes[0]))
    with torch.no_grad():
        expected = module(torch.from_numpy(u)).numpy()
    model = ic.from_torch(module)
    np.testing.assert_allclose(model.predict(u), expected, rtol=1e-12, atol=1e-12)
    assert ic.from_torch(module, dtype=np.float32).dtype == np.float32
    with pytest.raises(ArgumentValueError, match=r"ImplicitModule.*\['structure'\] do not apply"):
        ic.from_torch(module, structure="csr")


def test_the_classmethod_points_other_torch_modules_to_from_torch():
    with pytest.raises(
        ImplicitCompilerError, match=r"got Linear; .*implicit_compiler\.from_torch\(module, example_inputs\)"
    ):
        ImplicitModel.from_torch(nn.Linear(3, 2))


# ------------------------------------------------------------------------------------- README
def test_readme_from_torch_example_runs_as_written(tmp_path):
    text = (ROOT / "README.md").read_text()
    start = text.index("```python", text.index("## From torch")) + len("```python")
    block = text[start : text.index("```", start)]
    namespace: dict = {}
    with empty_folders(tmp_path):
        exec(compile(block, "README.md", "exec"), namespace)
    net, u, y = namespace["net"], namespace["u"], namespace["y"]
    expected = torch_output(net, u)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(expected).max())))
    assert y.shape == (5, 10)
