"""Saving a model to one .npz file and reading it back, without pickle.

The file is a NumPy .npz archive holding, for each matrix M in A, B, C, D, the CSR arrays
``M_data``, ``M_indices`` and ``M_indptr`` exactly as stored (so a round trip is bit-identical),
the biases, and ``metadata``: UTF-8 JSON with a format tag, the format version, the matrix
shapes, the blocks and the input/output specs. Writing goes to a temporary file in the same
folder that is renamed into place, so a crash never leaves a half-written model behind, and an
existing file is only replaced when ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from . import __version__
from .errors import ImplicitCompilerError, ModelFileError, OverwriteError
from .model import ImplicitModel, StateBlock, TensorSpec

FORMAT_TAG = "implicit_compiler.ImplicitModel"
FORMAT_VERSION = 1
MATRICES = ("A", "B", "C", "D")


def save_model(model: ImplicitModel, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` to ``path`` (the name is used as given); return the path."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OverwriteError(f"{path} already exists; pass overwrite=True to replace it, or choose another path")
    if path.is_dir():
        raise OverwriteError(f"{path} is a directory; expected a file path such as model.npz")
    arrays: dict[str, np.ndarray] = {}
    for name in MATRICES:
        matrix = getattr(model, name)
        arrays[f"{name}_data"] = matrix.data
        arrays[f"{name}_indices"] = matrix.indices
        arrays[f"{name}_indptr"] = matrix.indptr
    arrays["bias_x"] = model.bias_x
    arrays["bias_y"] = model.bias_y
    arrays["metadata"] = np.frombuffer(json.dumps(_metadata(model)).encode("utf-8"), dtype=np.uint8)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike) -> ImplicitModel:
    """Read a model written by ``ImplicitModel.save``.

    Raises:
        FileNotFoundError: there is no such file.
        ModelFileError: the file is truncated, corrupted or not an implicit_compiler model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "metadata" not in archive.files:
                raise ModelFileError(f"{path} is a .npz archive but not an implicit_compiler model (no metadata)")
            metadata = _read_metadata(archive["metadata"], path)
            arrays = {name: archive[name] for name in archive.files if name != "metadata"}
    except ModelFileError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as error:
        raise ModelFileError(
            f"cannot read {path}: it is truncated, corrupted or not a .npz model file ({error}). "
            "Re-create it with ImplicitModel.save or implicit-compiler compile"
        ) from error
    try:
        return _model_from(metadata, arrays)
    except (KeyError, TypeError, ValueError, ImplicitCompilerError) as error:
        raise ModelFileError(f"{path} holds an inconsistent model: {error}") from error


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
