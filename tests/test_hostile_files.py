"""Hostile files (issue 16): nothing the user owns is lost, and every bad file is a typed error.

Each test here failed before its fix: numpy's own file naming (``-o y`` writes y.npy) slipping
past the existence check, plots replacing files by default, ``save`` dropping a dangling symbolic
link and writing mode 0600, untyped errors from ``load`` (a .npy, a text file, a damaged zip
member, a missing path, a folder), an error naming our temporary file, multi-line usage errors.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import implicit_compiler as ic
from implicit_compiler import TensorSpec, serialization, viz
from implicit_compiler.cli import main
from implicit_compiler.serialization import write_file
from implicit_compiler.structure import Dense, StructuredMatrix, Term

PRECIOUS = b"precious user data"


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {stderr!r}"
    return lines[0]


@pytest.fixture
def model_file(mlp, tmp_path) -> Path:
    path = tmp_path / "mlp.npz"
    mlp.implicit().save(path)
    return path


@pytest.fixture
def inputs_file(rng, tmp_path) -> Path:
    path = tmp_path / "u.npy"
    np.save(path, rng.normal(size=(4, 6)))
    return path


# ------------------------------------------------------------------ CLI: the file numpy writes
def test_run_refuses_the_npy_that_numpy_would_write(model_file, inputs_file, mlp, tmp_path, capsys):
    written = tmp_path / "yout.npy"  # `-o yout`: numpy adds .npy
    written.write_bytes(PRECIOUS)
    assert main(["run", str(model_file), "-i", str(inputs_file), "-o", str(tmp_path / "yout")]) == 2
    assert "yout.npy exists; pass --overwrite" in _one_line(capsys.readouterr().err)
    assert written.read_bytes() == PRECIOUS
    assert not (tmp_path / "yout").exists()

    assert main(["run", str(model_file), "-i", str(inputs_file), "-o", str(tmp_path / "yout"), "--overwrite"]) == 0
    assert "wrote" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(written), mlp.forward(np.load(inputs_file)), rtol=1e-12, atol=1e-12)


def test_run_refuses_the_npz_of_a_model_with_two_outputs(mlp, inputs_file, tmp_path, capsys):
    model = mlp.implicit()
    two = ic.ImplicitModel(
        model.A, model.B, model.C, model.D, model.bias_x, model.bias_y, model.blocks, model.inputs,
        (TensorSpec("first", (2,)), TensorSpec("last", (1,))),
    )  # fmt: skip
    two.save(tmp_path / "two.npz")
    written = tmp_path / "yout.npz"  # np.savez adds .npz
    written.write_bytes(PRECIOUS)
    assert main(["run", str(tmp_path / "two.npz"), "-i", str(inputs_file), "-o", str(tmp_path / "yout")]) == 2
    assert "yout.npz exists" in _one_line(capsys.readouterr().err)
    assert written.read_bytes() == PRECIOUS


def test_sensitivity_refuses_the_npy_that_numpy_would_write(model_file, mlp, tmp_path, capsys):
    written = tmp_path / "S.npy"
    written.write_bytes(PRECIOUS)
    assert main(["sensitivity", str(model_file), "--save-matrix", str(tmp_path / "S")]) == 2
    assert "S.npy exists; pass --overwrite" in _one_line(capsys.readouterr().err)
    assert written.read_bytes() == PRECIOUS

    assert main(["sensitivity", str(model_file), "--save-matrix", str(tmp_path / "S"), "--overwrite"]) == 0
    model = mlp.implicit()
    A, B, C, D = (abs(getattr(model, name).toarray()) for name in "ABCD")
    expected = C @ np.linalg.solve(np.eye(model.n) - A, B) + D  # |C|(I-|A|)^-1|B| + |D|, ReLU: Lipschitz 1
    np.testing.assert_allclose(np.load(written), expected, rtol=1e-10)


def test_cli_outputs_treat_a_dangling_link_as_existing(model_file, inputs_file, tmp_path, capsys):
    link = tmp_path / "y.npy"
    link.symlink_to(tmp_path / "nowhere.npy")
    assert main(["run", str(model_file), "-i", str(inputs_file), "-o", str(link)]) == 2
    assert "exists; pass --overwrite" in _one_line(capsys.readouterr().err)
    assert link.is_symlink() and not (tmp_path / "nowhere.npy").exists()


@pytest.mark.parametrize("command", ["spy", "sensitivity"])
def test_cli_plots_are_not_replaced_without_overwrite(model_file, tmp_path, capsys, command):
    """The CLI checks before the work, and passes --overwrite on to the plot."""
    picture = tmp_path / "picture.png"
    picture.write_bytes(PRECIOUS)
    assert main([command, str(model_file), "-o", str(picture)]) == 2
    assert "picture.png exists; pass --overwrite" in _one_line(capsys.readouterr().err)
    assert picture.read_bytes() == PRECIOUS
    assert main([command, str(model_file), "-o", str(picture), "--overwrite"]) == 0
    assert picture.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------- viz: no overwrite
PLOTS = {
    "spy": lambda model, path, **kw: viz.spy(model, path, resolution=50, **kw),
    "sensitivity": lambda model, path, **kw: viz.sensitivity_image(np.ones((model.q, model.p)), path, **kw),
    "residual": lambda model, path, **kw: viz.residual_plot([1.0, 0.1, 0.01], path, **kw),
}


@pytest.mark.parametrize("plot", PLOTS.values(), ids=PLOTS.keys())
def test_plots_refuse_an_existing_file_by_default(mlp, tmp_path, plot):
    path = tmp_path / "mine.png"
    path.write_bytes(PRECIOUS)
    with pytest.raises(ic.OverwriteError, match=r"mine\.png exists; pass overwrite=True"):
        plot(mlp.implicit(), path)
    assert path.read_bytes() == PRECIOUS
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(ic.OverwriteError, match=r"link\.png exists"):
        plot(mlp.implicit(), link)
    assert not (tmp_path / "nowhere.png").exists()
    plot(mlp.implicit(), path, overwrite=True)
    assert path.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------- save()
def test_save_refuses_a_dangling_symlink_and_writes_through_it_with_overwrite(mlp, tmp_path):
    target, link = tmp_path / "elsewhere" / "model.npz", tmp_path / "link.npz"
    target.parent.mkdir()
    link.symlink_to(target)
    with pytest.raises(ic.OverwriteError, match=r"link\.npz already exists \(a symbolic link to .*elsewhere"):
        mlp.implicit().save(link)
    assert link.is_symlink() and not target.exists()

    mlp.implicit().save(link, overwrite=True)  # follows the link, as open(link, "w") would
    assert link.is_symlink() and target.is_file()
    assert ic.load(link).n == mlp.implicit().n
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["elsewhere", "link.npz", "model.npz"], "no temp left"


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077], ids=["022", "027", "077"])
def test_save_gives_a_new_file_the_mode_open_would(mlp, tmp_path, umask):
    reference, saved = tmp_path / "reference", tmp_path / "model.npz"
    old = os.umask(umask)
    try:
        reference.write_bytes(b"")  # what a normal open() creates under this umask
        mlp.implicit().save(saved)
    finally:
        os.umask(old)
    assert stat.S_IMODE(saved.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode) == 0o666 & ~umask


def test_save_with_overwrite_keeps_the_mode_of_the_file_it_replaces(mlp, tmp_path):
    path = tmp_path / "model.npz"
    path.write_bytes(PRECIOUS)
    path.chmod(0o640)
    mlp.implicit().save(path, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert ic.load(path).n == mlp.implicit().n


def test_write_keeps_a_file_that_appeared_while_writing(tmp_path):
    path = tmp_path / "late.npz"

    def write(stream):
        path.write_bytes(PRECIOUS)  # someone else creates the file after the check
        stream.write(b"ours")

    with pytest.raises(ic.OverwriteError, match="appeared while writing"):
        write_file(path, write)
    assert path.read_bytes() == PRECIOUS
    assert [p.name for p in tmp_path.iterdir()] == ["late.npz"], "no temporary file left"


def test_save_into_a_missing_folder_names_the_folder(mlp, tmp_path):
    folder = tmp_path / "not-made"
    with pytest.raises(ic.PathNotFoundError, match="create it") as caught:
        mlp.implicit().save(folder / "model.npz")
    assert isinstance(caught.value, FileNotFoundError)
    assert f"the folder {folder} does not exist" in str(caught.value) and ".tmp" not in str(caught.value)


def test_save_into_a_folder_without_write_permission_names_the_folder(mlp, tmp_path, monkeypatch):
    # (the tests run as root, for whom chmod does not deny: the refusal is what os.open raises)
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(serialization.os, "open", denied)
    with pytest.raises(ic.PathPermissionError, match="no permission") as caught:
        mlp.implicit().save(tmp_path / "model.npz")
    assert isinstance(caught.value, PermissionError)
    assert f"the folder {tmp_path}" in str(caught.value) and ".tmp" not in str(caught.value)
    assert not list(tmp_path.iterdir())


def test_save_onto_a_folder_is_a_typed_error(mlp, tmp_path):
    with pytest.raises(ic.PathIsDirectoryError, match="it is a folder") as caught:
        mlp.implicit().save(tmp_path, overwrite=True)
    assert isinstance(caught.value, IsADirectoryError)


# ---------------------------------------------------------------------------------- load()
def _npy(path: Path) -> None:
    with open(path, "wb") as stream:  # a .npy file under the given name (np.save would add .npy)
        np.save(stream, np.ones(3))


def _text(path: Path) -> None:
    path.write_text("x,y\n1,2\n")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


FOREIGN = {"npy": (_npy, "a single NumPy array"), "text": (_text, "not a .npz archive"), "empty": (_empty, "empty")}


@pytest.mark.parametrize("make,why", FOREIGN.values(), ids=FOREIGN.keys())
def test_load_of_a_foreign_file_says_it_is_not_a_model(tmp_path, make, why):
    path = tmp_path / "data.npz"
    make(path)
    with pytest.raises(ic.ModelFileError, match="not a model written by implicit_compiler.save") as caught:
        ic.load(path)
    message = str(caught.value)
    assert str(path) in message and why in message and "pickle" not in message


def test_load_of_a_corrupted_zip_member_is_a_model_file_error(model_file):
    """A compression method zipfile does not know: NotImplementedError from zipfile before."""
    data = bytearray(model_file.read_bytes())
    with zipfile.ZipFile(model_file) as archive:
        central = data.index(b"PK\x01\x02", archive.getinfo(archive.namelist()[0]).header_offset)
    data[central + 10] = 99  # the central directory's compression method of the first member
    model_file.write_bytes(bytes(data))
    with pytest.raises(ic.ModelFileError, match="not a model written by implicit_compiler.save") as caught:
        ic.load(model_file)
    assert str(model_file) in str(caught.value)


def test_load_of_a_missing_path_or_a_folder_is_typed(tmp_path):
    with pytest.raises(ic.PathNotFoundError, match="no model file at") as missing:
        ic.load(tmp_path / "missing.npz")
    assert isinstance(missing.value, FileNotFoundError) and "missing.npz" in str(missing.value)
    with pytest.raises(ic.PathIsDirectoryError, match="it is a folder") as folder:
        ic.load(tmp_path)
    assert isinstance(folder.value, IsADirectoryError) and str(tmp_path) in str(folder.value)


@pytest.mark.parametrize("make", [_npy, _text, "missing", "folder"], ids=["npy", "text", "missing", "folder"])
def test_cli_reports_a_bad_model_file_in_one_line(tmp_path, capsys, make):
    path = tmp_path / "bad.npz"
    if make == "folder":
        path.mkdir()
    elif make != "missing":
        make(path)
    assert main(["info", str(path)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("implicit-compiler info: error: ") and "bad.npz" in line


def _rewritten(path: Path, edit) -> Path:
    """The model file at ``path`` rewritten with ``edit(metadata)`` applied to its JSON metadata."""
    with np.load(path) as archive:
        arrays = dict(archive)
    metadata = json.loads(arrays["metadata"].tobytes())
    edit(metadata)
    arrays["metadata"] = np.frombuffer(json.dumps(metadata).encode("utf-8"), dtype=np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("version", [3, 0, True, "2", None], ids=["future", "zero", "true", "string", "none"])
def test_load_of_an_unknown_format_version_says_so(model_file, version):
    _rewritten(model_file, lambda metadata: metadata.update(format_version=version))
    with pytest.raises(ic.ModelFileError, match=r"reads versions up to 2: upgrade implicit_compiler") as caught:
        ic.load(model_file)
    assert str(model_file) in str(caught.value) and f"version {version!r}" in str(caught.value)


def _structured_mlp(mlp) -> ic.ImplicitModel:
    """The MLP with C as one Dense term (a structured model, saved in format 2)."""
    plain = mlp.implicit()
    _, n1, n2, q = mlp.sizes
    C = StructuredMatrix(
        (q, n1 + n2), (Term(slice(0, q), Dense(slice(n1, n1 + n2), mlp.W3)),), sp.csr_array((q, n1 + n2))
    )
    return ic.ImplicitModel(
        plain.A, plain.B, C, plain.D, plain.bias_x, plain.bias_y, plain.blocks, plain.inputs, plain.outputs
    )


def test_cli_reports_a_hostile_structured_file_in_one_line(mlp, tmp_path, capsys):
    path = tmp_path / "structured.npz"
    _structured_mlp(mlp).save(path)
    assert main(["info", str(path)]) == 0
    capsys.readouterr()
    _rewritten(path, lambda metadata: metadata["terms"]["C"][0].update(kind="hypernetwork"))
    assert main(["info", str(path)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("implicit-compiler info: error: ") and str(path) in line
    assert "matrix C, term 0: unknown term kind 'hypernetwork'" in line


def test_cli_compile_into_a_missing_folder_is_refused_before_compiling(tmp_path, capsys):
    onnx = Path(__file__).resolve().parents[1] / "zoo" / "lenet5.onnx"
    assert main(["compile", str(onnx), "-o", str(tmp_path / "no" / "m.npz")]) == 2
    assert "the folder" in _one_line(capsys.readouterr().err)


# ------------------------------------------------------------------------ CLI usage errors
USAGE_ERRORS = {
    "no-command": ([], "the following arguments are required: COMMAND"),
    "unknown-command": (["frobnicate"], "invalid choice: 'frobnicate'"),
    "missing-argument": (["run", "m.npz"], "the following arguments are required: -i/--input"),
    "bad-choice": (["spy", "m.npz", "-o", "s.png", "--order", "sideways"], "invalid choice: 'sideways'"),
    "bad-number": (["verify", "m.onnx", "--samples", "many"], "invalid int value: 'many'"),
    "unknown-option": (["info", "m.npz", "--colour"], "unrecognized arguments: --colour"),
}


@pytest.mark.parametrize("argv,message", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_usage_errors_are_one_line_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = _one_line(captured.err)
    assert line.startswith("implicit-compiler") and ": error: " in line and message in line
    assert "usage:" not in captured.err and captured.out == ""


def test_help_and_version_still_exit_0(capsys):
    assert main(["--version"]) == 0
    assert main(["info", "--help"]) == 0
    assert "usage: implicit-compiler info" in capsys.readouterr().out


def test_usage_error_through_the_installed_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "implicit_compiler.cli", "run", "model.npz"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and result.stdout == ""
    assert _one_line(result.stderr) == (
        "implicit-compiler run: error: the following arguments are required: -i/--input "
        "(see implicit-compiler run --help)"
    )
