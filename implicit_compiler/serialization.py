"""Saving a model to one .npz file and reading it back, without pickle.

The file is a NumPy .npz archive holding, for each matrix M in A, B, C, D, the CSR arrays
``M_data``, ``M_indices`` and ``M_indptr`` exactly as stored (so a round trip is bit-identical),
the biases, and ``metadata``: UTF-8 JSON with a format tag, the format version, the matrix
shapes, the blocks and the input/output specs. That is format 1, which plain (CSR) models keep
writing. A structured model (``model.is_structured``, issue 20) writes format 2: ``M_data``,
``M_indices``, ``M_indptr`` hold M's remainder, each term i of M its weight as ``M_term{i}``,
and the metadata's ``terms`` lists, per matrix, each term's kind and geometry ("convolution"
and "transposed_convolution": rows, source, in_shape, out_shape, kernel, stride, dilation,
pads, and groups when not 1 (absent in older files: 1); "dense": rows, source; rows and source
as [start, stop]). Neither saving nor loading materializes the matrices: ResNet20
lifted is a few MB against about 300 MB as CSR. Loading checks every part and refuses a damaged
file with a ``ModelFileError`` naming the file and what is wrong.

Writing goes to a temporary file in the same folder that is renamed into place, so a crash never
leaves a half-written model behind, and an existing file is only replaced when ``overwrite=True``
(``write_file``, also used by the command line for its .npy outputs: a symbolic link counts as an
existing file, even one whose target does not exist; with ``overwrite=True`` the link is followed
and the file it points at is written, as ``open(path, "w")`` would; the file gets the permissions
``open`` would give it).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import stat
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import scipy.sparse as sp

from . import __version__
from .errors import (
    ImplicitCompilerError,
    ModelFileError,
    OverwriteError,
    PathIsDirectoryError,
    PathNotFoundError,
    PathPermissionError,
)
from .model import FLOAT_DTYPES, ImplicitModel, StateBlock, TensorSpec
from .structure import Convolution, Dense, StructuredMatrix, Term, TransposedConvolution

FORMAT_TAG = "implicit_compiler.ImplicitModel"
FORMAT_VERSION = 2  # the newest format this module reads; plain models still write PLAIN_FORMAT
PLAIN_FORMAT, STRUCTURED_FORMAT = 1, 2
TERM_KINDS = {"convolution": Convolution, "transposed_convolution": TransposedConvolution, "dense": Dense}
GEOMETRY = {"in_shape": 3, "out_shape": 3, "kernel": 2, "stride": 2, "dilation": 2, "pads": 2}  # name: length
GEOMETRY_LIMIT = 2**31  # no model dimension or geometry integer is this large
MATRICES = ("A", "B", "C", "D")
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip
# What a damaged archive raises from numpy or zipfile: a bad header, a bad CRC, a compression
# method zipfile does not know (NotImplementedError), a broken deflate stream, a short read.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError, RuntimeError)


def save_model(model: ImplicitModel, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` to ``path`` (the name is used as given); return the path. A structured
    model is written in format 2, its terms as kernels (never materialized); a plain one in
    format 1."""
    path = Path(path)
    structure = model.structure
    arrays: dict[str, np.ndarray] = {}
    terms: dict[str, list[dict[str, Any]]] = {}
    for name in MATRICES:
        matrix: StructuredMatrix = getattr(structure, name)
        remainder = matrix.remainder
        arrays[f"{name}_data"] = remainder.data
        arrays[f"{name}_indices"] = remainder.indices
        arrays[f"{name}_indptr"] = remainder.indptr
        terms[name] = []
        for index, term in enumerate(matrix.terms):
            arrays[_weight_name(name, index)] = term.op.weight
            terms[name].append(_term_metadata(term))
    arrays["bias_x"] = model.bias_x
    arrays["bias_y"] = model.bias_y
    metadata = _metadata(model, terms if model.is_structured else None)
    arrays["metadata"] = np.frombuffer(json.dumps(metadata).encode("utf-8"), dtype=np.uint8)
    write_file(path, lambda stream: np.savez(stream, **arrays), overwrite)
    return path


def _weight_name(matrix: str, index: int) -> str:
    return f"{matrix}_term{index}"


def _term_metadata(term: Term) -> dict[str, Any]:
    """A term's kind and geometry as JSON (its weight is stored as an array)."""
    op = term.op
    entry: dict[str, Any] = {
        "kind": next(kind for kind, op_type in TERM_KINDS.items() if isinstance(op, op_type)),
        "rows": [int(term.rows.start), int(term.rows.stop)],
        "source": [int(op.source.start), int(op.source.stop)],
    }
    if not isinstance(op, Dense):
        entry.update({key: [int(value) for value in getattr(op, key)] for key in GEOMETRY})
        if op.groups != 1:  # (files without it: one group)
            entry["groups"] = int(op.groups)
    return entry


def write_file(path: str | os.PathLike, write: Callable[[IO[bytes]], None], overwrite: bool = False) -> Path:
    """Write a file through ``write(stream)`` without ever leaving half of it, or losing one.

    The bytes go to a temporary file in the destination folder, renamed into place once
    complete (without ``overwrite``, linked into place, so that a file that appeared meanwhile is
    kept). Permissions are those ``open(path, "w")`` gives: 0666 less the umask for a new file
    (the kernel applies it), the old mode for a replaced one. Returns the file written: ``path``,
    or where ``path`` links to.

    Raises:
        OverwriteError: ``path`` exists (a symbolic link, even a dangling one, counts) and
            ``overwrite`` is False.
        PathIsDirectoryError: ``path`` is a folder.
        PathNotFoundError: the folder to write into does not exist.
        PathPermissionError: the folder to write into does not let us create files.
    """
    target = writable_target(path, overwrite)
    old_mode = stat.S_IMODE(target.stat().st_mode) if target.is_file() else None
    handle, temporary = _create_temporary(target)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        if old_mode is not None:
            os.chmod(temporary, old_mode)
        if overwrite:
            os.replace(temporary, target)
        else:
            _move_to_new(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def _move_to_new(temporary: Path, target: Path) -> None:
    """Rename ``temporary`` to ``target`` unless that exists now: os.link refuses an existing
    name, where os.replace would drop a file created since the check."""
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise OverwriteError(
            f"{target} already exists (it appeared while writing); pass overwrite=True to replace it"
        ) from None
    except OSError:  # a file system without hard links: the check before writing is all there is
        os.replace(temporary, target)
        return
    temporary.unlink()


def writable_target(path: str | os.PathLike, overwrite: bool) -> Path:
    """The file that writing ``path`` replaces or creates, once the checks before writing pass.

    A symbolic link counts as an existing file even when its target does not exist (``exists()``
    follows links and would say False, and renaming onto the link would silently drop it). With
    ``overwrite`` the link is followed, as ``open`` does: the file it points at is written and
    the link is kept.
    """
    path = Path(path)
    if path.is_dir():
        raise PathIsDirectoryError(f"cannot write {path}: it is a folder; give the path of a file (in it)")
    if os.path.lexists(path):
        if not overwrite:
            link = f" (a symbolic link to {os.readlink(path)})" if path.is_symlink() else ""
            raise OverwriteError(
                f"{path} already exists{link}; pass overwrite=True to replace it, or choose another path"
            )
        if path.is_symlink():
            path = Path(os.path.realpath(path))
    folder = path.parent
    if not folder.is_dir():
        raise PathNotFoundError(f"cannot write {path}: the folder {folder} does not exist; create it first")
    return path


def _create_temporary(target: Path) -> tuple[int, Path]:
    """A new file next to ``target``, opened with mode 0666 so the umask applies (mkstemp: 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue
        except (FileNotFoundError, NotADirectoryError):  # the folder went away since the check
            raise PathNotFoundError(
                f"cannot write {target}: the folder {target.parent} does not exist; create it first"
            ) from None
        except PermissionError:
            raise PathPermissionError(
                f"cannot write {target}: no permission to create files in the folder {target.parent}; "
                "choose a folder you can write to"
            ) from None
    raise FileExistsError(f"cannot create a temporary file next to {target}: 100 names taken")


def load(path: str | os.PathLike) -> ImplicitModel:
    """Read a model written by ``ImplicitModel.save``.

    Raises:
        PathNotFoundError: there is no such file.
        PathIsDirectoryError: the path is a folder.
        ModelFileError: the file is truncated, corrupted or not an implicit_compiler model.
    """
    path = Path(path)
    _check_model_file(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "metadata" not in archive.files:
                raise ModelFileError(
                    f"{path} is a .npz archive but not an implicit_compiler model: it was not written by "
                    "implicit_compiler.save (no metadata)"
                )
            metadata = _read_metadata(archive["metadata"], path)
            arrays = {name: archive[name] for name in archive.files if name != "metadata"}
    except ModelFileError:
        raise
    except _READ_ERRORS as error:
        raise ModelFileError(
            f"cannot read {path}: it is truncated, corrupted or not a model written by implicit_compiler.save "
            f"({type(error).__name__}: {error}). Re-create it with ImplicitModel.save or implicit-compiler compile"
        ) from error
    try:
        return _model_from(metadata, arrays)
    except (KeyError, TypeError, ValueError, ImplicitCompilerError) as error:
        raise ModelFileError(f"{path} holds an inconsistent model: {error}") from error


def _check_model_file(path: Path) -> None:
    """Refuse what is not a .npz archive before numpy sees it.

    numpy would read a .npy file as one array and try anything else as a pickle (then refuse it
    with advice about ``allow_pickle``, which does not apply to a model file).
    """
    if path.is_dir():
        raise PathIsDirectoryError(f"cannot load {path}: it is a folder; expected a model file (.npz)")
    if not path.exists():
        raise PathNotFoundError(f"no model file at {path}; check the path")
    if not path.is_file():
        raise ModelFileError(
            f"cannot read {path}: it is not a regular file, so not a model written by implicit_compiler.save"
        )
    with open(path, "rb") as stream:
        head = stream.read(len(NPY_MAGIC))
    if head.startswith(NPY_MAGIC):
        raise ModelFileError(
            f"cannot read {path}: it holds a single NumPy array (.npy), not a model written by implicit_compiler.save"
        )
    if not head.startswith(ZIP_MAGICS):
        what = "it is empty" if not head else "it is not a .npz archive"
        raise ModelFileError(
            f"cannot read {path}: {what}, so not a model written by implicit_compiler.save. "
            "Re-create it with ImplicitModel.save or implicit-compiler compile"
        )


def _metadata(model: ImplicitModel, terms: dict[str, list[dict[str, Any]]] | None) -> dict[str, Any]:
    """The JSON metadata: format 1 without ``terms``, format 2 with them."""
    metadata = {
        "format": FORMAT_TAG,
        "format_version": PLAIN_FORMAT if terms is None else STRUCTURED_FORMAT,
        "written_by": f"implicit_compiler {__version__}",
        "shapes": {name: list(getattr(model.structure, name).shape) for name in MATRICES},
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
        ],
        "inputs": [{"name": s.name, "shape": list(s.shape)} for s in model.inputs],
        "outputs": [{"name": s.name, "shape": list(s.shape)} for s in model.outputs],
    }
    if terms is not None:
        metadata["terms"] = terms
    return metadata


def _read_metadata(raw: np.ndarray, path: Path) -> dict[str, Any]:
    try:
        metadata = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path}: its metadata is not valid JSON ({error}); the file is corrupted") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_TAG:
        raise ModelFileError(f"{path} is a .npz archive but not an implicit_compiler model (format tag missing)")
    version = metadata.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise ModelFileError(
            f"{path} uses model format version {version!r}; this implicit_compiler reads versions up "
            f"to {FORMAT_VERSION}: upgrade implicit_compiler"
        )
    return metadata


def _model_from(metadata: dict[str, Any], arrays: dict[str, np.ndarray]) -> ImplicitModel:
    terms = _term_lists(metadata) if metadata["format_version"] == STRUCTURED_FORMAT else {}
    matrices = []
    for name in MATRICES:
        matrix = sp.csr_array(
            (arrays[f"{name}_data"], arrays[f"{name}_indices"], arrays[f"{name}_indptr"]),
            shape=tuple(metadata["shapes"][name]),
        )
        matrix.check_format(full_check=True)
        if terms.get(name):
            matrix = _structured_matrix(name, matrix.shape, terms[name], matrix, arrays)
        matrices.append(matrix)
    blocks = tuple(
        StateBlock(b["name"], b["start"], b["stop"], b["activation"], tuple(b["shape"]), b["source_node"])
        for b in metadata["blocks"]
    )
    inputs = tuple(TensorSpec(s["name"], tuple(s["shape"])) for s in metadata["inputs"])
    outputs = tuple(TensorSpec(s["name"], tuple(s["shape"])) for s in metadata["outputs"])
    return ImplicitModel(*matrices, arrays["bias_x"], arrays["bias_y"], blocks, inputs, outputs)


# --------------------------------------------------------------------------------- format 2
def _term_lists(metadata: dict[str, Any]) -> dict[str, list[Any]]:
    """The metadata's ``terms``: a list (of JSON objects) per matrix."""
    terms = metadata.get("terms")
    if not isinstance(terms, dict) or set(terms) != set(MATRICES):
        raise ModelFileError(f"format 2 metadata needs 'terms' with a list for each of A, B, C, D, got {terms!r:.200}")
    for name in MATRICES:
        if not isinstance(terms[name], list):
            raise ModelFileError(f"the terms of matrix {name} are not a list: {terms[name]!r:.200}")
    return terms


def _structured_matrix(
    name: str, shape: tuple[int, ...], entries: list[Any], remainder: sp.csr_array, arrays: dict[str, np.ndarray]
) -> StructuredMatrix:
    """Matrix ``name`` from its remainder and its terms' metadata and weights, all checked: a
    term's geometry against its weight, its rectangle inside the matrix, no overlaps."""
    terms = []
    for index, entry in enumerate(entries):
        where = f"matrix {name}, term {index}"
        weight = arrays.get(_weight_name(name, index))
        if weight is None:
            raise ModelFileError(f"{where}: its weight array {_weight_name(name, index)!r} is missing")
        terms.append(_term(entry, weight, remainder.dtype, where))
    try:
        return StructuredMatrix(shape, tuple(terms), remainder)
    except ImplicitCompilerError as error:
        raise ModelFileError(f"matrix {name}: {error}") from error


def _term(entry: Any, weight: np.ndarray, dtype: np.dtype, where: str) -> Term:
    """One term from its JSON object and its weight array."""
    if not isinstance(entry, dict):
        raise ModelFileError(f"{where}: expected a JSON object, got {entry!r:.200}")
    kind = entry.get("kind")
    if not isinstance(kind, str) or kind not in TERM_KINDS:
        raise ModelFileError(
            f"{where}: unknown term kind {kind!r:.100}; this implicit_compiler reads {sorted(TERM_KINDS)}: "
            "upgrade implicit_compiler, or the file is corrupted"
        )
    if weight.dtype not in FLOAT_DTYPES or weight.dtype != dtype:
        raise ModelFileError(f"{where}: its weight is {weight.dtype}, expected {dtype} as the matrix's other entries")
    if weight.ndim != 2:
        raise ModelFileError(f"{where}: its weight has shape {weight.shape}, expected 2 dimensions")
    if not np.isfinite(weight).all():
        raise ModelFileError(f"{where}: its weight holds NaN or inf values; expected finite weights")
    rows, source = _slice_of(entry, "rows", where), _slice_of(entry, "source", where)
    if kind == "dense":
        return Term(rows, Dense(source, weight))
    geometry = {key: _integers(entry, key, length, where) for key, length in GEOMETRY.items()}
    groups = entry.get("groups", 1)  # (older files: none, one group)
    if not isinstance(groups, int) or isinstance(groups, bool) or abs(groups) >= GEOMETRY_LIMIT:
        raise ModelFileError(f"{where}: groups must be an integer, got {groups!r:.200}")
    transposed = kind == "transposed_convolution"
    _check_convolution(geometry, groups, weight.shape, rows, source, transposed, where)
    return Term(rows, TERM_KINDS[kind](source=source, weight=weight, groups=groups, **geometry))


def _check_convolution(
    geometry: dict[str, tuple[int, ...]],
    groups: int,
    weight_shape: tuple[int, ...],
    rows: slice,
    source: slice,
    transposed: bool,
    where: str,
) -> None:
    """Sizes at least 1 (pads at least 0), images as large as the rows and source, groups
    dividing both channel counts, and a weight as the geometry says: (Co, C / groups kh kw) for
    a convolution, (C, Co / groups kh kw) for a transposed one (C in, Co out channels)."""
    for key, values in geometry.items():
        if any(value < (0 if key == "pads" else 1) for value in values):
            raise ModelFileError(f"{where}: {key} {list(values)} must be {'>= 0' if key == 'pads' else '>= 1'}")
    for key, span, what in (("in_shape", source, "source"), ("out_shape", rows, "rows")):
        if math.prod(geometry[key]) != span.stop - span.start:
            raise ModelFileError(
                f"{where}: {key} {list(geometry[key])} holds {math.prod(geometry[key])} values, but its {what} "
                f"[{span.start}, {span.stop}] spans {span.stop - span.start}"
            )
    (C, _, _), (Co, _, _), (kh, kw) = geometry["in_shape"], geometry["out_shape"], geometry["kernel"]
    if groups < 1 or C % groups or Co % groups:
        raise ModelFileError(
            f"{where}: groups {groups} must be >= 1 and divide the in channels {C} and the out channels {Co}"
        )
    expected = (C, Co // groups * kh * kw) if transposed else (Co, C // groups * kh * kw)
    if tuple(weight_shape) != expected:
        raise ModelFileError(
            f"{where}: its weight has shape {tuple(weight_shape)}, but the geometry (in channels {C}, out channels "
            f"{Co}, {groups} group(s), kernel {kh}x{kw}) needs {expected}"
        )


def _slice_of(entry: dict[str, Any], key: str, where: str) -> slice:
    start, stop = _integers(entry, key, 2, where)
    if not 0 <= start <= stop:
        raise ModelFileError(f"{where}: {key} [{start}, {stop}] is not a range 0 <= start <= stop")
    return slice(start, stop)


def _integers(entry: dict[str, Any], key: str, length: int, where: str) -> tuple[int, ...]:
    """``entry[key]``: a list of ``length`` integers (JSON integers: not floats, not booleans)."""
    values = entry.get(key)
    if (
        not isinstance(values, list)
        or len(values) != length
        or not all(isinstance(v, int) and not isinstance(v, bool) and abs(v) < GEOMETRY_LIMIT for v in values)
    ):
        raise ModelFileError(f"{where}: {key} must be a list of {length} integers, got {values!r:.200}")
    return tuple(values)
