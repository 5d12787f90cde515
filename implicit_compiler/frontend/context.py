"""The lowering state: the node being lowered, the state blocks made so far, the memory budget.

Values are numpy arrays (constants, folded) or ``Affine`` expressions over [u; x]. Only
``create_block`` adds states: a block's pre-activation expression becomes its rows of [B A]
and its bias, and the value it stands for becomes a plain selection of the new states, so the
blocks are ordered by creation and A is strictly block lower triangular for a feedforward
network (nilpotent).

Forward references (a fixed point x = G(x), ``ops.fixed_point``): ``reserve_block`` takes the
columns of a block whose expression is not known yet and returns its states, which later
expressions read; ``fill_block`` (or ``move_last_block_into``) writes its rows once known. Those
rows may read the block itself and blocks made after it: A is then cyclic. The rows of blocks
made while a reservation is open wait (``_waiting``) until every block before them is written,
so that [B A] is still written in order, in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import scipy.sparse as sp

from ..activations import Activation, activation
from ..compose import typical_size
from ..errors import GraphError, ModelTooLargeError, UnsupportedAttributeError
from ..model import ImplicitModel, StateBlock, TensorSpec
from ..structure import StructuredMatrix, Term
from .expression import Affine, covers_entries

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
    """A block made while lowering (its rows of [B A] went to ``LoweringContext.rows``) and its
    bias in float64."""

    name: str
    start: int
    size: int
    activation: Activation
    shape: tuple[int, ...]
    source_node: str
    offset: np.ndarray
    known_size: float | None = None  # the states' size when known better than phi of their rows'
    filled: bool = True  # False for a reserved block whose rows are not written yet

    def typical_sizes(self, row_sizes: np.ndarray) -> np.ndarray:
        """The states' typical sizes (``variable_sizes``) from the sizes of their rows."""
        if self.known_size is not None:
            return np.full(self.size, self.known_size)
        return typical_size(self.activation, row_sizes, self.offset)


@dataclass
class LoweringContext:
    """Everything the op lowerings share: the input width p, the blocks, the current node."""

    p: int
    batched: bool
    memory_limit_bytes: float = math.inf
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float64))
    structured: bool = False  # Conv and Gemm emit structured terms (``from_onnx(structure="auto")``)
    node: NodeView | None = None
    blocks: list[_PendingBlock] = field(default_factory=list)
    rows: _RowStore | None = None  # [B A], filled block by block
    terms: list[Term] = field(default_factory=list)  # [B A]'s terms: rows of x, sources in columns of [u; x]
    expected_nonzeros: int = 0  # the estimate, to reserve room for ``rows``
    n: int = 0
    nonzeros: int = 0
    scope: dict[str, Value] = field(default_factory=dict)  # the graph's values so far (read by Loop bodies)
    dropped_outputs: set[str] = field(default_factory=set)  # graph outputs a lowering drops on purpose
    _names: set[str] = field(default_factory=set)
    _sizes: np.ndarray | None = None  # ``variable_sizes``, with room to grow
    _waiting: dict[int, sp.csr_array] = field(default_factory=dict)  # rows of blocks after a reserved one
    _written: int = 0  # blocks whose rows are in ``rows``

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
        known_size: float | None = None,
    ) -> Affine:
        """A new state block x_b = phi(pre_activation); returns the expression x_b.

        ``name`` defaults to the current node's first output; ``sample_shape`` to the value's
        shape without its batch axis. ``known_size``: the states' typical size where phi of their
        rows' sizes is far off (softmax's exp states are at most 1 whatever their rows' sizes).
        """
        unique = self._unique_name(name or (self.node.proto.output[0] if self.node is not None else "block"))
        shape = sample_shape if sample_shape is not None else self.sample_shape(pre_activation.shape)
        self.blocks.append(
            _PendingBlock(
                unique,
                self.n,
                pre_activation.size,
                activation(activation_spec),
                shape,
                self._node_name,
                pre_activation.offset,
                known_size,
            )
        )
        if self._sizes is not None:  # sizes are tracked once a product asked for them
            self._record_sizes(np.ones(pre_activation.size))
        start = self.width
        self.n += pre_activation.size
        self._write_rows(len(self.blocks) - 1, pre_activation)
        return Affine.variables(pre_activation.shape, start, self.width)

    def reserve_block(self, shape: tuple[int, ...], sample_shape: tuple[int, ...], name: str) -> tuple[int, Affine]:
        """A forward reference: the columns of a new block whose rows ``fill_block`` (or
        ``move_last_block_into``) writes later (module docstring). Returns the block's index
        and its states x_b (an expression of ``shape``)."""
        size = math.prod(shape)
        offset = np.zeros(size)
        self.blocks.append(
            _PendingBlock(
                self._unique_name(name), self.n, size, activation("identity"), sample_shape, self._node_name,
                offset, filled=False,
            )
        )  # fmt: skip
        if self._sizes is not None:
            self._record_sizes(np.ones(size))
        start = self.width
        self.n += size
        return len(self.blocks) - 1, Affine.variables(tuple(shape), start, self.width)

    def fill_block(self, index: int, pre_activation: Affine, activation_spec: str | Activation) -> None:
        """Write a reserved block's rows: x_b = phi(pre_activation), which may read x_b itself."""
        block = self.blocks[index]
        if block.filled or pre_activation.size != block.size:
            raise GraphError(
                f"block {block.name!r}: filled twice, or with {pre_activation.size} values for its {block.size}"
            )
        block.activation, block.offset, block.filled = activation(activation_spec), pre_activation.offset, True
        self._write_rows(index, pre_activation)

    def move_last_block_into(self, index: int) -> None:
        """Make the reserved block ``index`` what the last block made is (its rows, bias and
        activation), and drop that last block: nothing may read its states any more (the caller
        reads the reserved block instead)."""
        last, reserved = self.blocks[-1], self.blocks[index]
        position = len(self.blocks) - 1
        if reserved.filled or not last.filled or last.size != reserved.size or position not in self._waiting:
            raise GraphError(f"block {last.name!r} cannot stand for the reserved block {reserved.name!r}")
        rows = self._waiting.pop(position)
        shift = reserved.start - last.start
        self.terms = [
            Term(slice(t.rows.start + shift, t.rows.stop + shift), t.op) if t.rows.start >= last.start else t
            for t in self.terms
        ]
        reserved.activation, reserved.offset, reserved.known_size = last.activation, last.offset, last.known_size
        reserved.source_node, reserved.filled = last.source_node, True
        if self._sizes is not None:
            start, stop = self.p + reserved.start, self.p + reserved.start + reserved.size
            self._sizes[start:stop] = self._sizes[self.p + last.start : self.width]
        self.blocks.pop()
        self._names.discard(last.name)
        self.n -= last.size
        self._store(index, rows)

    def is_last_block(self, value: Value, since: int) -> bool:
        """Whether ``value`` is exactly the states of the last block, made after the first ``since``."""
        if not isinstance(value, Affine) or len(self.blocks) <= since or value.terms or np.any(value.offset):
            return False
        last = self.blocks[-1]
        c = value.coefficients
        columns = np.arange(self.p + last.start, self.p + last.start + last.size)
        return (
            last.filled
            and value.size == last.size
            and c.nnz == last.size
            and np.array_equal(c.indptr, np.arange(last.size + 1))
            and np.array_equal(c.indices, columns)
            and bool(np.all(c.data == 1))
        )

    def unfilled_blocks(self) -> list[str]:
        return [block.name for block in self.blocks if not block.filled]

    @property
    def _node_name(self) -> str:
        return self.node.name if self.node is not None else "input"

    def _unique_name(self, base: str) -> str:
        unique, suffix = base, 1
        while unique in self._names:
            suffix += 1
            unique = f"{base}#{suffix}"
        self._names.add(unique)
        return unique

    def _write_rows(self, index: int, pre_activation: Affine) -> None:
        """A block's pre-activation as its rows of [B A] (terms kept) and its typical sizes."""
        block = self.blocks[index]
        coefficients, terms = _storable(pre_activation, self.p)
        stored = coefficients.nnz + sum(term.op.weight.size for term in terms)
        self.charge(stored, f"state block {block.name!r}")
        self.terms.extend(_stored_term(term, block.start, self.dtype) for term in terms)
        if self._sizes is not None:
            where = slice(self.p + block.start, self.p + block.start + block.size)
            self._sizes[where] = block.typical_sizes(self.row_sizes(pre_activation))
        self._store(index, _compact(coefficients, self.dtype))

    def _store(self, index: int, rows: sp.csr_array) -> None:
        """Rows of block ``index`` into ``rows`` once every block before it is written (in order)."""
        if self.rows is None:
            self.rows = _RowStore(self.p, self.dtype, reserve=2 * self.expected_nonzeros + (1 << 20))
        self._waiting[index] = rows
        while self._written in self._waiting:
            self.rows.append(self._waiting.pop(self._written))
            self._written += 1

    def variable_sizes(self) -> np.ndarray:
        """A typical size of each variable of [u; x] so far: 1 for the inputs, and for each state
        its activation applied to the size of its pre-activation (``row_sizes``). A product of two
        values balances its operands with these (``ops.elementwise.product``).

        Only models with products need them: they are computed from the stored rows at the first
        call, then kept up to date by ``create_block`` (no cost to the other models)."""
        if self._sizes is None:
            self._sizes = self._sizes_of_stored_blocks()
        return self._sizes[: self.width]

    def row_sizes(self, expression: Affine) -> np.ndarray:
        """Per element of an expression, the 2-norm of its row [coefficients * variable sizes, offset]."""
        c = expression.coefficients
        sizes = self.variable_sizes()
        squares = sp.csr_array((c.data**2, c.indices, c.indptr), shape=c.shape) @ sizes[: c.shape[1]] ** 2
        for term in expression.terms:
            squares[term.rows] += _term_squares(term.op, sizes)
        return np.sqrt(squares + expression.offset**2)

    def _sizes_of_stored_blocks(self) -> np.ndarray:
        """``variable_sizes`` of the blocks made so far, block by block from their stored rows."""
        sizes = np.ones(self.p + max(self.n, 1024))
        if self.rows is None:
            return sizes
        B, A = self.rows.finish(self.width)
        for block in self.blocks[: self._written]:  # (the others' rows wait: their sizes stay 1)
            rows = slice(block.start, block.start + block.size)
            B_rows, A_rows = B[rows].astype(np.float64), A[rows].astype(np.float64)
            B_rows.data **= 2
            A_rows.data **= 2
            squares = B_rows.sum(axis=1) + A_rows @ sizes[self.p : self.width] ** 2 + block.offset**2
            for term in self.terms:
                if rows.start <= term.rows.start < rows.stop:
                    within = slice(term.rows.start - rows.start, term.rows.stop - rows.start)
                    squares[within] += _term_squares(term.op, sizes)
            sizes[self.p + rows.start : self.p + rows.stop] = block.typical_sizes(np.sqrt(squares))
        return sizes

    def _record_sizes(self, sizes: np.ndarray) -> None:
        """Append the sizes of a new block's states (before ``n`` grows)."""
        needed = self.width + sizes.size
        if needed > self._sizes.size:
            grown = np.ones(max(2 * self._sizes.size, needed))
            grown[: self.width] = self._sizes[: self.width]
            self._sizes = grown
        self._sizes[self.width : needed] = sizes

    def materialize(self, expression: Affine, name: str | None = None) -> Affine:
        """Keep an operand of the current node as its own identity block, named "<output>/input"
        (returns the selection of it)."""
        base = name or (self.node.proto.output[0] if self.node is not None else "value")
        return self.create_block(expression, "identity", name=f"{base}/input")

    def without_terms(self, expression: Affine) -> Affine:
        """An operand for an op that does not read structured terms: kept as an identity block
        when it carries terms (their Toeplitz rows are never built)."""
        return self.materialize(expression) if expression.has_terms else expression

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
        (each with the axis of its value that is the batch axis, or None). [B A] was written in
        place as the blocks were made (``_RowStore``): it is never copied."""
        if self.unfilled_blocks():
            raise GraphError(f"the blocks {self.unfilled_blocks()} were reserved but never written")
        width = self.width
        bias_x = np.concatenate([b.offset for b in self.blocks]) if self.blocks else np.zeros(0)
        blocks = tuple(
            StateBlock(b.name, b.start, b.start + b.size, b.activation, b.shape, b.source_node) for b in self.blocks
        )
        rows = self.rows if self.rows is not None else _RowStore(self.p, dtype, reserve=0)
        self.rows = None
        B, A = _with_terms(*rows.finish(width), self.terms, self.p)
        output_specs, output_rows, output_terms, bias_y = [], [], [], []
        first_row = 0
        for name, value, batch_axis in outputs:
            expression = as_affine(value, width)
            shape = expression.shape
            sample = shape if batch_axis is None else shape[:batch_axis] + shape[batch_axis + 1 :]
            output_specs.append(TensorSpec(name, sample))
            coefficients, terms = _storable(expression, self.p)
            output_rows.append(_compact(coefficients, dtype))
            output_terms.extend(_stored_term(term, first_row, dtype) for term in terms)
            bias_y.append(expression.offset)
            first_row += expression.size
        outputs_store = _RowStore(self.p, dtype, reserve=sum(m.nnz for m in output_rows))
        for matrix in output_rows:
            outputs_store.append(matrix)
        D, C = _with_terms(*outputs_store.finish(width), output_terms, self.p)
        return ImplicitModel(
            A=A,
            B=B,
            C=C,
            D=D,
            bias_x=bias_x.astype(dtype),
            bias_y=(np.concatenate(bias_y) if bias_y else np.zeros(0)).astype(dtype),
            blocks=blocks,
            inputs=inputs,
            outputs=tuple(output_specs),
        )


def _compact(matrix: sp.csr_array, dtype: np.dtype) -> sp.csr_array:
    """The same rows with ``dtype`` values and int32 column indices, explicit zeros dropped."""
    matrix = sp.csr_array(matrix)
    matrix.eliminate_zeros()
    compact = sp.csr_array(matrix.shape, dtype=dtype)
    compact.data = matrix.data.astype(dtype, copy=False)
    compact.indices = matrix.indices.astype(np.int32, copy=False)
    compact.indptr = matrix.indptr.astype(np.int64, copy=False)
    return compact


def _storable(expression: Affine, p: int) -> tuple[sp.csr_array, list[Term]]:
    """An expression's rows as (CSR rows, terms) that a ``StructuredMatrix`` holds: a term whose
    rectangle (rows x source) holds some of the CSR rows' entries, or that reads both inputs and
    states, is written as CSR rows (rare, and small: a residual identity reading the very
    states a convolution reads, where ``ops.elementwise.add`` did not see it coming)."""
    kept, written = [], []
    for term in expression.terms:
        source = term.op.source
        covered = covers_entries([term], expression.coefficients)
        (written if covered or source.start < p < source.stop else kept).append(term)
    if written:
        width = max(expression.width, *(term.op.source.stop for term in written))
        partial = Affine(expression.shape, expression.coefficients, expression.offset, tuple(written))
        return partial.without_terms().widen(width).coefficients, kept
    return expression.coefficients, kept


def _stored_term(term: Term, first_row: int, dtype: np.dtype) -> Term:
    """A value's term as a term of the stored rows (from ``first_row``), its kernel in ``dtype``
    (computed in float64, rounded once, as ``_compact`` rounds the CSR rows)."""
    rows = slice(term.rows.start + first_row, term.rows.stop + first_row)
    return Term(rows, replace(term.op, weight=term.op.weight.astype(dtype)))


def _with_terms(left: sp.csr_array, right: sp.csr_array, terms: list[Term], p: int):
    """([input columns], [state columns]) as ``StructuredMatrix`` when terms are stored (a term
    reading inputs goes left with its source as is, one reading states right with its source
    shifted by -p: columns of x), else the CSR matrices themselves."""
    if not terms:
        return left, right
    on_inputs = tuple(term for term in terms if term.op.source.stop <= p)
    on_states = tuple(
        Term(term.rows, replace(term.op, source=slice(term.op.source.start - p, term.op.source.stop - p)))
        for term in terms
        if term.op.source.start >= p
    )
    return StructuredMatrix(left.shape, on_inputs, left), StructuredMatrix(right.shape, on_states, right)


def _term_squares(op, sizes: np.ndarray) -> np.ndarray:
    """sum_j K_ij^2 sizes_j^2 over a term's source (sizes of the columns of [u; x])."""
    squared = replace(op, weight=np.asarray(op.weight, dtype=np.float64) ** 2)
    return squared.apply(sizes[op.source, None] ** 2).ravel()


class _RowStore:
    """Compact CSR rows appended block by block, split into the input columns [:p] (B or D)
    and the state columns [p:] (A or C), written straight into arrays reserved up front.

    Untouched pages of a reservation take no memory, so reserving twice the estimate costs
    nothing, and [B A] is built where it ends up instead of being stacked from per-block
    copies at the end (which held the model twice). Past the reservation, arrays double.
    """

    def __init__(self, p: int, dtype: np.dtype, reserve: int) -> None:
        self.p, self.dtype = p, np.dtype(dtype)
        self.parts = {side: [np.empty(reserve, self.dtype), np.empty(reserve, np.int32), 0] for side in "lr"}
        self.counts: dict[str, list[np.ndarray]] = {"l": [], "r": []}
        self.rows = 0

    def append(self, matrix: sp.csr_array) -> None:
        """Append the rows of a compact matrix (columns: [u; x] so far)."""
        left = matrix.indices < self.p
        counts_left = _row_counts_below(matrix, self.p)
        self.counts["l"].append(counts_left)
        self.counts["r"].append(np.diff(matrix.indptr) - counts_left)
        for side, chosen in (("l", left), ("r", ~left)):
            data, indices = matrix.data[chosen], matrix.indices[chosen]
            if side == "r":
                indices -= self.p
            self._write(side, data, indices)
        self.rows += matrix.shape[0]

    def _write(self, side: str, data: np.ndarray, indices: np.ndarray) -> None:
        stored_data, stored_indices, used = self.parts[side]
        if used + data.size > stored_data.size:
            size = max(2 * stored_data.size, used + data.size)
            grown_data, grown_indices = np.empty(size, self.dtype), np.empty(size, np.int32)
            grown_data[:used], grown_indices[:used] = stored_data[:used], stored_indices[:used]
            stored_data, stored_indices = grown_data, grown_indices
        stored_data[used : used + data.size], stored_indices[used : used + data.size] = data, indices
        self.parts[side] = [stored_data, stored_indices, used + data.size]

    def finish(self, width: int) -> tuple[sp.csr_array, sp.csr_array]:
        """(input-column matrix, state-column matrix), each with ``rows`` rows."""
        matrices = []
        for side, columns in (("l", self.p), ("r", width - self.p)):
            data, indices, used = self.parts[side]
            matrices.append(_csr(data[:used], indices[:used], _indptr(self.counts[side]), (self.rows, columns)))
        return matrices[0], matrices[1]


def _row_counts_below(matrix: sp.csr_array, p: int) -> np.ndarray:
    """Per row, how many column indices are below p."""
    below = np.concatenate([[0], np.cumsum(matrix.indices < p, dtype=np.int64)])
    return np.diff(below[matrix.indptr])


def _indptr(counts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.concatenate(counts)) if counts else []]).astype(np.int64)


def _csr(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]) -> sp.csr_array:
    """A CSR array from its parts without copies or checks (int32 index pointers when they fit)."""
    matrix = sp.csr_array(shape, dtype=data.dtype)
    fits = indptr[-1] <= np.iinfo(np.int32).max
    matrix.data, matrix.indices, matrix.indptr = data, indices, indptr.astype(np.int32) if fits else indptr
    return matrix


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
