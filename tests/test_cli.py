"""The implicit-compiler command line, driven as a subprocess: exit codes, files, messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import onnxruntime
import pytest
import scipy.sparse as sp

import implicit_compiler as ic
from implicit_compiler import model as model_module
from implicit_compiler.cli import main
from implicit_compiler.structure import StructuredMatrix, lift

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "zoo" / "lenet5.onnx"
SMALL = ROOT / "tests" / "onnx-corpus" / "vnncomp" / "vnncomp2021_mnistfc_mnist-net_256x2.onnx"
COMMANDS = ("compile", "info", "verify", "spy", "wellposed", "sensitivity", "bounds", "compose", "run", "export", "ops")


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "implicit_compiler.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def lenet_npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "lenet5.npz"
    result = cli("compile", LENET, "-o", path)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and result.stderr == "", "no progress bar when stderr is not a terminal"
    return path


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "implicit-compiler"
    assert script.exists()
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("implicit-compiler ")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = cli(command, "--help")
    assert result.returncode == 0 and f"usage: implicit-compiler {command}" in result.stdout


def test_compile_refuses_to_overwrite(lenet_npz):
    before = lenet_npz.read_bytes()
    result = cli("compile", LENET, "-o", lenet_npz)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, "one-line message"
    assert "exists; pass --overwrite" in result.stderr
    assert lenet_npz.read_bytes() == before


def test_compile_keeps_kernels_on_request(tmp_path):
    """--structure kernels keeps LeNet-5's convolutions as kernels (auto leaves a model this
    small as CSR): info shows them, and the file is smaller."""
    sizes = {}
    for structure in ("auto", "kernels"):
        path = tmp_path / f"{structure}.npz"
        result = cli("compile", LENET, "-o", path, "--structure", structure)
        assert result.returncode == 0, result.stderr
        sizes[structure] = path.stat().st_size
        info = cli("info", path)
        assert ("(structured" in info.stdout) == (structure == "kernels"), info.stdout
    assert sizes["kernels"] < sizes["auto"] / 2
    assert cli("compile", LENET, "-o", tmp_path / "x.npz", "--structure", "dense").returncode == 2


def test_info_prints_sizes_blocks_memory_and_verdict(lenet_npz):
    result = cli("info", lenet_npz)
    assert result.returncode == 0, result.stderr
    for expected in ("n = 12,812", "p = 1,024", "q = 10", "A 315,416", "memory", "blocks    10", "well-posed True"):
        assert expected in result.stdout


def test_verify_passes_and_reports_errors():
    result = cli("verify", SMALL, "--samples", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "float32 vs onnxruntime" in result.stdout and result.stdout.strip().endswith("PASSED")
    assert "onnxruntime ran the 4 samples one at a time (the model does not leave" in result.stdout  # a static batch


def test_spy_writes_a_png_of_the_documented_size(lenet_npz, tmp_path):
    output = tmp_path / "spy.png"
    result = cli("spy", lenet_npz, "-o", output, "--whole")
    assert result.returncode == 0, result.stderr
    assert matplotlib.image.imread(output).shape[:2] == (1200, 1200)
    assert cli("spy", lenet_npz, "-o", output).returncode == 2


def test_sensitivity_writes_image_and_matrix(lenet_npz, tmp_path):
    image, matrix = tmp_path / "s.png", tmp_path / "s.npy"
    result = cli("sensitivity", lenet_npz, "-o", image, "--save-matrix", matrix)
    assert result.returncode == 0, result.stderr
    assert np.load(matrix).shape == (10, 1024) and (np.load(matrix) >= 0).all()
    assert matplotlib.image.imread(image).shape[1] == 1200


def test_bounds_prints_verdicts_and_writes_plot_and_arrays(lenet_npz, tmp_path):
    """CROWN bounds of two digits: the verdicts, a PNG, the arrays; each bound holds for onnxruntime's
    outputs at the box's corners along the sign of a random direction, and nothing is overwritten."""
    import sys

    sys.path.insert(0, str(ROOT / "zoo"))
    from data import load_digits_32x32

    _, _, images, _ = load_digits_32x32()
    u0, image, saved = tmp_path / "u0.npy", tmp_path / "b.png", tmp_path / "b.npz"
    np.save(u0, images[:2])
    result = cli("bounds", lenet_npz, u0, "--eps", "0.01", "-o", image, "--save", saved)
    assert result.returncode == 0, result.stderr
    assert "crown bounds" in result.stdout and "verdicts:" in result.stdout and "robust" in result.stdout
    assert matplotlib.image.imread(image).shape[1] == 1200
    arrays = np.load(saved)
    session = onnxruntime.InferenceSession(str(LENET))
    corners = images[:2] + 0.01 * np.sign(np.random.default_rng(0).normal(size=images[:2].shape))
    y = session.run(None, {session.get_inputs()[0].name: corners.astype(np.float32)})[0]
    assert (arrays["lower"] <= y).all() and (y <= arrays["upper"]).all()
    again = cli("bounds", lenet_npz, u0, "--eps", "0.01", "-o", image)
    assert again.returncode == 2 and "exists" in again.stderr


def test_compose_and_wellposed_exit_codes(lenet_npz, tmp_path):
    closed, wild = tmp_path / "closed.npz", tmp_path / "wild.npz"
    assert cli("compose", "feedback", lenet_npz, "--gain", "1e-6", "-o", closed).returncode != 0  # p != q: no scalar
    gain = tmp_path / "K.npy"
    np.save(gain, np.full((1024, 10), 1e-7))
    assert cli("compose", "feedback", lenet_npz, "--gain", gain, "-o", closed).returncode == 0
    ok = cli("wellposed", closed)
    assert ok.returncode == 0 and "acyclic: False" in ok.stdout and "lambda_pf" in ok.stdout
    np.save(gain, np.full((1024, 10), 1.0))
    assert cli("compose", "feedback", lenet_npz, "--gain", gain, "-o", wild).returncode == 0
    not_shown = cli("wellposed", wild)
    assert not_shown.returncode == 1 and "well-posed: False" in not_shown.stdout
    missing = cli("compose", "feedback", lenet_npz, "-o", tmp_path / "x.npz")
    assert missing.returncode == 2 and "needs --gain" in missing.stderr


def test_compose_cascade_of_two_models(lenet_npz, tmp_path):
    head = tmp_path / "head.npz"
    import implicit_compiler as ic

    ic.ImplicitModel.from_matrices(np.zeros((2, 2)), np.ones((2, 10)), np.eye(2), np.zeros((2, 10))).save(head)
    output = tmp_path / "cascade.npz"
    result = cli("compose", "cascade", lenet_npz, head, "-o", output)
    assert result.returncode == 0, result.stderr
    assert ic.load(output).q == 2


def test_run_matches_onnxruntime(lenet_npz, tmp_path):
    images = np.random.default_rng(0).uniform(0, 1, size=(5, 1, 32, 32)).astype(np.float32)
    inputs, outputs = tmp_path / "u.npy", tmp_path / "y.npy"
    np.save(inputs, images)
    result = cli("run", lenet_npz, "-i", inputs, "-o", outputs)
    assert result.returncode == 0, result.stderr
    session = onnxruntime.InferenceSession(str(LENET), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": images})[0]
    np.testing.assert_allclose(np.load(outputs), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "args,message",
    [
        (("info", "missing.npz"), "no model file at missing.npz"),
        (("compile", "missing.onnx"), "no ONNX file at missing.onnx"),
        (("info", "README.md"), "cannot read README.md"),
        (("run", "missing.npz", "-i", "u.npy"), "no model file"),
        (("compile", LENET, "--input-shape", "input"), "--input-shape expects name=d1,d2"),
    ],
    ids=["missing-model", "missing-onnx", "foreign-file", "run-missing", "bad-shape-option"],
)
def test_bad_input_gives_exit_2_and_one_line(args, message, tmp_path):
    result = cli(*args, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_truncated_onnx_is_a_one_line_error(tmp_path):
    path = tmp_path / "cut.onnx"
    path.write_bytes(LENET.read_bytes()[:5000])
    result = cli("compile", path, "-o", tmp_path / "cut.npz")
    assert result.returncode == 2 and "truncated, corrupted or not an ONNX model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_command_is_a_usage_error():
    result = cli("frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_progress_bar_draws_on_a_terminal_and_stays_quiet_otherwise():
    import io

    from implicit_compiler.cli import ProgressBar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        bar = ProgressBar("lowering", stream=stream)
        for done in range(1, 5):
            bar(done, 4, f"node_{done}")
    assert pipe.getvalue() == ""
    assert "lowering [" in terminal.getvalue() and "4/4" in terminal.getvalue() and terminal.getvalue().endswith("\n")
    assert "#" * 30 in terminal.getvalue()


@pytest.fixture(scope="module")
def lifted_lenet(lenet_npz, tmp_path_factory):
    """(plain LeNet-5 as compiled, its lifted form saved in format 2)."""
    plain = ic.load(lenet_npz)
    path = tmp_path_factory.mktemp("cli-structured") / "lenet5-lifted.npz"
    lift(plain).save(path)
    return plain, path


def test_info_shows_structured_and_remainder_nonzeros(lifted_lenet):
    plain, path = lifted_lenet
    result = cli("info", path)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("nonzeros"))
    for name in "AB":  # the totals are the plain CSR's; the split adds up to them
        total = getattr(plain, name).nnz
        prefix = f"{name} {total:,} (structured "
        assert prefix in line, line
        structured, remainder = line.split(prefix)[1].split(")")[0].split(" + remainder ")
        assert int(structured.replace(",", "")) + int(remainder.replace(",", "")) == total
        assert int(structured.replace(",", "")) > 0.9 * total
    assert f"C {plain.C.nnz:,}   D 0   memory" in line  # plain matrices: the count alone
    assert "well-posed True" in result.stdout


def test_info_never_materializes_a_structured_model(lifted_lenet, monkeypatch, capsys):
    """With no memory left for a CSR, info still prints the summary, and checks the
    well-posedness of a cyclic structured model from its structure."""
    plain, path = lifted_lenet
    monkeypatch.setattr(model_module, "available_memory_bytes", lambda: 1.0)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"A {plain.A.nnz:,} (structured" in out and "well-posed True" in out

    lifted = ic.load(path)
    A = lifted.structure.A
    loop = sp.csr_array(([1e-3], ([0], [plain.n - 1])), shape=A.shape)  # the last block feeds the first
    cyclic = ic.ImplicitModel(
        StructuredMatrix(A.shape, A.terms, A.remainder + loop), *lifted._parts()[1:], lifted.bias_x, lifted.bias_y,
        lifted.blocks, lifted.inputs, lifted.outputs,
    )  # fmt: skip
    cyclic.save(path.with_name("cyclic.npz"))
    assert main(["info", str(path.with_name("cyclic.npz"))]) == 0
    out = capsys.readouterr().out
    assert f"A {plain.A.nnz + 1:,} (structured" in out
    assert "well-posed True" in out and "not checked" not in out
