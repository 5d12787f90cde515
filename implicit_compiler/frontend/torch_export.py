"""``from_torch``: a torch module exported to ONNX in memory, then compiled by ``from_onnx``.

torch is optional (``pip install 'implicit_compiler[torch]'``, pinned): it is imported here, on
first use. The export runs in eval mode (the module's modes are restored afterwards), writes no
file (the legacy exporter writes into a buffer; the dynamo exporter returns the model, and any
report it writes goes to a private temporary folder that is removed) and leaves the batch axis
dynamic, so the compiled model takes any batch size. A failing export raises
``TorchExportError``; errors of the lowering that follows are ``from_onnx``'s, unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import onnx

from ..arguments import choice, integer
from ..errors import ArgumentTypeError, ArgumentValueError, MissingDependencyError, TorchExportError
from ..model import ImplicitModel
from .lower import from_onnx

EXPORTERS = ("dynamo", "legacy")
INSTALL_TORCH = "pip install 'implicit_compiler[torch]'"
BATCH_NAME = "batch"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # the dynamo exporter colours its messages
# Arguments from_torch sets itself: export_options may not replace them.
_RESERVED_EXPORT_OPTIONS = ("model", "args", "f", "dynamo")


def from_torch(
    module: Any,
    example_inputs: Any = None,
    *,
    exporter: str = "dynamo",
    batch_axis: int | None = 0,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int | None = None,
    export_options: Mapping[str, Any] | None = None,
    **from_onnx_options: Any,
) -> ImplicitModel:
    """Compile a torch ``nn.Module``: export it with ``torch.onnx.export`` in memory, then ``from_onnx``.

    Args:
        module: a ``torch.nn.Module``. An ``implicit_compiler.training.ImplicitModule`` is not
            exported: the model it holds is returned (``module.to_model()``, as
            ``ImplicitModel.from_torch``), in ``dtype`` when given; example_inputs and the export
            arguments are not used, and other from_onnx options are refused.
        example_inputs: a tensor, or a tuple of tensors (one per positional argument of
            ``forward``), that the module runs on; their dtype is the export's (``module.double()``
            with float64 inputs keeps float64 weights).
        exporter: "dynamo" (``torch.onnx.export(dynamo=True)``, needs onnxscript) or "legacy"
            (the TorchScript exporter, ``dynamo=False``).
        batch_axis: the axis of every input left dynamic in the export, so that the model takes
            any batch size (1 for a sequence-first RNN's (seq, batch, features)); None exports
            the example's shapes as they are (then see from_onnx's batch convention). ``predict``
            takes the batch on the leading axis whichever axis it is here.
        input_names, output_names: names of the model's inputs and outputs (default: the
            names of ``forward``'s arguments; "output", or "output_0", "output_1", ... for a
            tuple of outputs), the keys of ``predict``'s dicts.
        opset: the ONNX opset to export (default: the exporter's).
        export_options: more keyword arguments of ``torch.onnx.export`` (e.g. ``{"optimize":
            False}``); they replace the ones set here.
        **from_onnx_options: passed to ``from_onnx``: dtype, structure, input_shapes,
            memory_limit_bytes, progress.

    Raises:
        MissingDependencyError: torch (or onnxscript, for the dynamo exporter) is not installed.
        TorchExportError: the export itself failed (the exporter's error is chained).
        ArgumentTypeError, ArgumentValueError: an argument of the wrong type or value.
        Any error of ``from_onnx`` (UnsupportedOpError, ...): the exported graph does not lower.
    """
    _check_from_onnx_options(from_onnx_options)
    torch = _import_torch()
    from ..training.torch_bridge import ImplicitModule

    if isinstance(module, ImplicitModule):
        return _held_model(module, from_onnx_options)
    if not isinstance(module, torch.nn.Module):
        raise ArgumentTypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    exporter = choice(exporter, EXPORTERS, "exporter")
    if exporter == "dynamo":
        _require_onnxscript()
    inputs = _example_tuple(torch, example_inputs)
    if batch_axis is not None:
        batch_axis = integer(batch_axis, "batch_axis", 0)
    options = _export_options(export_options)
    names = list(input_names) if input_names is not None else _argument_names(module, len(inputs))
    proto = _exported(torch, module, inputs, exporter, batch_axis, names, output_names, opset, options)
    return from_onnx(proto, **from_onnx_options)


def _check_from_onnx_options(options: Mapping[str, Any]) -> None:
    """Only from_onnx's own keyword arguments pass through; others are refused before exporting."""
    known = [name for name in inspect.signature(from_onnx).parameters if name != "model"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ArgumentTypeError(
            f"from_torch got unexpected options {unknown}: it passes on only from_onnx's ({', '.join(known)}); "
            "give options of torch.onnx.export as export_options={...}"
        )


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as error:
        raise MissingDependencyError(
            f"from_torch needs torch, which is not installed ({error}): {INSTALL_TORCH} (torch pinned to the "
            "version this package is tested with, and onnxscript for the dynamo exporter)"
        ) from error
    return torch


def _require_onnxscript() -> None:
    try:
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise MissingDependencyError(
            f"the dynamo exporter (torch.onnx.export(dynamo=True)) needs onnxscript, which is not installed "
            f"({error}): {INSTALL_TORCH}, or pass exporter='legacy'"
        ) from error


def _held_model(module: Any, options: Mapping[str, Any]) -> ImplicitModel:
    """An ImplicitModule already is an implicit model: its weights, in ``dtype`` when given."""
    other = sorted(set(options) - {"dtype"})
    if other:
        raise ArgumentValueError(
            f"module is an ImplicitModule, which is converted as it is (module.to_model()), not exported and "
            f"lowered: the options {other} do not apply to it (only dtype does)"
        )
    model = module.to_model()
    return model.astype(options["dtype"]) if "dtype" in options else model


def _example_tuple(torch: Any, example_inputs: Any) -> tuple:
    """The example inputs as a tuple of tensors (one tensor is a tuple of one)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        if not example_inputs:
            raise ArgumentValueError("example_inputs is empty: give one tensor per positional argument of forward")
        return tuple(example_inputs)
    found = "nothing" if example_inputs is None else type(example_inputs).__name__
    raise ArgumentTypeError(
        f"example_inputs must be a torch.Tensor or a tuple of tensors (one per positional argument of the "
        f"module's forward) to export the module with, got {found}"
    )


def _export_options(export_options: Any) -> dict[str, Any]:
    if export_options is None:
        return {}
    if not isinstance(export_options, Mapping):
        raise ArgumentTypeError(
            f"export_options must be a dict of torch.onnx.export keyword arguments, got {type(export_options).__name__}"
        )
    reserved = sorted(set(export_options) & set(_RESERVED_EXPORT_OPTIONS))
    if reserved:
        raise ArgumentValueError(
            f"export_options may not set {reserved}: from_torch passes the module, the example inputs and the "
            "exporter itself (choose it with exporter='dynamo' or 'legacy')"
        )
    return dict(export_options)


def _argument_names(module: Any, count: int) -> list[str]:
    """The names of ``forward``'s first ``count`` positional arguments ("input_<i>" past them)."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # a forward without a signature
        parameters = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in parameters if p.kind in positional][:count]
    return names + [f"input_{i}" for i in range(len(names), count)]


def _default_output_names(torch: Any, module: Any, inputs: tuple) -> list[str] | None:
    """ "output" for one tensor, "output_<i>" for a tuple of tensors; None (the exporter's names)
    for any other structure."""
    with torch.no_grad():
        outputs = module(*inputs)
    if isinstance(outputs, torch.Tensor):
        return ["output"]
    if isinstance(outputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in outputs):
        return [f"output_{i}" for i in range(len(outputs))]
    return None


def _exported(
    torch: Any,
    module: Any,
    inputs: tuple,
    exporter: str,
    batch_axis: int | None,
    input_names: list[str],
    output_names: Sequence[str] | None,
    opset: int | None,
    options: dict[str, Any],
) -> onnx.ModelProto:
    """The module exported in eval mode, as a ModelProto; any failure is a TorchExportError."""
    batched = [batch_axis is not None and t.dim() > batch_axis for t in inputs]
    with _eval_mode(module), _quiet_export(torch), tempfile.TemporaryDirectory(prefix="implicit_compiler_") as scratch:
        try:
            if output_names is None:
                output_names = _default_output_names(torch, module, inputs)
            common = {"input_names": input_names, "output_names": output_names, "opset_version": opset}
            if exporter == "legacy":
                dynamic_axes = {name: {batch_axis: BATCH_NAME} for name, b in zip(input_names, batched) if b}
                return _legacy(torch, module, inputs, {**common, "dynamic_axes": dynamic_axes, **options})
            batch = torch.export.Dim(BATCH_NAME)
            dynamic_shapes = tuple({batch_axis: batch} if b else None for b in batched) if any(batched) else None
            dynamo = {"dynamic_shapes": dynamic_shapes, "artifacts_dir": scratch, "verbose": False}
            return _dynamo(torch, module, inputs, {**common, **dynamo, **options})
        except Exception as error:
            raise TorchExportError(_export_failure(module, exporter, error)) from error


def _legacy(torch: Any, module: Any, inputs: tuple, options: dict[str, Any]) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(module, inputs, buffer, dynamo=False, **options)
    return onnx.load_model_from_string(buffer.getvalue())


def _dynamo(torch: Any, module: Any, inputs: tuple, options: dict[str, Any]) -> onnx.ModelProto:
    program = torch.onnx.export(module, inputs, None, dynamo=True, **{"external_data": False, **options})
    return program.model_proto


def _export_failure(module: Any, exporter: str, error: BaseException) -> str:
    """What failed, with the first line of the innermost error (the dynamo exporter wraps the
    torch.export error that says what in the module it could not trace)."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    lines = _ANSI_ESCAPE.sub("", str(root)).strip().splitlines() or [""]
    first = lines[0] if len(lines[0]) <= 500 else lines[0][:500] + " ..."
    other = "legacy" if exporter == "dynamo" else "dynamo"
    return (
        f"torch.onnx.export ({exporter} exporter) failed on {type(module).__name__}, before any lowering: "
        f"{type(root).__name__}: {first} (the exporter's full error is chained). Check that the module runs on "
        f"example_inputs, or try exporter={other!r}"
    )


@contextlib.contextmanager
def _eval_mode(module: Any):
    """The module and its submodules in eval mode; each one's own mode restored afterwards."""
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


@contextlib.contextmanager
def _quiet_export(torch: Any):
    """Without the exporters' notes that say nothing about the compiled model, all from torch's
    own code: the legacy exporter's deprecation notes, its TracerWarnings on torch's shape checks
    (those on the module's own code are kept: a Python branch on the input's values is traced as
    a constant), its warning that an RNN exported at a batch size other than 1 may fail at
    another (its initial states are computed from the dynamic batch axis; the model is lowered
    per sample anyway, and the tests predict other batches); torch's internal FutureWarnings,
    "torchvision is not installed", the dynamo exporter's notes that an RNN's ``_flat_weights``
    "were assigned during export" (they end up as initializers) and that two inputs' batch axes
    share one name."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torch\.")
            warnings.filterwarnings("ignore", message=".*batch_size other than 1.*", category=UserWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            warnings.filterwarnings("ignore", message=".*_check_is_size will be removed.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*were assigned during export.*", category=UserWarning)
            warnings.filterwarnings("ignore", message=f".*axis name: {BATCH_NAME} will not be used.*")
            yield
    finally:
        onnx_logger.setLevel(level)
