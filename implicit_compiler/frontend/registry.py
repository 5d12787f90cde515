"""The op registry: lowerings keyed by (op_type, since_version) of the default ONNX domain.

A node is lowered by the function registered for the ``since_version`` of its op's schema at
the model's opset (``onnx.defs.get_schema(op, max_inclusive_version=opset)``), as onnx2torch
does. The lowerings were written against the schemas up to ``LOWERED_THROUGH_OPSET``; a newer
opset is accepted wherever its ops' schemas are ones we lower (most ops do not change from one
opset to the next), and an op whose schema changed after that is refused naming its version.
Each lowering declares the attributes it understands; any other attribute on a node is
refused with UnsupportedAttributeError rather than silently ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import onnx.defs

from ..errors import UnsupportedOpError

# Newest opset whose schemas were lowered and tested: lowerings register the since_versions up
# to it. Models of later opsets compile when none of their ops changed since. Raising it
# registers every lowering for the newer schemas of its op: read each one's changes first
# (tests/test_modern_opsets.py lists the ops that changed after 25 and how each is handled).
LOWERED_THROUGH_OPSET = 28
# Ops whose lowerings read expressions carrying structured terms (``expression.Affine.terms``):
# they keep, fold or merge the terms, or store them as state rows (activations). Any other op
# gets such an operand as an identity block first (``lower._lower_node``), so that pooling, Pad,
# Transpose... never see terms. (Concat keeps them for stacked channels, the activations store
# them: every activation lowering goes through ``LoweringContext.create_block``.)
STRUCTURED_OPS = frozenset(
    {
        "Conv", "Gemm", "MatMul", "BatchNormalization", "Add", "Sub", "Mul", "Div", "Neg", "Sum",
        "Reshape", "Flatten", "Identity", "Dropout", "Squeeze", "Unsqueeze", "Concat",
        "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "Abs", "Exp", "Log", "Sqrt", "Reciprocal",
        "Erf", "Softplus", "Softsign", "HardSwish", "HardSigmoid", "Mish", "Gelu", "Elu", "Selu", "Celu",
        "Swish", "ThresholdedRelu", "Silu",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Lowering:
    """One registered lowering function."""

    op_type: str
    since_version: int
    function: Callable
    attributes: frozenset[str] | None  # None: any attribute (ops that are only ever folded)
    module: str
    check: Callable | None = None  # check(node) raises for attribute values refused; run before lowering

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.function) or ""
        return doc.splitlines()[0] if doc else ""


REGISTRY: dict[tuple[str, int], Lowering] = {}
# The private domain of the ops frontend.patterns folds exporters' decompositions into, and their
# lowerings by op name (filled by that module).
PATTERN_DOMAIN = "ai.implicit_compiler.patterns"
PATTERN_LOWERINGS: dict[str, Lowering] = {}


def since_versions(op_type: str) -> list[int]:
    """Every since_version of the op's schema in the default domain, up to LOWERED_THROUGH_OPSET."""
    versions = {
        schema.since_version
        for schema in onnx.defs.get_all_schemas_with_history()
        if schema.name == op_type and schema.domain == "" and schema.since_version <= LOWERED_THROUGH_OPSET
    }
    if not versions:
        raise ValueError(f"{op_type} is not an ONNX operator")
    return sorted(versions)


def lowers(
    op_type: str,
    attributes: Iterable[str] | None = (),
    since: Iterable[int] | None = None,
    check: Callable | None = None,
) -> Callable:
    """Register the decorated function as the lowering of ``op_type`` (all versions by default).

    ``attributes`` lists the attributes the lowering understands (None: any, for ops that are
    only evaluated on constants by the reference evaluator). ``check(node)``, if given, raises
    for the attribute values (or outputs) the lowering refuses; from_onnx runs it on every node
    before lowering any, so that a refusal at the last node does not come after minutes of work.
    """

    def register(function: Callable) -> Callable:
        for version in since if since is not None else since_versions(op_type):
            key = (op_type, version)
            if key in REGISTRY:
                raise ValueError(f"{op_type} version {version} is registered twice")
            accepted = None if attributes is None else frozenset(attributes)
            REGISTRY[key] = Lowering(op_type, version, function, accepted, function.__module__, check)
        return function

    return register


def find_lowering(op_type: str, domain: str, opset: int, where: str) -> Lowering:
    """The lowering for an op at an opset, or UnsupportedOpError saying why there is none."""
    if domain == PATTERN_DOMAIN and op_type in PATTERN_LOWERINGS:
        return PATTERN_LOWERINGS[op_type]
    if domain not in ("", "ai.onnx"):
        raise UnsupportedOpError(
            f"{where}: operators of domain {domain!r} are not supported; only the default ONNX domain is"
        )
    newest_known = onnx.defs.onnx_opset_version()
    if opset > newest_known:
        raise UnsupportedOpError(
            f"{where}: opset {opset} is newer than the newest supported ({newest_known}, the newest the installed "
            f"onnx knows); convert the model with onnx.version_converter.convert_version(model, {newest_known}) "
            "or upgrade onnx"
        )
    try:
        schema = onnx.defs.get_schema(op_type, max_inclusive_version=opset, domain="")
    except onnx.defs.SchemaError:
        raise UnsupportedOpError(f"{where}: {op_type!r} is not an ONNX operator at opset {opset}") from None
    lowering = REGISTRY.get((op_type, schema.since_version))
    if lowering is None:
        raise UnsupportedOpError(f"{where}: {_missing_lowering(op_type, schema.since_version, opset)}")
    return lowering


def _missing_lowering(op_type: str, version: int, opset: int) -> str:
    """Why there is no lowering for version ``version`` of an op, and what to do."""
    known = sorted(v for op, v in REGISTRY if op == op_type)
    if known and version > known[-1]:
        return (
            f"{op_type} changed in opset {version} (the model's opset is {opset}), after the newest version "
            f"lowered ({known[-1]}); convert the model to opset {version - 1} or older with "
            f"onnx.version_converter.convert_version"
        )
    if known:
        hint = f"versions {known} of it are supported: convert the model to one of those opsets"
    else:
        hint = f"supported ops: {', '.join(sorted({op for op, _ in REGISTRY}))}"
    return f"{op_type} (version {version}) has no lowering to an implicit model; {hint}"


def supported_ops_table() -> str:
    """A markdown table of the supported ops, their versions and lowering modules."""
    by_op: dict[str, list[Lowering]] = {}
    for lowering in REGISTRY.values():
        by_op.setdefault(lowering.op_type, []).append(lowering)
    lines = ["| op | since versions | module | lowering |", "| --- | --- | --- | --- |"]
    for op_type in sorted(by_op):
        entries = sorted(by_op[op_type], key=lambda lowering: lowering.since_version)
        versions = ", ".join(str(e.since_version) for e in entries)
        module = entries[-1].module.rsplit(".", 1)[-1]
        lines.append(f"| {op_type} | {versions} | {module} | {entries[-1].summary} |")
    return "\n".join(lines)
