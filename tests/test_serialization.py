"""Save/load: bit-identical round trips, no silent overwrites, clear errors on bad files."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import scipy.sparse as sp

import implicit_compiler as ic
from implicit_compiler import ImplicitModel, StateBlock, TensorSpec
from implicit_compiler.structure import Dense, StructuredMatrix, Term


def _assert_bit_identical(left, right):
    for name in "ABCD":
        a, b = getattr(left, name), getattr(right, name)
        assert a.shape == b.shape
        for part in ("data", "indices", "indptr"):
            x, y = getattr(a, part), getattr(b, part)
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), f"{name}.{part}"
    assert left.bias_x.tobytes() == right.bias_x.tobytes()
    assert left.bias_y.tobytes() == right.bias_y.tobytes()
    assert left.blocks == right.blocks and left.inputs == right.inputs and left.outputs == right.outputs


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_round_trip_is_bit_identical(mlp, tmp_path, rng, dtype):
    model = mlp.implicit().astype(dtype)
    path = tmp_path / "mlp.npz"
    model.save(path)
    loaded = ic.load(path)
    _assert_bit_identical(model, loaded)
    u = rng.normal(size=(3, 6)).astype(dtype)
    assert np.array_equal(loaded.predict(u), model.predict(u))


def test_round_trip_keeps_rich_metadata(tmp_path):
    blocks = (
        StateBlock("conv1", 0, 8, "leaky_relu(0.2)", (2, 2, 2), source_node="Conv_0"),
        StateBlock("fc", 8, 11, "sigmoid", (3,)),
    )
    model = ImplicitModel(
        np.zeros((11, 11)), np.ones((11, 4)), np.ones((2, 11)), np.zeros((2, 4)), np.arange(11.0), [1.0, 2.0],
        blocks, (TensorSpec("image", (1, 2, 2)),), (TensorSpec("logits", (2,)),),
    )  # fmt: skip
    path = tmp_path / "model.weird-suffix"
    model.save(path)
    assert path.exists() and not (tmp_path / "model.weird-suffix.npz").exists()
    _assert_bit_identical(model, ic.load(path))


def test_save_refuses_to_overwrite_unless_asked(mlp, tmp_path):
    path = tmp_path / "keep.npz"
    path.write_bytes(b"precious user data")
    with pytest.raises(ic.OverwriteError, match="overwrite=True"):
        mlp.implicit().save(path)
    assert path.read_bytes() == b"precious user data"
    assert list(tmp_path.iterdir()) == [path], "no temporary files left behind"
    mlp.implicit().save(path, overwrite=True)
    assert ic.load(path).n == 15


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999], ids=["10%", "50%", "90%", "99.9%"])
def test_truncated_file_raises_model_file_error(mlp, tmp_path, keep):
    path = tmp_path / "model.npz"
    mlp.implicit().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ic.ModelFileError, match="truncated, corrupted"):
        ic.load(path)


def test_corrupted_payload_raises_model_file_error(mlp, tmp_path):
    path = tmp_path / "model.npz"
    mlp.implicit().save(path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("A_data.npy")
    middle = info.header_offset + 30 + len(info.filename) + 200  # inside the stored array bytes
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ic.ModelFileError):
        ic.load(path)


def test_foreign_files_raise_model_file_error(tmp_path):
    npz = tmp_path / "other.npz"
    np.savez(npz, weights=np.ones(3))
    with pytest.raises(ic.ModelFileError, match="not an implicit_compiler model"):
        ic.load(npz)
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    with pytest.raises(ic.ModelFileError, match="cannot read"):
        ic.load(text)
    with pytest.raises(FileNotFoundError, match="no model file"):
        ic.load(tmp_path / "missing.npz")


def test_inconsistent_file_raises_model_file_error(mlp, tmp_path):
    path = tmp_path / "model.npz"
    mlp.implicit().save(path)
    with np.load(path) as archive:
        arrays = dict(archive)
    arrays["bias_x"] = arrays["bias_x"][:-1]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ic.ModelFileError, match="inconsistent model: bias_x"):
        ic.load(tmp_path / "bad.npz")


def _metadata_of(path):
    with np.load(path) as archive:
        return json.loads(archive["metadata"].tobytes())


def test_plain_models_write_format_1_and_structured_ones_format_2(mlp, tmp_path, rng):
    """Format 1 (CSR only) for a plain model, as before structured models existed; format 2 (the
    terms' geometry in the metadata, their weights as arrays) for a structured one, read back
    structured and computing what the plain model computes."""
    plain = mlp.implicit()
    plain.save(tmp_path / "plain.npz")
    metadata = _metadata_of(tmp_path / "plain.npz")
    assert metadata["format_version"] == 1 and "terms" not in metadata
    with np.load(tmp_path / "plain.npz") as archive:
        assert sorted(archive.files) == sorted(
            [f"{m}_{part}" for m in "ABCD" for part in ("data", "indices", "indptr")] + ["bias_x", "bias_y", "metadata"]
        )

    n1, n2 = mlp.sizes[1:3]
    A = plain.A
    term = Term(slice(n1, n1 + n2), Dense(slice(0, n1), mlp.W2))  # the second layer as a dense term
    structured = ImplicitModel(
        StructuredMatrix(A.shape, (term,), sp.csr_array(A.shape)), plain.B, plain.C, plain.D, plain.bias_x,
        plain.bias_y, plain.blocks, plain.inputs, plain.outputs,
    )  # fmt: skip
    structured.save(tmp_path / "structured.npz")
    metadata = _metadata_of(tmp_path / "structured.npz")
    assert metadata["format_version"] == 2
    assert metadata["terms"] == {
        "A": [{"kind": "dense", "rows": [n1, n1 + n2], "source": [0, n1]}],
        "B": [],
        "C": [],
        "D": [],
    }
    loaded = ic.load(tmp_path / "structured.npz")
    assert loaded.is_structured and loaded.structure.A.terms[0].op.weight.tobytes() == mlp.W2.tobytes()
    u = rng.normal(size=(5, 6))
    np.testing.assert_allclose(loaded.predict(u), mlp.forward(u), rtol=1e-12, atol=1e-12)
