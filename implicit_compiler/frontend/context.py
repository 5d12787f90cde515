"""The lowering state: the node being lowered, the state blocks made so far, the memory budget.

Values are numpy arrays (constants, folded) or ``Affine`` expressions over [u; x]. Only
``create_block`` adds states: a block's pre-activation expression becomes its rows of [B A]
and its bias, and the value it stands for becomes a plain selection of the new states, so the
blocks are ordered by creation and A is strictly block lower triangular for a feedforward
network (nilpotent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import scipy.sparse as sp

from ..activations import Activation, activation
from ..errors import GraphError, ModelTooLargeError, UnsupportedAttributeError
from ..model import ImplicitModel, StateBlock, TensorSpec
from .expression import Affine

Value = np.ndarray | Affine

# Folding a linear map into an expression that is not a plain selection may multiply the
# non-zeros (pooling then convolution): beyond this factor over materializing, keep an
# identity block instead.
FOLD_GROWTH_LIMIT = 2.0
# Bytes a non-zero costs while lowering: float64 value, int64 index, and scipy's temporaries.
BYTES_PER_NONZERO_WHILE_LOWERING = 48


@dataclass(frozen=True)
class NodeView:
    """An ONNX node with its opset, decoded attributes and a name for messages."""

    proto: onnx.NodeProto
    opset: int
    index: int

    @property
    def op_type(self) -> str:
        return self.proto.op_type

    @property
    def name(self) -> str:
        return self.proto.name or f"{self.op_type}_{self.index}"

    @property
    def where(self) -> str:
        return f"node {self.name!r} ({self.op_type}, opset {self.opset})"

    @property
    def attributes(self) -> dict[str, Any]:
        return {a.name: _attribute_value(a) for a in self.proto.attribute}

    def attr(self, name: str, default: Any = None) -> Any:
        for attribute in self.proto.attribute:
            if attribute.name == name:
                return _attribute_value(attribute)
        return default

    def unsupported(self, name: str, value: Any, remedy: str) -> UnsupportedAttributeError:
        """An error for an attribute value this lowering does not handle."""
        return UnsupportedAttributeError(f"{self.where}: attribute {name}={value!r} is not supported; {remedy}")


def _attribute_value(attribute: onnx.AttributeProto) -> Any:
    value = onnx.helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8") for v in value]
    return value


@dataclass
class _PendingBlock:
    name: str
    start: int
    activation: Activation
    shape: tuple[int, ...]
    source_node: str
    pre_activation: Affine


@dataclass
class LoweringContext:
    """Everything the op lowerings share: the input width p, the blocks, the current node."""

    p: int
    batched: bool
    memory_limit_bytes: float = math.inf
    node: NodeView | None = None
    blocks: list[_PendingBlock] = field(default_factory=list)
    n: int = 0
    nonzeros: int = 0
    _names: set[str] = field(default_factory=set)

    @property
    def width(self) -> int:
        """Columns of [u; x] so far."""
        return self.p + self.n

    # ----------------------------------------------------------------------------- states
    def create_block(
        self,
        pre_activation: Affine,
        activation_spec: str | Activation,
        name: str | None = None,
        sample_shape: tuple[int, ...] | None = None,
    ) -> Affine:
        """A new state block x_b = phi(pre_activation); returns the expression x_b.

        ``name`` defaults to the current node's first output; ``sample_shape`` to the value's
        shape without its batch axis.
        """
        node_name = self.node.name if self.node is not None else "input"
        base = name or (self.node.proto.output[0] if self.node is not None else "block")
        unique = base
        suffix = 1
        while unique in self._names:
            suffix += 1
            unique = f"{base}#{suffix}"
        self._names.add(unique)
        shape = sample_shape if sample_shape is not None else self.sample_shape(pre_activation.shape)
        self.charge(pre_activation.coefficients.nnz, f"state block {unique!r}")
        self.blocks.append(_PendingBlock(unique, self.n, activation(activation_spec), shape, node_name, pre_activation))
        start = self.width
        self.n += pre_activation.size
        return Affine.variables(pre_activation.shape, start, self.width)

    def materialize(self, expression: Affine, name: str | None = None) -> Affine:
        """Keep an operand of the current node as its own identity block, named "<output>/input"
        (returns the selection of it)."""
        base = name or (self.node.proto.output[0] if self.node is not None else "value")
        return self.create_block(expression, "identity", name=f"{base}/input")

    def sample_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A value's per-sample shape: without the leading batch axis where there is one."""
        return tuple(shape[1:]) if self.batched and shape and shape[0] == 1 else tuple(shape)

    # ----------------------------------------------------------------------------- linear maps
    def apply_map(
        self, expression: Affine, matrix: sp.csr_array, shape: tuple[int, ...], offset: np.ndarray | None = None
    ) -> Affine:
        """T applied to an expression; keeps the operand as an identity block when folding T
        into it would multiply the non-zeros (see ``FOLD_GROWTH_LIMIT``)."""
        matrix = sp.csr_array(matrix)
        if not expression.is_selection:
            folded = expression.map_nnz_estimate(matrix)
            kept = matrix.nnz + expression.coefficients.nnz
            if folded > FOLD_GROWTH_LIMIT * kept:
                expression = self.materialize(expression)
        return expression.map(matrix, shape, offset)

    # ----------------------------------------------------------------------------- memory
    def charge(self, nonzeros: int, what: str) -> None:
        """Account for non-zeros now stored; refuse before going past the memory limit."""
        self.ensure_fits(nonzeros, what)
        self.nonzeros += int(nonzeros)

    def ensure_fits(self, nonzeros: int, what: str) -> None:
        """Raise ModelTooLargeError, before allocating, if ``nonzeros`` more would not fit."""
        total = self.nonzeros + int(nonzeros)
        needed = total * BYTES_PER_NONZERO_WHILE_LOWERING
        if needed > self.memory_limit_bytes:
            where = f" at {self.node.where}" if self.node is not None else ""
            raise ModelTooLargeError(
                f"lowering would hold about {total / 1e6:,.1f}M non-zeros by {what}{where}, needing "
                f"~{needed / 2**30:,.1f} GiB while lowering, over the {self.memory_limit_bytes / 2**30:,.1f} GiB "
                "limit; use a smaller input resolution or a machine with more memory"
            )

    # ----------------------------------------------------------------------------- assembly
    def assemble(
        self,
        inputs: tuple[TensorSpec, ...],
        outputs: list[tuple[str, Value, int | None]],
        dtype: np.dtype,
    ) -> ImplicitModel:
        """The ImplicitModel: [B A] and b_x from the blocks, [D C] and b_y from the outputs
        (each with the axis of its value that is the batch axis, or None)."""
        width = self.width
        B, A = _stack_split([b.pre_activation.widen(width).coefficients for b in self.blocks], self.p, width)
        bias_x = np.concatenate([b.pre_activation.offset for b in self.blocks]) if self.blocks else np.zeros(0)
        output_specs, output_rows, bias_y = [], [], []
        for name, value, batch_axis in outputs:
            expression = as_affine(value, width)
            shape = expression.shape
            sample = shape if batch_axis is None else shape[:batch_axis] + shape[batch_axis + 1 :]
            output_specs.append(TensorSpec(name, sample))
            output_rows.append(expression.widen(width).coefficients)
            bias_y.append(expression.offset)
        D, C = _stack_split(output_rows, self.p, width)
        blocks = tuple(
            StateBlock(b.name, b.start, b.start + b.pre_activation.size, b.activation, b.shape, b.source_node)
            for b in self.blocks
        )
        return ImplicitModel(
            A=A,
            B=B,
            C=C,
            D=D,
            bias_x=bias_x,
            bias_y=np.concatenate(bias_y) if bias_y else np.zeros(0),
            blocks=blocks,
            inputs=inputs,
            outputs=tuple(output_specs),
        ).astype(dtype)


def _split_columns(matrix: sp.csr_array, p: int) -> tuple[sp.csr_array, sp.csr_array]:
    """(matrix[:, :p], matrix[:, p:]) by masking the index arrays (scipy's column slicing is
    several times slower); most blocks read no input column and skip the masking."""
    rows, width = matrix.shape
    indices = matrix.indices
    if indices.size == 0 or indices.min() >= p:
        right = sp.csr_array((matrix.data, indices - p, matrix.indptr), shape=(rows, width - p))
        return sp.csr_array((rows, p)), right
    in_left = indices < p
    left_indptr = np.concatenate([[0], np.cumsum(in_left)])[matrix.indptr]
    left = sp.csr_array((matrix.data[in_left], indices[in_left], left_indptr), shape=(rows, p))
    in_right = ~in_left
    right_indptr = matrix.indptr - left_indptr
    right = sp.csr_array((matrix.data[in_right], indices[in_right] - p, right_indptr), shape=(rows, width - p))
    return left, right


def _stack_split(matrices: list[sp.csr_array], p: int, width: int) -> tuple[sp.csr_array, sp.csr_array]:
    """Row-stack expressions' coefficient matrices, split into their input and state columns."""
    if not matrices:
        return sp.csr_array((0, p)), sp.csr_array((0, width - p))
    parts = [_split_columns(matrix, p) for matrix in matrices]
    left = sp.csr_array(sp.vstack([part[0] for part in parts], format="csr"))
    right = sp.csr_array(sp.vstack([part[1] for part in parts], format="csr"))
    left.eliminate_zeros()
    right.eliminate_zeros()
    return left, right


def as_affine(value: Value, width: int) -> Affine:
    """An expression for a value; a constant becomes zero coefficients plus an offset."""
    if isinstance(value, Affine):
        return value
    array = np.asarray(value, dtype=np.float64)
    return Affine(array.shape, sp.csr_array((array.size, width)), array.ravel().copy())


def require_constant(value: Value | None, node: NodeView, what: str) -> np.ndarray:
    """The constant behind an operand that must be known when compiling (weights, shapes)."""
    if value is None:
        raise GraphError(f"{node.where}: {what} is missing")
    if isinstance(value, Affine):
        raise GraphError(
            f"{node.where}: {what} depends on the model input, but it must be a constant (an initializer "
            "or computed from constants). If it is a weight fed as a runtime input, store it as an "
            "initializer (e.g. export with the parameters as constants)"
        )
    return value
