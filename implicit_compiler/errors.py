"""The error taxonomy: one base class, typed subclasses that also inherit the matching builtin.

Every message says what was expected, what was found, where (node name, op type, opset when
lowering) and what the user can do about it. Catch ``ImplicitCompilerError`` to catch them all,
or the builtin (``ValueError``, ``NotImplementedError``, ...) where that reads better.
"""

from __future__ import annotations

from collections.abc import Sequence


class ImplicitCompilerError(Exception):
    """Base class of every error raised on purpose by implicit_compiler."""


class ShapeError(ImplicitCompilerError, ValueError):
    """An array or matrix does not have the shape the model requires."""


class GraphError(ImplicitCompilerError, ValueError):
    """A network graph is malformed or uses something that cannot be lowered as given."""


class UnsupportedOpError(ImplicitCompilerError, NotImplementedError):
    """An operator (op type at an opset version) has no lowering."""


class UnsupportedAttributeError(ImplicitCompilerError, NotImplementedError):
    """An operator is supported, but not with the attribute value it was given."""


class NonFiniteError(ImplicitCompilerError, ValueError):
    """A weight or an input holds NaN or infinity."""


class ModelFileError(ImplicitCompilerError, ValueError):
    """A saved model file is truncated, corrupted, or was not written by implicit_compiler."""


class OverwriteError(ImplicitCompilerError, FileExistsError):
    """Writing would replace an existing file and overwriting was not asked for."""


class ModelTooLargeError(ImplicitCompilerError, MemoryError):
    """The lowered model (or a batch's work arrays) would not fit in memory; raised from an
    estimate before allocating, or when predicting a batch runs out of memory."""


class NotWellPosedError(ImplicitCompilerError, ValueError):
    """The equilibrium equation is not known to have a unique solution."""


class ConvergenceError(ImplicitCompilerError, RuntimeError):
    """A fixed-point iteration stopped before reaching its tolerance.

    Attributes:
        residual_history: the residual after each iteration, oldest first.
        iterations: how many iterations ran.
    """

    def __init__(self, message: str, residual_history: Sequence[float] = ()):
        super().__init__(message)
        self.residual_history = tuple(float(r) for r in residual_history)
        self.iterations = len(self.residual_history)


class ToleranceError(ImplicitCompilerError, ValueError):
    """A solver tolerance that is not positive, or below what the dtype can reach."""


class AnalysisError(ImplicitCompilerError, ValueError):
    """An analysis does not apply to the model (or input) it was given, or its result is not valid."""


class PathNotFoundError(ImplicitCompilerError, FileNotFoundError):
    """A file to read, or the folder to write a file into, does not exist."""


class PathIsDirectoryError(ImplicitCompilerError, IsADirectoryError):
    """A path names a folder where a file was expected."""


class PathPermissionError(ImplicitCompilerError, PermissionError):
    """A file cannot be written where asked: the folder does not let us create files."""


class MissingDependencyError(ImplicitCompilerError, ImportError):
    """An optional package a function needs (torch, onnxscript) is not installed; the message names
    the extra to install."""


class TorchExportError(ImplicitCompilerError, RuntimeError):
    """torch.onnx.export failed on a module (before any lowering); the exporter's own error is
    chained as ``__cause__``."""


class ArgumentTypeError(ImplicitCompilerError, TypeError):
    """An argument is of a type (or names a dtype) the function does not take."""


class ArgumentValueError(ImplicitCompilerError, ValueError):
    """An argument has the right type but a value the function cannot take (max_iter=0, samples=-1)."""
