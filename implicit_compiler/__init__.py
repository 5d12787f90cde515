"""implicit_compiler: compile neural networks into implicit models.

An implicit model predicts y from u through x = phi(A x + B u + b_x), y = C x + D u + b_y,
with sparse A, B, C, D and a componentwise activation phi.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .activations import Activation, activation
from .compose import add, cascade, feedback, multiply, parallel
from .errors import (
    AnalysisError,
    ArgumentTypeError,
    ArgumentValueError,
    ConvergenceError,
    GraphError,
    ImplicitCompilerError,
    MissingDependencyError,
    ModelFileError,
    ModelTooLargeError,
    NonFiniteError,
    NotWellPosedError,
    OverwriteError,
    PathIsDirectoryError,
    PathNotFoundError,
    PathPermissionError,
    ShapeError,
    ToleranceError,
    TorchExportError,
    UnsupportedAttributeError,
    UnsupportedOpError,
)
from .model import ImplicitModel, StateBlock, TensorSpec
from .runtime import Solution
from .serialization import load


def __getattr__(name: str):
    """The ONNX frontend loads lazily: ``import implicit_compiler`` stays light."""
    if name in ("from_onnx", "verify", "VerifyReport", "supported_ops_table"):
        from . import frontend

        return getattr(frontend, name)
    if name == "from_torch":  # torch itself is imported on the first call
        from .frontend.torch_export import from_torch

        return from_torch
    raise AttributeError(f"module 'implicit_compiler' has no attribute {name!r}")


__all__ = [
    "Activation",
    "AnalysisError",
    "ArgumentTypeError",
    "ArgumentValueError",
    "ConvergenceError",
    "GraphError",
    "ImplicitCompilerError",
    "ImplicitModel",
    "MissingDependencyError",
    "ModelFileError",
    "ModelTooLargeError",
    "NonFiniteError",
    "NotWellPosedError",
    "OverwriteError",
    "PathIsDirectoryError",
    "PathNotFoundError",
    "PathPermissionError",
    "ShapeError",
    "Solution",
    "StateBlock",
    "TensorSpec",
    "ToleranceError",
    "TorchExportError",
    "UnsupportedAttributeError",
    "UnsupportedOpError",
    "VerifyReport",
    "__version__",
    "activation",
    "add",
    "cascade",
    "feedback",
    "multiply",
    "parallel",
    "from_onnx",
    "from_torch",
    "load",
    "supported_ops_table",
    "verify",
]
