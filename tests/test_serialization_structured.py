"""Save/load of structured models (issue 20, step 4): format 2 keeps the kernels.

Round trips of lifted LeNet-5 and ResNet20 are checked part by part (remainders, term weights,
geometry) and against the plain compiled model (its CSR matrices and predictions), with the
memory limit monkeypatched so that any materialization fails; plain models keep writing format
1; damaged or hostile format-2 files are ``ModelFileError``s naming the file and the fault.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import implicit_compiler as ic
from implicit_compiler import model as model_module
from implicit_compiler.structure import Convolution, Dense, StructuredMatrix, Term, TransposedConvolution, lift

ROOT = Path(__file__).resolve().parents[1]
GEOMETRY = ("source", "in_shape", "out_shape", "kernel", "stride", "dilation", "pads")


@pytest.fixture(scope="module")
def zoo():
    """name -> (plain model, lifted model), compiled once per module."""
    cache = {}

    def get(name: str, dtype) -> tuple[ic.ImplicitModel, ic.ImplicitModel]:
        key = (name, np.dtype(dtype))
        if key not in cache:
            plain = ic.from_onnx(ROOT / "zoo" / f"{name}.onnx", dtype=dtype, structure="csr")
            cache[key] = plain, lift(plain)
        return cache[key]

    return get


@pytest.fixture
def no_memory(monkeypatch):
    """Any materialization of a structured matrix raises ModelTooLargeError while active."""
    monkeypatch.setattr(model_module, "available_memory_bytes", lambda: 1.0)
    return monkeypatch


def fresh(model: ic.ImplicitModel) -> ic.ImplicitModel:
    """The same model without any cached CSR (so that a materialization would be noticed)."""
    return ic.ImplicitModel(*model._parts(), model.bias_x, model.bias_y, model.blocks, model.inputs, model.outputs)


def assert_same_bytes(left: np.ndarray, right: np.ndarray, what: str) -> None:
    assert left.dtype == right.dtype and left.shape == right.shape and left.tobytes() == right.tobytes(), what


def assert_same_parts(saved: ic.ImplicitModel, loaded: ic.ImplicitModel) -> None:
    """Every stored part equal, bit for bit: remainders, terms (kind, rows, geometry, weight),
    biases, blocks and specs."""
    assert loaded.is_structured == saved.is_structured
    for name in "ABCD":
        left, right = getattr(saved.structure, name), getattr(loaded.structure, name)
        assert left.shape == right.shape, name
        for part in ("data", "indices", "indptr"):
            assert_same_bytes(getattr(left.remainder, part), getattr(right.remainder, part), f"{name}.{part}")
        assert len(left.terms) == len(right.terms), name
        for index, (a, b) in enumerate(zip(left.terms, right.terms)):
            where = f"{name} term {index}"
            assert type(a.op) is type(b.op) and a.rows == b.rows, where
            names = GEOMETRY if isinstance(a.op, Convolution) else ("source",)
            assert all(getattr(a.op, key) == getattr(b.op, key) for key in names), where
            assert_same_bytes(a.op.weight, b.op.weight, where)
    assert_same_bytes(saved.bias_x, loaded.bias_x, "bias_x")
    assert_same_bytes(saved.bias_y, loaded.bias_y, "bias_y")
    assert saved.blocks == loaded.blocks and saved.inputs == loaded.inputs and saved.outputs == loaded.outputs


def assert_matrices_equal(structured: ic.ImplicitModel, plain: ic.ImplicitModel, names: str = "ABCD") -> None:
    """Each structured matrix, materialized (to_csr, then cached for the runtime), equals the
    plain model's CSR exactly."""
    for name in names:
        csr, expected = getattr(structured, name), getattr(plain, name)
        assert csr.shape == expected.shape and csr.nnz == expected.nnz, name
        assert np.array_equal(csr.indptr, expected.indptr) and np.array_equal(csr.indices, expected.indices), name
        assert_same_bytes(csr.data, expected.data, name)


def images(model: ic.ImplicitModel, batch: int = 3) -> np.ndarray:
    shape = model.inputs[0].shape
    return np.random.default_rng(4).uniform(0, 1, size=(batch, *shape)).astype(model.dtype)


def save_and_load_without_materializing(model: ic.ImplicitModel, path: Path, no_memory) -> ic.ImplicitModel:
    model = fresh(model)
    structured = next(name for name in "ABCD" if getattr(model.structure, name).terms)
    with pytest.raises(ic.ModelTooLargeError):  # (the check is armed: reading a structured matrix fails)
        getattr(model, structured)
    model.save(path)
    loaded = ic.load(path)
    assert not any(key[0] == "csr" for key in loaded._cache if isinstance(key, tuple)), "load materialized"
    no_memory.undo()
    return loaded


# ------------------------------------------------------------------------------ round trips
LENET = [np.float64, np.float32]


@pytest.mark.parametrize("dtype", LENET, ids=["float64", "float32"])
def test_lifted_lenet_round_trips_bit_for_bit_without_materializing(zoo, tmp_path, no_memory, dtype):
    plain, lifted = zoo("lenet5", dtype)
    loaded = save_and_load_without_materializing(lifted, tmp_path / "lenet.npz", no_memory)
    assert loaded.is_structured and loaded.dtype == dtype
    assert_same_parts(lifted, loaded)
    assert_matrices_equal(loaded, plain)
    u = images(plain)
    assert np.array_equal(loaded.predict(u), plain.predict(u))


@pytest.mark.slow
def test_lifted_resnet20_round_trips_bit_for_bit_without_materializing(zoo, tmp_path, no_memory):
    plain, lifted = zoo("resnet20", np.float32)
    loaded = save_and_load_without_materializing(lifted, tmp_path / "resnet20.npz", no_memory)
    assert loaded.is_structured and loaded.dtype == np.float32
    assert_same_parts(lifted, loaded)
    assert_matrices_equal(loaded, plain)
    u = images(plain)
    assert np.array_equal(loaded.predict(u), plain.predict(u))


def test_lifted_resnet20_in_float64_round_trips_without_materializing(zoo, tmp_path, no_memory):
    """The float64 cast (astype never materializes): every part, and B (the input convolution)
    against the plain model's cast CSR."""
    plain, lifted = zoo("resnet20", np.float32)
    plain, lifted = plain.astype(np.float64), lifted.astype(np.float64)
    loaded = save_and_load_without_materializing(lifted, tmp_path / "resnet20.npz", no_memory)
    assert loaded.is_structured and loaded.dtype == np.float64
    assert_same_parts(lifted, loaded)
    assert_matrices_equal(loaded, plain, "BCD")


def test_lifted_resnet20_file_is_about_its_weights(zoo, tmp_path):
    """Format 2 stores each kernel once: the file is its weights, remainders and per-state
    arrays (biases, row pointers), not one entry per multiply-add as format 1."""
    plain, lifted = zoo("resnet20", np.float32)
    path = tmp_path / "resnet20.npz"
    lifted.save(path)
    size = path.stat().st_size
    plain_size = sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes for m in (plain.A, plain.B, plain.C, plain.D))
    weights = sum(term.op.weight.nbytes for m in (lifted.structure.A, lifted.structure.B) for term in m.terms)
    assert plain_size > 250e6  # (296 MB of CSR arrays as format 1 holds them)
    assert size < 0.05 * plain_size, f"{size / 1e6:.1f} MB against {plain_size / 1e6:.0f} MB"
    assert weights < size < lifted.memory_bytes + 2**16  # the stored arrays and the archive's headers


def test_plain_lenet_file_is_much_larger_than_the_lifted_one(zoo, tmp_path):
    plain, lifted = zoo("lenet5", np.float32)
    plain.save(tmp_path / "plain.npz")
    lifted.save(tmp_path / "lifted.npz")
    assert (tmp_path / "lifted.npz").stat().st_size < 0.25 * (tmp_path / "plain.npz").stat().st_size


def test_homogeneous_form_of_a_lifted_model_round_trips(zoo, tmp_path, no_memory):
    plain, lifted = zoo("lenet5", np.float64)
    homogeneous = lifted.homogeneous()
    loaded = save_and_load_without_materializing(homogeneous, tmp_path / "homogeneous.npz", no_memory)
    assert_same_parts(homogeneous, loaded)
    assert_matrices_equal(loaded, plain.homogeneous())
    u = images(plain)
    feed = {plain.inputs[0].name: u, loaded.inputs[-1].name: np.ones((len(u), 1))}
    np.testing.assert_allclose(loaded.predict(feed), plain.predict(u), rtol=1e-12, atol=1e-12)


def structured_output_model(mlp) -> tuple[ic.ImplicitModel, ic.ImplicitModel]:
    """The MLP fixture with C and D as Dense terms (D non-zero): (plain, structured)."""
    plain = mlp.implicit()
    p, n1, n2, q = mlp.sizes
    D = np.random.default_rng(7).normal(size=(q, p))
    plain = ic.ImplicitModel(
        plain.A, plain.B, plain.C, sp.csr_array(D), plain.bias_x, plain.bias_y, plain.blocks, plain.inputs,
        plain.outputs,
    )  # fmt: skip
    C = StructuredMatrix(
        (q, n1 + n2), (Term(slice(0, q), Dense(slice(n1, n1 + n2), mlp.W3.copy())),), sp.csr_array((q, n1 + n2))
    )
    D_terms = (Term(slice(1, q), Dense(slice(0, p), D[1:].copy())),)
    D_structured = StructuredMatrix((q, p), D_terms, sp.csr_array(np.vstack([D[:1], np.zeros((q - 1, p))])))
    structured = ic.ImplicitModel(
        plain.A, plain.B, C, D_structured, plain.bias_x, plain.bias_y, plain.blocks, plain.inputs, plain.outputs
    )
    return plain, structured


def test_structured_C_and_D_round_trip(mlp, tmp_path, no_memory, rng):
    plain, structured = structured_output_model(mlp)
    loaded = save_and_load_without_materializing(structured, tmp_path / "mlp.npz", no_memory)
    assert_same_parts(structured, loaded)
    assert [len(getattr(loaded.structure, name).terms) for name in "ABCD"] == [0, 0, 1, 1]
    assert_matrices_equal(loaded, plain)
    u = rng.normal(size=(4, 6))
    expected = mlp.forward(u) + u @ plain.D.toarray().T  # numpy's forward pass plus the feedthrough
    np.testing.assert_allclose(loaded.predict(u), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- format 1 kept
def format_1_members(model: ic.ImplicitModel) -> dict[str, bytes]:
    """The members of the format-1 file written before format 2 existed (the old save_model,
    written out here): CSR arrays, biases, metadata."""
    arrays = {}
    for name in "ABCD":
        matrix = getattr(model, name)
        arrays.update({f"{name}_data": matrix.data, f"{name}_indices": matrix.indices, f"{name}_indptr": matrix.indptr})
    arrays["bias_x"], arrays["bias_y"] = model.bias_x, model.bias_y
    metadata = {
        "format": "implicit_compiler.ImplicitModel",
        "format_version": 1,
        "written_by": f"implicit_compiler {ic.__version__}",
        "shapes": {name: list(getattr(model, name).shape) for name in "ABCD"},
        "blocks": [
            {
                "name": b.name,
                "start": b.start,
                "stop": b.stop,
                "activation": b.activation.to_spec(),
                "shape": list(b.shape),
                "source_node": b.source_node,
            }
            for b in model.blocks
        ],  # fmt: skip
        "inputs": [{"name": s.name, "shape": list(s.shape)} for s in model.inputs],
        "outputs": [{"name": s.name, "shape": list(s.shape)} for s in model.outputs],
    }
    arrays["metadata"] = np.frombuffer(json.dumps(metadata).encode("utf-8"), dtype=np.uint8)
    return arrays


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def test_plain_models_still_write_format_1_byte_for_byte(zoo, mlp, tmp_path):
    for index, model in enumerate((mlp.implicit(), zoo("lenet5", np.float32)[0])):
        old, new = tmp_path / f"old{index}.npz", tmp_path / f"new{index}.npz"
        np.savez(old, **format_1_members(model))
        model.save(new)
        assert members(new) == members(old)
        assert_same_parts(model, ic.load(old))


# ---------------------------------------------------------------------------- hostile files
@pytest.fixture(scope="module")
def saved_lenet(zoo, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("structured") / "lenet.npz"
    zoo("lenet5", np.float64)[1].save(path)
    return path


def edited(source: Path, path: Path, edit) -> Path:
    """A copy of the model file ``source`` with ``edit(metadata, arrays)`` applied."""
    with np.load(source) as archive:
        arrays = dict(archive)
    metadata = json.loads(arrays.pop("metadata").tobytes())
    edit(metadata, arrays)
    arrays["metadata"] = np.frombuffer(json.dumps(metadata).encode("utf-8"), dtype=np.uint8)
    np.savez(path, **arrays)
    return path


def first_conv(metadata) -> dict:
    return metadata["terms"]["A"][0]


def _set(key, value):
    def edit(metadata, arrays):
        first_conv(metadata)[key] = value

    return edit


def _shift_rows(metadata, arrays):  # rows past the end, the same length
    term, n = first_conv(metadata), metadata["shapes"]["A"][0]
    length = term["rows"][1] - term["rows"][0]
    term["rows"] = [n - length + 5, n + 5]


def _shift_source(metadata, arrays):
    term, n = first_conv(metadata), metadata["shapes"]["A"][1]
    length = term["source"][1] - term["source"][0]
    term["source"] = [n - length + 1, n + 1]


def _duplicate_term(metadata, arrays):  # the same rectangle twice
    terms = metadata["terms"]["A"]
    arrays[f"A_term{len(terms)}"] = arrays["A_term0"]
    terms.append(dict(terms[0]))


def _nan_weight(metadata, arrays):
    arrays["A_term0"] = arrays["A_term0"].copy()
    arrays["A_term0"][0, 0] = np.nan


def _cut_weight(metadata, arrays):
    arrays["A_term0"] = arrays["A_term0"][:, :-1]


def _flat_weight(metadata, arrays):
    arrays["A_term0"] = arrays["A_term0"].ravel()


def _float32_weight(metadata, arrays):
    arrays["A_term0"] = arrays["A_term0"].astype(np.float32)


def _missing_weight(metadata, arrays):
    del arrays["A_term0"]


def _future_format(metadata, arrays):
    metadata["format_version"] = 3


def _no_terms(metadata, arrays):
    del metadata["terms"]


def _terms_not_a_list(metadata, arrays):
    metadata["terms"]["B"] = {"kind": "convolution"}


HOSTILE = {
    "rows-out-of-range": (_shift_rows, "outside"),
    "source-out-of-range": (_shift_source, "outside"),
    "overlapping-terms": (_duplicate_term, "overlap"),
    "float-stride": (_set("stride", [1.5, 1]), "stride must be a list of 2 integers"),
    "string-kernel": (_set("kernel", ["5", 5]), "kernel must be a list of 2 integers"),
    "boolean-pads": (_set("pads", [True, 0]), "pads must be a list of 2 integers"),
    "short-dilation": (_set("dilation", [1]), "dilation must be a list of 2 integers"),
    "zero-stride": (_set("stride", [0, 1]), "stride [0, 1] must be >= 1"),
    "negative-pads": (_set("pads", [-1, 0]), "pads [-1, 0] must be >= 0"),
    "huge-kernel": (_set("kernel", [2**40, 1]), "kernel must be a list of 2 integers"),
    "backwards-rows": (_set("rows", [10, 5]), "rows [10, 5] is not a range"),
    "wrong-out-shape": (_set("out_shape", [1, 1, 1]), "out_shape [1, 1, 1] holds 1 values"),
    "wrong-kernel": (_set("kernel", [3, 3]), "needs"),
    "unknown-kind": (_set("kind", "deconvolution"), "unknown term kind 'deconvolution'"),
    "kind-not-a-string": (_set("kind", ["convolution"]), "unknown term kind"),
    "nan-weight": (_nan_weight, "NaN"),
    "cut-weight": (_cut_weight, "its weight has shape"),
    "flat-weight": (_flat_weight, "expected 2 dimensions"),
    "float32-weight": (_float32_weight, "its weight is float32, expected float64"),
    "missing-weight": (_missing_weight, "'A_term0' is missing"),
    "future-format": (_future_format, "format version 3; this implicit_compiler reads versions up to 2"),
    "no-terms": (_no_terms, "needs 'terms'"),
    "terms-not-a-list": (_terms_not_a_list, "terms of matrix B are not a list"),
}


@pytest.mark.parametrize("edit,message", HOSTILE.values(), ids=HOSTILE.keys())
def test_damaged_format_2_file_is_a_model_file_error_naming_file_and_fault(saved_lenet, tmp_path, edit, message):
    path = edited(saved_lenet, tmp_path / "hostile.npz", edit)
    with pytest.raises(ic.ModelFileError) as caught:
        ic.load(path)
    assert str(path) in str(caught.value) and message in str(caught.value), str(caught.value)


def test_remainder_entries_under_a_term_are_refused(zoo, saved_lenet, tmp_path):
    plain = zoo("lenet5", np.float64)[0]

    def edit(metadata, arrays):  # B's remainder replaced by the whole of B: its entries lie under the term
        arrays.update({"B_data": plain.B.data, "B_indices": plain.B.indices, "B_indptr": plain.B.indptr})

    path = edited(saved_lenet, tmp_path / "hostile.npz", edit)
    with pytest.raises(ic.ModelFileError, match="matrix B: the remainder of a structured matrix has entries") as caught:
        ic.load(path)
    assert str(path) in str(caught.value)


def test_the_unedited_copy_loads(saved_lenet, tmp_path, zoo):
    """The editing itself keeps a file loadable (so the refusals above are the edits')."""
    loaded = ic.load(edited(saved_lenet, tmp_path / "copy.npz", lambda metadata, arrays: None))
    assert_same_parts(zoo("lenet5", np.float64)[1], loaded)


def test_term_fields_are_all_saved():
    """Every field of Convolution, TransposedConvolution and Dense is stored (geometry and groups
    in the metadata, the weight as an array): a new field would need the format to change."""
    assert {f.name for f in fields(Convolution)} == {*GEOMETRY, "weight", "groups"}
    assert {f.name for f in fields(TransposedConvolution)} == {*GEOMETRY, "weight", "groups"}
    assert {f.name for f in fields(Dense)} == {"source", "weight"}
