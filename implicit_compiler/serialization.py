"""Saving a model to one .npz file and reading it back, without pickle.

The file is a NumPy .npz archive holding, for each matrix M in A, B, C, D, the CSR arrays
``M_data``, ``M_indices`` and ``M_indptr`` exactly as stored (so a round trip is bit-identical),
the biases, and ``metadata``: UTF-8 JSON with a format tag, the format version, the matrix
shapes, the blocks and the input/output specs. Writing goes to a temporary file in the same
folder that is renamed into place, so a crash never leaves a half-written model behind, and an
existing file is only replaced when ``overwrite=True`` (``write_file``, also used by the command
line for its .npy outputs: a symbolic link counts as an existing file, even one whose target does
not exist; with ``overwrite=True`` the link is followed and the file it points at is written, as
``open(path, "w")`` would; the file gets the permissions ``open`` would give it).
"""

from __future__ import annotations

import json
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
from .model import ImplicitModel, StateBlock, TensorSpec

FORMAT_TAG = "implicit_compiler.ImplicitModel"
FORMAT_VERSION = 1
MATRICES = ("A", "B", "C", "D")
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip
# What a damaged archive raises from numpy or zipfile: a bad header, a bad CRC, a compression
# method zipfile does not know (NotImplementedError), a broken deflate stream, a short read.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError, RuntimeError)


def save_model(model: ImplicitModel, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` to ``path`` (the name is used as given); return the path."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for name in MATRICES:
        matrix = getattr(model, name)
        arrays[f"{name}_data"] = matrix.data
        arrays[f"{name}_indices"] = matrix.indices
        arrays[f"{name}_indptr"] = matrix.indptr
    arrays["bias_x"] = model.bias_x
    arrays["bias_y"] = model.bias_y
    arrays["metadata"] = np.frombuffer(json.dumps(_metadata(model)).encode("utf-8"), dtype=np.uint8)
    write_file(path, lambda stream: np.savez(stream, **arrays), overwrite)
    return path


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


def _metadata(model: ImplicitModel) -> dict[str, Any]:
    return {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "written_by": f"implicit_compiler {__version__}",
        "shapes": {name: list(getattr(model, name).shape) for name in MATRICES},
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


def _read_metadata(raw: np.ndarray, path: Path) -> dict[str, Any]:
    try:
        metadata = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path}: its metadata is not valid JSON ({error}); the file is corrupted") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_TAG:
        raise ModelFileError(f"{path} is a .npz archive but not an implicit_compiler model (format tag missing)")
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} uses model format version {version!r}; this implicit_compiler reads versions up "
            f"to {FORMAT_VERSION}: upgrade implicit_compiler"
        )
    return metadata


def _model_from(metadata: dict[str, Any], arrays: dict[str, np.ndarray]) -> ImplicitModel:
    matrices = []
    for name in MATRICES:
        matrix = sp.csr_array(
            (arrays[f"{name}_data"], arrays[f"{name}_indices"], arrays[f"{name}_indptr"]),
            shape=tuple(metadata["shapes"][name]),
        )
        matrix.check_format(full_check=True)
        matrices.append(matrix)
    blocks = tuple(
        StateBlock(b["name"], b["start"], b["stop"], b["activation"], tuple(b["shape"]), b["source_node"])
        for b in metadata["blocks"]
    )
    inputs = tuple(TensorSpec(s["name"], tuple(s["shape"])) for s in metadata["inputs"])
    outputs = tuple(TensorSpec(s["name"], tuple(s["shape"])) for s in metadata["outputs"])
    return ImplicitModel(*matrices, arrays["bias_x"], arrays["bias_y"], blocks, inputs, outputs)
